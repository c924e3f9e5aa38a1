"""What one task's evaluation is: its metric's name and a :class:`TaskScore` record.

The metrics themselves are computed in :mod:`mergebench.evaluation.metrics`; suites name them, the
store keeps them and reports label them, so the names and the record live here, below all of those.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ACCURACY, MATTHEWS, SPEARMAN = "accuracy", "matthews_correlation", "spearman"
METRIC_LABELS = {ACCURACY: "acc.", MATTHEWS: "MCC", SPEARMAN: "Spearman"}
"""The metrics a task can name, with the short label tables print beside a task scored otherwise than by accuracy."""


class PerExample(NamedTuple):
    """What each evaluated example contributed, so that intervals can resample examples: for accuracy
    whether each example was right (``values`` bool); for a correlation metric each prediction
    (``values``) and its label (``labels``), from which the metric is recomputed on a resample."""

    values: np.ndarray
    labels: np.ndarray | None = None


class TaskScore(NamedTuple):
    """One task's evaluation: arg-max ``correct`` of ``total`` examples, and the task's ``metric`` ``score``.

    ``correct`` counts arg-max predictions equal to the label (0 for a regression task, which has no
    classes); ``score`` is what tables show, averages and normalizes; ``examples``, where known, what
    each example contributed (:class:`PerExample`).
    """

    correct: int
    total: int
    score: float
    metric: str = ACCURACY
    examples: PerExample | None = None

    @classmethod
    def of_correct(cls, correct: np.ndarray) -> "TaskScore":
        """The accuracy score of a boolean per-example vector of right answers."""
        correct = np.asarray(correct, dtype=bool)
        return cls(int(correct.sum()), len(correct), float(correct.mean()) if len(correct) else 0.0, ACCURACY, PerExample(correct))

    @classmethod
    def of(cls, outcome: "TaskScore | tuple[int, int]") -> "TaskScore":
        """``outcome`` itself, or the accuracy score of a ``(correct, total)`` pair."""
        if isinstance(outcome, cls):
            return outcome
        correct, total = outcome
        return cls(correct, total, correct / total)

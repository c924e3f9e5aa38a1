"""What one task's evaluation is: its metric's name and a :class:`TaskScore` record.

The metrics themselves are computed in :mod:`mergebench.evaluation.metrics`; suites name them, the
store keeps them and reports label them, so the names and the record live here, below all of those.
"""

from __future__ import annotations

from typing import NamedTuple

ACCURACY, MATTHEWS, SPEARMAN = "accuracy", "matthews_correlation", "spearman"
METRIC_LABELS = {ACCURACY: "acc.", MATTHEWS: "MCC", SPEARMAN: "Spearman"}
"""The metrics a task can name, with the short label tables print beside a task scored otherwise than by accuracy."""


class TaskScore(NamedTuple):
    """One task's evaluation: arg-max ``correct`` of ``total`` examples, and the task's ``metric`` ``score``.

    ``correct`` counts arg-max predictions equal to the label (0 for a regression task, which has no
    classes); ``score`` is what tables show, averages and normalizes.
    """

    correct: int
    total: int
    score: float
    metric: str = ACCURACY

    @classmethod
    def of(cls, outcome: "TaskScore | tuple[int, int]") -> "TaskScore":
        """``outcome`` itself, or the accuracy score of a ``(correct, total)`` pair."""
        if isinstance(outcome, cls):
            return outcome
        correct, total = outcome
        return cls(correct, total, correct / total)

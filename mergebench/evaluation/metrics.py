"""Scores of the model-merging literature: per-task metrics, their mean and normalized score.

A task is scored by its own metric (GLUE's: Matthews correlation for CoLA, Spearman's ρ for STS-B,
accuracy elsewhere; Wang et al., 2019, and the ``evaluate`` library's ``glue`` metric that DARE's and
EMR-Merging's code call). Every metric is a fraction in [-1, 1] (accuracy in [0, 1]) and is stored,
averaged and normalized the same way.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mergebench.core.scores import ACCURACY, MATTHEWS, METRIC_LABELS, SPEARMAN, PerExample, TaskScore
from mergebench.errors import MergebenchError

class NormalizationError(MergebenchError, ValueError):
    """A task whose expert scores 0 or below: its normalized score is undefined."""


def matthews_correlation(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of integer class predictions (Gorodkin's multi-class form, as scikit-learn).

    MCC = (c·s − Σ_k p_k t_k) / √((s² − Σ_k p_k²)(s² − Σ_k t_k²)) with c correct predictions, s examples,
    p_k predictions of class k and t_k true examples of class k; 0 when a denominator factor is 0 (every
    prediction, or every label, the same class), as in scikit-learn's ``matthews_corrcoef``.
    """
    classes = int(max(predictions.max(), labels.max())) + 1
    predicted = torch.bincount(predictions, minlength=classes).double()
    true = torch.bincount(labels, minlength=classes).double()
    samples = float(len(labels))
    correct = float((predictions == labels).sum())
    denominator = (samples**2 - float(predicted @ predicted)) * (samples**2 - float(true @ true))
    if denominator == 0:
        return 0.0
    return (correct * samples - float(predicted @ true)) / denominator**0.5


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1…n with ties given their mean rank (``scipy.stats.rankdata(method="average")``)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=len(unique)).double()
    return (sums / counts)[inverse]


def spearman_correlation(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the tie-averaged ranks (``scipy.stats.spearmanr``); 0 if either is constant."""
    x, y = _ranks(predictions.double()), _ranks(targets.double())
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else 0.0


def score_outputs(metric: str, outputs: torch.Tensor, labels: torch.Tensor) -> TaskScore:
    """The :class:`TaskScore` of a head's outputs ``[N, classes]`` (``[N, 1]`` for a regression task)."""
    if metric == SPEARMAN:
        if outputs.shape[1] != 1:
            raise ValueError(f"a Spearman-scored (regression) task needs one output per example, got {outputs.shape[1]}")
        examples = PerExample(outputs[:, 0].float().numpy(), labels.float().numpy())
        return TaskScore(0, len(labels), spearman_correlation(outputs[:, 0], labels), metric, examples)
    predictions = outputs.argmax(dim=1)
    correct = int((predictions == labels).sum())
    if metric == MATTHEWS:
        examples = PerExample(predictions.numpy(), labels.numpy())
        return TaskScore(correct, len(labels), matthews_correlation(predictions, labels), metric, examples)
    if metric == ACCURACY:
        return TaskScore.of_correct((predictions == labels).numpy())
    raise ValueError(f"unknown metric {metric!r}; metrics are {', '.join(METRIC_LABELS)}")


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]) -> float:
    """Mean over tasks of merged score on task t / fine-tuned model t's score on task t.

    As in Ortiz-Jimenez et al. (2023) and the TALL-masks protocol: the ratio is taken per task on the
    same split, then averaged; the score is the task's own metric (accuracy, or a Matthews or Spearman
    correlation, divided the same way). A ratio to an expert scoring 0 or below (a correlation can)
    has no meaning, so such a task is an error rather than a clipped or shifted ratio.
    """
    missing = [task for task in merged if task not in finetuned or finetuned[task] <= 0]
    if missing:
        found = f" (it scores {finetuned[missing[0]]:.4g})" if missing[0] in finetuned else ""
        raise NormalizationError(f"no positive fine-tuned score for task {missing[0]!r}{found}: normalization divides by it")
    return sum(merged[t] / finetuned[t] for t in merged) / len(merged)


def mean_accuracy(accuracies: Mapping[str, float]) -> float:
    return sum(accuracies.values()) / len(accuracies)

"""Scores of the model-merging literature."""

from __future__ import annotations

from typing import Mapping


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]) -> float:
    """Mean over tasks of merged accuracy on task t / fine-tuned model t's accuracy on task t.

    As in Ortiz-Jimenez et al. (2023) and the TALL-masks protocol: the ratio is taken per task on the
    same split, then averaged.
    """
    missing = [task for task in merged if task not in finetuned or finetuned[task] <= 0]
    if missing:
        raise ValueError(f"no positive fine-tuned accuracy for task {missing[0]!r}")
    return sum(merged[t] / finetuned[t] for t in merged) / len(merged)


def mean_accuracy(accuracies: Mapping[str, float]) -> float:
    return sum(accuracies.values()) / len(accuracies)

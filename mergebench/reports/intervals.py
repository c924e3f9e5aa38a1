"""How sure a score is: 95% intervals by resampling test examples, and paired comparisons of two methods.

Every evaluated cell stores what each test example contributed (:class:`~mergebench.core.scores.PerExample`).
A score's interval is the percentile bootstrap over those examples (Efron & Tibshirani, 1993): each task's
examples are resampled with replacement, ``RESAMPLES`` times, the task's metric is recomputed on each
resample (accuracy, Matthews or Spearman correlation), and the 2.5 % and 97.5 % quantiles of the suite
score bound it. The normalized score divides each task's resampled score by its expert's score on the
*same* resampled examples, so the interval carries the uncertainty of both. A paired comparison of two
methods draws one resample for both and reports the interval of their difference: two methods differ
beyond noise where it excludes 0. One task's accuracy alone also has the exact binomial (Clopper–Pearson)
interval. Resamples come from a generator seeded with :data:`SEED`, so a report is the same every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from scipy.special import betaincinv  # the Beta distribution's quantile function (scipy.stats takes a second to import)

from mergebench.core.scores import ACCURACY, MATTHEWS, SPEARMAN, PerExample
from mergebench.evaluation.metrics import matthews_correlation, spearman_correlation

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"[{100 * self.low:.1f}, {100 * self.high:.1f}]"


@dataclass(frozen=True)
class Comparison:
    """``a − b`` of two methods' suite scores, with the interval of the paired bootstrap."""

    difference: float
    interval: Interval

    @property
    def beyond_noise(self) -> bool:
        return not self.interval.contains(0.0)


def clopper_pearson(correct: int, total: int, confidence: float = CONFIDENCE) -> Interval:
    """The exact binomial interval of an accuracy of ``correct`` of ``total``: the α/2 quantile of
    Beta(c, n − c + 1) and the 1 − α/2 quantile of Beta(c + 1, n − c)."""
    tail = (1 - confidence) / 2
    low = 0.0 if correct == 0 else float(betaincinv(correct, total - correct + 1, tail))
    high = 1.0 if correct == total else float(betaincinv(correct + 1, total - correct, 1 - tail))
    return Interval(low, high)


def _resampled_scores(metric: str, examples: PerExample, draws: np.ndarray) -> np.ndarray:
    """The task metric on each resample ``draws[b]`` (indices of examples), ``[B]``."""
    values = np.asarray(examples.values)
    if metric == ACCURACY:
        return values[draws].mean(axis=1)
    score: Callable[[torch.Tensor, torch.Tensor], float] = {MATTHEWS: matthews_correlation, SPEARMAN: spearman_correlation}[metric]
    labels = np.asarray(examples.labels)
    return np.array([score(torch.from_numpy(values[d]), torch.from_numpy(labels[d])) for d in draws])


class Resampler:
    """One set of bootstrap draws per task, shared by every method scored on the same test examples."""

    def __init__(self, sizes: Mapping[str, int], metrics: Mapping[str, str], resamples: int = RESAMPLES, seed: int = SEED):
        generator = np.random.default_rng(seed)
        self.metrics = dict(metrics)
        self.draws = {task: generator.integers(0, size, size=(resamples, size)) for task, size in sorted(sizes.items())}

    def scores(self, examples: Mapping[str, PerExample]) -> dict[str, np.ndarray]:
        """Each task's score on every resample, ``{task: [B]}``."""
        return {task: _resampled_scores(self.metrics.get(task, ACCURACY), examples[task], draws) for task, draws in self.draws.items()}

    def suite(self, examples: Mapping[str, PerExample], experts: Mapping[str, PerExample] | None = None) -> np.ndarray:
        """The suite score on every resample: the mean over tasks, normalized by the experts' when given."""
        scores = self.scores(examples)
        if experts is not None:
            reference = self.scores(experts)
            scores = {task: scores[task] / np.where(reference[task] > 0, reference[task], np.nan) for task in scores}
        return np.mean(np.stack(list(scores.values())), axis=0)


def _quantiles(samples: np.ndarray, confidence: float = CONFIDENCE) -> Interval | None:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(low), float(high))


def suite_interval(resampler: Resampler, examples: Mapping[str, PerExample], experts: Mapping[str, PerExample] | None = None) -> Interval | None:
    """The 95% interval of a method's suite score (normalized when ``experts`` are given)."""
    return _quantiles(resampler.suite(examples, experts))


def compare(resampler: Resampler, a: Mapping[str, PerExample], b: Mapping[str, PerExample],
            experts: Mapping[str, PerExample] | None = None) -> Comparison | None:
    """The paired bootstrap of ``score(a) − score(b)`` on the same resamples."""
    samples = resampler.suite(a, experts) - resampler.suite(b, experts)
    interval = _quantiles(samples)
    if interval is None:
        return None
    return Comparison(float(np.nanmean(samples)), interval)


def ranks(count: int, comparisons: Callable[[int, int], Comparison | None]) -> list[int]:
    """Ranks of ``count`` methods sorted best first: 1 + the number of methods above it that are better
    beyond noise (``comparisons(above, below)`` is their paired difference), so methods within noise of
    each other share a rank."""
    result = []
    for below in range(count):
        better = 0
        for above in range(below):
            comparison = comparisons(above, below)
            better += comparison is not None and comparison.beyond_noise and comparison.difference > 0
        result.append(1 + better)
    return result

"""The loss and accuracy barrier along the linear path between two models (Frankle et al., 2020).

For endpoints θ_a, θ_b and α ∈ [0, 1], the path θ(α) = (1 − α) θ_a + α θ_b; the barrier of a metric f is
its largest rise above the straight line between the endpoints' values,

    B(f) = max_α [ f(θ(α)) − ((1 − α) f(θ_a) + α f(θ_b)) ]

(for accuracy, the largest drop below the line). Before alignment θ_b is the second model as trained;
after, it is that model with its units mapped onto θ_a's (a permutation leaves its function unchanged).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def interpolate(a: StateDict, b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b for floating-point tensors; other tensors from ``a``."""
    return {name: torch.lerp(tensor, b[name], alpha) if tensor.is_floating_point() else tensor for name, tensor in a.items()}


def interpolation_curve(a: StateDict, b: StateDict, evaluate: Callable[[StateDict], tuple[float, float]],
                        alphas: Sequence[float]) -> list[tuple[float, float, float]]:
    """``(α, loss, accuracy)`` of ``evaluate`` at each point of the path."""
    return [(alpha, *evaluate(interpolate(a, b, alpha))) for alpha in alphas]


def barrier(values: Sequence[float], alphas: Sequence[float], *, higher_is_worse: bool = True) -> float:
    """B(f) of a metric sampled at ``alphas`` (which include 0 and 1)."""
    start, end = values[0], values[-1]
    rise = [(v - ((1 - a) * start + a * end)) * (1 if higher_is_worse else -1) for v, a in zip(values, alphas)]
    return max(rise)

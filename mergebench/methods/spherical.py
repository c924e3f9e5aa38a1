"""Spherical interpolation and averaging of weights, per parameter tensor, as mergekit does.

**SLERP** (Shoemake, 1985, "Animating Rotation with Quaternion Curves"; mergekit ``slerp``), exactly
two models v₀ = θ₁, v₁ = θ₂, each tensor flattened, Ω the angle between their directions:

    slerp(t; v₀, v₁) = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁,

applied to the raw vectors (not their normalized directions: with unequal norms the result is not
norm-interpolated, as in mergekit). When the directions are nearly colinear, |cos Ω| > 0.9995
(mergekit's ``DOT_THRESHOLD``), it falls back to lerp (1 − t)·v₀ + t·v₁. A vector of norm ≤ 1e-8 is
used unnormalized for the angle, as mergekit's ``normalize``. ``space="weights"`` interpolates the
fine-tuned weights (mergekit ``slerp``); ``space="task_vectors"`` interpolates τ₁, τ₂ and adds the
result to θ₀ (mergekit ``nuslerp`` with a base model). t = 0 gives model 1; t is swept around 0.5.

**Karcher mean** (Karcher, 1977; mergekit ``karcher``), any number of models: per tensor, the
directions u_t = θ_t/‖θ_t‖ (norm > tol) are averaged on the unit sphere by the fixed-point iteration

    v = Σ_t w_t · Ω_t / sin Ω_t · (u_t − cos Ω_t · μ),   μ ← cos‖v‖ · μ + sin‖v‖ · v/‖v‖,

(Ω_t the angle from μ to u_t, terms with Ω_t < tol skipped, w_t uniform over the valid directions),
starting from the normalized Euclidean mean of the directions, for at most ``max_iter`` steps or until
‖v‖ < tol; the result is μ times the mean norm (1/T) Σ_t ‖θ_t‖ (mergekit's defaults max_iter = 10,
tol = 1e-5). It is computed on the fine-tuned weights; θ₀ only serves to return τ_m = θ_H − θ₀.

Neither method has a λ: both return merged weights minus θ₀. Angles are computed in float64.
"""

from __future__ import annotations

import math

from typing import Annotated

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import HParam, register

COLINEAR_DOT = 0.9995  # mergekit slerp's DOT_THRESHOLD
NORMALIZE_EPS = 1e-8  # mergekit slerp's eps
SLERP_TS = (0.3, 0.5, 0.7)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two flat vectors, lerp when nearly colinear (mergekit's rule)."""
    a, b = v0.double(), v1.double()
    norm_a, norm_b = a.norm(), b.norm()
    dot = (a / norm_a if norm_a > NORMALIZE_EPS else a) @ (b / norm_b if norm_b > NORMALIZE_EPS else b)
    if dot.abs() > COLINEAR_DOT:
        return torch.lerp(a, b, t).to(v0.dtype)
    omega = torch.arccos(dot.clamp(-1.0, 1.0))
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).to(v0.dtype)


@register(
    "slerp",
    citation="Shoemake, 1985 (SLERP), as in mergekit",
)
def slerp_merge(
    task_vectors: TaskVectors,
    *,
    t: Annotated[float, HParam("interpolation position: 0 = first model, 1 = second", SLERP_TS, low=0.0, high=1.0)] = 0.5,
    space: Annotated[str, HParam("interpolate fine-tuned weights (mergekit slerp) or task vectors (nuslerp with base)", choices=("weights", "task_vectors"))] = "weights",
) -> torch.Tensor:
    """Per tensor spherical interpolation between exactly two models."""
    if task_vectors.num_tasks != 2:
        raise MergebenchError(f"slerp merges exactly two models, got {task_vectors.num_tasks}")
    merged = torch.empty_like(task_vectors.pretrained)
    for slot, block in task_vectors.slices():
        theta0 = task_vectors.pretrained[slot.start : slot.stop]
        if space == "weights":
            merged[slot.start : slot.stop] = slerp(t, theta0 + block[0], theta0 + block[1]) - theta0
        else:
            merged[slot.start : slot.stop] = slerp(t, block[0], block[1])
    return merged


def karcher_mean(vectors: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Karcher mean direction of the rows of ``[T, n]`` on the unit sphere, times their mean norm."""
    rows = vectors.double()
    norms = rows.norm(dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(vectors[0])
    units = rows[valid] / norms[valid, None]
    weight = 1.0 / len(units)
    mean = units.mean(dim=0)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        angles = torch.arccos(dots)
        moving = angles >= tol
        coefficients = torch.where(moving, angles / torch.sin(angles).clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        tangent = weight * (coefficients[:, None] * (units - dots[:, None] * mean)).sum(dim=0)
        step = tangent.norm()
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (norms.mean() * mean).to(vectors.dtype)


@register(
    "karcher",
    citation="Karcher, 1977 (Riemannian center of mass), as in mergekit",
)
def karcher(
    task_vectors: TaskVectors,
    *,
    max_iter: Annotated[int, HParam("maximum fixed-point iterations (mergekit default)", low=1)] = 10,
    tol: Annotated[float, HParam("convergence tolerance on the tangent norm (mergekit default)", low=0.0)] = 1e-5,
) -> torch.Tensor:
    """Per tensor Karcher (Fréchet) mean of the fine-tuned weights on the sphere."""
    merged = torch.empty_like(task_vectors.pretrained)
    for slot, block in task_vectors.slices():
        theta0 = task_vectors.pretrained[slot.start : slot.stop]
        merged[slot.start : slot.stop] = karcher_mean(theta0 + block, max_iter, tol) - theta0
    return merged

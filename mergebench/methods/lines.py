"""LiNeS (Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret & Frossard, ICLR 2025, "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging").

A post-scaler: instead of one λ for the whole merged task vector τ_MTL, the part of τ_MTL in block
ℓ = 0..L−1 is scaled by a coefficient that grows linearly with depth,

    λ(ℓ) = α + β · ℓ / (L − 1),        θ = θ₀ + λ(ℓ) ⊙ τ_MTL,

so shallow layers (general features) stay close to θ₀ and deep layers keep more of the task-specific
update. For multi-task merging the paper and the authors' code (``eval.py``: ``alpha =
(norm_summed_tvs / norm_mtv) / num_tasks``) set

    α = (1/T) · ‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁,

which is 1/T (weight averaging at the first block) for Task Arithmetic, and compensates for the smaller
norm of TIES-like merged vectors; ``alpha`` may also be given as a number. β is tuned on validation.

Choices, following the authors' code: block depths come from the parameter names
(:mod:`mergebench.core.layers`); every parameter outside the blocks (stem, embeddings, final norm,
projection) is scaled by α; ``trailing_depth="last"`` scales the parameters after the last block by
α + β instead. With a single block the increment is 0; with no recognizable block every parameter
gets α. ``lines`` alone is Task Arithmetic + LiNeS; ``<method>+lines`` rescales any method's τ_MTL.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.layers import TRAILING, layer_depths, num_layers
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import HParam, register_post_scaler

# β grid: the paper's {0, 0.1, …, 1.0} (the authors' code sweeps 0.1 … 1.0, without 0)
BETAS = tuple(round(0.1 * i, 1) for i in range(0, 11))


def auto_alpha(task_vectors: TaskVectors, merged_vector: torch.Tensor) -> float:
    """α = ‖Σ_t τ_t‖₁ / (T · ‖τ_MTL‖₁); 0 when τ_MTL is zero."""
    merged_norm = merged_vector.abs().sum().item()
    if merged_norm == 0:
        return 0.0
    return task_vectors.vectors.sum(dim=0).abs().sum().item() / (task_vectors.num_tasks * merged_norm)


def depth_scales(task_vectors: TaskVectors, alpha: float, beta: float, trailing: str) -> torch.Tensor:
    """λ(ℓ) for every entry of the flat vector, ``[N]``."""
    layout = task_vectors.layout
    depths = torch.tensor(layer_depths(layout, trailing=trailing), dtype=torch.float64)
    per_slot = alpha + beta * depths / max(num_layers(layout) - 1, 1)
    sizes = torch.tensor([slot.stop - slot.start for slot in layout.slots])
    return per_slot.repeat_interleave(sizes).to(device=task_vectors.vectors.device, dtype=task_vectors.vectors.dtype)


def _alpha_value(alpha: float | str, task_vectors: TaskVectors, merged_vector: torch.Tensor) -> float:
    if alpha == "auto":
        return auto_alpha(task_vectors, merged_vector)
    try:
        value = float(alpha)
    except ValueError:
        raise MergebenchError(f"hyperparameter alpha={alpha!r} of lines: must be 'auto' or a number") from None
    if value < 0:
        raise MergebenchError(f"hyperparameter alpha={alpha!r} of lines: must be >= 0")
    return value


@register_post_scaler(
    "lines",
    citation="Wang et al., 2025 (LiNeS)",
)
def lines(
    task_vectors: TaskVectors,
    merged_vector: torch.Tensor,
    *,
    alpha: Annotated[str, HParam("scale of the shallowest block: 'auto' = ‖Στ_t‖₁/(T‖τ_MTL‖₁), or a number")] = "auto",
    beta: Annotated[float, HParam("increase of the scale from the first to the last block", BETAS, low=0.0)] = 0.5,
    trailing_depth: Annotated[str, HParam("scale of parameters after the last block: α (first) or α+β (last)", choices=TRAILING)] = "first",
) -> torch.Tensor:
    """Scale each block of the merged task vector by α + β·ℓ/(L−1)."""
    value = _alpha_value(alpha, task_vectors, merged_vector)
    return merged_vector * depth_scales(task_vectors, value, beta, trailing_depth)

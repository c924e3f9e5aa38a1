"""TIES-Merging (Yadav et al., NeurIPS 2023, "Resolving Interference When Merging Models").

Three steps over the task vectors τ_t, then θ = θ₀ + λ·τ_m:

1. **Trim**: keep the top-k% magnitudes of each τ_t, zero the rest. As in the authors' code the
   threshold is taken over the whole flattened task vector (``scope="global"``); ``scope="per_tensor"``
   trims each parameter tensor separately (mergekit's behaviour). We keep exactly ⌊k%·d⌋ entries
   (plus entries tied at the threshold); the authors' ``kthvalue`` indexing keeps one more.
2. **Elect**: γ = sgn(Σ_t τ̂_t) per parameter ("mass" election). Where the sum is exactly zero the sign
   of the majority of elected signs is used, as the authors' ``resolve_zero_signs``; if that too is
   zero, +1.
3. **Disjoint merge**: τ_m = mean of the τ̂_t whose sign agrees with γ (entries with no agreeing task
   are 0).
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, lam_grid, register

# λ chosen on validation; the disjoint mean keeps about one task's magnitude, so the optimum sits near 1
# for CLIP (the TIES paper searches 0.8–1.8) and lower when experts interfere more: the grid covers both.
TIES_LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)


def kth_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a non-negative 1-D tensor, exactly.

    For float32 a two-pass radix select: the bit patterns of non-negative floats sort like the floats,
    so a histogram of their top 16 bits locates the bin holding the k-th largest, and only that bin is
    searched — several times faster than ``kthvalue`` over the whole vector.
    """
    if magnitudes.dtype != torch.float32 or magnitudes.numel() < 1 << 16:
        return magnitudes.kthvalue(magnitudes.numel() - k + 1).values
    high_bits = magnitudes.view(torch.int32) >> 16
    at_or_above = torch.bincount(high_bits, minlength=1 << 15).flip(0).cumsum(0).flip(0)
    bin_index = int((at_or_above >= k).nonzero().max())
    above_bin = int(at_or_above[bin_index + 1]) if bin_index + 1 < at_or_above.numel() else 0
    in_bin = magnitudes[high_bits == bin_index]
    return in_bin.kthvalue(in_bin.numel() - (k - above_bin) + 1).values


def keep_top_magnitudes(vectors: torch.Tensor, k_percent: float, whole: TaskVectors | None = None) -> torch.Tensor:
    """Zero all but the ⌊k%·d⌋ largest-magnitude entries of each row of ``[T, d]``.

    With ``whole``, ``vectors`` is (part of) ``whole``'s task vectors and d and the threshold are taken
    over ``whole``'s entire task vectors (a streamed merge hands over one tensor at a time)."""
    d = vectors.shape[1] if whole is None else whole.entries
    keep = int(d * k_percent / 100)
    if keep <= 0:
        return torch.zeros_like(vectors)
    if keep >= d:
        return vectors.clone()
    magnitudes = vectors.abs()
    if whole is None:
        thresholds = torch.stack([kth_largest(row, keep) for row in magnitudes]).unsqueeze(1)
    else:
        (thresholds,) = whole.order_statistics(magnitudes, [d - keep])
    return vectors * (magnitudes >= thresholds)


def trim(task_vectors: TaskVectors, vectors: torch.Tensor, k_percent: float, scope: str) -> torch.Tensor:
    """TIES trim step, over the whole task vector or per parameter tensor."""
    if scope == "global":
        return keep_top_magnitudes(vectors, k_percent, task_vectors)
    trimmed = torch.empty_like(vectors)
    for slot in task_vectors.layout.slots:
        trimmed[:, slot.start : slot.stop] = keep_top_magnitudes(vectors[:, slot.start : slot.stop], k_percent)
    return trimmed


def elect_signs(vectors: torch.Tensor, whole: TaskVectors | None = None) -> torch.Tensor:
    """γ = sgn(Σ_t τ_t), zeros resolved to the majority sign (then +1); with ``whole``, the majority of
    ``whole``'s entire task vectors, of which ``vectors`` is (part of) the trimmed form."""
    signs = torch.sign(vectors.sum(dim=0))
    majority = torch.sign(signs.sum() if whole is None else whole.total(signs))
    fill = majority if majority != 0 else torch.ones_like(majority)
    return torch.where(signs == 0, fill, signs)


def disjoint_mean(vectors: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries whose sign equals the (non-zero) elected sign γ."""
    agrees = (vectors * signs) > 0
    total = torch.where(agrees, vectors, 0).sum(dim=0)
    count = agrees.to(vectors.dtype).sum(dim=0).clamp(min=1)
    return total / count


def elect_and_merge(vectors: torch.Tensor, whole: TaskVectors | None = None) -> torch.Tensor:
    """TIES steps 2–3 on already sparsified task vectors (majority sign over ``whole``, see :func:`elect_signs`)."""
    return disjoint_mean(vectors, elect_signs(vectors, whole))


@register(
    "ties",
    citation="Yadav et al., 2023 (TIES-Merging)",
    lam=lam_grid(1.0, TIES_LAMBDAS),
)
def ties(
    task_vectors: TaskVectors,
    *,
    k: Annotated[float, HParam("percent of each task vector's magnitudes kept", low=0.0, high=100.0)] = 20.0,
    scope: Annotated[str, HParam("top-k over the whole task vector or per tensor", choices=("global", "per_tensor"))] = "global",
) -> torch.Tensor:
    """Trim, elect sign, disjoint mean."""
    return elect_and_merge(trim(task_vectors, task_vectors.vectors, k, scope), task_vectors)

"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks").

Each task vector keeps only a middle band of its magnitudes: the largest outliers *and* the small
perturbations are masked. Within one row r of d entries, with entries ranked by decreasing magnitude
(rank 0 = largest),

    m_t[i] = 𝟙[ ⌊γ·d⌋ ≤ rank(|τ_t[i]|) < ⌊γ·d⌋ + ⌊β·d⌋ ],      τ̂_t = m_t ⊙ τ_t,

then Task Arithmetic, θ = θ₀ + λ Σ_t τ̂_t (``breadcrumbs``), or TIES sign election and disjoint mean
over the τ̂_t (``breadcrumbs_ties``, mergekit's method of that name).

Naming. The authors' code (``TaskVectorMiddleKeep`` in github.com/rezazzr/breadcrumbs, the class the
README calls "the Breadcrumbs method") takes ``beta`` = ``top_k_keep``, the fraction *kept*, and
``gamma`` = ``top_k_remove``, the fraction of largest magnitudes removed first. Here β is ``density``
and γ is ``top_masked``; the bottom 1 − β − γ of each row is masked. The reported ViT-B/32, 8-task
setting α = λ = 1, β = 0.1, γ = 0.01 is the default; the authors tuned β ∈ [0.05, 0.2],
γ ∈ [0.001, 0.01], α ∈ [0.01, 1] (``find_best_hyperparam.py``).

Choices, following the authors' code:

* ``scope="per_row"`` (default): the band is taken along the last dimension of every parameter tensor
  (``torch.topk`` over ``dim=-1`` with k = ⌊β·shape[-1]⌋), i.e. per output row of a weight matrix
  and over the whole vector for a 1-D tensor. ``scope="per_tensor"`` takes it over each flattened
  tensor, as the paper's text ("per layer") and mergekit's ``magnitude_outliers`` do.
* The top ⌊γ·d⌋ are removed first, then the next ⌊β·d⌋ are kept (``remove_first=True``); when
  ⌊γ·d⌋ + ⌊β·d⌋ > d the band simply ends at d. mergekit instead shrinks the removed top so that
  exactly ⌊β·d⌋ survive; the two agree whenever β + γ ≤ 1.
* 0-dimensional tensors are left unmasked (the authors return them unchanged).
* Entries tied in magnitude at a band edge are ranked lowest index first (``tie_rule="lowest_index"``,
  a stable descending sort, the authors' ``topk`` on distinct values); mergekit sorts ascending, so its
  ties rank highest index first (``tie_rule="highest_index"``). The band is found by two exact top-k
  selections (:mod:`~mergebench.core.selection`), without sorting.
* ``breadcrumbs_ties`` is TIES's disjoint mean over the masked vectors (mergekit with ``normalize:
  true``). mergekit's default ``normalize: false`` is the disjoint *sum*, which is not a rescaling of the
  mean: the ratio is the number of agreeing experts of each entry (1 to T), so λ cannot absorb it.
  Its zero-sum entries take the majority sign (``zero_sign="majority"``) or + (``"positive"``, mergekit).
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core import kernels
from mergebench.core.task_vectors import TaskVectors, TensorSlot
from mergebench.methods.arithmetic import sum_vectors
from mergebench.methods.registry import HParam, lam_grid, register
from mergebench.core.selection import TopK, column_chunks
from mergebench.methods.ties import ElectedMerge, ZeroSign

BREADCRUMBS_CITATION = "Davari & Belilovsky, 2024 (Model Breadcrumbs)"
SCOPES = ("per_row", "per_tensor")
BAND_TIE_RULES = ("lowest_index", "highest_index", "ascending_sort")
INDEX_TIE_RULES = ("lowest_index", "highest_index")


def row_view(block: torch.Tensor, slot: TensorSlot, scope: str) -> torch.Tensor:
    """A parameter's ``[T, numel]`` block as ``[T, rows, d]``: rows along its last dimension, or one row."""
    if scope == "per_row" and len(slot.shape) > 0:
        return block.reshape(block.shape[0], -1, slot.shape[-1])
    return block.reshape(block.shape[0], 1, -1)


def middle_band(rows: torch.Tensor, density: float, top_masked: float, tie_rule: str = "lowest_index") -> torch.Tensor:
    """Keep-mask of ranks ⌊γ·d⌋ … ⌊γ·d⌋ + ⌊β·d⌋ − 1 of each row of ``[R, d]``: the top ⌊γ·d⌋ + ⌊β·d⌋
    magnitudes without the top ⌊γ·d⌋, both exact top-k selections with the same tie rule."""
    d = rows.shape[-1]
    first = int(d * top_masked)
    magnitudes = rows.abs()
    band = TopK.of_values(magnitudes, first + int(d * density), tie_rule, signed=False).keep(magnitudes)
    if first > 0:
        band &= ~TopK.of_values(magnitudes, first, tie_rule, signed=False).keep(magnitudes)
    return band


def banded_blocks(task_vectors: TaskVectors, density: float, top_masked: float, scope: str, tie_rule: str):
    """``(columns, m_t ⊙ τ_t)`` for consecutive ``[T, c]`` blocks covering every column (0-d tensors
    unmasked); a block may be overwritten once the next one is asked for."""
    vectors = task_vectors.vectors
    storage = torch.empty(0, dtype=vectors.dtype, device=vectors.device)  # reused by the kernel's blocks
    for slot, block in task_vectors.slices():
        if len(slot.shape) == 0 or block.shape[1] == 0:
            yield slice(slot.start, slot.stop), block
            continue
        d = slot.shape[-1] if scope == "per_row" else block.shape[1]
        for columns in column_chunks(slot.start, slot.stop, vectors.shape[0], multiple=d):
            block = vectors[:, columns]
            if kernels.available(block) and tie_rule in INDEX_TIE_RULES:
                first = int(d * top_masked)
                if storage.numel() < block.numel():
                    storage = torch.empty(block.numel(), dtype=vectors.dtype, device=vectors.device)
                out = storage[: block.numel()].view(block.shape)
                yield columns, kernels.middle_band(block, d, first, first + int(d * density), tie_rule, out)
                continue
            rows = block.reshape(-1, d)
            yield columns, rows.where(middle_band(rows, density, top_masked, tie_rule), 0.0).reshape(vectors.shape[0], -1)


def breadcrumb_masked(task_vectors: TaskVectors, density: float, top_masked: float, scope: str, tie_rule: str = "lowest_index") -> torch.Tensor:
    """τ̂_t = m_t ⊙ τ_t for every task, ``[T, N]``."""
    masked = torch.empty_like(task_vectors.vectors)
    for columns, block in banded_blocks(task_vectors, density, top_masked, scope, tie_rule):
        masked[:, columns] = block
    return masked


# β = 0.1, γ = 0.01: the authors' ViT-B/32 8-task setting; β grid within their tuning range
Density = Annotated[float, HParam("fraction β of each row kept (after the top γ)", (0.1, 0.15, 0.2), low=0.0, high=1.0)]
TopMasked = Annotated[float, HParam("fraction γ of largest magnitudes masked", low=0.0, high=1.0)]
Scope = Annotated[str, HParam("band along each tensor's last dimension or over the tensor", choices=SCOPES)]
BandTieRule = Annotated[
    str,
    HParam(
        "magnitudes tied at a band edge ranked lowest index first (a stable descending sort), highest "
        "index first (a stable ascending sort), or as torch.sort orders them (mergekit)",
        choices=BAND_TIE_RULES,
    ),
]


@register(
    "breadcrumbs",
    citation=BREADCRUMBS_CITATION,
    # α ∈ [0.01, 1] in the authors' search; α = 1 reported for ViT-B/32 on 8 tasks
    lam=lam_grid(1.0, (0.4, 0.6, 0.8, 1.0)),
)
def breadcrumbs(
    task_vectors: TaskVectors,
    *,
    density: Density = 0.1,
    top_masked: TopMasked = 0.01,
    scope: Scope = "per_row",
    tie_rule: BandTieRule = "lowest_index",
) -> torch.Tensor:
    """Mask each τ_t's largest and smallest magnitudes, then Task Arithmetic."""
    merged = torch.empty_like(task_vectors.pretrained)
    for columns, block in banded_blocks(task_vectors, density, top_masked, scope, tie_rule):
        merged[columns] = sum_vectors(block)
    return merged


@register(
    "breadcrumbs_ties",
    citation=f"{BREADCRUMBS_CITATION} with Yadav et al., 2023 (TIES); mergekit breadcrumbs_ties",
    lam=lam_grid(1.0, (0.8, 1.0, 1.2, 1.4)),
)
def breadcrumbs_ties(
    task_vectors: TaskVectors,
    *,
    density: Density = 0.1,
    top_masked: TopMasked = 0.01,
    scope: Scope = "per_row",
    tie_rule: BandTieRule = "lowest_index",
    zero_sign: ZeroSign = "majority",
) -> torch.Tensor:
    """Breadcrumbs mask, then TIES sign election and disjoint mean."""
    election = ElectedMerge(task_vectors.layout.numel, task_vectors.vectors, zero_sign, whole=task_vectors)
    for columns, block in banded_blocks(task_vectors, density, top_masked, scope, tie_rule):
        election.add(columns, block)
    return election.result()

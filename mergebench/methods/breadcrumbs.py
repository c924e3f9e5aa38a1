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
* Entries tied in magnitude are ranked in ``argsort`` order.
* mergekit's ``breadcrumbs_ties`` defaults to ``normalize: false`` (a disjoint *sum*); here it is TIES's
  disjoint mean, whose overall scale λ absorbs.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.task_vectors import TaskVectors, TensorSlot
from mergebench.methods.arithmetic import sum_vectors
from mergebench.methods.registry import HParam, lam_grid, register
from mergebench.methods.ties import elect_and_merge

BREADCRUMBS_CITATION = "Davari & Belilovsky, 2024 (Model Breadcrumbs)"
SCOPES = ("per_row", "per_tensor")


def row_view(block: torch.Tensor, slot: TensorSlot, scope: str) -> torch.Tensor:
    """A parameter's ``[T, numel]`` block as ``[T, rows, d]``: rows along its last dimension, or one row."""
    if scope == "per_row" and len(slot.shape) > 0:
        return block.reshape(block.shape[0], -1, slot.shape[-1])
    return block.reshape(block.shape[0], 1, -1)


def descending_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Rank of each entry's magnitude within its row of ``[T, rows, d]``, 0 for the largest."""
    order = torch.argsort(rows.abs(), dim=-1, descending=True, stable=True)
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def middle_band(rows: torch.Tensor, density: float, top_masked: float) -> torch.Tensor:
    """Keep ranks ⌊γ·d⌋ … ⌊γ·d⌋ + ⌊β·d⌋ − 1 of each row of ``[T, rows, d]``, zero the rest."""
    d = rows.shape[-1]
    first = int(d * top_masked)
    ranks = descending_ranks(rows)
    return rows * ((ranks >= first) & (ranks < first + int(d * density)))


def breadcrumb_masked(task_vectors: TaskVectors, density: float, top_masked: float, scope: str) -> torch.Tensor:
    """τ̂_t = m_t ⊙ τ_t for every task, ``[T, N]``."""
    masked = task_vectors.vectors.clone()
    for slot, block in task_vectors.slices():
        if len(slot.shape) == 0:
            continue
        banded = middle_band(row_view(block, slot, scope), density, top_masked)
        masked[:, slot.start : slot.stop] = banded.reshape(block.shape)
    return masked


# β = 0.1, γ = 0.01: the authors' ViT-B/32 8-task setting; β grid within their tuning range
Density = Annotated[float, HParam("fraction β of each row kept (after the top γ)", (0.1, 0.15, 0.2), low=0.0, high=1.0)]
TopMasked = Annotated[float, HParam("fraction γ of largest magnitudes masked", low=0.0, high=1.0)]
Scope = Annotated[str, HParam("band along each tensor's last dimension or over the tensor", choices=SCOPES)]


@register(
    "breadcrumbs",
    citation=BREADCRUMBS_CITATION,
    # α ∈ [0.01, 1] in the authors' search; α = 1 reported for ViT-B/32 on 8 tasks
    lam=lam_grid(1.0, (0.4, 0.6, 0.8, 1.0)),
)
def breadcrumbs(
    task_vectors: TaskVectors, *, density: Density = 0.1, top_masked: TopMasked = 0.01, scope: Scope = "per_row"
) -> torch.Tensor:
    """Mask each τ_t's largest and smallest magnitudes, then Task Arithmetic."""
    return sum_vectors(breadcrumb_masked(task_vectors, density, top_masked, scope))


@register(
    "breadcrumbs_ties",
    citation=f"{BREADCRUMBS_CITATION} with Yadav et al., 2023 (TIES); mergekit breadcrumbs_ties",
    lam=lam_grid(1.0, (0.8, 1.0, 1.2, 1.4)),
)
def breadcrumbs_ties(
    task_vectors: TaskVectors, *, density: Density = 0.1, top_masked: TopMasked = 0.01, scope: Scope = "per_row"
) -> torch.Tensor:
    """Breadcrumbs mask, then TIES sign election and disjoint mean."""
    return elect_and_merge(breadcrumb_masked(task_vectors, density, top_masked, scope))

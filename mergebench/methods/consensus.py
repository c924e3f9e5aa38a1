"""TALL masks and Consensus Merging (Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard, ICML 2024,
"Localizing Task Information for Improved Model Merging and Compression"; code: nik-dim/tall_masks).

**TALL mask** of task t: the entries where the task's own update dominates what the multi-task vector
τ_MTL adds for the other tasks,

    m_t = 1{ |θ₀ − θ_t| > λ_t · |θ_MTL − θ_t| } = 1{ |τ_t| > λ_t · |τ_MTL − τ_t| },   θ_MTL = θ₀ + τ_MTL,

with τ_MTL unscaled (``generate_task_masks``: ``flat_multi = flat_ptm + tv``), the comparison strict
(an all-zero entry is in no mask), and λ_t ∈ {0.2, 0.3, 0.4, 0.5, 0.6}.

**Consensus merging** keeps only the entries that at least k tasks consider relevant, removing
"catastrophic" (k ≥ 1) and "selfish" (k ≥ 2) weights,

    m_cons = 1{ Σ_t m_t ≥ k },      θ = θ₀ + λ · (m_cons ⊙ τ_MTL),

with k = 2 by default (k = 0 reduces to the underlying method, k > T gives θ₀). τ_MTL, as in the
authors' ``create_task_vector``:

* ``consensus_ta``: τ_MTL = Σ_t τ_t (their ``k=100``: no magnitude trim).
* ``consensus_ties``: τ_MTL = TIES with the top-20% global trim and *disjoint sum* (``merge_func=
  "dis-sum"``; both the TALL masks and the merged vector use it), i.e. Σ_t τ̂_t over the trimmed
  entries whose sign agrees with the elected sign, not the disjoint mean of ``ties``. The trim keeps
  exactly k entries, ties at the threshold broken as ``ties`` does (``tie_rule``); the authors'
  ``abs >= kthvalue`` keeps every tied entry (``tie_rule="keep_all"``).

The masks are computed against the *untrimmed* τ_t (as the authors). They pick λ_t per task on that
task's validation set by evaluating each task with its own masked model; a harness that evaluates one
merged model on every task cannot, so here one λ_t = ``mask_lambda`` is shared by all tasks and swept
on validation. λ: the authors sweep {0.1, …, 1.0}; the grid below is halved to keep the sweep small.

**TALL-masks compression** (θ_t ≈ θ₀ + m_t ⊙ τ_MTL, one masked model per task, each evaluated on its
own task) is not registered: it produces T task-specific models, not one merged model, so it does not
fit the single-model ``register`` interface. :func:`tall_mask` is exposed for reuse.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.arithmetic import sum_vectors
from mergebench.methods.registry import HParam, lam_grid, register
from mergebench.core.selection import column_chunks
from mergebench.methods.ties import ElectedMerge, TieRule

MASK_LAMBDAS = (0.2, 0.4, 0.6)  # the authors' per-task λ_t grid is {0.2, 0.3, 0.4, 0.5, 0.6}
CONSENSUS_LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0)  # the authors sweep {0.1, …, 1.0}
TIES_TRIM_PERCENT = 20.0  # hard-coded ``reset_thresh=20`` in the authors' consensus/TALL TIES variant


def tall_mask(vectors: torch.Tensor, multi_task_vector: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """m_t = |τ_t| > λ·|τ_MTL − τ_t| for every row of ``[T, n]`` (boolean ``[T, n]``)."""
    return vectors.abs() > mask_lambda * (multi_task_vector - vectors).abs()


def consensus_mask(task_vectors: TaskVectors, multi_task_vector: torch.Tensor, mask_lambda: float, k: int) -> torch.Tensor:
    """Entries in at least k TALL masks (boolean ``[N]``), computed column chunk by column chunk."""
    vectors = task_vectors.vectors
    mask = torch.empty(multi_task_vector.shape, dtype=torch.bool, device=multi_task_vector.device)
    for columns in column_chunks(0, vectors.shape[1], vectors.shape[0]):
        mask[columns] = tall_mask(vectors[:, columns], multi_task_vector[columns], mask_lambda).sum(dim=0) >= k
    return mask


def ties_disjoint_sum(task_vectors: TaskVectors, trim_percent: float, tie_rule: str = "lowest_index") -> torch.Tensor:
    """TIES with the authors' "dis-sum": top-k% global trim, elected sign γ, Σ_t of agreeing entries
    (threshold and majority sign over the whole task vector, also in a streamed merge)."""
    vectors = task_vectors.vectors
    election = ElectedMerge(vectors.shape[1], vectors, mean=False, whole=task_vectors)
    selection = task_vectors.top_k(vectors, int(task_vectors.entries * trim_percent / 100), tie_rule, magnitude=True)
    election.add(slice(0, vectors.shape[1]), vectors, selection)
    return election.result()


MinimumVotes = Annotated[int, HParam("minimum number of TALL masks an entry must be in", low=0)]
MaskLambda = Annotated[float, HParam("λ_t of the TALL masks, shared by all tasks", MASK_LAMBDAS, low=0.0)]


@register("consensus_ta", citation="Wang et al., 2024 (TALL masks / Consensus Merging)", lam=lam_grid(0.6, CONSENSUS_LAMBDAS), entrywise=True)
def consensus_ta(task_vectors: TaskVectors, *, k: MinimumVotes = 2, mask_lambda: MaskLambda = 0.4) -> torch.Tensor:
    """Task Arithmetic restricted to the entries at least k tasks' TALL masks agree on."""
    vectors = task_vectors.vectors
    merged = torch.empty_like(task_vectors.pretrained)
    for columns in column_chunks(0, vectors.shape[1], vectors.shape[0]):
        block = vectors[:, columns]
        multi_task_vector = sum_vectors(block)
        merged[columns] = multi_task_vector * (tall_mask(block, multi_task_vector, mask_lambda).sum(dim=0) >= k)
    return merged


@register(
    "consensus_ties",
    citation="Wang et al., 2024 (TALL masks / Consensus Merging) with Yadav et al., 2023 (TIES)",
    lam=lam_grid(0.6, CONSENSUS_LAMBDAS),
    entrywise=True,  # the TIES trim and majority sign are whole-vector statistics; the TALL masks per entry
)
def consensus_ties(
    task_vectors: TaskVectors,
    *,
    k: MinimumVotes = 2,
    mask_lambda: MaskLambda = 0.4,
    trim_percent: Annotated[float, HParam("percent of each task vector kept by the TIES trim", low=0.0, high=100.0)] = TIES_TRIM_PERCENT,
    tie_rule: TieRule = "lowest_index",
) -> torch.Tensor:
    """TIES (disjoint sum) restricted to the entries at least k tasks' TALL masks agree on."""
    multi_task_vector = ties_disjoint_sum(task_vectors, trim_percent, tie_rule)
    return multi_task_vector * consensus_mask(task_vectors, multi_task_vector, mask_lambda, k)

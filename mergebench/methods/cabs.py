"""CABS (Yang et al., 2025, "CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model
Merging", arXiv:2503.01874).

Two parts, then Task Arithmetic:

* **Balanced sparsification (BS)**: n:m magnitude pruning. Each parameter tensor is flattened and cut
  into consecutive blocks of m entries; each block keeps its n largest magnitudes, so every block, and
  so every layer, keeps the same fraction n/m.
* **Conflict-aware sparsification (CA)**: the task vectors are pruned one after another, and a task
  may only keep positions no earlier task kept. With A_t = ¬(m_1 ∨ … ∨ m_{t−1}) the positions still
  available,

      m_t = n:m(|τ_t| ⊙ A_t) ∧ A_t,      τ̂_t = m_t ⊙ τ_t,      θ = θ₀ + λ Σ_t τ̂_t,

  so the kept masks of different tasks are disjoint.

From the authors' code (github.com/zongzhenyang/CABS, ``prune_task_vector.py`` and
``prune_task_vector_7b.py``), which prunes two task vectors:

* Tasks are pruned in the order given (the paper studies the order; the first task is favoured).
* A block keeps its top n among the positions still available; with fewer than n available it keeps
  all of them. A position selected for a task counts as taken even when that task's entry is 0 there
  (the authors subtract the n:m mask, not the support).
* No rescaling of the survivors; the authors merge Σ_t λ_t τ̂_t with one λ per task, here one λ.

Assumptions where the code does not decide: for more than two tasks the same rule is applied
sequentially; a trailing block shorter than m (tensor size not a multiple of m) keeps its top n like
any block (the GLUE script zeros it, the 7B script requires divisibility); the 7B script's special
case for n ≥ m/2, where the second task also reuses half of each block, is not reproduced.
Of magnitudes tied at a block's n-th place, the lowest-index entries are kept (a stable sort).
Defaults: 3:32 is the authors' RoBERTa-GLUE setting (90.6 % sparsity, leaving room for up to 10
disjoint tasks); n ∈ {2, 3, 4} keeps 8 tasks disjoint. λ ∈ [0.4, 1.0] in their GLUE sweep, 1.2 in
their 7B recipe.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core import kernels
from mergebench.core.selection import column_chunks
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.arithmetic import sum_vectors
from mergebench.methods.registry import HParam, lam_grid, register


def conflict_aware_n_m(block: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Disjoint n:m keep-masks of a ``[T, numel]`` block, pruned task after task."""
    num_tasks, numel = block.shape
    pad = -numel % m
    magnitudes = torch.nn.functional.pad(block.abs(), (0, pad)).reshape(num_tasks, -1, m)
    taken = torch.zeros(magnitudes.shape[1:], dtype=torch.bool, device=block.device)
    taken.view(-1)[numel:] = True  # padding is never available
    masks = torch.zeros_like(magnitudes, dtype=torch.bool)
    for task in range(num_tasks):
        scores = magnitudes[task].masked_fill(taken, -1.0)
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : min(n, m)]
        chosen = torch.zeros_like(taken).scatter_(1, best, True)
        masks[task] = chosen & ~taken
        taken |= masks[task]
    return masks.reshape(num_tasks, -1)[:, :numel]


def cabs_masks(task_vectors: TaskVectors, n: int, m: int) -> torch.Tensor:
    """The kept positions of every task, ``[T, N]`` booleans, disjoint across tasks."""
    masks = torch.empty_like(task_vectors.vectors, dtype=torch.bool)
    for columns, block_masks in masked_blocks(task_vectors, n, m):
        masks[:, columns] = block_masks
    return masks


def masked_blocks(task_vectors: TaskVectors, n: int, m: int):
    """``(columns, keep-masks)`` for consecutive ``[T, c]`` blocks, each tensor cut at multiples of m."""
    if n > m:
        raise MergebenchError(f"CABS needs n <= m (got {n}:{m})")
    vectors = task_vectors.vectors
    for slot in task_vectors.layout.slots:
        for columns in column_chunks(slot.start, slot.stop, vectors.shape[0], multiple=m):
            yield columns, conflict_aware_n_m(vectors[:, columns], n, m)


@register(
    "cabs",
    citation="Yang et al., 2025 (CABS)",
    lam=lam_grid(1.0, (0.6, 0.8, 1.0, 1.2)),
)
def cabs(
    task_vectors: TaskVectors,
    *,
    n: Annotated[int, HParam("entries kept in each block of m", (2, 3, 4), low=1)] = 3,
    m: Annotated[int, HParam("block length m of n:m pruning", low=1)] = 32,
) -> torch.Tensor:
    """Sequential disjoint n:m pruning of the task vectors, then Task Arithmetic."""
    vectors = task_vectors.vectors
    if n > m:
        raise MergebenchError(f"CABS needs n <= m (got {n}:{m})")
    if kernels.available(vectors) and vectors.is_contiguous():
        starts = [slot.start for slot in task_vectors.layout.slots] + [vectors.shape[1]]
        return kernels.conflict_aware_sum(vectors, starts, n, m)
    merged = torch.empty_like(task_vectors.pretrained)
    for columns, masks in masked_blocks(task_vectors, n, m):
        merged[columns] = sum_vectors(task_vectors.vectors[:, columns].where(masks, 0.0))
    return merged

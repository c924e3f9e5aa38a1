"""DELLA-Merging (Deep, Bhardwaj & Poria, 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv:2406.11617).

Drop (MagPrune), Elect, Fuse. MagPrune ranks the entries of each row of τ_t by magnitude,
r_i ∈ {0, …, d−1} ascending (r = d−1 for the largest), and gives them drop probabilities spread
linearly over [p − ε, p + ε], the largest magnitude the least likely to be dropped:

    p_i = p + ε − 2ε · r_i / (d − 1),      m_i ~ Bernoulli(1 − p_i),      τ̃_t[i] = m_i · τ_t[i] / (1 − p_i),

so E[τ̃_t] = τ_t. Then ``della``: TIES sign election γ = sgn(Σ_t τ̃_t) and disjoint mean (mergekit
``della``: consensus "sum", ``normalize: true``); ``della_linear``: the plain sum Σ_t τ̃_t (mergekit
``della_linear``: no consensus, ``normalize: false``). Finally θ = θ₀ + λ·τ_m.

Choices, following the authors' code (the ``rank_magnitude`` sparsifier they contributed to mergekit,
also in github.com/declare-lab/della):

* Ranking is **per row** (the paper finds row-wise ranking better than layer-wise): along the last
  dimension of each parameter tensor, i.e. per output row of a weight matrix and over the whole
  vector for a 1-D tensor. (mergekit ranks along ``dim=1``, which for a 4-D convolution kernel is
  its input-channel axis; the last axis is used here for every tensor.) A row of one entry
  (0-d tensors) gets the centre probability p.
* The window is [p − ε, p + ε] with ε = ``window_size``/2 of the authors' script; p ± ε must lie in
  [0, 1). Survivors are rescaled by 1/(1 − p_i) (``rescale: 1``). Current mergekit instead rescales
  each sparsified tensor to its original L1 norm; that variant is not offered.
* Magnitude ties are ranked in ``argsort`` order.
* The Bernoulli draws come from one ``torch.Generator`` seeded with the run's seed, drawn over the
  whole ``[T, N]`` stack exactly as :func:`~mergebench.methods.dare.drop_and_rescale` draws them: with
  ε = 0 DELLA's masks are DARE's masks for the same seed.

Defaults: p = 0.3, window 0.14 (ε = 0.07), λ = 1.1 are the authors' README example command.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core import kernels
from mergebench.core.kernels import task_sum
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.breadcrumbs import row_view
from mergebench.methods.registry import HParam, lam_grid, register
from mergebench.methods.ties import ElectedMerge, ZeroSign, elect_and_merge

DELLA_CITATION = "Deep et al., 2024 (DELLA-Merging)"


def magprune_drop_probabilities(rows: torch.Tensor, p: float, epsilon: float) -> torch.Tensor:
    """p_i = p + ε − 2ε·r_i/(d − 1) for each entry of ``[..., d]``, r_i its ascending magnitude rank.

    The probabilities of ascending ranks 0 … d − 1 form one ramp, written at the entries' places by the
    stable descending ``argsort`` (its position j is ascending rank d − 1 − j)."""
    d = rows.shape[-1]
    if d == 1:
        return torch.full_like(rows, p)
    ascending = torch.arange(d - 1, -1, -1, device=rows.device).to(rows.dtype)
    ramp = p + epsilon - (2 * epsilon / (d - 1)) * ascending
    order = torch.argsort(rows.abs(), dim=-1, descending=True, stable=True)
    return torch.empty_like(rows).scatter_(-1, order, ramp.expand_as(rows))


def check_window(p: float, epsilon: float) -> None:
    if not (0.0 <= p - epsilon and p + epsilon < 1.0):
        raise MergebenchError(f"DELLA needs 0 <= p - epsilon and p + epsilon < 1 (got p={p}, epsilon={epsilon})")


def fused(task_vectors: TaskVectors) -> bool:
    """Whether MagPrune takes the fused kernels (float32 CPU task vectors, one contiguous stack)."""
    return kernels.available(task_vectors.vectors) and task_vectors.vectors.is_contiguous()


def row_segments(task_vectors: TaskVectors) -> tuple[list[int], list[int]]:
    """(starts of the non-empty tensors, then N; their row widths d), the rows the kernels rank in."""
    slots = [slot for slot in task_vectors.layout.slots if slot.stop > slot.start]
    return [slot.start for slot in slots] + [task_vectors.vectors.shape[1]], [slot.shape[-1] if len(slot.shape) else 1 for slot in slots]


def magprune(task_vectors: TaskVectors, p: float, epsilon: float, seed: int) -> torch.Tensor:
    """τ̃_t = m_t ⊙ τ_t / (1 − p_t), m_t[i] ~ Bernoulli(1 − p_t[i]), for every task, ``[T, N]``.

    Task by task and tensor by tensor, drawing the uniforms in the row-major order of one
    ``torch.rand([T, N])`` draw (the masks of DARE for the same seed when ε = 0)."""
    check_window(p, epsilon)
    vectors = task_vectors.vectors
    if fused(task_vectors):
        return kernels.magprune(vectors, *row_segments(task_vectors), p, epsilon, seed)
    pruned = torch.empty_like(vectors)
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    for task in range(vectors.shape[0]):
        for slot, block in task_vectors.slices():
            values = block[task]
            drop = magprune_drop_probabilities(row_view(values.unsqueeze(0), slot, "per_row"), p, epsilon).reshape(-1)
            keep = torch.rand(values.shape, generator=generator, device=vectors.device) >= drop
            torch.where(keep, values, values.new_zeros(()), out=pruned[task, slot.start : slot.stop]).div_(drop.neg_().add_(1.0))
    return pruned


MeanDropRate = Annotated[float, HParam("mean drop probability p", (0.3, 0.5, 0.7), low=0.0, high=1.0, high_inclusive=False)]
Epsilon = Annotated[float, HParam("half-width ε of the drop-probability window [p − ε, p + ε]", low=0.0, high=0.5)]


@register(
    "della",
    citation=DELLA_CITATION,
    lam=lam_grid(1.1, (0.8, 1.0, 1.1, 1.2)),
)
def della(
    task_vectors: TaskVectors, *, p: MeanDropRate = 0.3, epsilon: Epsilon = 0.07, zero_sign: ZeroSign = "majority", seed: int
) -> torch.Tensor:
    """MagPrune each τ_t, then TIES sign election and disjoint mean (on float32 CPU task vectors, block
    by block, without writing the pruned task vectors: :func:`~mergebench.core.kernels.magprune_elect`)."""
    if not fused(task_vectors):
        return elect_and_merge(magprune(task_vectors, p, epsilon, seed), zero_sign, whole=task_vectors)
    check_window(p, epsilon)
    vectors = task_vectors.vectors
    election = ElectedMerge(vectors.shape[1], vectors, zero_sign, whole=task_vectors)
    election.add_elected(0, *kernels.magprune_elect(vectors, *row_segments(task_vectors), p, epsilon, seed, election.merged))
    return election.result()


@register(
    "della_linear",
    citation=f"{DELLA_CITATION}; mergekit della_linear",
    # a sum of unbiased sparsified task vectors: Task Arithmetic's range of λ
    lam=lam_grid(0.3, (0.2, 0.3, 0.4, 0.5)),
)
def della_linear(task_vectors: TaskVectors, *, p: MeanDropRate = 0.3, epsilon: Epsilon = 0.07, seed: int) -> torch.Tensor:
    """MagPrune each τ_t, then Task Arithmetic (the sum over tasks in task order on every path; on float32
    CPU task vectors block by block, without writing the pruned task vectors)."""
    if not fused(task_vectors):
        return task_sum(magprune(task_vectors, p, epsilon, seed))
    check_window(p, epsilon)
    return kernels.magprune_sum(task_vectors.vectors, *row_segments(task_vectors), p, epsilon, seed)

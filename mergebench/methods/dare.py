"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario").

Drop And REscale: each entry of τ_t is dropped with probability p and the survivors are rescaled,
τ̃_t = (m_t ⊙ τ_t) / (1 − p) with m_t ~ Bernoulli(1 − p), so E[τ̃_t] = τ_t. The sparsified vectors are
then combined by Task Arithmetic (``dare``) or by TIES sign election and disjoint mean (``dare_ties``,
which, like mergekit's ``dare_ties``, applies no magnitude trim after the random drop).
Masks come from a ``torch.Generator`` seeded with the run's seed: the same seed on the same device type
gives bit-identical merged weights.
"""

from __future__ import annotations

from typing import Annotated, Iterator

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.arithmetic import sum_vectors
from mergebench.methods.registry import LAMBDA_TENTHS, HParam, lam_grid, register
from mergebench.core import kernels
from mergebench.core.selection import column_chunks
from mergebench.methods.ties import TIES_LAMBDAS, ElectedMerge, ZeroSign, elect_and_merge

DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)


def uniform_draws(vectors: torch.Tensor, seed: int) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """``(task, columns, u)``, u ~ U[0, 1) for consecutive chunks of each row of ``[T, N]``.

    The draws are taken chunk after chunk in row-major order from one generator seeded with ``seed``,
    which gives the same numbers as one ``torch.rand([T, N])`` draw: the masks m = [u ≥ p] do not depend
    on the chunking, and no ``[T, N]`` draw is held. Chunks are multiples of 8 columns."""
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    draws = None
    for task, row in enumerate(vectors):
        for columns in column_chunks(0, row.numel(), 1, multiple=8):
            width = columns.stop - columns.start
            if draws is None or draws.numel() < width:
                draws = torch.empty(width, device=vectors.device)
            yield task, columns, torch.rand(width, generator=generator, device=vectors.device, out=draws[:width])


class DropMask:
    """m_t ~ Bernoulli(1 − p) for every entry of ``[T, N]`` task vectors, packed eight to a byte
    (``[T, ⌈N/8⌉]`` uint8: a 32nd of the float32 stack)."""

    def __init__(self, vectors: torch.Tensor, p: float, seed: int) -> None:
        self.p = p
        self.bits = torch.zeros((vectors.shape[0], (vectors.shape[1] + 7) // 8), dtype=torch.uint8, device=vectors.device)
        if kernels.available(vectors):
            random = kernels.TorchCpuRandom(seed)
            for task_bits in self.bits:
                kernels.draw_keep_bits(random, p, task_bits, vectors.shape[1])
            return
        for task, columns, draws in uniform_draws(vectors, seed):
            kept = torch.nn.functional.pad(draws >= p, (0, -(columns.stop - columns.start) % 8)).view(-1, 8).to(torch.uint8)
            self.bits[task, columns.start // 8 : (columns.stop + 7) // 8] = (kept << BIT_POSITIONS.to(kept.device)).sum(dim=1, dtype=torch.uint8)

    def keep(self, columns: slice) -> torch.Tensor:
        """Boolean ``[T, c]`` mask of ``columns`` (``columns.start`` a multiple of 8)."""
        packed = self.bits[:, columns.start // 8 : (columns.stop + 7) // 8]
        unpacked = (packed.unsqueeze(2) >> BIT_POSITIONS.to(packed.device)) & 1
        return unpacked.reshape(packed.shape[0], -1)[:, : columns.stop - columns.start].bool()

    def rescaled(self, block: torch.Tensor, columns: slice) -> torch.Tensor:
        """τ̃ = m ⊙ τ / (1 − p) of the ``[T, c]`` task vectors ``block`` at ``columns``."""
        return block.where(self.keep(columns), 0.0).div_(1.0 - self.p)


BIT_POSITIONS = torch.arange(8, dtype=torch.uint8)


def drop_and_rescale(vectors: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p) drawn from a generator seeded with ``seed``."""
    if p == 0:
        return vectors.clone()
    mask = DropMask(vectors, p, seed)
    dropped = torch.empty_like(vectors)
    for columns in column_chunks(0, vectors.shape[1], vectors.shape[0], multiple=8):
        dropped[:, columns] = mask.rescaled(vectors[:, columns], columns)
    return dropped


def dropped_sum(vectors: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Σ_t τ̃_t without holding the ``[T, N]`` sparsified stack (on the CPU one fused pass per task)."""
    if p == 0:
        return sum_vectors(vectors)
    total = torch.zeros_like(vectors[0])
    if kernels.available(vectors):
        random = kernels.TorchCpuRandom(seed)
        for row in vectors:
            kernels.dropped_add(random, row, p, total)
        return total
    for task, columns, draws in uniform_draws(vectors, seed):
        total[columns] += vectors[task, columns].where(draws >= p, 0.0).div_(1.0 - p)
    return total


def dropped_elected_merge(task_vectors: TaskVectors, p: float, seed: int, zero_sign: str) -> torch.Tensor:
    """TIES election and disjoint mean of τ̃_t, reading τ_t and the packed masks (no τ̃ stack is held);
    the majority sign is the whole task vector's, also in a streamed merge."""
    vectors = task_vectors.vectors
    if p == 0:
        return elect_and_merge(vectors, zero_sign, whole=task_vectors)
    election = ElectedMerge(vectors.shape[1], vectors, zero_sign, whole=task_vectors)
    election.add(slice(0, vectors.shape[1]), vectors, drop=DropMask(vectors, p, seed))
    return election.result()


DropRate = Annotated[float, HParam("probability p of dropping each task-vector entry", DROP_RATES, low=0.0, high=1.0, high_inclusive=False)]


@register(
    "dare",
    citation="Yu et al., 2024 (DARE)",
    lam=lam_grid(0.3, LAMBDA_TENTHS),
)
def dare(task_vectors: TaskVectors, *, p: DropRate = 0.5, seed: int) -> torch.Tensor:
    """Drop and rescale each τ_t, then Task Arithmetic."""
    return dropped_sum(task_vectors.vectors, p, seed)


@register(
    "dare_ties",
    citation="Yu et al., 2024 (DARE) with Yadav et al., 2023 (TIES)",
    lam=lam_grid(1.0, TIES_LAMBDAS),
)
def dare_ties(task_vectors: TaskVectors, *, p: DropRate = 0.5, zero_sign: ZeroSign = "majority", seed: int) -> torch.Tensor:
    """Drop and rescale each τ_t, then TIES sign election and disjoint mean."""
    return dropped_elected_merge(task_vectors, p, seed, zero_sign)

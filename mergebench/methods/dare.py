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
from mergebench.core.selection import column_chunks
from mergebench.methods.ties import TIES_LAMBDAS, ZeroSign, elect_and_merge

DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)


def dropped_chunks(vectors: torch.Tensor, p: float, seed: int) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """``(task, columns, m ⊙ τ_t / (1 − p))`` for consecutive chunks of each row of ``[T, N]``.

    The Bernoulli draws are taken chunk after chunk in row-major order from one generator seeded with
    ``seed``, which gives the same numbers as one ``torch.rand([T, N])`` draw: the masks do not depend on
    the chunking, and no ``[T, N]`` mask is held."""
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    draws = None
    for task, row in enumerate(vectors):
        for columns in column_chunks(0, row.numel(), 1):
            width = columns.stop - columns.start
            if draws is None or draws.numel() < width:
                draws = torch.empty(width, device=vectors.device)
            uniform = torch.rand(width, generator=generator, device=vectors.device, out=draws[:width])
            yield task, columns, row[columns].where(uniform >= p, 0.0).div_(1.0 - p)


def drop_and_rescale(vectors: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p) drawn from a generator seeded with ``seed``."""
    if p == 0:
        return vectors.clone()
    dropped = torch.empty_like(vectors)
    for task, columns, chunk in dropped_chunks(vectors, p, seed):
        dropped[task, columns] = chunk
    return dropped


def dropped_sum(vectors: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Σ_t τ̃_t without holding the ``[T, N]`` sparsified stack."""
    if p == 0:
        return sum_vectors(vectors)
    total = torch.zeros_like(vectors[0])
    for _, columns, chunk in dropped_chunks(vectors, p, seed):
        total[columns] += chunk
    return total


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
    return elect_and_merge(drop_and_rescale(task_vectors.vectors, p, seed), zero_sign)

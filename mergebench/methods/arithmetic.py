"""Weight averaging and Task Arithmetic.

* Model soups / weight averaging (Wortsman et al., 2022): θ = (1/T) Σ_t θ_t = θ₀ + (1/T) Σ_t τ_t.
* Task Arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"): θ = θ₀ + λ Σ_t τ_t,
  λ chosen on validation from {0.1, …, 1.0} as in the TALL-masks and LiNeS protocols.
"""

from __future__ import annotations

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import LAMBDA_TENTHS, lam_grid, register


def sum_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Σ_t τ_t over the task axis of a ``[T, N]`` stack."""
    return vectors.sum(dim=0)


@register("average", citation="Wortsman et al., 2022 (model soups)", entrywise=True)
def average(task_vectors: TaskVectors) -> torch.Tensor:
    """Mean of the fine-tuned weights: τ_m = (1/T) Σ_t τ_t."""
    return task_vectors.vectors.mean(dim=0)


@register(
    "task_arithmetic",
    citation="Ilharco et al., 2023 (Editing Models with Task Arithmetic)",
    lam=lam_grid(0.3, LAMBDA_TENTHS),
    entrywise=True,
)
def task_arithmetic(task_vectors: TaskVectors) -> torch.Tensor:
    """Sum of task vectors: θ = θ₀ + λ Σ_t τ_t."""
    return sum_vectors(task_vectors.vectors)

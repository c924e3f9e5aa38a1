"""Model Stock (Jang, Yun & Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

Fine-tuned weights lie on a thin shell around a centre; with θ₀ as anchor, the point of the plane
spanned by θ₀ and the average θ̄ = (1/N) Σ_t θ_t that is closest to the centre is, per layer,

    θ_H = t · θ̄ + (1 − t) · θ₀,      t = N cos θ / (1 + (N − 1) cos θ),

where θ is the angle between fine-tuned task vectors τ_t = θ_t − θ₀ of that layer. There is no λ:
the method returns τ_m = θ_H − θ₀ = t · (1/N) Σ_t τ_t (two parallel task vectors give t = 1, the
plain average; orthogonal ones give t = 0, the pretrained layer).

Choices, following mergekit's ``model_stock`` (the paper defines θ only for N = 2):

* One t per parameter tensor, the tensor flattened (mergekit's default ``filter_wise=False``).
* For N > 2, cos θ is the mean of the pairwise cosines (``pairwise="cosine"``, mergekit);
  ``pairwise="angle"`` averages the pairwise angles instead and takes their cosine (FusionBench).
* At least two fine-tuned models are required (mergekit and FusionBench raise too).

Deviations, both guards for degenerate tensors: a pair with a zero task vector has cos θ = 0 (mergekit
clamps the norm product at 1e-6, which also shrinks the cosine of genuinely small task vectors such as
biases); and the mean cos θ is clamped at 0, so t ∈ [0, 1] — mergekit lets t go negative and divides
by zero at cos θ = −1/(N−1), where the paper's geometry (an acute angle) no longer holds.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import HParam, register


def mean_pairwise_cosine(block: torch.Tensor, pairwise: str) -> torch.Tensor:
    """cos θ of the rows of ``[N, n]``: the mean pairwise cosine, or the cosine of the mean angle."""
    gram = block.double() @ block.double().T
    norms = gram.diagonal().sqrt()
    products = norms[:, None] * norms[None, :]
    cosines = torch.where(products > 0, gram / products.clamp(min=torch.finfo(torch.float64).tiny), 0.0).clamp(-1.0, 1.0)
    upper = torch.triu_indices(len(block), len(block), offset=1)
    pairs = cosines[upper[0], upper[1]]
    return pairs.mean() if pairwise == "cosine" else pairs.arccos().mean().cos()


def stock_ratio(cos_theta: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ), with cos θ clamped to [0, 1]."""
    cos_theta = cos_theta.clamp(min=0.0)
    return n * cos_theta / (1 + (n - 1) * cos_theta)


@register(
    "model_stock",
    citation="Jang et al., 2024 (Model Stock)",
)
def model_stock(
    task_vectors: TaskVectors,
    *,
    pairwise: Annotated[str, HParam("average pairwise cosines (mergekit) or angles (FusionBench)", choices=("cosine", "angle"))] = "cosine",
) -> torch.Tensor:
    """Per tensor, interpolate between θ₀ and the average by t = N cos θ / (1 + (N−1) cos θ)."""
    n = task_vectors.num_tasks
    if n < 2:
        raise MergebenchError(f"model_stock needs at least two fine-tuned models, got {n}")
    merged = torch.empty_like(task_vectors.pretrained)
    for slot, block in task_vectors.slices():
        t = stock_ratio(mean_pairwise_cosine(block, pairwise), n)
        merged[slot.start : slot.stop] = t.to(block.dtype) * block.mean(dim=0)
    return merged

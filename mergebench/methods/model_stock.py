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
biases); and by default (``negative_cosine="clamp"``) the mean cos θ is clamped at 0, so t ∈ [0, 1],
since the paper's geometry (an acute angle) no longer holds for a negative cosine.
``negative_cosine="extrapolate"`` is mergekit's rule: t goes negative, and where
|1 + (N − 1) cos θ| < 10⁻⁶ (no finite estimate) t = 0, the pretrained tensor.

The cosines come from each tensor's Gram matrix, accumulated in float64 over column chunks in the same
pass that averages the task vectors: one read of the ``[T, N]`` stack.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.selection import column_chunks
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import HParam, register

NEGATIVE_COSINE_RULES = ("clamp", "extrapolate")


def gram_and_mean(block: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The Gram matrix τ_i·τ_j (float64) of the rows of ``[N, n]``, writing their mean into ``mean``;
    one pass over the block, column chunk by column chunk."""
    gram = torch.zeros((len(block), len(block)), dtype=torch.float64, device=block.device)
    for columns in column_chunks(0, block.shape[1], len(block), element_size=8):
        chunk = block[:, columns]
        torch.mean(chunk, dim=0, out=mean[columns])
        chunk = chunk.double()
        gram += chunk @ chunk.T
    return gram


def mean_pairwise_cosine(gram: torch.Tensor, pairwise: str) -> torch.Tensor:
    """cos θ from the Gram matrix of N task vectors: the mean pairwise cosine, or the cosine of the mean angle."""
    norms = gram.diagonal().sqrt()
    products = norms[:, None] * norms[None, :]
    cosines = torch.where(products > 0, gram / products.clamp(min=torch.finfo(torch.float64).tiny), 0.0).clamp(-1.0, 1.0)
    upper = torch.triu_indices(len(gram), len(gram), offset=1)
    pairs = cosines[upper[0], upper[1]]
    return pairs.mean() if pairwise == "cosine" else pairs.arccos().mean().cos()


def stock_ratio(cos_theta: torch.Tensor, n: int, negative_cosine: str = "clamp") -> torch.Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ), with cos θ clamped at 0 (``"clamp"``), or extrapolated to
    negative t with t = 0 where |1 + (N − 1) cos θ| < 10⁻⁶ (``"extrapolate"``, mergekit)."""
    if negative_cosine == "clamp":
        cos_theta = cos_theta.clamp(min=0.0)
    denominator = 1 + (n - 1) * cos_theta
    if negative_cosine == "extrapolate" and bool(denominator.abs() < 1e-6):
        return torch.zeros_like(cos_theta)
    return n * cos_theta / denominator


@register(
    "model_stock",
    citation="Jang et al., 2024 (Model Stock)",
)
def model_stock(
    task_vectors: TaskVectors,
    *,
    pairwise: Annotated[str, HParam("average pairwise cosines (mergekit) or angles (FusionBench)", choices=("cosine", "angle"))] = "cosine",
    negative_cosine: Annotated[
        str, HParam("a negative mean cosine clamped at 0 (t ≥ 0) or extrapolated to t < 0 (mergekit)", choices=NEGATIVE_COSINE_RULES)
    ] = "clamp",
) -> torch.Tensor:
    """Per tensor, interpolate between θ₀ and the average by t = N cos θ / (1 + (N−1) cos θ)."""
    n = task_vectors.num_tasks
    if n < 2:
        raise MergebenchError(f"model_stock needs at least two fine-tuned models, got {n}")
    merged = torch.empty_like(task_vectors.pretrained)
    for slot, block in task_vectors.slices():
        mean = merged[slot.start : slot.stop]
        t = stock_ratio(mean_pairwise_cosine(gram_and_mean(block, mean), pairwise), n, negative_cosine)
        mean.mul_(t.to(block.dtype))
    return merged

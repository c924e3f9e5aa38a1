"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For every linear map y = x Wᵀ of the network, RegMean picks the merged W that best reproduces each
fine-tuned model's outputs on that model's own inputs X_t (rows = input vectors of the layer):

    min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²   ⇒   Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ,   G_t = X_tᵀ X_t   (paper Eq. 2)

with the off-diagonal entries of every Gram matrix scaled by α (paper §3.3, "reduce non-diagonal"),
G̃_t = α G_t + (1 − α) diag(G_t): α = 1 is the exact solution, α = 0 a per-input-channel weighted mean.
Every other parameter (biases, norms, depthwise and spatial convolutions, the stem) is averaged, as in
the paper and in the authors' and FusionBench's code.

Linear maps here are ``nn.Linear`` weights and 1×1 convolutions without groups, whose inputs are the
channel vectors at every (strided) spatial position. X_t are the inputs of the layer in the fine-tuned
model θ_t itself (forward hooks on ``model.backbone(θ_t)``), on N training examples of task t.

Choices: G_t is averaged over the N examples (FusionBench's running mean; with equal N per task this
only rescales every task alike). α's grid {0.7, 0.8, 0.9, 1.0} and default 0.9 are the authors'
``regmean_reduce_nondiag`` range and default (FusionBench's CLIP config uses 0.6). N = 256 is
FusionBench's ``num_regmean_examples`` (the paper's own N was not verified here). The linear system is
solved in float64 with a tiny ridge toward the plain average, (Σ G̃_t + δI) Wᵀ = Σ G̃_t W_tᵀ + δ W̄ᵀ,
δ = 10⁻⁶·mean diag(Σ G̃_t): it leaves well-posed layers unchanged and gives input channels that no
task ever activates (zero rows of every Gram, e.g. dead ReLU6 channels) the average weight, where the
authors' ``torch.inverse`` would fail or return inf.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import TaskVectors, TensorSlot
from mergebench.methods.registry import HParam, register

REGMEAN_EXAMPLES = 256  # FusionBench num_regmean_examples
ALPHAS = (0.7, 0.8, 0.9, 1.0)  # authors' regmean_reduce_nondiag range
OffDiagonal = Annotated[float, HParam("multiplier α of the Gram matrices' off-diagonal entries", ALPHAS, low=0.0, high=1.0)]
RIDGE = 1e-6
GRAM_BATCH = 32


def is_linear_map(module: nn.Module) -> bool:
    """``nn.Linear``, or a 1×1 convolution without groups (a linear map over channels at every position)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input vectors of a linear map as rows ``[M, d_in]``."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, module.in_features)
    strided = inputs[:, :, :: module.stride[0], :: module.stride[1]]
    return strided.permute(0, 2, 3, 1).reshape(-1, module.in_channels)


class _GramsComplete(Exception):
    """Raised by a hook to end a forward pass once every requested layer has seen its input."""


def gram_matrices(
    model: ModelAccess, theta: torch.Tensor, task: str, names: set[str], *, stop_early: bool = False
) -> dict[str, torch.Tensor]:
    """G_t = X_tᵀX_t / N for every linear layer whose weight is in ``names``, keyed by weight name.

    ``stop_early`` ends each forward pass as soon as every requested layer has been called once (the
    layers above them are not needed); a module called several times per pass then counts once.
    """
    backbone = model.backbone(theta.to(model.device))
    grams: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def hook_for(weight_name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            rows = input_rows(module, inputs[0]).double()
            grams[weight_name] = grams.get(weight_name, 0) + rows.T @ rows
            seen.add(weight_name)
            if stop_early and len(seen) == len(handles):
                raise _GramsComplete
        return hook

    weight_names = {module: f"{name}.weight" if name else "weight" for name, module in backbone.named_modules()}
    handles = [
        module.register_forward_hook(hook_for(weight_name))
        for module, weight_name in weight_names.items()
        if weight_name in names and is_linear_map(module)
    ]
    count = 0
    try:
        with torch.no_grad():
            for inputs, _ in model.batches(task, GRAM_BATCH):
                seen.clear()
                try:
                    backbone(inputs)
                except _GramsComplete:
                    pass
                count += len(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (gram / max(count, 1)).to(theta.device) for name, gram in grams.items()}


def scale_off_diagonal(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G) for a stack ``[T, d, d]``."""
    diagonal = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))
    return alpha * grams + (1.0 - alpha) * diagonal


def regmean_weight(weights: torch.Tensor, grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """W with Wᵀ = (Σ_t G̃_t + δI)⁻¹ (Σ_t G̃_t W_tᵀ + δ W̄ᵀ) for ``weights [T, out, in]``, ``grams [T, in, in]``."""
    scaled = scale_off_diagonal(grams.double(), alpha)
    total = scaled.sum(dim=0)
    ridge = RIDGE * torch.diagonal(total).mean().clamp(min=1e-30)
    w = weights.double()
    lhs = total + ridge * torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    rhs = (scaled @ w.transpose(1, 2)).sum(dim=0) + ridge * w.mean(dim=0).T
    return torch.linalg.solve(lhs, rhs).T.to(weights.dtype)


@register(
    "regmean",
    citation="Jin et al., 2023 (RegMean: Dataless Knowledge Fusion by Merging Weights of Language Models)",
    data="train-samples",
    examples=REGMEAN_EXAMPLES,
)
def regmean(task_vectors: TaskVectors, *, alpha: OffDiagonal = 0.9, model: ModelAccess) -> torch.Tensor:
    """Per linear layer the least-squares merge Wᵀ = (Σ G_t)⁻¹ Σ G_t W_tᵀ; other parameters averaged."""
    finetuned = task_vectors.finetuned()
    names = set(task_vectors.layout.names)
    grams = [
        model.cached("regmean_gram", {"task": task}, lambda row=row, task=task: gram_matrices(model, finetuned[row], task, names))
        for row, task in enumerate(task_vectors.tasks)
    ]
    return merge_with_grams(task_vectors, grams, alpha, finetuned=finetuned)


def merged_layer_weight(
    finetuned: torch.Tensor, slot: TensorSlot, grams: list[dict[str, torch.Tensor]], alpha: float
) -> torch.Tensor:
    """The flat RegMean weight of one linear layer from the fine-tuned θ_t ``[T, N]`` and each task's Gram."""
    weights = finetuned[:, slot.start : slot.stop].reshape(finetuned.shape[0], slot.shape[0], -1)
    stacked = torch.stack([task_grams[slot.name] for task_grams in grams])
    return regmean_weight(weights, stacked, alpha).reshape(-1)


def merge_with_grams(
    task_vectors: TaskVectors, grams: list[dict[str, torch.Tensor]], alpha: float, *, finetuned: torch.Tensor | None = None
) -> torch.Tensor:
    """τ_m with every linear layer that has a Gram per task (``grams[t][weight name]``) solved by RegMean
    and every other parameter averaged; ``finetuned`` is θ_t ``[T, N]`` if the caller already has it."""
    finetuned = task_vectors.finetuned() if finetuned is None else finetuned
    merged = task_vectors.vectors.mean(dim=0)
    for slot in task_vectors.layout.slots:
        if slot.name not in grams[0]:
            continue
        pretrained = task_vectors.pretrained[slot.start : slot.stop]
        merged[slot.start : slot.stop] = merged_layer_weight(finetuned, slot, grams, alpha) - pretrained
    return merged

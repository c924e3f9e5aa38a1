"""RegMean++ (Nguyen et al., 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression
Mean for Model Merging", arXiv:2508.03121): RegMean whose layer inputs come from the merged model.

RegMean (:mod:`mergebench.methods.regmean`) solves, for every linear map W of layer l,

    Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ,   G_t = X_tᵀ X_t / N,   G̃_t = α G_t + (1 − α) diag(G_t),

where RegMean takes X_t^(l), the inputs of the map, from the fine-tuned model θ_t alone. RegMean++
keeps the formula and changes only where the inputs come from: the layers are merged in forward
order, and the input of layer l for task t is produced by the layers below l *already merged*,

    RegMean:    X_t^(l) = f_t^(l−1)(X_t^(l−1))        (task t's own layer l − 1)
    RegMean++:  X_t^(l) = f_M^(l−1)(X_t^(l−1))        (the merged layer l − 1),

starting from task t's own examples. Inside layer l the Grams come from a forward pass of task t's
own layer l (the authors run the candidate's encoder layer on the merged model's representation), so
a linear map deeper in the layer sees task t's own earlier sub-layers. The Grams of the first layer
are therefore RegMean's, and every later Gram depends on the merged weights below it (hence on α).

What a layer is here. A layer is one block of the backbone, read from the parameter names as LiNeS
does (:func:`mergebench.core.layers.block_index`): for EfficientNet-Lite one MBConv block
``net._blocks.{i}``, whose linear maps are its 1×1 expansion and projection convolutions (the
projection's inputs come from the task's own expansion and depthwise convolutions and BatchNorms
inside the block); for a ViT one encoder layer, as in the authors' code. A parameter outside every
block is its own layer, one module at a time: EfficientNet's stem (3×3 convolution and BatchNorm:
no linear map, so averaged, as the authors average CLIP's embeddings) and, after the last block, the
1×1 ``_conv_head`` (merged by RegMean on the output of the merged blocks) and its BatchNorm. A network
without block names (e.g. a plain ``nn.Sequential``) has one layer per module with parameters. The
layers are ordered by the first call of their modules in a forward pass. As in RegMean, every
parameter that is not a linear map (biases, BatchNorm scales, depthwise and spatial convolutions) is
averaged, and the merged model in which later layers' inputs are computed uses those averages.

Choices, from FusionBench's ``fusion_bench/method/regmean_plusplus/regmean_plusplus.py`` and
``clip_regmean_plusplus.py`` and ``config/method/regmean_plusplus/clip_regmean_plusplus.yaml`` (the
authors' experiments, github.com/nthehai01/RegMean-plusplus, run on a FusionBench fork): N = 256
examples per task (``num_regmean_examples``), α = 0.95 (``reduce_non_diagonal_ratio``; the authors
sweep 0.1–1.0 in ``experiments/hyperparam.sh``; the validation grid here is RegMean's
{0.7, 0.8, 0.9, 1.0} plus 0.95), Grams averaged over the examples' input rows. FusionBench's code
leaves CLIP's ``post_layernorm`` (after the last encoder layer) at its pretrained value; here the
parameters after the last block are layers like any other. The linear systems are solved as in
RegMean (float64, tiny ridge toward the average).

Cost: the Grams of layer l need a forward pass of every task's examples up to layer l, with the
merged weights below it, so one merge costs about L/2 RegMean Gram passes (L layers with linear
maps), and every α needs its own passes. They are cached per α.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Annotated

import torch

from mergebench.core.data_access import ModelAccess
from mergebench.core.layers import block_index
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, register
from mergebench.methods.regmean import (
    ALPHAS,
    REGMEAN_EXAMPLES,
    gram_matrices,
    is_linear_map,
    merge_with_grams,
    merged_layer_weight,
)

REGMEAN_PLUS_PLUS_ALPHA = 0.95  # FusionBench clip_regmean_plusplus.yaml reduce_non_diagonal_ratio
REGMEAN_PLUS_PLUS_ALPHAS = tuple(sorted({*ALPHAS, REGMEAN_PLUS_PLUS_ALPHA}))


@dataclass
class Layer:
    """One layer: its parameters (names in the layout) and, among them, the weights of linear maps."""

    params: list[str] = field(default_factory=list)
    linear: list[str] = field(default_factory=list)


def forward_layers(task_vectors: TaskVectors, model: ModelAccess) -> list[Layer]:
    """The backbone's layers in forward order (see the module docstring)."""
    names = set(task_vectors.layout.names)
    backbone = model.backbone(task_vectors.pretrained.to(model.device))
    owned: dict[torch.nn.Module, tuple[str, list[str]]] = {}
    for module_name, module in backbone.named_modules():
        prefix = f"{module_name}." if module_name else ""
        direct = [prefix + name for name, _ in module.named_parameters(recurse=False) if prefix + name in names]
        if direct:
            owned[module] = (module_name, direct)
    called: list[torch.nn.Module] = []

    def record(module: torch.nn.Module, inputs: tuple) -> None:
        if module not in called:
            called.append(module)

    handles = [module.register_forward_pre_hook(record) for module in owned]
    try:
        inputs, _ = next(iter(model.batches(task_vectors.tasks[0], 1)))
        with torch.no_grad():
            backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
    layers: dict[object, Layer] = {}
    for module in called + [module for module in owned if module not in called]:
        module_name, params = owned[module]
        index = block_index(params[0])
        layer = layers.setdefault(("block", index) if index is not None else ("module", module_name), Layer())
        layer.params += params
        weight = f"{module_name}.weight" if module_name else "weight"
        if is_linear_map(module) and weight in params:
            layer.linear.append(weight)
    return list(layers.values())


def cross_layer_grams(task_vectors: TaskVectors, model: ModelAccess, alpha: float) -> list[dict[str, torch.Tensor]]:
    """Each task's Grams, layer l's computed with layers < l merged by RegMean++ (the rest averaged)."""
    finetuned = task_vectors.finetuned()
    merged = finetuned.mean(dim=0)  # θ of the merged model, its linear maps filled in layer by layer
    below = torch.zeros(merged.shape, dtype=torch.bool, device=merged.device)  # parameters of merged layers
    slots = {slot.name: slot for slot in task_vectors.layout.slots}
    grams: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors.tasks]
    for layer in forward_layers(task_vectors, model):
        if layer.linear:
            for row, task in enumerate(task_vectors.tasks):
                theta = torch.where(below, merged, finetuned[row])
                grams[row].update(gram_matrices(model, theta, task, set(layer.linear), stop_early=True))
            for name in layer.linear:
                if name in grams[0]:
                    slot = slots[name]
                    merged[slot.start : slot.stop] = merged_layer_weight(finetuned, slot, grams, alpha)
        for name in layer.params:
            below[slots[name].start : slots[name].stop] = True
    return grams


@register(
    "regmean_plus_plus",
    citation="Nguyen et al., 2025 (RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging)",
    data="train-samples",
    examples=REGMEAN_EXAMPLES,
)
def regmean_plus_plus(
    task_vectors: TaskVectors,
    *,
    alpha: Annotated[float, HParam("multiplier α of the Gram matrices' off-diagonal entries", REGMEAN_PLUS_PLUS_ALPHAS, low=0.0, high=1.0)] = REGMEAN_PLUS_PLUS_ALPHA,
    model: ModelAccess,
) -> torch.Tensor:
    """RegMean layer by layer, each layer's Grams computed on the outputs of the merged layers below it."""
    grams = model.cached("regmean_plus_plus_gram", {"alpha": alpha}, lambda: cross_layer_grams(task_vectors, model, alpha))
    return merge_with_grams(task_vectors, grams, alpha)

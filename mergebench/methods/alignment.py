"""Merging models that share no initialization: align their units, then average (mergebench.alignment).

Each endpoint θ_t = θ₀ + τ_t is a whole model trained from its own random initialization (θ₀ is zero for
such suites). A method maps every model's units onto the first model's (or, for ZipIt!, into a zipped
set of units), averages the aligned weights, and optionally applies REPAIR; the merged model's BatchNorm
statistics are re-estimated by the suite before it is scored. All of them read ``train-samples``: the
activation-based methods match units on them, and REPAIR and the BatchNorm re-estimation of the
endpoints use them (weight matching without REPAIR reads weights alone).

* ``weight_matching``, ``activation_matching`` — Git Re-Basin (Ainsworth et al., 2023);
* ``zipit`` — ZipIt! (Stoica et al., 2024); ``zipit_partial`` zips only the first layers and keeps each
  model's later layers, their logits averaged (the paper's partial zipping);
* ``cca_merge`` — CCA Merge (Horoi et al., 2024);
* ``ot_fusion`` — OT fusion (Singh & Jaggi, 2020), activation-based;
* ``np_merge`` — NP Merge (Orozco Camacho et al., 2024): after weight matching, each parameter's weight
  per model learned by gradient descent on the labelled training batches;
* ``average_repair`` — plain averaging, then REPAIR (Jordan et al., 2023);
* ``ensemble`` — the endpoints' mean logits: the upper reference, T times the parameters.
"""

from __future__ import annotations

from typing import Annotated, Callable, Mapping

import torch
from torch import nn

from mergebench.alignment import matching
from mergebench.alignment.features import Moments, calibrated, feature_moments, reset_statistics
from mergebench.alignment.merge import Alignment, align_state, merge_states, partially_merged_states
from mergebench.alignment.repair import renormalize, repair_targets
from mergebench.alignment.spec import spec_for
from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, register

CALIBRATION_EXAMPLES = 256
"""Training examples per task that matching, REPAIR and BatchNorm re-estimation read."""
BATCH_SIZE = 128
REPAIR = HParam("REPAIR: restore each merged unit's mean and std to the endpoints' (Jordan et al., 2023)",
                grid=("off", "on"), choices=("off", "on"))


class Ensemble(nn.Module):
    """The mean of the member models' logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(inputs) for member in self.members]).mean(dim=0)


def calibration_batches(model: ModelAccess) -> list[torch.Tensor]:
    """The granted training inputs of every task, in batches."""
    return [inputs for task in model.tasks for inputs, _ in model.batches(task, BATCH_SIZE)]


def endpoint_models(task_vectors: TaskVectors, model: ModelAccess, batches: list[torch.Tensor]) -> list[nn.Module]:
    """Each endpoint as its own module, BatchNorm statistics re-estimated on ``batches``."""
    return [calibrated(model.backbone(weights), batches) for weights in task_vectors.finetuned()]


def endpoint_states(task_vectors: TaskVectors) -> list[dict[str, torch.Tensor]]:
    return [task_vectors.layout.views(weights) for weights in task_vectors.finetuned().cpu()]


def merged_vector(task_vectors: TaskVectors, model: ModelAccess, alignment: Alignment, repaired: str,
                  batches: list[torch.Tensor], endpoints: list[nn.Module] | None = None,
                  merged: torch.Tensor | None = None) -> torch.Tensor:
    """τ_m of the mean of the aligned endpoints (or of the given ``merged`` weights), renormalized by
    REPAIR when ``repaired`` is ``on``."""
    spec = spec_for(task_vectors.layout.names)
    if merged is None:
        merged = task_vectors.layout.flatten(merge_states(spec, alignment, endpoint_states(task_vectors)))
    merged = merged.to(task_vectors.pretrained)
    if repaired == "on":
        targets = repair_targets(spec, alignment, endpoints or endpoint_models(task_vectors, model, batches), batches)
        network = model.backbone(merged)
        renormalize(network, spec, targets, batches, reset=lambda module: reset_statistics(module, batches))
        merged = task_vectors.layout.flatten({name: p.detach() for name, p in network.named_parameters()}).clone()
    return merged - task_vectors.pretrained


def activation_based(task_vectors: TaskVectors, model: ModelAccess, repaired: str,
                     align: Callable[[Mapping[str, Moments]], Alignment]) -> torch.Tensor:
    """Match on the endpoints' activations over the granted training inputs, merge, optionally REPAIR."""
    batches = calibration_batches(model)
    endpoints = endpoint_models(task_vectors, model, batches)
    moments = feature_moments(spec_for(task_vectors.layout.names), endpoints, batches)
    return merged_vector(task_vectors, model, align(moments), repaired, batches, endpoints)


@register("weight_matching", citation="Ainsworth et al., 2023 (Git Re-Basin)", data="train-samples", examples=CALIBRATION_EXAMPLES)
def weight_matching(task_vectors: TaskVectors, *, model: ModelAccess, seed: int,
                    repair: Annotated[str, REPAIR] = "on") -> torch.Tensor:
    """Permute each model's units onto the first's by maximizing Σ⟨W_ref, P W_t Pᵀ⟩, then average."""
    spec = spec_for(task_vectors.layout.names)
    alignment = matching.weight_matching(spec, endpoint_states(task_vectors), seed=seed)
    batches = calibration_batches(model) if repair == "on" else []
    return merged_vector(task_vectors, model, alignment, repair, batches)


@register("activation_matching", citation="Ainsworth et al., 2023 (Git Re-Basin)", data="train-samples", examples=CALIBRATION_EXAMPLES)
def activation_matching(task_vectors: TaskVectors, *, model: ModelAccess, repair: Annotated[str, REPAIR] = "on") -> torch.Tensor:
    """Permute each model's units onto the first's by maximal activation correlation, then average."""
    return activation_based(task_vectors, model, repair, matching.activation_matching)


@register("zipit", citation="Stoica et al., 2024 (ZipIt! Merging Models from Different Tasks without Training)",
          data="train-samples", examples=CALIBRATION_EXAMPLES)
def zipit(task_vectors: TaskVectors, *, model: ModelAccess, repair: Annotated[str, REPAIR] = "on") -> torch.Tensor:
    """Zip the most correlated units, within and across models, into averaged units."""
    return activation_based(task_vectors, model, repair, matching.zipit)


def tie(models: list[nn.Module], shared: set[str]) -> None:
    """Make every model hold model 0's Parameter object for each name in ``shared`` (counted once)."""
    for name in shared:
        owner, _, leaf = name.rpartition(".")
        parameter = models[0].get_submodule(owner).get_parameter(leaf)
        for other in models[1:]:
            setattr(other.get_submodule(owner), leaf, parameter)


@register("zipit_partial", citation="Stoica et al., 2024 (ZipIt!, partial zipping)", data="train-samples",
          examples=CALIBRATION_EXAMPLES, returns_model=True)
def zipit_partial(
    task_vectors: TaskVectors, *, model: ModelAccess,
    zip_layers: Annotated[int, HParam("unit groups zipped, in forward order; later layers stay each model's own", low=1)] = 2,
) -> nn.Module:
    """Zip the first layers into one shared trunk; each model keeps its later layers; logits averaged."""
    spec = spec_for(task_vectors.layout.names)
    batches = calibration_batches(model)
    endpoints = endpoint_models(task_vectors, model, batches)
    alignment = matching.zipit(feature_moments(spec, endpoints, batches))
    states, shared = partially_merged_states(spec, alignment, endpoint_states(task_vectors), set(spec.groups[:zip_layers]))
    members = []
    for state in states:
        network = model.backbone(task_vectors.layout.flatten(state).to(task_vectors.pretrained))
        members.append(calibrated(network, batches))
    tie(members, shared)
    for member in members:
        reset_statistics(member, batches)
    return Ensemble(members)


@register("cca_merge", citation="Horoi et al., 2024 (Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis)",
          data="train-samples", examples=CALIBRATION_EXAMPLES)
def cca_merge(
    task_vectors: TaskVectors, *, model: ModelAccess, repair: Annotated[str, REPAIR] = "on",
    regularization: Annotated[float, HParam("ridge γ added to each covariance, relative to its mean variance", low=0.0)] = 1e-2,
) -> torch.Tensor:
    """Map each model's units onto the first's by CCA's linear transform, then average."""
    return activation_based(task_vectors, model, repair, lambda moments: matching.cca_merge(moments, regularization=regularization))


@register("ot_fusion", citation="Singh & Jaggi, 2020 (Model Fusion via Optimal Transport)", data="train-samples", examples=CALIBRATION_EXAMPLES)
def ot_fusion(
    task_vectors: TaskVectors, *, model: ModelAccess, repair: Annotated[str, REPAIR] = "on",
    entropic: Annotated[float, HParam("entropic regularization of the transport plan (0: exact, POT's emd)", low=0.0)] = 0.0,
) -> torch.Tensor:
    """Transport each model's units onto the first's (uniform marginals, activation cost), then average."""
    return activation_based(task_vectors, model, repair, lambda moments: matching.ot_fusion(moments, entropic=entropic))


def learn_parameter_weights(network: nn.Module, aligned: torch.Tensor, layout, model: ModelAccess, *, steps: int, lr: float,
                            seed: int) -> torch.Tensor:
    """NP Merge's optimization: θ = Σ_t softmax_t(β)_t ⊙ θ̃_t, with β ``[T, N]`` from 0 (the plain average),
    trained by Adam on cross-entropy over the granted labelled batches (BatchNorm on batch statistics)."""
    batches = [(inputs, labels) for task in model.tasks for inputs, labels in model.batches(task, BATCH_SIZE)]
    logits = torch.zeros_like(aligned, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    order = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(steps):
        inputs, labels = batches[int(torch.randint(len(batches), (1,), generator=order))]
        merged = (torch.softmax(logits, dim=0) * aligned).sum(dim=0)
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(network, layout.views(merged), (inputs,)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        return (torch.softmax(logits, dim=0) * aligned).sum(dim=0)


@register("np_merge", citation="Orozco Camacho et al., 2024 (Non-Uniform Parameter-Wise Model Merging)", data="train-samples",
          examples=CALIBRATION_EXAMPLES)
def np_merge(
    task_vectors: TaskVectors, *, model: ModelAccess, seed: int, repair: Annotated[str, REPAIR] = "off",
    steps: Annotated[int, HParam("Adam steps on the per-parameter weights", low=1)] = 200,
    lr: Annotated[float, HParam("learning rate of the per-parameter weight logits", low=0.0)] = 0.05,
) -> torch.Tensor:
    """Align by weight matching, then learn each parameter's weight per model by gradient descent:
    θ_i = Σ_t α_{t,i} θ̃_{t,i} with α_{·,i} = softmax(β_{·,i}), β trained on the labelled training batches."""
    spec = spec_for(task_vectors.layout.names)
    states = endpoint_states(task_vectors)
    alignment = matching.weight_matching(spec, states, seed=seed)
    aligned = torch.stack([task_vectors.layout.flatten(align_state(spec, alignment, state, t)) for t, state in enumerate(states)])
    network = model.backbone(task_vectors.pretrained)
    merged = learn_parameter_weights(network, aligned.to(task_vectors.pretrained), task_vectors.layout, model, steps=steps, lr=lr, seed=seed)
    return merged_vector(task_vectors, model, alignment, repair, calibration_batches(model) if repair == "on" else [], merged=merged)


@register("average_repair", citation="Jordan et al., 2023 (REPAIR)", data="train-samples", examples=CALIBRATION_EXAMPLES)
def average_repair(task_vectors: TaskVectors, *, model: ModelAccess) -> torch.Tensor:
    """Average the endpoints without aligning them, then REPAIR."""
    spec = spec_for(task_vectors.layout.names)
    identity = {g: [torch.arange(spec.size(g, task_vectors.layout.views(task_vectors.pretrained)))] * task_vectors.num_tasks for g in spec.groups}
    return merged_vector(task_vectors, model, Alignment.of_permutations(identity), "on", calibration_batches(model))


@register("ensemble", citation="output ensemble (upper reference)", data="train-samples", examples=CALIBRATION_EXAMPLES, returns_model=True)
def ensemble(task_vectors: TaskVectors, *, model: ModelAccess) -> nn.Module:
    """Average the endpoints' logits: every model kept whole (T× the parameters)."""
    return Ensemble(endpoint_models(task_vectors, model, calibration_batches(model)))

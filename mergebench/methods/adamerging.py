"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning").

Layer-wise AdaMerging learns one coefficient per task per layer l,

    θ_l = θ₀_l + Σ_t λ_{t,l} τ_{t,l},

by test-time adaptation: minimizing the Shannon entropy of each task's head predictions on unlabeled
test inputs of that task (paper Eq. 5–6), summed over tasks,

    min_λ Σ_t Σ_{x ∈ B_t} H(softmax(h_t(f(x; θ(λ))))),   H(p) = −Σ_c p_c log p_c.

Choices from the authors' ``main_layer_wise_adamerging.py``: a "layer" is one parameter tensor (one
λ per task per tensor of the state dict), λ initialized at 0.3, Adam with lr 10⁻³, 500 steps, batches
of 16; each step takes the first two batches of a freshly shuffled loader of every task (their
``if i > 0: break``) and sums the batch-mean entropies; the coefficients used in every forward pass
are ``clamp(λ_raw, 0, 1)`` (their ``lambdas()``), so the merged model always has λ ∈ [0, 1] (FusionBench
makes this clamp optional, default off). The shuffling comes from a generator seeded with the run's
seed. The result is returned as τ_m = Σ_t λ_{t,l} τ_{t,l} (no λ post-scaling).

AdaMerging++ (``adamerging_ties``, the authors' ``main_layer_wise_adamergingpp.py``) learns the same
coefficients over TIES-processed task vectors: each τ_t trimmed to its top k = 20 % magnitudes over
the whole vector, signs elected by mass, and every task keeping only its entries that agree with the
elected sign (their ``ties_merging_split``, "dis-sum") — the disjoint-masked vectors, not their mean.
"""

from __future__ import annotations

from typing import Annotated

import torch
from tqdm.auto import trange

from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, register
from mergebench.methods.ties import elect_signs, trim

BATCHES_PER_STEP = 2  # authors' loop breaks after the second batch of every task


# The authors' defaults; ``steps`` is small-able for CPU runs.
Steps = Annotated[int, HParam("Adam steps on the entropy (authors: 500)", low=0)]
LearningRate = Annotated[float, HParam("Adam learning rate (authors: 1e-3)", low=0.0)]
Init = Annotated[float, HParam("initial value of every coefficient λ_{t,l} (authors: 0.3)", low=0.0, high=1.0)]
BatchSize = Annotated[int, HParam("unlabeled test inputs per batch (authors: 16)", low=1)]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) per row."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def layer_coefficients(
    task_vectors: TaskVectors, vectors: torch.Tensor, model: ModelAccess, *,
    steps: int, lr: float, init: float, batch_size: int, seed: int,
) -> torch.Tensor:
    """Learned λ ``[T, S]`` (one per task and parameter tensor), each in [0, 1]."""
    device = model.device
    layout = task_vectors.layout
    vectors = vectors.to(device)
    pretrained = task_vectors.pretrained.to(device)
    sizes = torch.tensor([slot.stop - slot.start for slot in layout.slots], device=device)
    inputs = {task: torch.cat([x for x, _ in model.batches(task, batch_size)]) for task in task_vectors.tasks}
    heads = {task: model.head(task) for task in task_vectors.tasks}
    raw = torch.full((len(task_vectors.tasks), len(layout.slots)), init, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in trange(steps, desc="AdaMerging entropy steps", unit="step", leave=False):
        coefficients = raw.clamp(0.0, 1.0).repeat_interleave(sizes, dim=1)
        params = layout.views(pretrained + (coefficients * vectors).sum(dim=0))
        loss = torch.zeros((), device=device)
        for task, task_inputs in inputs.items():
            order = torch.randperm(len(task_inputs), generator=generator)[: BATCHES_PER_STEP * batch_size]
            for batch in order.to(device).split(batch_size):
                logits = heads[task](model.functional_features(params, task_inputs[batch]))
                loss = loss + softmax_entropy(logits).mean()
        # autograd.grad, not backward: the heads are shared modules whose .grad must stay untouched
        (raw.grad,) = torch.autograd.grad(loss, [raw])
        optimizer.step()
    return raw.detach().clamp(0.0, 1.0)


def coefficient_merge(task_vectors: TaskVectors, vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """τ_m = Σ_t λ_{t,l} τ_{t,l} for coefficients ``[T, S]``."""
    sizes = torch.tensor([slot.stop - slot.start for slot in task_vectors.layout.slots], device=vectors.device)
    return (coefficients.to(vectors.device).repeat_interleave(sizes, dim=1) * vectors).sum(dim=0)


def disjoint_ties_vectors(task_vectors: TaskVectors, k: float) -> torch.Tensor:
    """AdaMerging++'s task vectors: trimmed to top-k %, then masked to the entries agreeing with the elected sign."""
    trimmed = trim(task_vectors, task_vectors.vectors, k, "global")
    return trimmed * ((trimmed * elect_signs(trimmed)) > 0)


def adaptive_merge(task_vectors: TaskVectors, vectors: torch.Tensor, model: ModelAccess, **options) -> torch.Tensor:
    coefficients = layer_coefficients(task_vectors, vectors, model, **options)
    return coefficient_merge(task_vectors, vectors, coefficients)


@register(
    "adamerging",
    citation="Yang et al., 2024 (AdaMerging: Adaptive Model Merging for Multi-Task Learning)",
    data="unlabeled-test",
)
def adamerging(
    task_vectors: TaskVectors,
    *,
    steps: Steps = 500,
    lr: LearningRate = 1e-3,
    init: Init = 0.3,
    batch_size: BatchSize = 16,
    model: ModelAccess,
    seed: int,
) -> torch.Tensor:
    """Layer-wise coefficients learned by entropy minimization on unlabeled test inputs."""
    return adaptive_merge(task_vectors, task_vectors.vectors, model, steps=steps, lr=lr, init=init, batch_size=batch_size, seed=seed)


@register(
    "adamerging_ties",
    citation="Yang et al., 2024 (AdaMerging++) with Yadav et al., 2023 (TIES)",
    data="unlabeled-test",
)
def adamerging_ties(
    task_vectors: TaskVectors,
    *,
    steps: Steps = 500,
    lr: LearningRate = 1e-3,
    init: Init = 0.3,
    batch_size: BatchSize = 16,
    k: Annotated[float, HParam("percent of each task vector kept by the TIES trim (authors: 20)", low=0.0, high=100.0)] = 20.0,
    model: ModelAccess,
    seed: int,
) -> torch.Tensor:
    """AdaMerging++: layer-wise coefficients over TIES-trimmed, sign-elected, disjoint task vectors."""
    vectors = disjoint_ties_vectors(task_vectors, k)
    return adaptive_merge(task_vectors, vectors, model, steps=steps, lr=lr, init=init, batch_size=batch_size, seed=seed)

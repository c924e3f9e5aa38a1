"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each fine-tuned model θ_t (backbone with its own frozen head) gets the diagonal of its Fisher
information, estimated on N training examples x_1…x_N of its task:

    F_t = (1/N) Σ_n E_{y ~ q(y|x_n)} [ (∇_θ log p_θt(y | x_n))² ]        (elementwise square)

and the merged weights are the Fisher-weighted average (paper Eq. 2, equal model weights λ_t = 1/T):

    θ* = Σ_t F̂_t ⊙ θ_t / Σ_t F̂_t,     so  τ_m = θ* − θ₀ = Σ_t F̂_t ⊙ τ_t / Σ_t F̂_t.

The distribution q over labels is the ``labels`` option:

* ``exact`` (default, the authors' ``_compute_exact_fisher_for_batch``): the expectation over the
  model's own predictive distribution, Σ_c p(c|x) (∇ log p(c|x))² — one gradient per class;
* ``sampled``: one label per example drawn from p(·|x) with a generator seeded by the run's seed;
* ``empirical``: the example's true label (the "empirical Fisher").

Choices from the authors' code (``model_merging/merging.py``): the floor F̂ = max(F, 10⁻⁶)
(``fisher_floor``) and ``normalize="l2"`` (``normalize_fishers=True``: each model's weight is divided
by the global L2 norm of its Fisher, F̂_t/‖F_t‖₂, so no task dominates by scale); ``normalize="none"``
gives the plain formula above. FusionBench uses the same floor and normalization but a batch-level
squared gradient rather than per-example ones; we follow the paper with per-example gradients
(one forward pass per example, one backward pass per label: :func:`summed_squared_gradients`). N = 256 examples per task is FusionBench's default
(``num_fisher_examples``); the authors' script uses 4,096. Only the backbone's mergeable parameters
get a Fisher (the heads are not merged); buffers (BatchNorm statistics) are frozen.
"""

from __future__ import annotations

from typing import Annotated, Callable, Mapping

import torch
from tqdm.auto import tqdm

from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.methods.registry import HParam, register

FISHER_FLOOR = 1e-6  # authors' fisher_floor and FusionBench's minimal_fisher_weight
FISHER_EXAMPLES = 256  # FusionBench num_fisher_examples
EXAMPLE_CHUNK = 16  # examples per batch read from the granted data (the progress bar's unit)
LABELS = ("exact", "sampled", "empirical")


LogProbs = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def summed_squared_gradients(
    log_probs: LogProbs, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_n Σ_k w_nk (∇_θ log p(y_nk | x_n))² over a chunk of examples, per parameter tensor.

    ``log_probs(params, inputs)`` maps a batch ``[B, …]`` to log-probabilities ``[B, C]``; ``labels`` is
    ``[B]`` (one label per example) or ``[B, K]`` (K labels per example, e.g. every class), ``weights``
    the same shape (1 if None). The gradients are per example and label (one forward pass per example,
    one backward pass per label, which keeps memory at one model's gradients), squared, weighted and summed.
    """
    names = list(params)
    leaves = [params[name].detach().requires_grad_(True) for name in names]
    totals = [torch.zeros_like(leaf) for leaf in leaves]
    labels = labels if labels.dim() == 2 else labels[:, None]
    weights = torch.ones(labels.shape, device=labels.device) if weights is None else weights.reshape(labels.shape)
    for n in range(len(inputs)):
        row = log_probs(dict(zip(names, leaves)), inputs[n : n + 1])[0]
        for k in range(labels.shape[1]):
            gradients = torch.autograd.grad(row[labels[n, k]], leaves, retain_graph=k + 1 < labels.shape[1])
            for total, gradient in zip(totals, gradients):
                total.add_(gradient.square(), alpha=float(weights[n, k]))
    return dict(zip(names, totals))


def fisher_diagonal(
    model: ModelAccess, layout: ParamLayout, theta: torch.Tensor, task: str, labels: str, seed: int
) -> torch.Tensor:
    """The flat diagonal Fisher ``[N]`` of the backbone θ (with ``task``'s head) on the granted slice."""
    params = layout.views(theta.to(model.device))
    head = model.head(task)

    def log_probs(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(model.functional_features(p, x)), dim=-1)

    generator = torch.Generator(device=model.device).manual_seed(seed)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for inputs, true_labels in tqdm(model.batches(task, EXAMPLE_CHUNK), desc=f"Fisher {task}", unit="batch", leave=False):
        with torch.no_grad():
            probs = log_probs(params, inputs).exp()
        if labels == "exact":  # every class c, weighted by p(c | x)
            every_class = torch.arange(probs.shape[1], device=probs.device).expand(len(inputs), -1)
            chunk = summed_squared_gradients(log_probs, params, inputs, every_class, probs)
        elif labels == "sampled":
            chunk = summed_squared_gradients(log_probs, params, inputs, torch.multinomial(probs, 1, generator=generator)[:, 0])
        else:
            chunk = summed_squared_gradients(log_probs, params, inputs, true_labels)
        for name, value in chunk.items():
            total[name] += value
        count += len(inputs)
    return layout.flatten(total).div_(max(count, 1)).to(theta.device)


def fisher_weighted_average(vectors: torch.Tensor, fishers: torch.Tensor, *, floor: float, normalize: str) -> torch.Tensor:
    """τ_m = Σ_t w_t ⊙ τ_t / Σ_t w_t with w_t = max(F_t, floor) (÷ ‖F_t‖₂ if ``normalize="l2"``)."""
    weights = fishers.clamp(min=floor)
    if normalize == "l2":
        weights = weights / fishers.norm(dim=1, keepdim=True).clamp(min=torch.finfo(fishers.dtype).tiny)
    return (weights * vectors).sum(dim=0) / weights.sum(dim=0)


@register(
    "fisher",
    citation="Matena & Raffel, 2022 (Merging Models with Fisher-Weighted Averaging)",
    data="train-samples",
    examples=FISHER_EXAMPLES,
)
def fisher(
    task_vectors: TaskVectors,
    *,
    labels: Annotated[str, HParam("labels y of the Fisher: model expectation, one sampled, or the true label", choices=LABELS)] = "exact",
    normalize: Annotated[str, HParam("divide each model's Fisher by its L2 norm (authors' default)", choices=("l2", "none"))] = "l2",
    seed: int,
    model: ModelAccess,
) -> torch.Tensor:
    """Fisher-weighted average of the fine-tuned models: θ = Σ_t F_t θ_t / Σ_t F_t."""
    finetuned = task_vectors.finetuned()
    label_seed = seed if labels == "sampled" else None
    fishers = torch.stack([
        model.cached(
            "fisher",
            {"task": task, "labels": labels, "seed": label_seed},
            lambda row=row, task=task: fisher_diagonal(model, task_vectors.layout, finetuned[row], task, labels, label_seed or 0),
        )
        for row, task in enumerate(task_vectors.tasks)
    ])
    return fisher_weighted_average(task_vectors.vectors, fishers, floor=FISHER_FLOOR, normalize=normalize)

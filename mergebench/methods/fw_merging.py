"""FW-Merging (Chen et al., ICCV 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization", arXiv:2503.12649): merging as constrained minimization of the task losses.

The merged weights minimize the sum of the tasks' training losses over the convex hull of the
candidate models,

    min_θ f(θ) = Σ_t L_t(θ),   L_t(θ) = (1/N) Σ_n CE(h_t(φ(x_n; θ)), y_n),   θ ∈ conv{θ_1, …, θ_T, θ^(0)},

(φ the backbone, h_t task t's own frozen head, N labeled training examples per task), solved by
Frank-Wolfe. Each iteration k = 0, 1, …, K − 1:

1. **relevance**: the gradient g_k = ∇f(θ^(k)) on the examples of every task;
2. **selection** (the linear-minimization oracle): the candidate that minimizes the linearized
   objective, s_k = argmin_{s ∈ candidates} ⟨g_k, s⟩ — equivalently the task vector τ_s with the most
   negative inner product with the gradient, since ⟨g, θ₀ + τ_s⟩ = ⟨g, θ₀⟩ + ⟨g, τ_s⟩;
3. **integration** (the Frank-Wolfe step, "hard" FW with Task Arithmetic as the merging function):

       θ^(k+1) = θ^(k) + γ_k (s_k − θ^(k)) = (1 − γ_k) θ^(k) + γ_k s_k,   γ_k = η · λ · 2/(k + 2),

   the classic 2/(k + 2) schedule scaled by the step size η and the Task Arithmetic coefficient λ
   (their ``step = 2 / (step_idx + 2) * step_size``, merged with ``scaling_factor=step * scaling_factor``).

Everything runs on task vectors: θ = θ₀ + x, every candidate is θ₀ + c with c = τ_t or c = x^(0), and
the step reads x^(k+1) = (1 − γ_k) x^(k) + γ_k c_k. The result is τ_m = x^(K) (no λ post-scaling).

Choices, from FusionBench's ``fusion_bench/method/fw_merging/fw_hard.py`` (``FrankWolfeHardAlgorithm``,
the authors' ViT implementation) and ``config/method/fw_merging/fw_hard.yaml``, and the authors'
``discriminative/merge.py`` (github.com/hmarkc/FW-Merging):

* Defaults ``max_iters: 10``, ``step_size: 0.1``, ``scaling_factor: 0.3``, ``dataset_size: 100``
  examples per task, ``loss_fn: cross_entropy``, ``granularity: task``, ``merge_fn: task_arithmetic``.
* Start: with no ``init_weight`` they start from Task Arithmetic, θ^(0) = θ₀ + λ Σ_t τ_t
  (``init="task_arithmetic"``); ``init="pretrained"`` is their ``init_weight: base``, θ^(0) = θ₀.
  The starting point is added to the pool of candidates (their ``finetuned_models["initial"]``), so
  every iterate stays in the hull and the oracle may also step back toward it. Candidates are
  compared in the order τ_1 … τ_T, θ^(0); ties go to the first.
* Oracle: ``oracle="inner"`` (default) is the linear-minimization oracle above. Both codes instead
  score each candidate by the sum over parameter tensors p of the cosine similarity between the
  gradient and the candidate's *weights*, Σ_p ⟨g_p, θ_s,p⟩ / (‖g_p‖ ‖θ_s,p‖) — ``oracle="cosine"``
  (a term whose norm is zero counts 0 here; theirs would be NaN).
* ``granularity="layer"`` (their layer-wise oracle) picks the candidate separately for every
  parameter tensor and steps toward the composite; ``"task"`` (FusionBench's default for the ViTs)
  picks one candidate for all tensors. The authors' RoBERTa script (``merge.py``) is layer-wise and
  there steps a tensor whose best cosine is not negative toward zero weights; FusionBench dropped
  that rule, and so does this module.
* Loss and examples: the gradient is the exact gradient of f on the granted examples (the same N
  examples of every task at each iteration, BatchNorm frozen), where FusionBench draws a fresh
  shuffled ``dataset_size`` of each task's training set at every iteration and divides f by T (a
  scale that changes neither the oracle nor the steps).
* Not implemented: the "soft" variant (FusionBench ``FrankWolfeSoftAlgorithm``), which re-runs
  AdaMerging over the selected models at every iteration, and TIES as the merging function.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch.nn import functional as F
from tqdm.auto import trange

from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.methods.registry import HParam, register

FW_EXAMPLES = 100  # FusionBench fw_hard.yaml dataset_size
GRAD_BATCH = 32
ORACLES = ("inner", "cosine")
GRANULARITIES = ("task", "layer")
INITS = ("task_arithmetic", "pretrained")


def step_size_at(iteration: int, step_size: float, scaling: float) -> float:
    """γ_k = η · λ · 2/(k + 2)."""
    return 2.0 / (iteration + 2) * step_size * scaling


def frank_wolfe_step(current: torch.Tensor, vertex: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 − γ) x + γ s."""
    return torch.lerp(current, vertex, gamma)


def slot_scores(
    gradient: torch.Tensor, candidates: list[torch.Tensor], layout: ParamLayout, pretrained: torch.Tensor, oracle: str
) -> torch.Tensor:
    """``[C, S]``: each candidate's score on each parameter tensor — ⟨g_p, c_p⟩ for ``inner``, the cosine
    between g_p and the candidate's weights θ₀_p + c_p for ``cosine``."""
    scores = torch.zeros(len(candidates), len(layout.slots), dtype=torch.float64)
    for column, slot in enumerate(layout.slots):
        g = gradient[slot.start : slot.stop].double()
        for row, candidate in enumerate(candidates):
            c = candidate[slot.start : slot.stop].double()
            if oracle == "inner":
                scores[row, column] = float(g @ c)
            else:
                w = c + pretrained[slot.start : slot.stop].double()
                norms = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(w))
                scores[row, column] = float(g @ w) / norms if norms > 0 else 0.0
    return scores


def oracle_choice(
    gradient: torch.Tensor, candidates: list[torch.Tensor], layout: ParamLayout, pretrained: torch.Tensor,
    *, oracle: str, granularity: str,
) -> torch.Tensor:
    """The chosen candidate for every parameter tensor, ``[S]``: one argmin of the summed scores
    (``task``) or one argmin per tensor (``layer``)."""
    scores = slot_scores(gradient, candidates, layout, pretrained, oracle)
    if granularity == "task":
        return scores.sum(dim=1).argmin().repeat(len(layout.slots))
    return scores.argmin(dim=0)


def assemble(candidates: list[torch.Tensor], choice: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """The vertex s: every parameter tensor taken from its chosen candidate."""
    vertex = torch.empty_like(candidates[0])
    for slot, row in zip(layout.slots, choice.tolist()):
        vertex[slot.start : slot.stop] = candidates[row][slot.start : slot.stop]
    return vertex


def loss_and_gradient(
    task_vectors: TaskVectors, model: ModelAccess, merged_vector: torch.Tensor, data: dict[str, list]
) -> tuple[float, torch.Tensor]:
    """f(θ₀ + x) = Σ_t mean cross-entropy of task t, and its gradient with respect to x (``[N]``)."""
    flat = (task_vectors.pretrained + merged_vector).to(model.device).detach().requires_grad_(True)
    params = task_vectors.layout.views(flat)
    gradient = torch.zeros_like(flat)
    total = 0.0
    for task, batches in data.items():
        head = model.head(task)
        count = sum(len(inputs) for inputs, _ in batches)
        for inputs, labels in batches:
            logits = head(model.functional_features(params, inputs))
            loss = F.cross_entropy(logits, labels, reduction="sum") / count
            # autograd.grad, not backward: the heads are shared modules whose .grad must stay untouched
            (batch_gradient,) = torch.autograd.grad(loss, [flat])
            gradient += batch_gradient
            total += float(loss.detach())
    return total, gradient.to(merged_vector.device)


def frank_wolfe_merge(
    task_vectors: TaskVectors, model: ModelAccess, *,
    iterations: int, step_size: float, scaling: float, oracle: str, granularity: str, init: str,
) -> torch.Tensor:
    """x^(K) after K Frank-Wolfe steps over the pool {τ_1, …, τ_T, x^(0)}."""
    vectors = task_vectors.vectors
    start = scaling * vectors.sum(dim=0) if init == "task_arithmetic" else torch.zeros_like(task_vectors.pretrained)
    candidates = [*vectors.unbind(0), start]
    data = {task: list(model.batches(task, GRAD_BATCH)) for task in task_vectors.tasks}
    current = start.clone()
    for iteration in trange(iterations, desc="FW-Merging iterations", unit="step", leave=False):
        _, gradient = loss_and_gradient(task_vectors, model, current, data)
        choice = oracle_choice(
            gradient, candidates, task_vectors.layout, task_vectors.pretrained, oracle=oracle, granularity=granularity
        )
        vertex = assemble(candidates, choice, task_vectors.layout)
        current = frank_wolfe_step(current, vertex, step_size_at(iteration, step_size, scaling))
    return current


@register(
    "fw_merging",
    citation="Chen et al., 2025 (FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization)",
    data="train-samples",
    examples=FW_EXAMPLES,
)
def fw_merging(
    task_vectors: TaskVectors,
    *,
    iterations: Annotated[int, HParam("Frank-Wolfe iterations (authors: 10)", low=0)] = 10,
    step_size: Annotated[float, HParam("step size η of γ_k = η·λ·2/(k+2) (authors: 0.1)", low=0.0, high=1.0)] = 0.1,
    scaling: Annotated[float, HParam("Task Arithmetic coefficient λ of the start and of every step (authors: 0.3)", low=0.0, high=1.0)] = 0.3,
    oracle: Annotated[str, HParam("candidate score: inner product with the gradient (LMO) or the authors' per-tensor cosine sum", choices=ORACLES)] = "inner",
    granularity: Annotated[str, HParam("one candidate for the whole model (task) or one per parameter tensor (layer)", choices=GRANULARITIES)] = "task",
    init: Annotated[str, HParam("start θ^(0): Task Arithmetic with λ (authors' default) or the pretrained model", choices=INITS)] = "task_arithmetic",
    model: ModelAccess,
) -> torch.Tensor:
    """Frank-Wolfe over the fine-tuned models: step toward the candidate the loss gradient favours."""
    return frank_wolfe_merge(
        task_vectors, model, iterations=iterations, step_size=step_size, scaling=scaling, oracle=oracle,
        granularity=granularity, init=init,
    )

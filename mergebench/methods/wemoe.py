"""WEMoE (Tang et al., ICML 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts").

Every feed-forward block of the backbone (a transformer layer's MLP; a CNN's MBConv block) is
*upscaled* into a weight-ensembling mixture of experts. For an input x with tokens h_1 … h_n,

    r(x) = (1/n) Σ_i R(h_i),         R(h) = W₂ ReLU(W₁ h + b₁) + b₂ ∈ ℝ^T       (the router)
    θ_ff(x) = θ₀_ff + Σ_t r_t(x) τ_{t,ff}                                        (weight ensembling)
    y = f_ff(x; θ_ff(x)),

so every sample runs through its own merged block. Every other parameter is merged by task arithmetic,
θ = θ₀ + λ Σ_t τ_t with λ = ``init_lambda``. Only the routers are trained, by test-time adaptation on
unlabeled test inputs: Adam on Σ_t H(softmax(h_t(f(x)))) over a batch x of each task t, the entropy
objective of AdaMerging.

Choices from the authors' code (FusionBench ``models/we_moe.py``, ``method/we_moe/``): routers of two
layers with hidden width = the block's input width, weights N(0, 0.01²), b₁ = 0 and b₂ = ``init_lambda``
= 0.3, so training starts at task arithmetic with λ = 0.3 everywhere; routing weights not clamped;
Adam with lr 10⁻⁴, 1000 steps, 16 inputs per task per step, the tasks' entropies summed. While training,
the routing weights are averaged over the batch (one merged block per batch, their ``batch_reduce``);
the returned model routes every sample on its own.

Tokens are a sequence's positions (``[B, n, h]``) or a feature map's pixels (``[B, h, H, W]``); as in
the authors' code, the router's mean runs over every position, padding included.
Which modules are feed-forward blocks is the backbone's ``feed_forward_modules()``; BatchNorm running
statistics inside a block stay those of the pretrained model. The merged model holds θ₀ and T task
vectors of every block, so it is larger than the base model (the table's ``Params`` column).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import trange

from mergebench.core.data_access import ModelAccess
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.adamerging import softmax_entropy
from mergebench.methods.registry import HParam, register

ROUTER_INIT_STD = 0.01


def tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, h]`` tokens of a block input: sequence positions, or the pixels of a ``[B, h, H, W]`` map."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        return x
    raise MergebenchError(f"cannot route a block input of shape {tuple(x.shape)}: expected [B, n, h] or [B, h, H, W]")


class Router(nn.Module):
    """R(h) = W₂ ReLU(W₁ h + b₁) + b₂, initialized so that R(h) ≈ init_lambda for every task."""

    def __init__(self, width: int, num_tasks: int, init_lambda: float, generator: torch.Generator):
        super().__init__()
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, num_tasks)
        with torch.no_grad():
            for layer in (self.hidden, self.out):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * ROUTER_INIT_STD)
            self.hidden.bias.zero_()
            self.out.bias.fill_(init_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights r(x) ``[B, T]``: the token mean of R."""
        return self.out(torch.relu(self.hidden(tokens(x)))).mean(dim=1)


class WeightEnsemblingMoE(nn.Module):
    """A feed-forward block whose weights are θ₀ + Σ_t r_t(x) τ_t, routed per input."""

    def __init__(self, block: nn.Module, task_vectors: Mapping[str, torch.Tensor], router: Router):
        super().__init__()
        self.block = block.requires_grad_(False)  # holds θ₀ of the block and its buffers
        self.names = list(task_vectors)
        self.task_vectors = nn.ParameterList(nn.Parameter(task_vectors[n], requires_grad=False) for n in self.names)
        self.router = router
        self.batch_reduce = False  # True while training: one merged block per batch

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ₀ + Σ_t w_t τ_t for routing weights ``[T]`` (one block) or ``[B, T]`` (one per sample)."""
        base = dict(self.block.named_parameters())
        return {n: base[n] + torch.tensordot(weights, tv, dims=1) for n, tv in zip(self.names, self.task_vectors)}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.router(x)
        if self.batch_reduce:
            return functional_call(self.block, self.merged_parameters(weights.mean(dim=0)), (x, *args), kwargs)

        def one_sample(params, sample, *rest):
            batched = [r.unsqueeze(0) if isinstance(r, torch.Tensor) else r for r in rest]
            return functional_call(self.block, params, (sample.unsqueeze(0), *batched), kwargs).squeeze(0)

        in_dims = (0, 0, *(0 if isinstance(a, torch.Tensor) else None for a in args))
        return vmap(one_sample, in_dims=in_dims)(self.merged_parameters(weights), x, *args)


def upscale(
    task_vectors: TaskVectors, model: ModelAccess, *, init_lambda: float, probe: torch.Tensor, generator: torch.Generator
) -> nn.Module:
    """A copy of the backbone merged by task arithmetic (λ = ``init_lambda``), its feed-forward blocks
    replaced by :class:`WeightEnsemblingMoE` modules over the blocks' pretrained weights and task vectors."""
    device = model.device
    pretrained = task_vectors.pretrained.to(device)
    vectors = task_vectors.vectors.to(device)
    merged = copy.deepcopy(model.backbone(pretrained + init_lambda * vectors.sum(dim=0))).requires_grad_(False)
    names = feed_forward_modules(merged)
    widths = input_widths(merged, names, probe.to(device))
    theta0 = task_vectors.layout.views(pretrained)
    per_task = [task_vectors.layout.views(v) for v in vectors]
    for name in names:
        block = merged.get_submodule(name)
        stacked = {}
        for param_name, param in block.named_parameters():
            full = f"{name}.{param_name}"
            param.data.copy_(theta0[full].view_as(param))
            stacked[param_name] = torch.stack([views[full].view_as(param) for views in per_task])
        router = Router(widths[name], len(task_vectors.tasks), init_lambda, generator).to(device)
        merged.set_submodule(name, WeightEnsemblingMoE(block, stacked, router))
    return merged


def feed_forward_modules(backbone: nn.Module) -> tuple[str, ...]:
    declared = getattr(backbone, "feed_forward_modules", None)
    names = declared() if declared is not None else ()
    if not names:
        raise MergebenchError(f"wemoe: the {type(backbone).__name__} backbone declares no feed-forward modules to upscale")
    return names


def input_widths(backbone: nn.Module, names: tuple[str, ...], probe: torch.Tensor) -> dict[str, int]:
    """The token width of each named block's input, read from one forward pass over ``probe``."""
    widths: dict[str, int] = {}

    def record(name: str):
        def hook(_module, args) -> None:
            widths.setdefault(name, tokens(args[0]).shape[-1])

        return hook

    hooks = [backbone.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            backbone.eval()(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return widths


def routers(merged: nn.Module) -> list[WeightEnsemblingMoE]:
    return [m for m in merged.modules() if isinstance(m, WeightEnsemblingMoE)]


def adapt_routers(
    merged: nn.Module, model: ModelAccess, tasks: tuple[str, ...], *,
    steps: int, lr: float, batch_size: int, generator: torch.Generator,
) -> list[float]:
    """Test-time adaptation of the routers; returns the summed entropy at every step."""
    inputs = {task: torch.cat([x for x, _ in model.batches(task, batch_size)]) for task in tasks}
    heads = {task: model.head(task) for task in tasks}
    mixtures = routers(merged)
    parameters = [p for m in mixtures for p in m.router.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for m in mixtures:
        m.batch_reduce = True
    try:
        for _ in trange(steps, desc="WEMoE router steps", unit="step", leave=False):
            loss = torch.zeros((), device=model.device)
            for task, task_inputs in inputs.items():
                batch = torch.randperm(len(task_inputs), generator=generator)[:batch_size].to(task_inputs.device)
                loss = loss + softmax_entropy(heads[task](merged(task_inputs[batch]))).mean()
            # autograd.grad, not backward: the heads are shared modules whose .grad must stay untouched
            gradients = torch.autograd.grad(loss, parameters)
            for p, g in zip(parameters, gradients):
                p.grad = g
            optimizer.step()
            losses.append(loss.item())
    finally:
        for m in mixtures:
            m.batch_reduce = False
    return losses


@register(
    "wemoe",
    citation="Tang et al., 2024 (Merging Multi-Task Models via Weight-Ensembling Mixture of Experts)",
    data="unlabeled-test",
    returns_model=True,
)
def wemoe(
    task_vectors: TaskVectors,
    *,
    init_lambda: Annotated[float, HParam("task-arithmetic λ of the other layers and the routers' initial output (authors: 0.3)", low=0.0)] = 0.3,
    steps: Annotated[int, HParam("Adam steps on the entropy (authors: 1000)", low=0)] = 1000,
    lr: Annotated[float, HParam("Adam learning rate of the routers (authors: 1e-4)", low=0.0)] = 1e-4,
    batch_size: Annotated[int, HParam("unlabeled test inputs per task per step (authors: 16)", low=1)] = 16,
    model: ModelAccess,
    seed: int,
) -> nn.Module:
    """Feed-forward blocks upscaled into routed mixtures of task vectors, routers trained on unlabeled test inputs."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probe, _ = next(model.batches(task_vectors.tasks[0], batch_size))
    merged = upscale(task_vectors, model, init_lambda=init_lambda, probe=probe, generator=generator)
    adapt_routers(merged, model, task_vectors.tasks, steps=steps, lr=lr, batch_size=batch_size, generator=generator)
    return merged.eval()

"""WEMoE: routed weight-ensembling blocks checked against explicitly merged models, sample by sample."""

import copy

import pytest
import torch
from torch import nn

from mergebench.core.task_vectors import merged_state_dict
from mergebench.errors import MergebenchError
from mergebench.methods import get_method
from mergebench.methods.wemoe import WeightEnsemblingMoE, adapt_routers, routers, upscale
from tests.method_helpers import merge, setup

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = 3


class TokenBackbone(nn.Module):
    """Tokens ``[B, n, 3]`` → embedding → one residual MLP → mean over tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))

    def forward(self, x):
        h = self.embed(x)
        return (h + self.mlp(h)).mean(dim=1)

    def feed_forward_modules(self):
        return ("mlp",)


class PixelBackbone(nn.Module):
    """Images ``[B, 3, H, W]`` → one residual 1×1-conv block with BatchNorm → mean over pixels."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 3, 1))
        with torch.no_grad():  # pretrained BatchNorm statistics, which every merged block keeps
            self.block[1].running_mean.uniform_(-0.5, 0.5)
            self.block[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return (x + self.block(x)).mean(dim=(2, 3))

    def feed_forward_modules(self):
        return ("block",)


def perturbed(module, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() and "running" not in name else value
        for name, value in module.state_dict().items()
    }


def problem(backbone_class, inputs):
    torch.manual_seed(0)
    backbone = backbone_class().eval()
    finetuned = [perturbed(backbone, 0.3, seed) for seed in range(TASKS)]
    heads = {f"t{i}": nn.Linear(3 if backbone_class is PixelBackbone else 4, 5) for i in range(TASKS)}
    generator = torch.Generator().manual_seed(1)
    data = {task: (inputs(generator), torch.zeros(8, dtype=torch.long)) for task in heads}
    return setup(backbone, finetuned, heads, data, access="unlabeled-test")


def tokens_input(generator):
    return torch.randn(8, 5, 3, generator=generator)


def pixels_input(generator):
    return torch.randn(8, 3, 4, 4, generator=generator)


def explicit_model(tv, model, backbone_class, block: str, routing: torch.Tensor, init_lambda: float):
    """The plain backbone with θ₀ + λΣτ outside ``block`` and θ₀ + Σ_t r_t τ_t inside it."""
    outside = tv.pretrained + init_lambda * tv.vectors.sum(0)
    inside = tv.pretrained + (routing[:, None] * tv.vectors).sum(0)
    flat = torch.where(block_mask(tv, block), inside, outside)
    net = backbone_class().eval()
    net.load_state_dict(merged_state_dict(model.pretrained, tv.layout, flat))
    return net


def block_mask(tv, block):
    mask = torch.zeros(tv.layout.numel, dtype=torch.bool)
    for slot in tv.layout.slots:
        if slot.name.startswith(block + "."):
            mask[slot.start : slot.stop] = True
    return mask


def router_by_hand(router, tokens):
    """r = mean over tokens of W₂ ReLU(W₁ h + b₁) + b₂, written out."""
    hidden = (tokens @ router.hidden.weight.T + router.hidden.bias).clamp(min=0)
    return (hidden @ router.out.weight.T + router.out.bias).mean(dim=0)


@pytest.mark.parametrize("backbone_class,inputs", [(TokenBackbone, tokens_input), (PixelBackbone, pixels_input)])
def test_every_sample_runs_its_own_merged_block(backbone_class, inputs):
    tv, model = problem(backbone_class, inputs)
    x = model.data["t0"][0]
    merged = upscale(tv, model, init_lambda=0.3, probe=x, generator=torch.Generator().manual_seed(0))
    mixture = routers(merged)[0]
    with torch.no_grad():  # routers far from their initialization, so samples route differently
        for p in mixture.router.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        out = merged(x)
        block_name = backbone_class().feed_forward_modules()[0]
        for i in range(len(x)):
            ta = explicit_model(tv, model, backbone_class, block_name, torch.full((TASKS,), 0.3), 0.3)
            if backbone_class is TokenBackbone:
                block_input = ta.embed(x[i])
            else:
                block_input = x[i].flatten(1).T  # pixels as tokens
            routing = router_by_hand(mixture.router, block_input)
            expected = explicit_model(tv, model, backbone_class, block_name, routing, 0.3)(x[i : i + 1])
            assert torch.allclose(out[i : i + 1], expected, atol=1e-5)
        assert not torch.allclose(out[0], out[1])


def test_untrained_routers_with_zero_weights_are_task_arithmetic():
    tv, model = problem(TokenBackbone, tokens_input)
    x = model.data["t0"][0]
    merged = upscale(tv, model, init_lambda=0.4, probe=x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mixture in routers(merged):
            mixture.router.hidden.weight.zero_()
            mixture.router.out.weight.zero_()
        ta = TokenBackbone().eval()
        ta.load_state_dict(merged_state_dict(model.pretrained, tv.layout, merge("task_arithmetic", tv, lam=0.4)))
        assert torch.allclose(merged(x), ta(x), atol=1e-6)


def test_batch_reduced_routing_merges_one_block_with_mean_weights():
    tv, model = problem(TokenBackbone, tokens_input)
    x = model.data["t1"][0]
    merged = upscale(tv, model, init_lambda=0.3, probe=x, generator=torch.Generator().manual_seed(0))
    mixture = routers(merged)[0]
    with torch.no_grad():
        embedded = copy.deepcopy(merged.embed)(x)
        mean_routing = torch.stack([router_by_hand(mixture.router, h) for h in embedded]).mean(0)
        mixture.batch_reduce = True
        expected = explicit_model(tv, model, TokenBackbone, "mlp", mean_routing, 0.3)(x)
        assert torch.allclose(merged(x), expected, atol=1e-5)


def test_router_training_lowers_entropy_and_touches_only_routers():
    tv, model = problem(TokenBackbone, tokens_input)
    x = model.data["t0"][0]
    merged = upscale(tv, model, init_lambda=0.3, probe=x, generator=torch.Generator().manual_seed(0))
    frozen = {n: p.clone() for n, p in merged.named_parameters() if "router" not in n}
    routers_before = {n: p.clone() for n, p in merged.named_parameters() if "router" in n}
    losses = adapt_routers(merged, model, tv.tasks, steps=40, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in merged.named_parameters() if n in frozen)
    assert any(not torch.equal(p, routers_before[n]) for n, p in merged.named_parameters() if n in routers_before)
    assert all(p.grad is None for head in model.heads.values() for p in head.parameters())
    assert not any(m.batch_reduce for m in routers(merged))  # evaluation routes per sample


def test_registered_method_is_seeded_and_counts_every_stored_tensor():
    tv, model = problem(TokenBackbone, tokens_input)
    method = get_method("wemoe")
    assert method.returns_model and method.data == "unlabeled-test"
    setting = method.defaults() | {"steps": 3, "lr": 0.01, "batch_size": 4}
    a = method.merge(tv, setting, seed=1, model=model)
    b = method.merge(tv, setting, seed=1, model=model)
    c = method.merge(tv, setting, seed=2, model=model)
    x = model.data["t2"][0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    mlp = sum(p.numel() for p in TokenBackbone().mlp.parameters())  # 4·6+6 + 6·4+4 = 58
    router = 4 * 4 + 4 + 4 * TASKS + TASKS
    assert sum(p.numel() for p in a.parameters()) == tv.layout.numel + TASKS * mlp + router  # what the runner stores
    assert isinstance(routers(a)[0], WeightEnsemblingMoE)


def test_wemoe_does_not_compose_with_post_scalers():
    with pytest.raises(MergebenchError, match="returns a model"):
        get_method("wemoe+lines")


def test_backbone_without_feed_forward_modules_is_refused():
    tv, model = problem(TokenBackbone, tokens_input)
    model.net.feed_forward_modules = lambda: ()
    with pytest.raises(MergebenchError, match="no feed-forward modules"):
        merge("wemoe", tv, model=model, steps=0)

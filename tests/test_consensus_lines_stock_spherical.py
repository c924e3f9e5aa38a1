"""Consensus / TALL masks, LiNeS and layer depths, Model Stock, SLERP and Karcher on hand-worked values."""

import math

from functools import partial

import pytest
import torch

import mergebench.methods.consensus  # noqa: F401  (registers before builtin.py lists it)
import mergebench.methods.lines  # noqa: F401
import mergebench.methods.model_stock  # noqa: F401
import mergebench.methods.spherical  # noqa: F401
from mergebench.core.layers import layer_depths, num_layers
from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods import get_method
from mergebench.methods.consensus import tall_mask, ties_disjoint_sum
from mergebench.methods.spherical import karcher_mean
import method_helpers
from method_helpers import merge

ROOT_HALF = math.sqrt(0.5)






stack = partial(method_helpers.stack, dtype=torch.float64)


def layout_of(names):
    return ParamLayout.of({name: torch.zeros(1) for name in names}, names)


# --- layer depths ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "names, depths, last",
    [
        (  # EfficientNet: stem, blocks 0, 1, 15, head conv + bn after the blocks
            ["net._conv_stem.weight", "net._bn0.weight", "net._blocks.0._depthwise_conv.weight",
             "net._blocks.1._project_conv.weight", "net._blocks.15._bn2.bias", "net._conv_head.weight", "net._bn1.bias"],
            [0, 0, 0, 1, 2, 0, 0], [0, 0, 0, 1, 2, 2, 2],
        ),
        (  # open_clip ViT: own parameters (proj) come first; ".1." must not match "resblocks.11."
            ["model.visual.proj", "model.visual.conv1.weight", "model.visual.transformer.resblocks.0.attn.in_proj_weight",
             "model.visual.transformer.resblocks.11.ln_2.bias", "model.visual.transformer.resblocks.1.mlp.c_fc.weight",
             "model.visual.ln_post.weight"],
            [0, 0, 0, 2, 1, 0], [0, 0, 0, 2, 1, 2],
        ),
        (  # HF CLIP vision tower
            ["vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight",
             "vision_model.encoder.layers.1.mlp.fc1.weight", "vision_model.post_layernorm.weight"],
            [0, 0, 1, 0], [0, 0, 1, 1],
        ),
        (  # HF BERT
            ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.output.dense.weight", "bert.pooler.dense.weight"],
            [0, 0, 1, 0], [0, 0, 1, 1],
        ),
        (  # HF GPT-2
            ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"],
            [0, 0, 1, 0], [0, 0, 1, 1],
        ),
        (  # HF Llama
            ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.norm.weight", "lm_head.weight"],
            [0, 0, 1, 0, 0], [0, 0, 1, 1, 1],
        ),
    ],
)
def test_layer_depths_per_layout_family(names, depths, last):
    layout = layout_of(names)
    assert layer_depths(layout) == depths
    assert layer_depths(layout, trailing="last") == last
    assert num_layers(layout) == max(depths) + 1


def test_layer_depths_without_blocks_and_bad_trailing():
    layout = layout_of(["weight", "bias"])
    assert layer_depths(layout) == [0, 0] and layer_depths(layout, trailing="last") == [0, 0]
    assert num_layers(layout) == 0
    with pytest.raises(MergebenchError, match="trailing"):
        layer_depths(layout, trailing="middle")


# --- LiNeS -----------------------------------------------------------------------------------

TOY_BLOCKS = ["stem.w", "blocks.0.w", "blocks.1.w", "blocks.2.w", "head.w"]


def toy_lines_vectors():
    # stem has 2 entries, every other tensor 1; Σ_t τ_t = 2 everywhere
    return stack(
        [[1.0, 2.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]],
        pretrained=[10.0] * 6, shapes=[(2,), (1,), (1,), (1,), (1,)], names=TOY_BLOCKS,
    )


def test_lines_scales_blocks_linearly_with_auto_alpha():
    tv = toy_lines_vectors()
    # TA: τ_MTL = Σ τ_t → α = ‖Σ‖₁/(T‖Σ‖₁) = 1/2; β = 0.4, L = 3:
    # stem 0.5, block0 0.5, block1 0.5 + 0.4·1/2 = 0.7, block2 0.9, head (outside) 0.5; times Σ = 2
    merged = merge("lines", tv, beta=0.4)
    assert torch.allclose(merged, torch.tensor([11.0, 11.0, 11.0, 11.4, 11.8, 11.0], dtype=torch.float64))
    last = merge("lines", tv, beta=0.4, trailing_depth="last")  # head gets the last block's 0.9
    assert torch.allclose(last, torch.tensor([11.0, 11.0, 11.0, 11.4, 11.8, 11.8], dtype=torch.float64))


def test_lines_numeric_alpha_and_beta_zero():
    tv = toy_lines_vectors()
    # α = 0.1, β = 1: 0.1, 0.1, 0.1, 0.6, 1.1, 0.1
    merged = merge("lines", tv, alpha="0.1", beta=1.0)
    assert torch.allclose(merged, torch.tensor([10.2, 10.2, 10.2, 11.2, 12.2, 10.2], dtype=torch.float64))
    # β = 0 with auto α is weight averaging for Task Arithmetic
    assert torch.allclose(merge("lines", tv, beta=0.0), merge("average", tv))


def test_ties_plus_lines_auto_alpha_uses_the_merged_vector_norm():
    tv = toy_lines_vectors()
    composed = get_method("ties+lines")
    assert set(composed.hparams) == {"k", "scope", "tie_rule", "zero_sign", "alpha", "beta", "trailing_depth"}
    # TIES k=100: all + → disjoint means [1, 2, 1, 1, 1, 1] (the 0 of τ2 does not count);
    # α = ‖Σ τ_t‖₁ / (T ‖τ_MTL‖₁) = 12 / (2 · 7) = 6/7
    merged = composed.merge(tv, {"k": 100.0, "scope": "global", "alpha": "auto", "beta": 0.0, "trailing_depth": "first"})
    expected = 10.0 + (6 / 7) * torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(merged, expected)


def test_lines_zero_vectors_and_bad_alpha():
    tv = stack([[0.0, 0.0], [0.0, 0.0]], pretrained=[1.0, 2.0], shapes=[(1,), (1,)], names=["blocks.0.w", "blocks.1.w"])
    assert torch.equal(merge("lines", tv), torch.tensor([1.0, 2.0], dtype=torch.float64))
    with pytest.raises(MergebenchError, match="'auto' or a number"):
        merge("lines", tv, alpha="big")
    with pytest.raises(MergebenchError, match=">= 0"):
        merge("lines", tv, alpha=-1.0)


def test_lines_grid():
    assert len(get_method("lines").settings()) == 11


# --- TALL masks and consensus ---------------------------------------------------------------

CONSENSUS_ROWS = [[1.0, 1.0, 0.0, 2.0, 3.0], [1.0, 0.0, 0.0, 2.0, -1.0], [1.0, 0.0, 3.0, 0.0, 0.0]]


def test_tall_masks_by_hand():
    vectors = torch.tensor(CONSENSUS_ROWS)
    # Σ = [3, 1, 3, 4, 2]; m_t = |τ_t| > 0.4·|Σ − τ_t|
    # col0: 1 > 0.8 for all; col1: only t0 (1 > 0); col2: only t2 (3 > 0);
    # col3: t0, t1 (2 > 0.8), t2: 0 > 1.6 no; col4: t0 (3 > 0.4), t1: 1 > 1.2 no, t2 no
    expected = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0], [1, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(tall_mask(vectors, vectors.sum(dim=0), 0.4), expected)
    assert not tall_mask(torch.zeros(2, 3), torch.zeros(3), 0.0).any()  # strict: zeros are in no mask


@pytest.mark.parametrize(
    "k, kept",
    [(0, [3.0, 1.0, 3.0, 4.0, 2.0]), (1, [3.0, 1.0, 3.0, 4.0, 2.0]), (2, [3.0, 0.0, 0.0, 4.0, 0.0]), (3, [3.0, 0.0, 0.0, 0.0, 0.0]), (4, [0.0] * 5)],
)
def test_consensus_ta_keeps_entries_on_at_least_k_masks(k, kept):
    tv = stack(CONSENSUS_ROWS, pretrained=[1.0] * 5, shapes=[(2,), (3,)])
    # votes per entry (see test_tall_masks_by_hand): [3, 1, 1, 2, 1]
    merged = merge("consensus_ta", tv, k=k, mask_lambda=0.4, lam=0.5)
    assert torch.allclose(merged, 1.0 + 0.5 * torch.tensor(kept, dtype=torch.float64))


def test_ties_disjoint_sum_adds_agreeing_entries():
    rows = stack([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-1.0, 0.0, -2.0]])
    # signs of sums (5, 2, -2) → +, +, -; agreeing sums: 2+4, 3, -2 (the disjoint mean would be 3, 3, -2)
    assert torch.equal(ties_disjoint_sum(rows, 100.0), torch.tensor([6.0, 3.0, -2.0]))


def test_consensus_ties_by_hand():
    tv = stack(CONSENSUS_ROWS)
    # no trim: signs all + → disjoint sums [3, 1, 3, 4, 3]; masks vs raw τ with λ=0.4:
    # col4: t0 3 > 0, t1 1 > 0.4·4 no → 1 vote; others as for TA → votes [3, 1, 1, 2, 1]
    merged = merge("consensus_ties", tv, k=2, mask_lambda=0.4, trim_percent=100.0, lam=1.0)
    assert torch.allclose(merged, torch.tensor([3.0, 0.0, 0.0, 4.0, 0.0], dtype=torch.float64))


def test_consensus_grids_and_bad_k():
    assert len(get_method("consensus_ta").settings()) == 3 * 5
    assert len(get_method("consensus_ties").settings()) == 3 * 5
    with pytest.raises(MergebenchError, match="k=-1"):
        get_method("consensus_ta").settings({"k": "-1"})


# --- Model Stock -----------------------------------------------------------------------------

def test_model_stock_orthogonal_gives_pretrained_parallel_gives_average():
    # tensor A: τ1 = (1, 0), τ2 = (0, 3) orthogonal → t = 0; tensor B: (1, 2), (2, 4) parallel → t = 2·1/(1+1) = 1
    tv = stack([[1.0, 0.0, 1.0, 2.0], [0.0, 3.0, 2.0, 4.0]], pretrained=[5.0] * 4, shapes=[(2,), (2,)])
    assert torch.allclose(merge("model_stock", tv), torch.tensor([5.0, 5.0, 6.5, 8.0], dtype=torch.float64))


def test_model_stock_sixty_degrees_and_three_models():
    # (2, 0) and (1, √3) are 60° apart: cos = 0.5, N = 2 → t = 1 / 1.5 = 2/3; their mean is (1.5, √3/2)
    tv = stack([[2.0, 0.0], [1.0, math.sqrt(3.0)]])
    assert torch.allclose(merge("model_stock", tv), (2 / 3) * torch.tensor([1.5, math.sqrt(3.0) / 2], dtype=torch.float64))
    # e1, e1, e2: cosines 1, 0, 0 → mean 1/3 → t = 1/(1 + 2/3) = 0.6; angles 0, 90°, 90° → mean 60° → t = 0.75
    three = stack([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mean = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert torch.allclose(merge("model_stock", three), 0.6 * mean)
    assert torch.allclose(merge("model_stock", three, pairwise="angle"), 0.75 * mean)


def test_model_stock_degenerate_cases():
    opposite = stack([[1.0, 2.0], [-1.0, -2.0]], pretrained=[1.0, 1.0])  # cos = −1 clamped to 0 → θ₀, finite
    assert torch.equal(merge("model_stock", opposite), torch.tensor([1.0, 1.0], dtype=torch.float64))
    zero = stack([[0.0, 0.0], [1.0, 2.0]], pretrained=[1.0, 1.0])
    assert torch.equal(merge("model_stock", zero), torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(MergebenchError, match="at least two"):
        merge("model_stock", stack([[1.0, 2.0]]))


# --- SLERP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t, expected", [(0.0, [1.0, 0.0]), (1.0, [0.0, 1.0]), (0.5, [ROOT_HALF, ROOT_HALF])])
def test_slerp_of_orthogonal_unit_vectors(t, expected):
    tv = stack([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(merge("slerp", tv, t=t), torch.tensor(expected, dtype=torch.float64))


def test_slerp_weights_versus_task_vectors_space():
    tv = stack([[1.0, 0.0], [0.0, 1.0]], pretrained=[1.0, 1.0])
    in_tv_space = merge("slerp", tv, t=0.5, space="task_vectors")
    assert torch.allclose(in_tv_space, torch.tensor([1.0 + ROOT_HALF, 1.0 + ROOT_HALF], dtype=torch.float64))
    # weights θ1 = (2, 1), θ2 = (1, 2): cos Ω = 4/5, sin Ω = 3/5, sin(Ω/2) = √0.1 → (θ1 + θ2)·√0.1/0.6
    factor = math.sqrt(0.1) / 0.6
    assert torch.allclose(merge("slerp", tv, t=0.5), torch.tensor([3 * factor, 3 * factor], dtype=torch.float64))


def test_slerp_per_tensor_and_colinear_fallback():
    # tensor A orthogonal; tensor B colinear (v1 = 2·v0) → lerp: 0.5·(1, 1) + 0.5·(2, 2)
    tv = stack([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 2.0, 2.0]], shapes=[(2,), (2,)])
    expected = torch.tensor([ROOT_HALF, ROOT_HALF, 1.5, 1.5], dtype=torch.float64)
    assert torch.allclose(merge("slerp", tv, t=0.5), expected)


def test_slerp_needs_exactly_two_models():
    for rows in ([[1.0]], [[1.0], [2.0], [3.0]]):
        with pytest.raises(MergebenchError, match="exactly two"):
            merge("slerp", stack(rows))


# --- Karcher ---------------------------------------------------------------------------------

def test_karcher_of_two_equal_norm_vectors_is_the_slerp_midpoint():
    tv = stack([[3.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(merge("karcher", tv), merge("slerp", tv, t=0.5))


def test_karcher_is_the_mean_angle_on_the_circle():
    # directions at 0°, 0°, 90° → Karcher mean at 30° (the Euclidean mean of directions is at 26.6°);
    # norms 2, 2, 5 → mean norm 3
    tv = stack([[2.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    angle = math.radians(30)
    assert torch.allclose(merge("karcher", tv), torch.tensor([3 * math.cos(angle), 3 * math.sin(angle)], dtype=torch.float64))


def test_karcher_satisfies_the_first_order_condition():
    vectors = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    mean = karcher_mean(vectors, max_iter=50, tol=1e-12)
    mu = mean / mean.norm()
    units = vectors / vectors.norm(dim=1, keepdim=True)
    dots = units @ mu
    logs = (torch.arccos(dots) / torch.sqrt(1 - dots**2))[:, None] * (units - dots[:, None] * mu)
    assert logs.sum(dim=0).norm() < 1e-8  # Σ_t log_μ(u_t) = 0 at the Karcher mean
    assert torch.isclose(mean.norm(), vectors.norm(dim=1).mean())


def test_karcher_edge_cases():
    one = stack([[1.0, -2.0]], pretrained=[1.0, 1.0])
    assert torch.allclose(merge("karcher", one), torch.tensor([2.0, -1.0], dtype=torch.float64))
    zeros = stack([[0.0, 0.0], [0.0, 0.0]], pretrained=[-1.0, 1.0])  # θ_t = θ₀ = (−1, 1): not zero weights
    assert torch.allclose(merge("karcher", zeros), torch.tensor([-1.0, 1.0], dtype=torch.float64))
    all_zero_weights = stack([[1.0, -1.0], [1.0, -1.0]], pretrained=[-1.0, 1.0])  # θ_t = 0 → merged 0
    assert torch.allclose(merge("karcher", all_zero_weights), torch.zeros(2, dtype=torch.float64))


# --- all methods on float32 vectors ----------------------------------------------------------

@pytest.mark.parametrize("name", ["consensus_ta", "consensus_ties", "lines", "ties+lines", "model_stock", "slerp", "karcher"])
def test_methods_keep_float32_and_stay_finite(name):
    generator = torch.Generator().manual_seed(1)
    tasks = 2 if name == "slerp" else 3
    names = ["embed.w", "layers.0.w", "layers.1.w", "norm.w"]
    state = {n: torch.zeros(4, 5) for n in names}
    layout = ParamLayout.of(state, names)
    tv = TaskVectors(torch.randn(80, generator=generator), 0.01 * torch.randn(tasks, 80, generator=generator), layout, tuple("abc"[:tasks]))
    merged = merge(name, tv)
    assert merged.dtype == torch.float32 and merged.shape == (80,) and bool(torch.isfinite(merged).all())

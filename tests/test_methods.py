"""Each method's math on tiny hand-made task vectors, with expected values worked out by hand."""

from typing import Annotated

import pytest
import torch

from mergebench.errors import MergebenchError
from mergebench.methods import HParam, get_method
from mergebench.methods.dare import drop_and_rescale
from mergebench.methods.ties import disjoint_mean, elect_signs, keep_top_magnitudes
from method_helpers import merge, stack






# --- averaging and task arithmetic -------------------------------------------------------------

def test_average_is_mean_of_finetuned_weights():
    tv = stack([[1.0, -2.0], [3.0, 4.0]], pretrained=[10.0, 20.0])
    # θ1 = (11, 18), θ2 = (13, 24) → mean (12, 21)
    assert torch.equal(merge("average", tv), torch.tensor([12.0, 21.0]))


def test_task_arithmetic_scales_the_sum():
    tv = stack([[1.0, -2.0], [3.0, 4.0]], pretrained=[10.0, 20.0])
    # θ0 + 0.5 * (4, 2) = (12, 21)
    assert torch.equal(merge("task_arithmetic", tv, lam=0.5), torch.tensor([12.0, 21.0]))


def test_task_arithmetic_one_task_lambda_one_recovers_the_expert():
    tv = stack([[0.25, -1.5, 3.0]], pretrained=[1.0, 1.0, 1.0])
    assert torch.equal(merge("task_arithmetic", tv, lam=1.0), torch.tensor([1.25, -0.5, 4.0]))


# --- TIES ------------------------------------------------------------------------------------

def test_trim_keeps_top_k_percent_per_task():
    rows = torch.tensor([[0.1, -0.9, 0.3, 0.5, -0.2], [1.0, 2.0, -3.0, 4.0, 5.0]])
    # 40% of 5 → 2 largest magnitudes per row
    expected = torch.tensor([[0.0, -0.9, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 4.0, 5.0]])
    assert torch.equal(keep_top_magnitudes(rows, 40), expected)


def test_trim_k_zero_and_hundred():
    rows = torch.tensor([[0.1, -0.9, 0.0]])
    assert torch.equal(keep_top_magnitudes(rows, 0), torch.zeros(1, 3))
    assert torch.equal(keep_top_magnitudes(rows, 100), rows)


def test_trim_tie_rules_at_the_threshold():
    rows = torch.tensor([[1.0, -1.0, 0.5, 0.2]])
    # 25% of 4 → 1 entry, but |1| and |-1| tie at the threshold
    assert torch.equal(keep_top_magnitudes(rows, 25), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # exactly k, lowest index
    assert torch.equal(keep_top_magnitudes(rows, 25, "highest_index"), torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    assert torch.equal(keep_top_magnitudes(rows, 25, "keep_all"), torch.tensor([[1.0, -1.0, 0.0, 0.0]]))


def test_elect_uses_mass_and_resolves_zero_sums_to_majority():
    rows = torch.tensor([[2.0, -1.0, 1.0, 0.5], [-1.0, -1.0, -1.0, 0.5], [0.0, 3.0, 0.0, 1.0]])
    # sums: 1, 1, 0, 2 → signs +, +, 0, + → majority + fills the zero
    assert torch.equal(elect_signs(rows), torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_elect_all_zero_vectors_gives_zero_merge():
    rows = torch.zeros(3, 4)
    signs = elect_signs(rows)
    assert torch.equal(signs, torch.ones(4))
    assert torch.equal(disjoint_mean(rows, signs), torch.zeros(4))


def test_disjoint_mean_averages_only_agreeing_nonzero_entries():
    rows = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-1.0, 0.0, -2.0]])
    signs = torch.tensor([1.0, 1.0, -1.0])
    # col0: mean(2, 4) = 3; col1: only 3 agrees → 3; col2: only -2 → -2
    assert torch.equal(disjoint_mean(rows, signs), torch.tensor([3.0, 3.0, -2.0]))


def test_ties_end_to_end_by_hand():
    tv = stack(
        [[0.9, -0.1, 0.4, -0.6, 0.05], [-0.8, 0.7, 0.3, -0.2, 0.0], [0.2, 0.6, -0.9, -0.1, 0.3]],
        pretrained=[1.0, 1.0, 1.0, 1.0, 1.0],
    )
    # k=60% of 5 → 3 entries per task:
    # t0: 0.9, 0.4, -0.6      → [0.9, 0, 0.4, -0.6, 0]
    # t1: -0.8, 0.7, 0.3      → [-0.8, 0.7, 0.3, 0, 0]
    # t2: 0.6, -0.9, 0.3      → [0, 0.6, -0.9, 0, 0.3]
    # sums: 0.1, 1.3, -0.2, -0.6, 0.3 → signs +, +, -, -, +
    # disjoint means: 0.9, (0.7+0.6)/2, -0.9, -0.6, 0.3
    merged = merge("ties", tv, k=60.0, lam=2.0)
    expected = torch.tensor([1.0 + 2 * 0.9, 1.0 + 2 * 0.65, 1.0 - 2 * 0.9, 1.0 - 2 * 0.6, 1.0 + 2 * 0.3])
    assert torch.allclose(merged, expected, atol=1e-6)


def test_ties_one_task_k100_lam1_recovers_the_expert():
    tv = stack([[0.3, -0.2, 0.0, 1.0]], pretrained=[1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(merge("ties", tv, k=100.0, lam=1.0), torch.tensor([1.3, 1.8, 3.0, 5.0]))


def test_ties_per_tensor_scope_trims_each_tensor_separately():
    # two tensors of 2 entries; k=50 keeps 1 entry per tensor (global would keep 2 largest overall)
    tv = stack([[5.0, 4.0, 0.1, -0.2]], shapes=[(2,), (2,)])
    per_tensor = merge("ties", tv, k=50.0, lam=1.0, scope="per_tensor")
    global_ = merge("ties", tv, k=50.0, lam=1.0, scope="global")
    assert torch.equal(per_tensor, torch.tensor([5.0, 0.0, 0.0, -0.2]))
    assert torch.equal(global_, torch.tensor([5.0, 4.0, 0.0, 0.0]))


# --- DARE ------------------------------------------------------------------------------------

def test_dare_p_zero_is_task_arithmetic():
    tv = stack([[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]], pretrained=[0.0, 1.0, 2.0])
    assert torch.equal(merge("dare", tv, p=0.0, lam=0.5), merge("task_arithmetic", tv, lam=0.5))


def test_dare_drops_and_rescales_survivors():
    vectors = torch.full((4, 10_000), 2.0)
    dropped = drop_and_rescale(vectors, 0.75, seed=3)
    survivors = dropped[dropped != 0]
    assert torch.all(survivors == 8.0)  # 2 / (1 - 0.75)
    kept_fraction = survivors.numel() / vectors.numel()
    assert abs(kept_fraction - 0.25) < 0.02
    assert abs(dropped.mean().item() - 2.0) < 0.1  # unbiased: E[τ̃] = τ


def test_dare_same_seed_is_bit_identical_and_seed_matters():
    tv = stack(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).tolist())
    a = merge("dare", tv, seed=7, p=0.5, lam=0.3)
    b = merge("dare", tv, seed=7, p=0.5, lam=0.3)
    c = merge("dare", tv, seed=8, p=0.5, lam=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_ties_with_p_zero_is_ties_without_trim():
    tv = stack([[0.9, -0.1, 0.4], [-0.8, 0.7, 0.3]])
    # no drop: signs of sums (0.1, 0.6, 0.7) → all +; disjoint means: 0.9, 0.7, 0.35
    merged = merge("dare_ties", tv, p=0.0, lam=1.0)
    assert torch.allclose(merged, torch.tensor([0.9, 0.7, 0.35]))
    assert torch.allclose(merged, merge("ties", tv, k=100.0, lam=1.0))


# --- registry --------------------------------------------------------------------------------

def test_unknown_method_lists_known_ones():
    with pytest.raises(MergebenchError, match="unknown method 'nope'.*ties"):
        get_method("nope")


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("dare", {"p": "1.0"}, r"p=1.0 of dare: must be in \[0.0, 1.0\)"),
        ("ties", {"k": "120"}, r"k=120.0 of ties: must be in \[0.0, 100.0\]"),
        ("ties", {"scope": "layer"}, "must be one of global, per_tensor"),
        ("ties", {"lam": "abc"}, "not a number"),
        ("ties", {"density": "0.2"}, "has no hyperparameter 'density'"),
    ],
)
def test_bad_hyperparameters_are_rejected(method, overrides, message):
    with pytest.raises(MergebenchError, match=message):
        get_method(method).settings(overrides)


def test_settings_grid_and_overrides():
    dare = get_method("dare")
    assert len(dare.settings()) == 5 * 10
    fixed = dare.settings({"p": "0.3"})
    assert {s["p"] for s in fixed} == {0.3} and len(fixed) == 10
    assert get_method("average").settings() == [{}]


def test_sweep_reuses_the_merged_vector_across_lambda():
    calls = []
    tv = stack([[1.0, 2.0], [3.0, -4.0]])
    ties = get_method("ties")
    original = ties.function
    try:
        object.__setattr__(ties, "function", lambda *a, **k: calls.append(1) or original(*a, **k))
        results = list(ties.sweep(tv, ties.settings(), seed=0))
    finally:
        object.__setattr__(ties, "function", original)
    assert len(results) == len(ties.settings()) and len(calls) == 1
    lam_one = next(merged for setting, merged in results if setting["lam"] == 1.0)
    assert torch.equal(lam_one, ties.merge(tv, {"k": 20.0, "scope": "global", "lam": 1.0}))


def test_post_scaler_composes_with_any_method(monkeypatch):
    from mergebench.methods import registry

    def halve_second(task_vectors, merged_vector, *, factor: Annotated[float, HParam("factor", (0.5, 0.25))] = 0.5):
        """Multiply the second entry by factor."""
        out = merged_vector.clone()
        out[1] *= factor
        return out

    monkeypatch.setattr(registry, "POST_SCALERS", {})
    registry.register_post_scaler("halve", citation="test")(halve_second)
    tv = stack([[1.0, 2.0], [3.0, 4.0]], pretrained=[1.0, 1.0])
    alone = get_method("halve")
    assert set(alone.hparams) == {"factor"} and len(alone.settings()) == 2
    assert torch.equal(alone.merge(tv, {"factor": 0.5}), torch.tensor([5.0, 4.0]))  # θ0 + (4, 6·0.5)
    composed = get_method("ties+halve")
    assert set(composed.hparams) == {"k", "scope", "tie_rule", "zero_sign", "factor"}
    # TIES with k=100: signs +,+ → means (2, 3); then the second entry halved
    assert torch.equal(composed.merge(tv, {"k": 100.0, "scope": "global", "factor": 0.5}), torch.tensor([3.0, 2.5]))
    with pytest.raises(MergebenchError, match="unknown post-scaler 'nope'"):
        get_method("ties+nope")


@pytest.mark.parametrize("k", [1, 7, 1000, 99_999, 100_000])
def test_radix_select_matches_sorting(k):
    from mergebench.core.selection import kth_largest

    generator = torch.Generator().manual_seed(k)
    magnitudes = torch.randn(100_000, generator=generator).abs()
    magnitudes[:500] = 0.25  # ties across the histogram bin of the threshold
    expected = magnitudes.sort(descending=True).values[k - 1]
    assert kth_largest(magnitudes, k) == expected

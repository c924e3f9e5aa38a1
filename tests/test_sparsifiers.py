"""Breadcrumbs, DELLA, PCB and CABS: masks and merged values on tiny hand-made task vectors."""

import numpy as np
import pytest
import torch

import mergebench.methods.breadcrumbs  # noqa: F401
import mergebench.methods.cabs  # noqa: F401
import mergebench.methods.della  # noqa: F401
import mergebench.methods.pcb  # noqa: F401
from mergebench.errors import MergebenchError
from mergebench.methods import get_method
from mergebench.methods.cabs import cabs_masks
from mergebench.methods.della import magprune, magprune_drop_probabilities
from method_helpers import merge, stack






# --- Breadcrumbs -----------------------------------------------------------------------------

def test_breadcrumbs_keeps_the_middle_band_of_ten_entries():
    row = [0.1, -0.9, 0.3, 0.5, -0.2, 0.8, 0.05, -0.6, 0.4, 0.7]
    # magnitudes in decreasing order: 0.9, 0.8 | 0.7, 0.6, 0.5, 0.4, 0.3 | 0.2, 0.1, 0.05
    # top_masked 0.2 → the 2 largest go; density 0.5 → the next 5 stay; the bottom 3 go
    expected = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.0, 0.0, 0.0, -0.6, 0.4, 0.7])
    merged = merge("breadcrumbs", stack([row]), density=0.5, top_masked=0.2, lam=1.0)
    assert torch.equal(merged, expected)


def test_breadcrumbs_band_per_row_or_per_tensor():
    tv = stack([[5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 0.1, 0.4, 0.2, 0.3]], shapes=[(2, 5)])
    # per row (d=5): drop ⌊0.2·5⌋=1 largest, keep the next ⌊0.4·5⌋=2 → 4, 3 and 0.4, 0.3
    per_row = merge("breadcrumbs", tv, density=0.4, top_masked=0.2, lam=1.0, scope="per_row")
    assert torch.equal(per_row, torch.tensor([0.0, 0.0, 4.0, 0.0, 3.0, 0.0, 0.0, 0.4, 0.0, 0.3]))
    # per tensor (d=10): drop 5, 4; keep the next 4 → 3, 2, 1, 0.5
    per_tensor = merge("breadcrumbs", tv, density=0.4, top_masked=0.2, lam=1.0, scope="per_tensor")
    assert torch.equal(per_tensor, torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_breadcrumbs_sums_masked_vectors_and_scales():
    tv = stack([[4.0, -3.0, 2.0, 1.0], [1.0, 2.0, -3.0, 4.0]], pretrained=[1.0, 1.0, 1.0, 1.0])
    # d=4, top_masked 0.25 → drop 1, density 0.5 → keep 2: t0 → (0, -3, 2, 0), t1 → (0, 2, -3, 0)
    merged = merge("breadcrumbs", tv, density=0.5, top_masked=0.25, lam=0.5)
    assert torch.equal(merged, torch.tensor([1.0, 1.0 - 0.5, 1.0 - 0.5, 1.0]))


def test_breadcrumbs_ties_elects_and_averages_the_masked_vectors():
    tv = stack([[4.0, -3.0, 2.0, 1.0], [1.0, 2.5, -3.0, 4.0], [0.5, 2.0, 1.5, 0.25]])
    # drop the largest, keep the next 2 of each task:
    # t0 → (0, -3, 2, 0); t1 → (0, 2.5, -3, 0); t2 → (0.5, 0, 1.5, 0)
    # sums: 0.5, -0.5, 0.5, 0 → signs +, -, +, and the zero takes the majority sign +
    # disjoint means: 0.5, -3, (2 + 1.5)/2, 0
    merged = merge("breadcrumbs_ties", tv, density=0.5, top_masked=0.25, lam=1.0)
    assert torch.equal(merged, torch.tensor([0.5, -3.0, 1.75, 0.0]))


def test_breadcrumbs_without_masking_is_task_arithmetic_and_scalars_are_untouched():
    tv = stack([[1.0, -2.0, 3.0, 7.0], [0.5, 0.5, -1.0, -7.0]], shapes=[(3,), ()])
    full = merge("breadcrumbs", tv, density=1.0, top_masked=0.0, lam=0.5)
    assert torch.equal(full, merge("task_arithmetic", tv, lam=0.5))
    # density 0 empties the 3-vector but the 0-d tensor is never masked
    empty = merge("breadcrumbs", tv, density=0.0, top_masked=0.0, lam=1.0)
    assert torch.equal(empty, torch.tensor([0.0, 0.0, 0.0, 0.0]))
    one = merge("breadcrumbs", stack([[1.0, 2.0, 3.0, 4.0]], shapes=[(3,), ()]), density=0.0, top_masked=0.0, lam=1.0)
    assert torch.equal(one, torch.tensor([0.0, 0.0, 0.0, 4.0]))


# --- DELLA -----------------------------------------------------------------------------------

def test_magprune_probabilities_are_linear_in_magnitude_rank_per_row():
    values = torch.tensor([0.3, -1.1, 0.05, 0.7, -0.2, 0.9, 0.01, -0.5, 0.6, 0.15, 1.0])
    probabilities = magprune_drop_probabilities(values.reshape(1, 1, -1), p=0.5, epsilon=0.2)
    # smallest magnitude → p + ε = 0.7, largest → p − ε = 0.3, evenly spaced in between
    expected = np.empty(11)
    expected[np.argsort(np.abs(values.numpy()))] = np.linspace(0.7, 0.3, 11)
    assert np.allclose(probabilities.reshape(-1).numpy(), expected, atol=1e-6)
    # a 2 × 3 tensor is ranked row by row: each row spans the whole window
    tv = stack([[1.0, 3.0, 2.0, 0.1, 0.3, 0.2]], shapes=[(2, 3)])
    dropped = magprune(tv, p=0.5, epsilon=0.2, seed=0)
    survivors = dropped != 0
    # survivors are rescaled by 1/(1 − p_i): p = (0.7, 0.3, 0.5) in both rows
    keep = torch.tensor([0.3, 0.7, 0.5, 0.3, 0.7, 0.5])
    assert torch.allclose(dropped[survivors], (tv.vectors / keep)[survivors])


def test_magprune_drops_small_entries_more_and_is_unbiased():
    n = 100_000
    magnitudes = torch.linspace(0.01, 1.0, n)
    values = magnitudes[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    values[::2] *= -1
    tv = stack([values.tolist()])
    dropped = magprune(tv, p=0.5, epsilon=0.3, seed=5)[0]
    order = torch.argsort(values.abs())
    kept = (dropped != 0)[order].float()
    # bottom tenth: drop probability 0.8 → 0.74, kept ≈ 0.23; top tenth: kept ≈ 0.77
    assert abs(kept[: n // 10].mean().item() - 0.23) < 0.01
    assert abs(kept[-n // 10 :].mean().item() - 0.77) < 0.01
    ratio = dropped / values  # E[τ̃_i / τ_i] = 1
    assert abs(ratio.mean().item() - 1.0) < 0.03
    assert abs(ratio[order][: n // 10].mean().item() - 1.0) < 0.06


def test_della_with_zero_window_is_dare_with_the_same_seed():
    tv = stack(torch.randn(3, 500, generator=torch.Generator().manual_seed(0)).tolist())
    assert torch.equal(merge("della_linear", tv, seed=4, p=0.5, epsilon=0.0, lam=0.3), merge("dare", tv, seed=4, p=0.5, lam=0.3))
    assert torch.equal(merge("della", tv, seed=4, p=0.5, epsilon=0.0, lam=1.0), merge("dare_ties", tv, seed=4, p=0.5, lam=1.0))


def test_della_elects_signs_over_the_pruned_vectors():
    # p = ε = 0 keeps everything: DELLA is TIES without trimming
    tv = stack([[0.9, -0.1, 0.4], [-0.8, 0.7, 0.3]])
    # sums 0.1, 0.6, 0.7 → all +; disjoint means 0.9, 0.7, 0.35
    assert torch.allclose(merge("della", tv, p=0.0, epsilon=0.0, lam=1.0), torch.tensor([0.9, 0.7, 0.35]))
    assert torch.allclose(merge("della_linear", tv, p=0.0, epsilon=0.0, lam=1.0), torch.tensor([0.1, 0.6, 0.7]))


def test_della_same_seed_is_bit_identical_and_seed_matters():
    tv = stack(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).tolist(), shapes=[(10, 100)])
    a = merge("della", tv, seed=7)
    assert torch.equal(a, merge("della", tv, seed=7))
    assert not torch.equal(a, merge("della", tv, seed=8))


def test_della_window_must_stay_inside_zero_one():
    tv = stack([[1.0, 2.0]])
    with pytest.raises(MergebenchError, match="p - epsilon"):
        merge("della", tv, p=0.1, epsilon=0.2)
    with pytest.raises(MergebenchError, match="p \\+ epsilon < 1"):
        merge("della", tv, p=0.9, epsilon=0.1)


# --- PCB -------------------------------------------------------------------------------------

def pcb_by_hand(tau, ratio, clip, vision):
    """The authors' pcb-merging.py / vision pcb.py steps, one numpy line each."""
    n, d = tau.shape
    s = np.sort(np.abs(tau), axis=1)
    clipped_abs = np.clip(np.abs(tau), s[:, [int(d * clip)]], s[:, [int(d * (1 - clip)) - 1]])
    norm = lambda x: (x - x.min(1, keepdims=True)) / (x.max(1, keepdims=True) - x.min(1, keepdims=True))  # noqa: E731
    intra = np.exp(n * norm(clipped_abs) ** 2)
    partners = np.sign(tau) * norm(clipped_abs) if vision else tau
    inter = np.tanh(tau * partners.sum(0))
    score = intra * inter
    score_sorted = np.sort(score, axis=1)
    scale = norm(np.clip(score, score_sorted[:, [int(d * (1 - ratio))]], score_sorted[:, [d - 1]]))
    return (np.sign(tau) * clipped_abs * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


@pytest.mark.parametrize("variant, clip", [("vision", 0.01), ("reference", 0.0001)])
def test_pcb_two_tasks_four_entries_recomputed_step_by_step(variant, clip):
    tau = np.array([[0.5, -0.2, 0.1, 0.8], [0.3, 0.4, -0.6, 0.2]])
    # d = 4: each task's largest magnitude is clipped to its second largest (index ⌊3.96⌋ − 1 = 2);
    # ratio 0.75 → the threshold is the 2nd smallest score, so two entries per task get weight > 0
    expected = pcb_by_hand(tau, 0.75, clip, variant == "vision")
    merged = merge("pcb", stack(tau.tolist()), ratio=0.75, variant=variant, lam=1.0)
    assert np.allclose(merged.numpy(), expected, atol=1e-6)
    assert np.count_nonzero(expected) >= 2


def test_pcb_vision_example_by_hand():
    tau = np.array([[0.5, -0.2, 0.1, 0.8], [0.3, 0.4, -0.6, 0.2]])
    # clipped |τ|: t0 (0.5, 0.2, 0.1, 0.5), t1 (0.3, 0.4, 0.4, 0.2)
    # Norm: t0 (1, 1/4, 0, 1), t1 (1/2, 1, 1, 0); intra = exp(2·Norm²)
    # partner sum Σ sgn·Norm = (1.5, 0.75, -1, 1); inter = tanh(τ · that)
    intra = np.exp(2 * np.array([[1, 1 / 16, 0, 1], [1 / 4, 1, 1, 0]]))
    inter = np.tanh(tau * np.array([1.5, 0.75, -1.0, 1.0]))
    score = intra * inter
    # threshold = 2nd smallest score per task; weight = (score − thr)/(max − thr), clamped at 0
    thr = np.sort(score, 1)[:, [1]]
    w = np.maximum(score - thr, 0) / (score.max(1, keepdims=True) - thr)
    clipped = np.array([[0.5, -0.2, 0.1, 0.5], [0.3, 0.4, -0.4, 0.2]])
    expected = (clipped * w).sum(0) / np.maximum(w.sum(0), 1e-12)
    merged = merge("pcb", stack(tau.tolist()), ratio=0.75, variant="vision", lam=2.0)
    assert np.allclose(merged.numpy(), 2.0 * expected, atol=1e-6)


def test_pcb_all_zero_task_vectors_merge_to_zero():
    assert torch.equal(merge("pcb", stack([[0.0] * 5, [0.0] * 5])), torch.zeros(5))


# --- CABS ------------------------------------------------------------------------------------

def test_cabs_two_tasks_two_of_four_by_hand():
    tv = stack([[0.1, -0.9, 0.3, 0.5, 0.2, 0.8, -0.7, 0.05], [0.6, 0.4, -0.2, 0.9, 0.3, 0.1, 0.5, -0.4]])
    # t0 keeps its top 2 of each block of 4: -0.9, 0.5 | 0.8, -0.7
    # t1 may only use what t0 left: positions 0, 2 | 4, 7 → 0.6, -0.2 | 0.3, -0.4
    masks = cabs_masks(tv, 2, 4)
    assert masks.tolist() == [[False, True, False, True, False, True, True, False], [True, False, True, False, True, False, False, True]]
    merged = merge("cabs", tv, n=2, m=4, lam=1.0)
    assert torch.allclose(merged, torch.tensor([0.6, -0.9, -0.2, 0.5, 0.3, 0.8, -0.7, -0.4]))
    # order matters: t1 first takes 0.6, 0.9 | 0.5, -0.4
    swapped = stack(tv.vectors.flip(0).tolist())
    assert cabs_masks(swapped, 2, 4)[0].tolist() == [True, False, False, True, False, False, True, True]


def test_cabs_masks_are_disjoint_and_balanced():
    vectors = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    tv = stack(vectors.tolist(), shapes=[(10, 20), (100,)])
    masks = cabs_masks(tv, 3, 16)
    assert int(masks.sum(0).max()) <= 1  # no position kept by two tasks
    # task 0 keeps exactly 3 of every full block of 16: 12 blocks + 3 of the trailing 8 in the first
    # tensor (200 = 12·16 + 8), 6 blocks + 3 of the trailing 4 in the second (100 = 6·16 + 4)
    assert int(masks[0, :200].sum()) == 13 * 3 and int(masks[0, 200:].sum()) == 7 * 3
    # every task keeps at most 3 per block
    assert int(masks[:, :192].reshape(5, -1, 16).sum(-1).max()) <= 3
    merged = merge("cabs", tv, n=3, m=16, lam=1.0)
    assert torch.equal(merged, (vectors * masks).sum(0))


def test_cabs_later_tasks_get_nothing_when_blocks_are_full():
    tv = stack([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
    masks = cabs_masks(tv, 2, 4)
    assert masks.sum(1).tolist() == [2, 2, 0]
    # the trailing block shorter than m keeps its top n like a full block
    short = cabs_masks(stack([[1.0, 2.0, 3.0, 4.0, 5.0, 0.5]]), 2, 4)
    assert short.tolist() == [[False, False, True, True, True, True]]


def test_cabs_one_task_full_density_recovers_the_expert():
    tv = stack([[0.3, -0.2, 0.0, 1.0]], pretrained=[1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(merge("cabs", tv, n=4, m=4, lam=1.0), torch.tensor([1.3, 1.8, 3.0, 5.0]))


# --- hyperparameters -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("breadcrumbs", {"scope": "global"}, "must be one of per_row, per_tensor"),
        ("breadcrumbs_ties", {"density": "1.5"}, r"density=1.5 of breadcrumbs_ties: must be in \[0.0, 1.0\]"),
        ("della", {"p": "1.0"}, r"p=1.0 of della: must be in \[0.0, 1.0\)"),
        ("pcb", {"variant": "nlp"}, "must be one of reference, vision"),
        ("cabs", {"n": "0"}, r"n=0 of cabs: must be >= 1"),
    ],
)
def test_bad_hyperparameters_are_rejected(method, overrides, message):
    with pytest.raises(MergebenchError, match=message):
        get_method(method).settings(overrides)


def test_cabs_rejects_n_above_m():
    with pytest.raises(MergebenchError, match="n <= m"):
        merge("cabs", stack([[1.0, 2.0]]), n=5, m=4)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "pcb", "cabs"])
def test_sweep_grids_stay_small(name):
    assert len(get_method(name).settings()) <= 12

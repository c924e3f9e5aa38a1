"""Exact top-k selection (radix select, tie rules, column chunks) and the peer-behaviour options built on it."""

import pytest
import torch

from mergebench.core import selection as selection_module
from mergebench.core.selection import TopK, column_chunks, kth_largest, kth_smallest, top_k_mask
from mergebench.methods.breadcrumbs import middle_band
from mergebench.methods.model_stock import stock_ratio
from mergebench.methods.ties import elect_and_merge, elect_signs
from method_helpers import merge, stack


def sorted_top_k(values: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """Reference: keep the first k of a stable sort (descending, or ascending read from its end)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    for row, out in zip(values, mask):
        if rule == "lowest_index":
            order = torch.argsort(row, descending=True, stable=True)[:k]
        else:
            order = torch.argsort(row, stable=True).flip(0)[:k]
        out[order] = True
    return mask


def tied_rows(rows: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Magnitudes with many exact ties: values on a coarse grid."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d, generator=generator).abs() * 8).round().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [50, 70_000])  # kthvalue/topk path and radix-select path
@pytest.mark.parametrize("rule", ["lowest_index", "highest_index"])
def test_top_k_keeps_exactly_k_in_the_order_of_a_stable_sort(dtype, d, rule):
    values = tied_rows(3, d, dtype, seed=d)
    for k in (1, d // 5, d // 2 + 1, d - 1):
        mask = top_k_mask(values, k, rule)
        assert mask.sum(dim=1).tolist() == [k] * 3
        assert torch.equal(mask, sorted_top_k(values.float(), k, rule))


def test_keep_all_keeps_every_entry_tied_at_the_threshold():
    values = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5]])
    assert top_k_mask(values, 2, "keep_all").tolist() == [[True, False, True, True, True, False]]
    assert top_k_mask(values, 2, "lowest_index").tolist() == [[True, False, True, False, False, False]]
    assert top_k_mask(values, 2, "highest_index").tolist() == [[True, False, False, False, True, False]]


@pytest.mark.parametrize("rule", ["lowest_index", "highest_index"])
def test_chunked_masks_equal_the_whole_row_mask(rule, monkeypatch):
    monkeypatch.setattr(selection_module, "CHUNK_BYTES", 1 << 12)
    values = tied_rows(4, 90_000, torch.float32, seed=7)
    whole = top_k_mask(values, 20_000, rule)
    selection = TopK.of_values(values, 20_000, rule, signed=False)
    chunks = list(column_chunks(0, values.shape[1], 4))
    assert len(chunks) > 10
    assert torch.equal(torch.cat([selection.keep(values[:, c]) for c in chunks], dim=1), whole)


@pytest.mark.parametrize("k", [1, 333, 50_000, 99_999])
def test_radix_select_of_signed_values_matches_sorting(k):
    generator = torch.Generator().manual_seed(k)
    values = torch.randn(100_000, generator=generator)
    values[:300] = -0.125  # ties on the negative side
    assert kth_largest(values, k, signed=True) == values.sort(descending=True).values[k - 1]
    assert kth_smallest(values, k, signed=True) == values.sort().values[k - 1]


def test_ties_trim_keeps_exactly_k_and_keep_all_keeps_the_ties():
    # one task, 10 entries, k = 20 % → 2 kept; |0.5| appears three times at the threshold
    tv = stack([[0.5, -1.0, 0.5, 0.2, -0.5, 0.1, 0.0, 0.3, 0.2, 0.1]])
    exact = merge("ties", tv, k=20.0, lam=1.0)
    assert torch.equal(exact, torch.tensor([0.5, -1.0, 0, 0, 0, 0, 0, 0, 0, 0]))
    every_tie = merge("ties", tv, k=20.0, lam=1.0, tie_rule="keep_all")
    assert torch.equal(every_tie, torch.tensor([0.5, -1.0, 0.5, 0, -0.5, 0, 0, 0, 0, 0]))


def test_zero_sum_entries_take_the_majority_or_the_positive_sign():
    # column 2 sums to exactly 0 with non-zero entries; the other columns elect -, -, -: majority -
    rows = torch.tensor([[-1.0, -2.0, 3.0, -1.0], [-1.0, -1.0, -3.0, -2.0]])
    assert elect_signs(rows).tolist() == [-1.0, -1.0, -1.0, -1.0]
    assert elect_signs(rows, "positive").tolist() == [-1.0, -1.0, 1.0, -1.0]
    # disjoint means: the zero-sum column keeps only the entry of the filled sign
    assert elect_and_merge(rows).tolist() == [-1.0, -1.5, -3.0, -1.5]
    assert elect_and_merge(rows, "positive").tolist() == [-1.0, -1.5, 3.0, -1.5]


def test_zero_sum_columns_in_a_later_chunk_use_the_majority_of_all_columns(monkeypatch):
    monkeypatch.setattr(selection_module, "CHUNK_BYTES", 1 << 12)
    # 20,000 columns in chunks of 1,024: the first chunks elect +, the one zero-sum column sits at the end
    rows = torch.full((2, 20_000), 0.5)
    rows[:, -1] = torch.tensor([2.0, -2.0])
    assert elect_and_merge(rows)[-1] == 2.0
    assert elect_and_merge(-rows)[-1] == -2.0


def test_breadcrumbs_band_edge_ties_follow_the_tie_rule():
    # magnitudes 4, 3, 2, 2, 2, 1: drop the top 1, keep 2 → 3 and one of the three 2s
    row = torch.tensor([[2.0, 4.0, -2.0, 3.0, 2.0, 1.0]])
    assert middle_band(row, density=2 / 6, top_masked=1 / 6).tolist() == [[True, False, False, True, False, False]]
    assert middle_band(row, 2 / 6, 1 / 6, "highest_index").tolist() == [[False, False, False, True, True, False]]


def test_breadcrumbs_highest_index_is_a_stable_ascending_sort():
    """mergekit's magnitude_outliers band, positions [n_bot, n_bot + target) of an ascending sort, stable."""
    values = tied_rows(1, 40, torch.float32, seed=3)
    density, gamma = 0.3, 0.1
    target, n_top = int(density * 40), int(gamma * 40)
    n_bot = 40 - target - n_top
    expected = torch.zeros(40, dtype=torch.bool)
    expected[torch.sort(values[0], stable=True).indices[n_bot : n_bot + target]] = True
    assert torch.equal(middle_band(values, density, gamma, "highest_index")[0], expected)


def test_model_stock_negative_cosine_clamped_or_extrapolated():
    cos = torch.tensor(-0.2, dtype=torch.float64)
    assert stock_ratio(cos, 3) == 0.0
    # t = N cos / (1 + (N − 1) cos) = 3·(−0.2) / (1 − 0.4) = −1
    assert stock_ratio(cos, 3, "extrapolate") == pytest.approx(-1.0)
    assert stock_ratio(torch.tensor(-0.5, dtype=torch.float64), 3, "extrapolate") == 0.0  # 1 + 2·(−0.5) = 0
    # two opposite-ish task vectors: cos = −0.6 → t = 2·(−0.6)/(1 − 0.6) = −3, τ_m = −3 · mean
    tv = stack([[1.0, 0.0], [-0.6, 0.8]])
    merged = merge("model_stock", tv, negative_cosine="extrapolate")
    assert torch.allclose(merged, -3.0 * torch.tensor([0.2, 0.4]))
    assert torch.equal(merge("model_stock", tv), torch.zeros(2))


def test_sort_rules_keep_the_first_k_of_torch_sorts():
    values = tied_rows(2, 300, torch.bfloat16, seed=11)
    descending = torch.zeros(2, 300, dtype=torch.bool).scatter_(1, torch.argsort(values.float(), dim=1, descending=True)[:, :60], True)
    ascending = torch.zeros(2, 300, dtype=torch.bool).scatter_(1, torch.sort(values.float(), dim=1).indices[:, 240:], True)
    assert torch.equal(top_k_mask(values, 60, "descending_sort"), descending)
    assert torch.equal(top_k_mask(values, 60, "ascending_sort"), ascending)
    selection = TopK.of_values(values, 60, "descending_sort", signed=False)
    assert torch.equal(torch.cat([selection.keep(values[:, :100]), selection.keep(values[:, 100:])], dim=1), descending)

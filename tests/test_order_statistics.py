"""Exact order statistics by two-round radix select, against a sort."""

import pytest
import torch

from mergebench.core.order_statistics import RowOrderStatistics, key_values, row_order_statistics, sortable_keys


def test_keys_sort_as_the_floats_and_invert():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-38, 2.0, float("inf")])
    keys = sortable_keys(values)
    assert torch.equal(keys.sort().values, keys)
    # −0 is folded into +0
    assert keys[3] == keys[4]
    assert torch.equal(key_values(keys), values + 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_equal_the_sorted_entries_in_any_blocking(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5000, generator=generator).to(dtype).float()
    values[0, :400] = 0.0  # many ties, signed zeros
    values[1, :300] = -0.0
    values[2] *= 1e-20
    ranks = [0, 1, 399, 2500, 4998, 4999]
    expected = values.sort(dim=1).values
    whole = row_order_statistics(values, ranks)
    select = RowOrderStatistics(3, ranks)
    for _ in range(2):
        for block in values.split(333, dim=1):
            select.add(block)
        select.next_round()
    for rank, one_block, blocks in zip(ranks, whole, select.values()):
        assert torch.equal(one_block[:, 0], expected[:, rank])
        assert torch.equal(blocks[:, 0], expected[:, rank])


def test_ranks_outside_the_entries_are_refused():
    with pytest.raises(ValueError, match="outside"):
        row_order_statistics(torch.ones(2, 4), [4])

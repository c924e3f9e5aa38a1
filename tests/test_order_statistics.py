"""Exact order statistics by two-round radix select, against a sort and the in-memory selection."""

import pytest
import torch

from mergebench.core.order_statistics import RowOrderStatistics, key_values, sortable_keys
from mergebench.core.task_vectors import ParamLayout, TaskVectors, TensorSlot


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
    counted = [counted_statistics(values, ranks, values.shape[1]), counted_statistics(values, ranks, 333)]
    in_memory = in_memory_vectors(values).order_statistics(values, ranks)  # the radix select of core.selection
    for position, rank in enumerate(ranks):
        for answer in (counted[0][position], counted[1][position], in_memory[position]):
            assert torch.equal(answer[:, 0], expected[:, rank])
            # bit for bit, −0 answered as +0
            assert torch.equal(answer.view(torch.int32), counted[1][position].view(torch.int32))


def counted_statistics(values, ranks, block_width):
    select = RowOrderStatistics(values.shape[0], ranks)
    for _ in range(2):
        for block in values.split(block_width, dim=1):
            select.add(block)
        select.next_round()
    return select.values()


def in_memory_vectors(values):
    layout = ParamLayout((TensorSlot("w", (values.shape[1],), 0, values.shape[1]),))
    return TaskVectors(torch.zeros(values.shape[1]), values, layout, tuple(f"t{i}" for i in range(values.shape[0])))


def test_ranks_outside_the_entries_are_refused():
    with pytest.raises(ValueError, match="outside"):
        counted_statistics(torch.ones(2, 4), [4], 4)


def test_in_memory_radix_select_of_long_rows_matches_the_counted_passes():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(2, 70_000, generator=generator)  # long rows: the radix-select path
    values[0, :5000] = -0.0
    values[0, 5000:9000] = 0.0
    values[1] = values[1].to(torch.bfloat16).float()  # ties
    ranks = [4000, 8999, 9000, 35_000, 69_999]
    expected = values.sort(dim=1).values
    counted = counted_statistics(values, ranks, 4096)
    in_memory = in_memory_vectors(values).order_statistics(values, ranks)
    for position, rank in enumerate(ranks):
        assert torch.equal(in_memory[position][:, 0], expected[:, rank])
        assert torch.equal(in_memory[position].view(torch.int32), counted[position].view(torch.int32))

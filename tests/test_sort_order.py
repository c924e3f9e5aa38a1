"""The replay of PyTorch's unstable CPU sort (mergekit's tie order) against ``torch.sort`` itself."""

import numpy as np
import pytest
import torch

from mergebench.core import kernels, sort_order
from mergebench.core.selection import TopK
from mergebench.errors import MergebenchError
from mergebench.methods.ties import keep_top_magnitudes, ties_merge
from method_helpers import stack


needs_libstdcxx_sort = pytest.mark.skipif(
    not sort_order.replays_torch_sort(), reason="this PyTorch's CPU sort is not libstdc++'s std::sort (the flags come from torch.sort)"
)


def test_the_replay_is_used_where_pytorch_sorts_with_libstdcxx():
    if "GCC" not in torch.__config__.show() or torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2"):
        pytest.skip("checked on GCC builds running their AVX2 or default kernels")
    assert sort_order.replays_torch_sort()


def rows_of_many_kinds(d: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "bfloat16 magnitudes": (torch.randn(d, generator=generator) * 1e-3).bfloat16().float().abs(),
        "three values": torch.randint(0, 3, (d,), generator=generator).float(),
        "all equal": torch.zeros(d),
        "ascending": torch.arange(d).float(),
        "descending": torch.arange(d).flip(0).float(),
        "signed normal": torch.randn(d, generator=generator),
    }


def depth_limit_row(n: int) -> tuple[torch.Tensor, bool]:
    """A row on which libstdc++'s introsort partitions until its depth limit (McIlroy's adversary, "A
    killer adversary for quicksort", 1999): values are fixed lazily as the ascending sort compares them,
    so that every median-of-three pivot is among the smallest of its range. Returns the row and whether
    the limit (where the sort switches to heapsort) was reached."""
    gas, value, solid, candidate = n, [n] * n, [0], [0]

    def less(x: int, y: int) -> bool:
        if value[x] == gas and value[y] == gas:
            frozen = x if x == candidate[0] else y
            value[frozen], solid[0] = solid[0], solid[0] + 1
        if value[x] == gas:
            candidate[0] = x
        elif value[y] == gas:
            candidate[0] = y
        return value[x] < value[y]

    items, reached = list(range(n)), [False]

    def partition(first: int, last: int) -> int:
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        if less(items[a], items[b]):
            median = b if less(items[b], items[c]) else (c if less(items[a], items[c]) else a)
        else:
            median = a if less(items[a], items[c]) else (c if less(items[b], items[c]) else b)
        items[first], items[median] = items[median], items[first]
        pivot, left, right = items[first], first + 1, last
        while True:
            while less(items[left], pivot):
                left += 1
            right -= 1
            while less(pivot, items[right]):
                right -= 1
            if left >= right:
                return left
            items[left], items[right] = items[right], items[left]
            left += 1

    ranges = [(0, n, 2 * (n.bit_length() - 1))]
    while ranges:
        first, last, depth = ranges.pop()
        while last - first > sort_order.THRESHOLD:
            if depth == 0:
                reached[0] = True
                break
            depth -= 1
            cut = partition(first, last)
            ranges.append((cut, last, depth))
            last = cut
    return torch.tensor(value, dtype=torch.float32), reached[0]


@needs_libstdcxx_sort
@pytest.mark.parametrize("d", [1, 2, 5, 16, 17, 33, 127, 128, 129, 1000, 30_000])
def test_the_full_replay_is_torch_argsort(d):
    for name, row in rows_of_many_kinds(d, seed=d).items():
        for descending in (True, False):
            expected = torch.argsort(row, descending=descending)
            assert torch.equal(sort_order.sort_indices(row, descending), expected), (name, descending)


@needs_libstdcxx_sort
@pytest.mark.parametrize("n", [100, 1000, 5000])
def test_the_replay_is_torch_argsort_where_introsort_falls_back_to_heapsort(n):
    row, reached = depth_limit_row(n)
    assert reached
    assert len(set(row.tolist())) < n // 2  # the heapsorted ranges are full of ties
    assert torch.equal(sort_order.sort_indices(row, False), torch.argsort(row))
    assert torch.equal(sort_order.sort_indices(-row, True), torch.argsort(-row, descending=True))


def sort_mask(rows: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    """Reference: the first k of torch.argsort descending, or the last k of torch.sort ascending."""
    order = torch.argsort(rows, dim=1, descending=True)[:, :k] if descending else torch.sort(rows, dim=1).indices[:, -k:]
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, True)


@pytest.mark.parametrize("replayed", [True, False])
@pytest.mark.parametrize("d", [300, 70_000])  # kthvalue path and radix-select path for the threshold
def test_sort_rules_keep_what_torch_sort_keeps_with_ties_straddling_the_threshold(d, replayed, monkeypatch):
    if replayed and not sort_order.replays_torch_sort():
        pytest.skip("this PyTorch's CPU sort is not libstdc++'s std::sort")
    if not replayed:  # as on a build whose sort the replay does not reproduce: the flags come from torch.sort
        monkeypatch.setattr(sort_order, "replays_torch_sort", lambda: False)
        monkeypatch.setattr(sort_order, "_ties_kept_by_sort", None)
    generator = torch.Generator().manual_seed(d)
    rows = (torch.randn(4, d, generator=generator) * 1e-3).bfloat16().float()
    rows[3] = (torch.arange(d) // 2).float()[torch.randperm(d, generator=generator)]  # every magnitude twice
    for k in (1, d // 5, d // 2, d - 1):
        for rule, descending in (("descending_sort", True), ("ascending_sort", False)):
            expected = sort_mask(rows.abs(), k, descending)
            selection = TopK.of_magnitudes(rows, k, rule)
            assert not selection.all_ties_kept or k == d - 1
            chunks = [selection.keep(rows[:, i : i + 997].abs()) for i in range(0, d, 997)]
            assert torch.equal(torch.cat(chunks, dim=1), expected), (k, rule)
            assert torch.equal(keep_top_magnitudes(rows, 100 * k / d, rule) != 0, expected & (rows != 0)), (k, rule)


def test_ties_with_descending_sort_is_the_merge_of_torch_argsort_masks_on_both_paths(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    vectors = (torch.randn(5, 40_000, generator=generator) * 1e-3).bfloat16().float()
    k = int(40_000 * 0.2)
    masked = vectors * sort_mask(vectors.abs(), k, descending=True)
    summed = masked.sum(dim=0)
    signs = torch.where(summed >= 0, 1.0, -1.0)  # zero_sign="positive"
    agreeing = (masked * signs > 0)
    expected = (masked * agreeing).sum(dim=0) / agreeing.sum(dim=0).clamp(min=1)
    fused = ties_merge(stack(vectors.tolist()), 20.0, "global", "descending_sort", "positive")
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = ties_merge(stack(vectors.tolist()), 20.0, "global", "descending_sort", "positive")
    assert torch.equal(fused, plain)
    assert torch.allclose(fused, expected, rtol=0, atol=1e-9)
    assert torch.equal(fused != 0, expected != 0)


def test_sort_rules_refuse_nan():
    rows = torch.ones(2, 50)
    rows[1, 7] = float("nan")
    with pytest.raises(MergebenchError, match="NaN"):
        TopK.of_magnitudes(rows, 10, "descending_sort")


@needs_libstdcxx_sort
def test_ties_kept_by_sort_flags_each_rows_ties_in_index_order():
    row = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    order = torch.argsort(row[0], descending=True)[:3].tolist()  # 3.0 and two of the four 2.0s
    flags = sort_order.ties_kept_by_sort(row, torch.tensor([0]), torch.tensor([2.0]), 3, True, torch.tensor([4]))
    tied = [i for i in range(7) if row[0, i] == 2.0]
    assert flags.tolist() == [i in order for i in tied]
    assert int(flags.sum()) == 2
    assert np.array_equal(flags.numpy(), np.array([i in order for i in tied]))

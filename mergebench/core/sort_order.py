"""The entries that PyTorch's unstable CPU sort puts first, found without sorting.

``torch.sort`` and ``torch.argsort`` without ``stable=True`` sort a CPU float row with C++'s
``std::sort`` (GNU libstdc++: introsort) over (value, index) pairs, comparing values only. Its order of
equal values is no index order, but it is a deterministic function of the row: median-of-three pivot
moved to the front, Hoare partition of the rest around it, the right part first, heapsort of a range
once 2·⌊log₂ d⌋ partitions deep, and a final insertion sort over the whole row that moves no entry out
of the ≤ 16-entry range partitioning left it in. mergekit's ``magnitude`` (the first k of
``argsort(|τ|, descending=True)``) and ``magnitude_outliers`` (a slice of an ascending sort) depend on
that order wherever magnitudes tie at the threshold, as they often do in bfloat16.

:func:`ties_kept_by_sort` replays exactly those steps but, like a quickselect, only on the ranges that
straddle a requested position b: a range wholly before or after b ends up, in the full sort, wholly
before or after it, whatever order it gets inside. So the entries at positions < b are those of the
full sort in about three passes over the row instead of log₂ d. The tests check the replay against
``torch.argsort`` itself, full permutations included, on rows with heavy ties and on rows that drive
the partition to its depth limit.

A descending sort is replayed as the ascending sort of the negated values (x > y exactly when −x < −y).
The rows must hold no NaN (PyTorch's comparators order NaN last, which the replay does not; callers
refuse such rows).

The replay is of the GNU libstdc++ ``std::sort`` that Linux builds of PyTorch use. A build whose CPU sort
is another algorithm (another C++ library, or a vectorized sort) is detected once per process by
comparing the replay with ``torch.argsort`` on a probe row full of ties, and then the flags come from
``torch.sort`` itself (:func:`replays_torch_sort`).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

THRESHOLD = 16
"""libstdc++'s ``_S_threshold``: ranges of at most this many entries are left to the final insertion sort."""


def _jit(function):
    return numba.njit(cache=True, nogil=True, error_model="numpy")(function)


@_jit
def _swap(values, order, i, j):
    values[i], values[j] = values[j], values[i]
    order[i], order[j] = order[j], order[i]


@_jit
def _move_median_to_first(values, order, result, a, b, c):
    """``std::__move_median_to_first``: the median of entries a, b, c swapped into ``result``."""
    if values[a] < values[b]:
        if values[b] < values[c]:
            median = b
        elif values[a] < values[c]:
            median = c
        else:
            median = a
    elif values[a] < values[c]:
        median = a
    elif values[b] < values[c]:
        median = c
    else:
        median = b
    _swap(values, order, result, median)


BLOCK = 64
"""Entries a block partition step examines on each side before swapping (branch-free comparisons)."""


@_jit
def _partition_around_first(values, order, first, last):
    """``std::__unguarded_partition_pivot``: the median of three moved to ``first``, the rest of
    [first, last) split around it; returns the cut (left part ≤ pivot ≤ right part).

    Hoare's scans stop at the entries ≥ pivot from the left and ≤ pivot from the right, and swap the
    i-th stop of one side with the i-th of the other until they cross. The stops are found a block of
    ``BLOCK`` entries per side at a time without branching on the values, and swapped in the same pairs
    (the BlockQuicksort of Edelkamp and Weiß, 2016), so the result is that of the scalar loop, which
    finishes the last two blocks' worth of entries."""
    _move_median_to_first(values, order, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = values[first]
    left_stops = np.empty(BLOCK, dtype=np.int64)
    right_stops = np.empty(BLOCK, dtype=np.int64)
    left, right = first + 1, last - 1  # next unexamined block starts at left, ends at right (inclusive)
    num_left = num_right = start_left = start_right = 0
    while right - left + 1 >= 2 * BLOCK:
        if num_left == 0:
            start_left = 0
            for j in range(BLOCK):
                left_stops[num_left] = j
                num_left += np.int64(not values[left + j] < pivot)
        if num_right == 0:
            start_right = 0
            for j in range(BLOCK):
                right_stops[num_right] = j
                num_right += np.int64(not pivot < values[right - j])
        pairs = min(num_left, num_right)
        for s in range(pairs):
            _swap(values, order, left + left_stops[start_left + s], right - right_stops[start_right + s])
        num_left -= pairs
        num_right -= pairs
        start_left += pairs
        start_right += pairs
        if num_left == 0:
            left += BLOCK
        if num_right == 0:
            right -= BLOCK
    i = left + left_stops[start_left] if num_left else left
    j = right - right_stops[start_right] if num_right else right
    while True:
        while values[i] < pivot:
            i += 1
        while pivot < values[j]:
            j -= 1
        if not i < j:
            return i
        _swap(values, order, i, j)
        i += 1
        j -= 1


@_jit
def _adjust_heap(values, order, first, hole, length, value, index):
    """``std::__adjust_heap``: sift the hole at ``hole`` down to a leaf, then push (value, index) up."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if values[first + child] < values[first + child - 1]:
            child -= 1
        values[first + hole], order[first + hole] = values[first + child], order[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        values[first + hole], order[first + hole] = values[first + child - 1], order[first + child - 1]
        hole = child - 1
    while hole > top:  # std::__push_heap
        parent = (hole - 1) // 2
        if not values[first + parent] < value:
            break
        values[first + hole], order[first + hole] = values[first + parent], order[first + parent]
        hole = parent
    values[first + hole], order[first + hole] = value, index


@_jit
def _heap_sort(values, order, first, last):
    """``std::__partial_sort(first, last, last)``: ``std::make_heap`` then ``std::sort_heap``."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(values, order, first, parent, length, values[first + parent], order[first + parent])
        if parent == 0:
            break
        parent -= 1
    while last - first > 1:
        last -= 1
        value, index = values[last], order[last]  # std::__pop_heap
        values[last], order[last] = values[first], order[first]
        _adjust_heap(values, order, first, 0, last - first, value, index)


@_jit
def _insertion_sort(values, order, first, last):
    """Stable insertion sort of [first, last): what the final insertion sort does to an unsorted range."""
    for i in range(first + 1, last):
        value, index = values[i], order[i]
        j = i
        while j > first and value < values[j - 1]:
            values[j], order[j] = values[j - 1], order[j - 1]
            j -= 1
        values[j], order[j] = value, index


@_jit
def _straddles(boundaries, first, last):
    """Whether a position b of the sorted ``boundaries`` has first < b < last."""
    i = np.searchsorted(boundaries, first, side="right")
    return i < boundaries.shape[0] and boundaries[i] < last


@_jit
def _replay(values, order, boundaries):
    """``std::sort`` of (values, order) by value, carried out only on the ranges that straddle a position
    of ``boundaries``: afterwards every position b holds the entries [0, b) of the full sort."""
    n = values.shape[0]
    if n < 2:
        return
    depth = np.int64(-2)  # 2·⌊log₂ n⌋, std::__lg
    while n >> (depth // 2 + 1):
        depth += 2
    stack = [(np.int64(0), np.int64(n), depth)]
    while stack:
        first, last, depth = stack.pop()
        while last - first > THRESHOLD and _straddles(boundaries, first, last):
            if depth == 0:
                _heap_sort(values, order, first, last)
                break
            depth -= 1
            cut = _partition_around_first(values, order, first, last)
            stack.append((cut, last, depth))
            last = cut
        else:
            if last - first <= THRESHOLD and _straddles(boundaries, first, last):
                _insertion_sort(values, order, first, last)


@_jit
def _ties_kept_by_sort(rows, which, magnitude, thresholds, position, descending, offsets, order, keys, kept):
    """kept[offsets[r] + i] = whether the i-th entry (in index order) of row ``which[r]`` (of its
    magnitudes) equal to thresholds[r] lands before ``position`` in PyTorch's sort of the row
    (descending), or does not (ascending)."""
    boundaries = np.array([position], dtype=np.int64)
    d = rows.shape[1]
    for r in range(which.shape[0]):
        row = rows[which[r]]
        v = thresholds[r]
        for i in range(d):
            x = abs(row[i]) if magnitude else row[i]
            keys[i] = -x if descending else x
            order[i] = i
        _replay(keys, order, boundaries)
        target = -v if descending else v
        tied_before = 0
        for i in range(position):  # the tied entries landing before ``position``, to the front of ``order``
            if keys[i] == target:
                order[tied_before] = order[i]
                tied_before += 1
        keys[:] = 0
        for i in range(tied_before):
            keys[order[i]] = 1
        ordinal = offsets[r]
        for j in range(d):
            if (abs(row[j]) if magnitude else row[j]) == v:
                kept[ordinal] = (keys[j] != 0) == descending
                ordinal += 1


def ties_kept_by_sort(rows: torch.Tensor, which: torch.Tensor, thresholds: torch.Tensor, k: int, descending: bool,
                      ties: torch.Tensor, *, magnitude: bool = False) -> torch.Tensor:
    """Which entries tied at the k-th largest value ``thresholds[r]`` of row ``which[r]`` of ``rows`` (of
    their magnitudes with ``magnitude``) PyTorch's sort of the row puts among the k largest: the first
    k of ``torch.sort(row, descending=True)``, or the last k of the ascending sort. ``rows`` is
    ``[R, d]`` NaN-free, ``ties[r]`` the count of entries equal to ``thresholds[r]``; returns one flag
    per tied entry, row after row, each row's in index order."""
    values = rows.detach().to("cpu", torch.float32).contiguous()
    thresholds = thresholds.detach().to("cpu", torch.float32).reshape(-1)
    d = values.shape[1]
    if not replays_torch_sort():
        return torch.cat([_ties_kept_by_torch_sort(values[r].abs() if magnitude else values[r], v, k, descending)
                          for r, v in zip(which.tolist(), thresholds)])
    ties = ties.cpu().numpy()
    offsets = np.zeros(len(ties), dtype=np.int64)
    offsets[1:] = np.cumsum(ties)[:-1]
    kept = np.zeros(int(ties.sum()), dtype=np.bool_)
    order = np.empty(d, dtype=np.int32 if d < 2**31 else np.int64)
    position = k if descending else d - k
    _ties_kept_by_sort(values.numpy(), which.cpu().numpy().astype(np.int64), magnitude, thresholds.numpy(), position, descending,
                       offsets, order, np.empty(d, dtype=np.float32), kept)
    return torch.from_numpy(kept)


def _ties_kept_by_torch_sort(row: torch.Tensor, threshold: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    """:func:`ties_kept_by_sort` of one row, by ``torch.sort`` itself."""
    order = torch.sort(row, descending=descending).indices
    chosen = torch.zeros(row.shape, dtype=torch.bool)
    chosen[order[:k] if descending else order[row.shape[0] - k :]] = True
    return chosen[row == threshold]


@functools.cache
def replays_torch_sort() -> bool:
    """Whether the replay reproduces this PyTorch's CPU sort, on a probe row of heavy ties, both ways."""
    probe = torch.from_numpy((np.arange(5000, dtype=np.int64) * 7919 % 5003 % 23).astype(np.float32))
    return all(torch.equal(sort_indices(probe, descending), torch.sort(probe, descending=descending).indices) for descending in (True, False))


def sort_indices(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """``torch.argsort(values, descending=descending)`` of a 1-D NaN-free float32 CPU row, by the
    replay carried out in full (every position a boundary)."""
    keys = -values.numpy() if descending else values.numpy().copy()
    order = np.arange(keys.shape[0], dtype=np.int64)
    _replay(keys, order, np.arange(1, keys.shape[0], dtype=np.int64))
    return torch.from_numpy(order)

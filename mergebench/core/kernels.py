"""Fused CPU kernels for the per-entry passes of the data-free merges (compiled with numba).

Each kernel does in one pass over memory what several PyTorch operations do in as many passes (each of
which reads and writes the whole ``[T, N]`` stack): a merge becomes a few reads of the task vectors,
close to the cost of reading them once. They take contiguous-row float32 CPU tensors; any other tensor
(a GPU, 16-bit task vectors) takes the PyTorch expressions of the methods, which compute the same
numbers in the same order (sums over tasks are taken in task order, t = 0, 1, …, T − 1, on every
path, so results do not depend on the device or on how columns are cut into blocks).

* :func:`radix_select`, :func:`order_statistics`: the k-th largest of a row (or of its magnitudes) with
  the counts of entries greater than and equal to it, for one or several k at once, by two histogram
  passes over the bit patterns (16 high bits, then the 16 low bits inside the bins found) — no sort, no
  temporary of the row's size.
* :func:`elect_columns`: TIES's trim (a top-k threshold per task with its tie rule, or a packed keep-mask
  with a rescale, as DARE draws it), sign election γ = sgn(Σ_t τ̂_t) and disjoint mean (or sum) of the
  entries agreeing with γ, block of columns by block of columns.
* :class:`TorchCpuRandom`: PyTorch's CPU random stream (MT19937), so that DARE's and DELLA's Bernoulli
  masks are drawn inside the kernels (:func:`dropped_add`, :func:`draw_keep_bits`, :func:`magprune`,
  :func:`magprune_elect`) and equal ``torch.rand``'s draws bit for bit.
* :func:`middle_band`: Breadcrumbs' band of magnitude ranks of every row, both edges found by an
  interpolation search of the magnitudes' bit patterns, each step one vectorized count of two probes.
* :func:`magprune`: DELLA's rank-dependent drop probabilities and draws; the exact magnitude ranks of
  each row come from one bucket pass and a branch-free count of the keys near each key (no sort), and
  :func:`magprune_elect` elects the pruned rows block by block, the pruned stack never written.
* :func:`pcb_candidate_merge`: PCB with PyTorch's ``exp`` and ``tanh`` only for the entries whose
  score, estimated by polynomials within a stated tolerance, could reach the task's threshold.

``torch.profiler`` does not see the kernels: ``benchmarks/merge_speed.py`` reports their time as the
time outside PyTorch operators.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

ENABLED = True
"""Whether CPU float32 tensors take the kernels (the tests turn them off to compare both paths)."""

BLOCK = 2048
"""Columns of a block of :func:`elect_columns`: T·BLOCK·4 bytes of task vectors stay in cache across its
two loops (sums, then agreeing entries)."""

KEEP_ALL, LOWEST_INDEX, HIGHEST_INDEX, CHOSEN = 0, 1, 2, 3
TIE_CODES = {
    "keep_all": KEEP_ALL, "lowest_index": LOWEST_INDEX, "highest_index": HIGHEST_INDEX,
    "descending_sort": CHOSEN, "ascending_sort": CHOSEN,
}


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: float32 on the CPU, rows contiguous."""
    return ENABLED and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and (t.dim() < 2 or t.stride(-1) == 1) and not t.requires_grad for t in tensors
    )


def _jit(function):
    return numba.njit(cache=True, nogil=True, error_model="numpy")(function)


def _jit_inline(function):
    """A small per-entry function inlined by numba into its callers' loops, so that they vectorize."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")(function)


def _jit_apart(function):
    """A kernel's inner loop compiled as a function of its own (not inlined), which LLVM vectorizes."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", inline="never")(function)


@_jit
def _key(x, magnitude):
    """int32 key of a float32 that orders as the float (of |x| with ``magnitude``), −0 as +0."""
    bits = np.int32(np.float32(x + np.float32(0.0)).view(np.int32))
    if magnitude:
        return bits & np.int32(0x7FFFFFFF)
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


@_jit_apart
def _high_bits_histogram(row, magnitude, counts):
    for x in row:
        counts[(_key(x, magnitude) >> 16) + 32768] += 1


@_jit_apart
def _count_low_bits(row, magnitude, bin_index, counts):
    """counts[low 16 bits] += 1 for the keys whose high 16 bits are ``bin_index``."""
    for x in row:
        key = _key(x, magnitude)
        if (key >> 16) == bin_index:
            counts[key & 0xFFFF] += 1


@_jit_apart
def _count_low_bits_of_bins(row, magnitude, histogram_of_bin, low):
    """low[h, low 16 bits] += 1 for the keys whose high bits have a histogram h (≥ 0) in the table."""
    for x in row:
        key = _key(x, magnitude)
        h = histogram_of_bin[(key >> 16) + 32768]
        if h >= 0:
            low[h, key & 0xFFFF] += 1


@_jit
def _radix_select(row, ks, magnitude, values, greater, equal):
    """values[i] = the ks[i]-th largest of ``row`` (of |row| with ``magnitude``), with the counts of the
    entries greater than and equal to it: one histogram of the 16 high key bits for every k, then one of
    the 16 low bits inside each bin found."""
    high = np.zeros(1 << 16, dtype=np.int64)
    _high_bits_histogram(row, magnitude, high)
    wanted = np.empty(ks.shape[0], dtype=np.int32)
    for i in range(ks.shape[0]):
        above = 0
        bin_index = (1 << 16) - 1
        while above + high[bin_index] < ks[i]:
            above += high[bin_index]
            bin_index -= 1
        wanted[i], greater[i] = bin_index - 32768, above
    low = np.zeros((ks.shape[0], 1 << 16), dtype=np.int64)
    histogram_of = np.zeros(ks.shape[0], dtype=np.int64)  # the low-bits histogram of each k's bin
    if (wanted == wanted[0]).all():  # one bin (one k): a comparison per entry
        _count_low_bits(row, magnitude, wanted[0], low[0])
    else:  # several bins: a table from the high bits to the histogram
        histogram_of_bin = np.full(1 << 16, -1, dtype=np.int32)
        for i in range(ks.shape[0]):
            if histogram_of_bin[wanted[i] + 32768] < 0:
                histogram_of_bin[wanted[i] + 32768] = i
            histogram_of[i] = histogram_of_bin[wanted[i] + 32768]
        _count_low_bits_of_bins(row, magnitude, histogram_of_bin, low)
    for i in range(ks.shape[0]):
        counts = low[histogram_of[i]]
        low_index = (1 << 16) - 1
        while greater[i] + counts[low_index] < ks[i]:
            greater[i] += counts[low_index]
            low_index -= 1
        key = np.int32((wanted[i] << 16) | low_index)
        if not magnitude:
            key = key ^ ((key >> 31) & np.int32(0x7FFFFFFF))
        values[i], equal[i] = np.int32(key).view(np.float32), counts[low_index]


def radix_select(row: torch.Tensor, k: int, magnitude: bool) -> tuple[torch.Tensor, int, int]:
    """(k-th largest of ``row`` or of ``|row|``, entries greater, entries equal) for 1 ≤ k ≤ len(row)."""
    values, greater, equal = np.empty(1, dtype=np.float32), np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int64)
    _radix_select(row.numpy(), np.array([k], dtype=np.int64), magnitude, values, greater, equal)
    return torch.tensor(values[0], dtype=torch.float32), int(greater[0]), int(equal[0])


@_jit
def _order_statistics(rows, ks, magnitude, values):
    greater, equal = np.empty(ks.shape[0], dtype=np.int64), np.empty(ks.shape[0], dtype=np.int64)
    for t in range(rows.shape[0]):
        _radix_select(rows[t], ks, magnitude, values[:, t], greater, equal)


def order_statistics(rows: torch.Tensor, ranks: list[int], magnitude: bool) -> list[torch.Tensor]:
    """The entries of ``ranks`` (0-based, ascending) of each row of ``[R, n]`` ``rows`` (of ``|rows|``
    with ``magnitude``), one ``[R, 1]`` column per rank; two reading passes per row for all ranks."""
    values = np.empty((len(ranks), rows.shape[0]), dtype=np.float32)
    _order_statistics(rows.numpy(), np.array([rows.shape[1] - rank for rank in ranks], dtype=np.int64), magnitude, values)
    return [torch.from_numpy(column).reshape(-1, 1) for column in values]


@_jit_apart
def _unpack_kept(kept, values, bits, scale):
    """kept = values / scale where the bits (from bit 0 of ``bits[0]``) are set, else 0."""
    whole_bytes = kept.shape[0] >> 3
    for byte in range(whole_bytes):
        packed = np.int32(bits[byte])
        for i in range(8):
            kept[8 * byte + i] = values[8 * byte + i] / scale if (packed >> i) & 1 else np.float32(0.0)
    for j in range(8 * whole_bytes, kept.shape[0]):
        kept[j] = values[j] / scale if (np.int32(bits[whole_bytes]) >> (j & 7)) & 1 else np.float32(0.0)


@_jit
def _trim_row(values, kept, t, threshold, rule, ties_to_keep, ties_total, ties_seen, tie_offsets, kept_ties, bits, offset, scale):
    """kept[:] = τ̂_t of ``values`` (one task's columns): x where kept by the threshold and tie rule (the
    ``CHOSEN`` rule: a tie is kept where its flag in ``kept_ties``, from the row's ``tie_offsets`` on,
    is set), or x / scale where the packed bit is set, else 0."""
    width = values.shape[0]
    if bits.shape[1] > 0:
        _unpack_kept(kept[:width], values, bits[t, offset >> 3 :], scale)
        return
    v = threshold[t]
    tied = False
    for j in range(width):
        magnitude = abs(values[j])
        kept[j] = values[j] if magnitude > v else np.float32(0.0)
        tied |= magnitude == v
    if not tied:
        return
    for j in range(width):  # entries at the threshold, in index order
        if abs(values[j]) == v:
            keep = True
            if rule != KEEP_ALL:
                ties_seen[t] += 1
                if rule == LOWEST_INDEX:
                    keep = ties_seen[t] <= ties_to_keep[t]
                elif rule == HIGHEST_INDEX:
                    keep = ties_seen[t] > ties_total[t] - ties_to_keep[t]
                else:
                    keep = tie_offsets[t] < 0 or kept_ties[tie_offsets[t] + ties_seen[t] - 1]
            if keep:
                kept[j] = values[j]


@_jit
def _elect_columns(values, row_stride, num_tasks, width, offset, threshold, rule, ties_to_keep, ties_total, ties_seen, tie_offsets, kept_ties,
                   bits, scale, mean, merged):
    """:func:`elect_columns` of the ``[num_tasks, width]`` rows of ``values`` (flat, rows ``row_stride`` apart)."""
    kept = np.empty((num_tasks, BLOCK), dtype=np.float32)
    sums = np.empty(BLOCK, dtype=np.float32)
    signs = np.empty(BLOCK, dtype=np.float32)
    agreeing = np.empty(BLOCK, dtype=np.float32)
    counts = np.empty(BLOCK, dtype=np.float32)
    nonzero = np.empty(BLOCK, dtype=np.float32)
    sign_total = 0
    undecided = []
    negative = []
    for first in range(0, width, BLOCK):
        n = min(first + BLOCK, width) - first
        for t in range(num_tasks):
            row = t * row_stride + first
            _trim_row(values[row : row + n], kept[t], t, threshold, rule, ties_to_keep, ties_total, ties_seen, tie_offsets, kept_ties,
                      bits, offset + first, scale)
        sums[:n] = kept[0, :n]
        for t in range(1, num_tasks):
            for j in range(n):
                sums[j] += kept[t, j]
        for j in range(n):
            signs[j] = np.float32(1.0) if sums[j] > 0 else (np.float32(-1.0) if sums[j] < 0 else np.float32(0.0))
            agreeing[j] = 0.0
            counts[j] = 0.0
            nonzero[j] = 0.0
        for t in range(num_tasks):
            for j in range(n):
                aligned = kept[t, j] * signs[j]
                agreeing[j] += max(aligned, np.float32(0.0))
                counts[j] += np.float32(1.0) if aligned > 0 else np.float32(0.0)
                nonzero[j] += np.float32(1.0) if kept[t, j] != 0 else np.float32(0.0)
        for j in range(n):
            sign_total += np.int64(signs[j])
            if mean:
                merged[first + j] = signs[j] * agreeing[j] / max(counts[j], np.float32(1.0))
            else:
                merged[first + j] = signs[j] * agreeing[j]
        undecided_here = np.int32(0)  # counted first: most blocks have none, and skip the branchy loop
        for j in range(n):
            undecided_here = np.int32(undecided_here + np.int32((signs[j] == 0) & (nonzero[j] > 0)))
        for j in range(n if undecided_here else 0):  # γ = 0: the value for γ = +1 now, for γ = −1 kept aside
            if signs[j] != 0 or nonzero[j] == 0:
                continue
            positive, negative_sum, positives, negatives = np.float32(0.0), np.float32(0.0), 0, 0
            for t in range(num_tasks):
                value = kept[t, j]
                if value > 0:
                    positive += value
                    positives += 1
                elif value < 0:
                    negative_sum += value
                    negatives += 1
            if positives + negatives == 0:
                continue
            undecided.append(first + j)
            if mean:
                merged[first + j] = positive / np.float32(max(positives, 1))
                negative.append(negative_sum / np.float32(max(negatives, 1)))
            else:
                merged[first + j] = positive
                negative.append(negative_sum)
    return sign_total, np.array(undecided, dtype=np.int64), np.array(negative, dtype=np.float32)


NO_BITS = np.zeros((0, 0), dtype=np.uint8)
NO_FLAGS = np.zeros(0, dtype=np.bool_)


def elect_columns(vectors: torch.Tensor, merged: torch.Tensor, *, selection=None, bits: torch.Tensor | None = None,
                  offset: int = 0, scale: float = 1.0, mean: bool = True) -> tuple[int, torch.Tensor, torch.Tensor]:
    """TIES steps 1–3 over the ``[T, w]`` columns ``vectors``, written into ``merged`` (``[w]``).

    The kept entries τ̂_t are those of ``selection`` (a :class:`~mergebench.core.selection.TopK` of the
    magnitudes, whose tie counts it advances), or those whose bit is set in ``bits`` (``[T, ⌈N/8⌉]``
    packed, for columns ``offset …``) divided by ``scale``, or every entry. Returns
    ``(Σ γ, undecided columns, their merged value for γ = −1)``: where Σ_t τ̂_t is exactly 0 with
    non-zero entries, ``merged`` holds the value for γ = +1."""
    num_tasks = vectors.shape[0]
    if bits is not None and offset % 8:
        raise ValueError(f"packed masks are read from byte boundaries: offset {offset} is not a multiple of 8")
    none = np.zeros(num_tasks, dtype=np.int64)
    # every entry kept: |x| > −1 in one pass (a threshold of 0 would rank the zeros as ties, one by one)
    threshold, rule, (ties_to_keep, ties_total, ties_seen) = np.full(num_tasks, -1.0, dtype=np.float32), KEEP_ALL, (none, none, none)
    tie_offsets, kept_ties = none, NO_FLAGS
    if selection is not None and selection.empty:
        threshold = np.full(num_tasks, np.inf, dtype=np.float32)
    elif selection is not None and not selection.full:
        threshold = selection.value.reshape(-1).to(torch.float32).contiguous().numpy()
        rule = KEEP_ALL if selection.all_ties_kept else TIE_CODES[selection.rule]
        ties_to_keep, ties_total, ties_seen = selection.ties_to_keep.numpy(), selection.ties_total.numpy(), selection.ties_seen.numpy()
        tie_offsets, kept_ties = selection.tie_offsets.numpy(), selection.kept_ties.numpy()
    values, row_stride = _flat_rows(vectors)
    sign_total, undecided, negative = _elect_columns(
        values, row_stride, num_tasks, vectors.shape[1], offset, threshold, rule, ties_to_keep, ties_total, ties_seen,
        tie_offsets, kept_ties, NO_BITS if bits is None else bits.numpy(), np.float32(scale), mean, merged.numpy(),
    )
    return int(sign_total), torch.from_numpy(undecided), torch.from_numpy(negative)


MAGNITUDE = np.int32(0x7FFFFFFF)
"""Mask of a float32 bit pattern's magnitude bits: the magnitude key, which orders as |x| (−0 as +0)."""


@_jit_apart
def _magnitude_keys(bits, keys):
    """keys = the magnitude keys of the float32 bit patterns ``bits``; returns the (largest, smallest)."""
    largest, smallest = np.int32(0), MAGNITUDE
    for j in range(keys.shape[0]):  # int32 throughout, so that LLVM vectorizes eight keys at a time
        key = np.int32(bits[j] & MAGNITUDE)
        keys[j] = key
        largest, smallest = np.int32(max(largest, key)), np.int32(min(smallest, key))
    return largest, smallest


@_jit_apart
def _count_at_least(keys, a, b):
    """(number of keys ≥ a, number ≥ b), in one pass."""
    count_a, count_b = np.int32(0), np.int32(0)
    for j in range(keys.shape[0]):
        key = keys[j]
        count_a, count_b = np.int32(count_a + np.int32(key >= a)), np.int32(count_b + np.int32(key >= b))
    return count_a, count_b


@_jit_apart
def _extreme_keys_in(keys, low, top):
    """(largest, smallest) key in ``low`` … ``top``, given that one lies there."""
    largest, smallest = np.int32(-1), MAGNITUDE
    for j in range(keys.shape[0]):
        key = keys[j]
        largest = np.int32(max(largest, key if key <= top else np.int32(-1)))
        smallest = np.int32(min(smallest, key if key >= low else MAGNITUDE))
    return largest, smallest


@_jit
def _kth_largest_key(keys, k, low, count_low, high, count_high):
    """(v, keys > v, keys = v) for the k-th largest v of the non-negative int32 ``keys``, searched in the
    bracket ``low`` ≤ v < ``high``, where count_low = #keys ≥ low ≥ k > count_high = #keys ≥ high.

    Each step counts the keys at or above two probes in one vectorized pass (no branch on the data)
    and narrows the bracket to them. The probes sit one standard deviation of the k-th key's rank
    either side of where the count, interpolated linearly across the bracket, falls to k − ½ (keys
    grow with the logarithm of the magnitude, so a few steps suffice on smooth data); a step that did
    not halve the keys inside is followed by one at the bracket's middle, which halves its 31-bit
    range, so the search ends within a few dozen steps whatever the data. Once at most two keys
    remain inside, or a step found none to separate (ties), one pass over the keys inside finds their
    largest and smallest."""
    middle_next, separated = False, True
    while high - low > 1:
        inside = count_low - count_high
        if inside <= 2 or not separated:
            largest, smallest = _extreme_keys_in(keys, np.int32(low), np.int32(high - 1))
            if largest == smallest:
                return largest, count_high, inside
            if inside == 2:  # two distinct keys: the k-th is the larger or the smaller
                return (largest, count_high, 1) if k - count_high == 1 else (smallest, count_high + 1, 1)
            low, high = np.int64(smallest), np.int64(largest) + 1
        width = high - low
        if middle_next:
            a = b = low + width // 2
        else:
            fraction = (count_low - k + 0.5) / inside
            crossing = low + width * fraction
            spread = width / inside * (np.sqrt(inside * fraction * (1.0 - fraction)) + 0.5)
            a, b = np.int64(crossing - spread), np.int64(crossing + spread)
        a, b = min(max(a, low + 1), high - 1), min(max(b, low + 1), high - 1)
        count_a, count_b = _count_at_least(keys, np.int32(a), np.int32(b))
        for probe, count in ((a, count_a), (b, count_b)):
            if count >= k and probe > low:
                low, count_low = probe, count
            elif count < k and probe < high:
                high, count_high = probe, count
        separated = count_low - count_high < inside
        middle_next = not middle_next and (count_low - count_high) * 2 > inside
    return np.int32(low), count_high, count_low - count_high


@_jit
def _edge(k, greater, equal, rule):
    """(ties kept, ties skipped first) at a top-k threshold with ``greater`` keys above it and ``equal``
    at it: of the keys at it, in index order, those after the first ``skip`` and up to ``skip + keep``."""
    keep = k - greater
    return keep, (equal - keep if rule == HIGHEST_INDEX else 0)


@_jit
def _middle_band(values, bits, row_stride, num_tasks, width, d, first, last, rule, out):
    """out = τ where the magnitude ranks (0 = largest, ties by ``rule``) of each d-entry row segment are
    in ``first … last − 1``, else 0. ``values`` (and ``bits``, its float32 bit patterns as int32) holds
    task t's ``width`` columns from t·``row_stride``; ``out`` is ``[T, width]`` flattened."""
    keys = np.empty(d, dtype=np.int32)
    for t in range(num_tasks):
        for column in range(0, width, d):
            at, out_at = t * row_stride + column, t * width + column
            row, row_out = values[at : at + d], out[out_at : out_at + d]
            largest, smallest = _magnitude_keys(bits[at : at + d], keys)
            above_all = np.int64(largest) + 1
            # the band holds the keys in lower … upper, the ties split at an edge decided by the rule:
            # the outer edge's (rank last) key is in, the inner edge's (rank first) above the band
            lower, upper = np.int32(0), MAGNITUDE
            outer, outer_keep, outer_skip, outer_split = np.int32(-1), 0, 0, False
            inner, inner_keep, inner_skip, inner_split = MAGNITUDE, 0, 0, False
            searched_from, count = np.int64(smallest), d  # the inner edge is at or above it, count keys there
            if last < d:
                outer, greater, equal = _kth_largest_key(keys, last, np.int64(smallest), d, above_all, 0)
                outer_keep, outer_skip = _edge(last, greater, equal, rule)
                outer_split = outer_keep < equal
                lower = np.int32(min(outer + 1, MAGNITUDE) if outer_split else outer)
                searched_from, count = np.int64(outer), greater + equal
            if first > 0:
                inner, greater, equal = _kth_largest_key(keys, first, searched_from, count, above_all, 0)
                inner_keep, inner_skip = _edge(first, greater, equal, rule)
                inner_split = inner_keep < equal
                upper = np.int32(inner if inner_split else inner - 1)
            _band(row, keys, lower, upper, row_out)
            if outer_split or inner_split:  # entries at an edge, ranked in index order by the tie rule
                _band_ties(row, keys, outer, outer_keep, outer_skip, inner, inner_keep, inner_skip, row_out)


@_jit_apart
def _band(row, keys, lower, upper, out):
    """out = row where its key is in ``lower`` … ``upper``, else 0."""
    for j in range(row.shape[0]):
        out[j] = row[j] if (keys[j] >= lower) & (keys[j] <= upper) else np.float32(0.0)


@_jit
def _band_ties(row, keys, outer, outer_keep, outer_skip, inner, inner_keep, inner_skip, out):
    """out = row or 0 at the keys equal to an edge's, as their rank in index order puts them in the band
    or not: at the outer edge, those after the first ``outer_skip`` and up to ``outer_skip +
    outer_keep`` are in; at the inner edge, those so ranked are above it."""
    outer_seen, inner_seen = 0, 0
    for j in range(row.shape[0]):
        key = keys[j]
        if key != outer and key != inner:
            continue
        inside = key > outer
        if key == outer:
            outer_seen += 1
            inside = outer_skip < outer_seen <= outer_skip + outer_keep
        above = key > inner
        if key == inner:
            inner_seen += 1
            above = inner_skip < inner_seen <= inner_skip + inner_keep
        out[j] = row[j] if inside and not above else np.float32(0.0)


def _flat_rows(block: torch.Tensor) -> tuple[np.ndarray, int]:
    """A ``[T, c]`` block whose rows are contiguous (columns of a larger stack) as one 1-D array from its
    first entry to its last, with its row stride: numba sees slices of it as contiguous, and vectorizes
    loops over them, which it does not over the rows of a strided 2-D array."""
    span = (block.shape[0] - 1) * block.stride(0) + block.shape[1] if block.numel() else 0
    return block.as_strided((span,), (1,)).numpy(), block.stride(0)


def middle_band(block: torch.Tensor, d: int, first: int, last: int, tie_rule: str, out: torch.Tensor) -> torch.Tensor:
    """``out`` (``[T, c]``, contiguous) = each task's columns ``block`` (c a multiple of d) with every d-entry
    row masked to its magnitude ranks ``first … last − 1`` (0 = largest; ties ranked by ``tie_rule``, an
    index rule): Breadcrumbs."""
    if last <= 0:
        return out.zero_()
    values, row_stride = _flat_rows(block)
    bits, _ = _flat_rows(block.view(torch.int32))
    _middle_band(values, bits, row_stride, block.shape[0], block.shape[1], d, first, last, TIE_CODES[tie_rule], out.view(-1).numpy())
    return out


class TorchCpuRandom:
    """The uniform draws of ``torch.rand`` from ``torch.Generator().manual_seed(seed)`` on the CPU, drawn
    inside the kernels: PyTorch's CPU generator is MT19937 (32-bit outputs, seeded with the seed's low
    32 bits), and a float32 draw is u = (y mod 2²⁴)·2⁻²⁴ for the next output y, so u ≥ p exactly when
    y mod 2²⁴ ≥ ⌈p·2²⁴⌉ (p as float32). Same numbers, in the same order, as one ``torch.rand([T, N])``."""

    def __init__(self, seed: int) -> None:
        self.state = np.zeros(MT_N, dtype=np.uint32)
        self.draws = np.zeros(MT_N, dtype=np.int32)  # y mod 2²⁴ of the current block of outputs
        self.position = np.array([MT_N], dtype=np.int64)  # the first draw twists
        _seed_mt19937(self.state, seed & 0xFFFFFFFF)

    @staticmethod
    def threshold(p: float) -> int:
        """The least y mod 2²⁴ whose draw u is ≥ p (p compared as float32, as ``u >= p`` is)."""
        return int(np.ceil(float(np.float32(p)) * 2.0**24))


MT_N, MT_M = 624, 397


@_jit
def _seed_mt19937(state, seed):
    state[0] = np.uint32(seed)
    for j in range(1, MT_N):
        previous = np.uint64(state[j - 1])
        state[j] = np.uint32((np.uint64(1812433253) * (previous ^ (previous >> np.uint64(30))) + np.uint64(j)) & np.uint64(0xFFFFFFFF))


@_jit
def _twist_pair(state, i, following, shifted):
    y = (state[i] & np.uint32(0x80000000)) | (state[following] & np.uint32(0x7FFFFFFF))
    state[i] = state[shifted] ^ (y >> np.uint32(1)) ^ (np.uint32(0x9908B0DF) * (y & np.uint32(1)))


@_jit
def _twist(state):
    """Advance MT19937 by one state (624 outputs)."""
    for i in range(MT_N - MT_M):
        _twist_pair(state, i, i + 1, i + MT_M)
    for i in range(MT_N - MT_M, MT_N - 1):
        _twist_pair(state, i, i + 1, i + MT_M - MT_N)
    _twist_pair(state, MT_N - 1, 0, MT_M - 1)


@_jit
def _temper(state, draws):
    """The state's 624 outputs, tempered, into ``draws`` (low 24 bits)."""
    for i in range(MT_N):
        y = state[i]
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        draws[i] = np.int32(y & np.uint32(0xFFFFFF))


@_jit
def _next_block(state, draws):
    """Advance MT19937 by one state (624 outputs) and temper them into ``draws`` (low 24 bits)."""
    _twist(state)
    _temper(state, draws)


@_jit
def _skip_draws(state, draws, position, count):
    """Advance the stream by ``count`` draws without using them (only the last state is tempered)."""
    at, twisted = position[0], False
    while at + count > MT_N:
        count -= MT_N - at
        _twist(state)
        at, twisted = 0, True
    if twisted:
        _temper(state, draws)
    position[0] = at + count


@_jit
def _draw_keep_bits(state, draws, position, count, threshold, bits):
    at = position[0]
    for byte in range((count + 7) // 8):
        packed = 0
        for i in range(min(8, count - 8 * byte)):
            if at == MT_N:
                _next_block(state, draws)
                at = 0
            packed |= (1 << i) if draws[at] >= threshold else 0
            at += 1
        bits[byte] = np.uint8(packed)
    position[0] = at


def draw_keep_bits(random: TorchCpuRandom, p: float, bits: torch.Tensor, count: int) -> None:
    """Pack the next ``count`` draws' ``u ≥ p`` into ``bits`` (uint8, bit j of byte j // 8)."""
    _draw_keep_bits(random.state, random.draws, random.position, count, TorchCpuRandom.threshold(p), bits.numpy())


@_jit_apart
def _add_kept(total, row, draws, threshold, scale):
    for i in range(total.shape[0]):
        total[i] += row[i] / scale if draws[i] >= threshold else np.float32(0.0)


@_jit
def _dropped_add(state, draws, position, row, threshold, scale, total):
    at, j = position[0], 0
    while j < row.shape[0]:
        if at == MT_N:
            _next_block(state, draws)
            at = 0
        step = min(MT_N - at, row.shape[0] - j)
        _add_kept(total[j : j + step], row[j : j + step], draws[at : at + step], threshold, scale)
        at += step
        j += step
    position[0] = at


def dropped_add(random: TorchCpuRandom, row: torch.Tensor, p: float, total: torch.Tensor) -> None:
    """``total += where(u ≥ p, row, 0) / (1 − p)`` with the next draws u (DARE's drop and rescale)."""
    _dropped_add(random.state, random.draws, random.position, row.numpy(), TorchCpuRandom.threshold(p), np.float32(1.0 - p), total.numpy())


@_jit
def _stable_order(keys, order, spare_keys, spare_order, counts):
    """The indices of non-negative int32 ``keys`` in ascending key order, equal keys in index order: a
    least-significant-digit radix sort (stable), a byte per pass, skipping bytes all keys share.
    ``keys`` is overwritten; the answer is a prefix of ``order`` or of ``spare_order``."""
    d = keys.shape[0]
    source_keys, source_order, target_keys, target_order = keys, order[:d], spare_keys[:d], spare_order[:d]
    for j in range(d):
        source_order[j] = j
    for shift in range(0, 32, 8):
        counts[:] = 0
        for j in range(d):
            counts[(source_keys[j] >> shift) & 255] += 1
        if counts.max() == d:
            continue
        total = 0
        for byte in range(256):
            total, counts[byte] = total + counts[byte], total
        for j in range(d):
            byte = (source_keys[j] >> shift) & 255
            target_keys[counts[byte]] = source_keys[j]
            target_order[counts[byte]] = source_order[j]
            counts[byte] += 1
        source_keys, target_keys = target_keys, source_keys
        source_order, target_order = target_order, source_order
    return source_order


BUCKETED_OCTAVES = 16
"""Magnitudes more than 2¹⁶ times below their row's largest share the last bucket of :func:`_magnitude_ramp`."""

WINDOW = 8
"""Keys of a bucket of :func:`_magnitude_ramp` ranked by counting the keys around them (more: by
comparing the bucket's keys with each other)."""

CROWDED = 64
"""The most keys a bucket of :func:`_magnitude_ramp` may hold (more: the row is radix sorted)."""


@_jit
def _magnitude_ramp(bits, high, step, keys, ranked_keys, order, before, counts, crowded, drop):
    """drop[i] = high − step·(d − 1 − r_i) for a row of d magnitudes (``bits``: its float32 bit patterns
    as int32), r_i the rank of |x_i| in descending order, equal magnitudes ranked in index order.

    A stable bucket pass on the high bits of the magnitude keys (2·d buckets cutting the top
    ``BUCKETED_OCTAVES`` octaves below the largest magnitude evenly in key, i.e. in log-magnitude; the
    rest share the last one) lays the keys out by bucket, at positions q. Every key outside a key's
    bucket ranks before it exactly when it lies before it, so in a bucket of at most ``WINDOW`` keys
    r = q − ``WINDOW`` + the keys within ``WINDOW`` places of q that rank before it
    (:func:`_count_before`, branch-free); the keys of a bigger bucket are compared with each other
    (:func:`_rank_within`). Rows with a bucket of more than ``CROWDED`` keys (many equal magnitudes)
    take the radix sort :func:`_stable_order`."""
    d = bits.shape[0]
    largest, smallest = np.int32(0), np.int32(0x7FFFFFFF)
    for j in range(d):
        key = bits[j] & MAGNITUDE
        keys[j] = key
        largest = max(largest, key)
        smallest = min(smallest, key)
    span = min(largest - smallest, np.int32(BUCKETED_OCTAVES << 23))
    shift = 0
    while (span >> shift) >= 2 * d:
        shift += 1
    last = span >> shift  # buckets 0 … last, bucket 0 holding the largest keys
    buckets = before[:d]  # until the keys are laid out
    _bucket_of(keys[:d], largest, shift, last, buckets)
    counts[: last + 1] = 0
    for j in range(d):
        counts[buckets[j]] += 1
    total, most, num_crowded = 0, 0, 0
    for bucket in range(last + 1):
        if counts[bucket] > WINDOW:
            crowded[num_crowded] = total
            crowded[num_crowded + 1] = counts[bucket]
            num_crowded += 2
        most = max(most, counts[bucket])
        total, counts[bucket] = total + counts[bucket], total
    if most > CROWDED:
        for j in range(d):  # descending magnitude: ascending 0x7FFFFFFF − |x|'s bits
            keys[j] = np.int32(0x7FFFFFFF) - keys[j]
        ranked = _stable_order(keys[:d], order, ranked_keys, before, counts[:256])
        for j in range(d):
            drop[ranked[j]] = high - step * np.float32(d - 1 - j)
        return
    ranked_keys[:WINDOW] = np.int32(0x7FFFFFFF)  # sentinels: before every key
    ranked_keys[WINDOW + d : 2 * WINDOW + d] = np.int32(-1)  # after every key
    position = order[:d]
    _positions_in_buckets(buckets, counts, position)
    _lay_out(keys[:d], position, ranked_keys[WINDOW : WINDOW + d])
    _count_before(ranked_keys[: 2 * WINDOW + d], before[:d])
    for i in range(0, num_crowded, 2):
        _rank_within(ranked_keys[WINDOW:], crowded[i], crowded[i + 1], before)
    _ramp_at(position, before[:d], high, step, drop[:d])


@_jit_apart
def _positions_in_buckets(buckets, starts, position):
    """position[j] = the place of key j when the keys are laid out by bucket, in index order within one
    (``starts``: each bucket's first place; advanced past it)."""
    for j in range(buckets.shape[0]):
        position[j] = starts[buckets[j]]
        starts[buckets[j]] += 1


@_jit_apart
def _lay_out(keys, position, laid_out):
    for j in range(keys.shape[0]):
        laid_out[position[j]] = keys[j]


@_jit_apart
def _ramp_at(position, before, high, step, drop):
    """drop[j] = high − step·(d − 1 − r_j), r_j = position[j] − WINDOW + before[position[j]]."""
    d = position.shape[0]
    for j in range(d):
        q = position[j]
        drop[j] = high - step * np.float32(d - 1 - (q - WINDOW + before[q]))


@_jit_apart
def _bucket_of(keys, largest, shift, last, buckets):
    """buckets = (largest − keys) >> shift, at most ``last``."""
    for j in range(keys.shape[0]):
        buckets[j] = min((largest - keys[j]) >> shift, last)


@_jit_apart
def _count_before(ranked_keys, before):
    """before[q] = how many of the 2·``WINDOW`` keys around ``ranked_keys[WINDOW + q]`` rank before it:
    greater, or equal and placed before it (the loops over the window unroll: eight keys at a time,
    each compared with its 15 neighbours in registers)."""
    for q in range(before.shape[0]):
        key = ranked_keys[WINDOW + q]
        count = np.int32(0)
        for offset in range(WINDOW):
            count += np.int32(ranked_keys[offset + q] >= key)
        for offset in range(WINDOW + 1, 2 * WINDOW):
            count += np.int32(ranked_keys[offset + q] > key)
        before[q] = count


@_jit
def _rank_within(ranked_keys, start, size, before):
    """``before`` of the bucket ``ranked_keys[start : start + size]``: its keys' ranks r, less their
    positions q, plus ``WINDOW``; r = start + the bucket's keys greater, or equal and placed before."""
    for q in range(start, start + size):
        rank = start
        for m in range(start, start + size):
            rank += (ranked_keys[m] > ranked_keys[q]) | ((ranked_keys[m] == ranked_keys[q]) & (m < q))
        before[q] = rank - q + WINDOW


@_jit
def _magprune_row(values, bits, p, high, step, scratch, state, draws, position, out):
    """``out`` = the row ``values`` MagPruned with the next d draws of the stream (:func:`_magprune`)."""
    d = values.shape[0]
    keys, ranked_keys, order, before, counts, crowded, drop = scratch
    if d == 1:
        drop[0] = np.float32(p)
    else:
        _magnitude_ramp(bits, high, step, keys, ranked_keys, order, before, counts, crowded, drop)
    at, j = position[0], 0
    while j < d:
        if at == MT_N:
            _next_block(state, draws)
            at = 0
        count = min(MT_N - at, d - j)
        _prune(values[j : j + count], drop[j : j + count], draws[at : at + count], out[j : j + count])
        at += count
        j += count
    position[0] = at


@_jit
def _row_scratch(longest):
    """The buffers :func:`_magnitude_ramp` works in, for rows of up to ``longest`` entries."""
    return (np.empty(longest, dtype=np.int32), np.empty(longest + 2 * WINDOW, dtype=np.int32), np.empty(longest, dtype=np.int32),
            np.empty(longest, dtype=np.int32), np.empty(max(2 * longest, 256), dtype=np.int32), np.empty(2 * longest, dtype=np.int64),
            np.empty(longest, dtype=np.float32))


@_jit
def _magprune(vectors, bits, starts, widths, p, epsilon, state, draws, position, out):
    """DELLA's MagPrune of every row segment (``starts[i]`` … + k·``widths[i]``, one tensor's rows):
    drop probability p + ε − 2ε·r/(d − 1) by ascending magnitude rank r (ties: lower index ranked
    higher), Bernoulli draws in row-major order, survivors divided by 1 − p_i."""
    high = np.float32(p + epsilon)
    scratch = _row_scratch(max(widths.max(), 1))
    for t in range(vectors.shape[0]):
        for segment in range(starts.shape[0] - 1):
            d = widths[segment]
            step = np.float32(2 * epsilon / (d - 1)) if d > 1 else np.float32(0.0)
            for start in range(starts[segment], starts[segment + 1], d):
                _magprune_row(vectors[t, start : start + d], bits[t, start : start + d], p, high, step, scratch, state, draws, position,
                              out[t, start : start + d])


@_jit_apart
def _sum_rows(block, total):
    """total = Σ_t block[t], in task order."""
    total[:] = block[0]
    for t in range(1, block.shape[0]):
        for j in range(total.shape[0]):
            total[j] += block[t, j]


@_jit
def _magprune_elect(vectors, bits, starts, widths, p, epsilon, states, draws, positions, elect, mean, merged):
    """:func:`_magprune` and :func:`_elect_columns` block by block of whole rows: every task's rows of
    a block are pruned into a cache-resident ``[T, ≤ BLOCK]`` block (each task drawing from its own
    generator, which starts where task t's draws start in the one stream, at t·N) and elected there,
    so that the pruned stack is never written. Returns what :func:`_elect_columns` returns; without
    ``elect``, ``merged`` is the plain sum over tasks (in task order) and nothing is undecided."""
    num_tasks = vectors.shape[0]
    high = np.float32(p + epsilon)
    longest = max(widths.max(), 1)
    scratch = _row_scratch(longest)
    room = np.empty(num_tasks * max(longest, BLOCK), dtype=np.float32)
    none, every = np.zeros(num_tasks, dtype=np.int64), np.full(num_tasks, -1.0, dtype=np.float32)  # |x| > −1: every entry kept
    sign_total, undecided, negative = 0, [], []
    for segment in range(starts.shape[0] - 1):
        d = widths[segment]
        step = np.float32(2 * epsilon / (d - 1)) if d > 1 else np.float32(0.0)
        rows = max(1, BLOCK // d)
        for first in range(starts[segment], starts[segment + 1], rows * d):
            width = min(rows * d, starts[segment + 1] - first)
            block = room[: num_tasks * width].reshape((num_tasks, width))
            for t in range(num_tasks):
                for start in range(0, width, d):
                    column = first + start
                    _magprune_row(vectors[t, column : column + d], bits[t, column : column + d], p, high, step, scratch,
                                  states[t], draws[t], positions[t : t + 1], block[t, start : start + d])
            if not elect:
                _sum_rows(block, merged[first : first + width])
                continue
            block_total, block_undecided, block_negative = _elect_columns(
                room, width, num_tasks, width, 0, every, KEEP_ALL, none, none, none, none, NO_FLAGS, NO_BITS, np.float32(1.0), mean,
                merged[first : first + width])
            sign_total += block_total
            for i in range(block_undecided.shape[0]):
                undecided.append(first + block_undecided[i])
                negative.append(block_negative[i])
    return sign_total, np.array(undecided, dtype=np.int64), np.array(negative, dtype=np.float32)


@_jit_apart
def _prune(values, drop, draws, out):
    """out = values / (1 − drop) where the draw u = draws·2⁻²⁴ is ≥ drop, else 0."""
    for j in range(values.shape[0]):
        kept = np.float32(draws[j]) * np.float32(2.0**-24) >= drop[j]
        out[j] = values[j] / (np.float32(1.0) - drop[j]) if kept else np.float32(0.0)


def magprune(vectors: torch.Tensor, starts: list[int], widths: list[int], p: float, epsilon: float, seed: int) -> torch.Tensor:
    """DELLA's MagPrune of ``[T, N]`` task vectors whose tensor i spans ``starts[i]`` … ``starts[i + 1]``
    in rows of ``widths[i]`` entries, with the draws of ``torch.rand([T, N])`` seeded with ``seed``."""
    random = TorchCpuRandom(seed)
    out = torch.empty_like(vectors)
    _magprune(vectors.numpy(), vectors.view(torch.int32).numpy(), np.array(starts, dtype=np.int64), np.array(widths, dtype=np.int64),
              p, epsilon, random.state, random.draws, random.position, out.numpy())
    return out


def magprune_elect(vectors: torch.Tensor, starts: list[int], widths: list[int], p: float, epsilon: float, seed: int,
                   merged: torch.Tensor, mean: bool = True) -> tuple[int, torch.Tensor, torch.Tensor]:
    """:func:`magprune`, then :func:`elect_columns` of the pruned vectors into ``merged``, block by block
    without writing the pruned ``[T, N]`` stack; the same numbers and the same return value."""
    return _magprune_merge(vectors, starts, widths, p, epsilon, seed, merged, True, mean)


def magprune_sum(vectors: torch.Tensor, starts: list[int], widths: list[int], p: float, epsilon: float, seed: int) -> torch.Tensor:
    """Σ_t of :func:`magprune`'s pruned vectors, in task order (:func:`task_sum`), block by block without
    writing the pruned ``[T, N]`` stack."""
    merged = torch.empty(vectors.shape[1], dtype=vectors.dtype)
    _magprune_merge(vectors, starts, widths, p, epsilon, seed, merged, False, False)
    return merged


def _magprune_merge(vectors, starts, widths, p, epsilon, seed, merged, elect, mean):
    num_tasks, num_columns = vectors.shape
    states, draws = np.zeros((num_tasks, MT_N), dtype=np.uint32), np.zeros((num_tasks, MT_N), dtype=np.int32)
    positions = np.full(num_tasks, MT_N, dtype=np.int64)
    random = TorchCpuRandom(seed)
    for t in range(num_tasks):  # task t's draws start at t·N of the stream
        states[t], draws[t], positions[t] = random.state, random.draws, random.position[0]
        if t + 1 < num_tasks:
            _skip_draws(random.state, random.draws, random.position, num_columns)
    sign_total, undecided, negative = _magprune_elect(
        vectors.numpy(), vectors.view(torch.int32).numpy(), np.array(starts, dtype=np.int64), np.array(widths, dtype=np.int64),
        p, epsilon, states, draws, positions, elect, mean, merged.numpy())
    return int(sign_total), torch.from_numpy(undecided), torch.from_numpy(negative)


@_jit
def _conflict_aware_sum(vectors, starts, n, m, merged):
    num_tasks = vectors.shape[0]
    taken = np.zeros(m, dtype=np.bool_)
    available = np.empty(m, dtype=np.float32)  # |τ_t| where not taken, −1 where taken
    for segment in range(starts.shape[0] - 1):
        for first in range(starts[segment], starts[segment + 1], m):
            width = min(m, starts[segment + 1] - first)
            taken[:width] = False
            merged[first : first + width] = 0.0
            for t in range(num_tasks):
                for j in range(width):
                    available[j] = np.float32(-1.0) if taken[j] else abs(vectors[t, first + j])
                for _ in range(n):  # the largest available magnitude, the lowest index among equals
                    best = np.argmax(available[:width])
                    if available[best] < 0:
                        break
                    taken[best] = True
                    available[best] = -1.0
                    merged[first + best] += vectors[t, first + best]


def conflict_aware_sum(vectors: torch.Tensor, starts: list[int], n: int, m: int) -> torch.Tensor:
    """CABS: Σ_t of each task's top n magnitudes among the positions of every block of m (blocks cut
    from each tensor's start ``starts[i]``) that earlier tasks did not take."""
    merged = torch.empty(vectors.shape[1], dtype=vectors.dtype)
    _conflict_aware_sum(vectors.numpy(), np.array(starts, dtype=np.int64), n, m, merged.numpy())
    return merged


@_jit_inline
def _span_fraction(value, low, high):
    """(value − low) / (high − low), 0 where high = low: PCB's min–max normalization."""
    span = high - low
    return (value - low) / span if span > 0 else np.float32(0.0)


@_jit_inline
def _clipped(x, low, high):
    """|τ̃| = clamp(|x|, low, high): PCB's magnitude clipped to the task's quantiles."""
    return min(max(abs(x), low), high)


@_jit
def _pcb_partners(vectors, low, high, partners):
    partners[:] = 0.0
    for first in range(0, vectors.shape[1], BLOCK):  # a block of the sums stays in cache over the tasks
        stop = min(first + BLOCK, vectors.shape[1])
        for t in range(vectors.shape[0]):
            _add_partner(vectors[t, first:stop], low[t], high[t], partners[first:stop])


@_jit_apart
def _add_partner(values, low, high, partners):
    for j in range(values.shape[0]):
        x = values[j]
        partners[j] += np.float32(np.sign(x)) * _span_fraction(_clipped(x, low, high), low, high)


def pcb_partners(vectors: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """PCB's vision partner sum Σ_t sgn(τ_t)·Norm(clamp(|τ_t|, low_t, high_t)), in task order."""
    partners = torch.empty(vectors.shape[1], dtype=vectors.dtype)
    _pcb_partners(vectors.numpy(), _per_task(low), _per_task(high), partners.numpy())
    return partners


@_jit_inline
def _pcb_argument_pair(x, partner, low, high, num_tasks):
    """(T·Norm(|τ̃|)², τ·partner) of one entry: the arguments of PCB's ``exp`` and ``tanh``."""
    normalized = _span_fraction(_clipped(x, low, high), low, high)
    return num_tasks * (normalized * normalized), x * partner


@_jit
def _pcb_arguments(vectors, t, first, count, partners, low, high, num_tasks, intra, inter):
    """intra = T·Norm(|τ̃_t|)², inter = τ_t ⊙ partners, for the ``count`` columns from ``first`` of task t."""
    for j in range(count):
        intra[j], inter[j] = _pcb_argument_pair(vectors[t, first + j], partners[first + j], low[t], high[t], num_tasks)


SCORE_COLUMNS = 1 << 16
"""Columns of PCB's score arguments computed at once: both buffers stay in cache for ``exp`` and ``tanh``."""


def pcb_scores(vectors: torch.Tensor, partners: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scores: torch.Tensor) -> None:
    """PCB's scores exp(T·Norm(|τ̃_t|)²) ⊙ tanh(τ_t ⊙ partners) into ``scores`` (``[T, n]``): the arguments
    from a kernel, ``exp`` and ``tanh`` PyTorch's (the same numbers as the PyTorch path), on small buffers."""
    num_tasks, width = vectors.shape
    intra, inter = torch.empty(min(SCORE_COLUMNS, width)), torch.empty(min(SCORE_COLUMNS, width))
    arrays = vectors.numpy(), partners.numpy(), _per_task(low), _per_task(high), np.float32(num_tasks), intra.numpy(), inter.numpy()
    for t in range(num_tasks):
        for first in range(0, width, SCORE_COLUMNS):
            count = min(SCORE_COLUMNS, width - first)
            _pcb_arguments(arrays[0], t, first, count, *arrays[1:])
            torch.mul(intra[:count].exp_(), inter[:count].tanh_(), out=scores[t, first : first + count])


@_jit
def _pcb_weighted_sum(vectors, scores, low, high, threshold, top, numerator, denominator):
    for first in range(0, vectors.shape[1], BLOCK):  # a block of the sums stays in cache over the tasks
        stop = min(first + BLOCK, vectors.shape[1])
        for t in range(vectors.shape[0]):
            _add_weighted(vectors[t, first:stop], scores[t, first:stop], low[t], high[t], threshold[t], top[t], numerator[first:stop], denominator[first:stop])


@_jit_inline
def _weighted_term(x, score, low, high, threshold, top):
    """(w·τ̃, w) of one entry, w = Norm(max(β, t)) with the task's threshold t and top score."""
    weight = _span_fraction(max(score, threshold), threshold, top)
    return np.float32(np.sign(x)) * _clipped(x, low, high) * weight, weight


@_jit_apart
def _add_weighted(values, scores, low, high, threshold, top, numerator, denominator):
    for j in range(values.shape[0]):
        term, weight = _weighted_term(values[j], scores[j], low, high, threshold, top)
        numerator[j] += term
        denominator[j] += weight


def pcb_weighted_sum(vectors, scores, low, high, threshold, top, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
    """PCB's Σ_t w_t τ̃_t and Σ_t w_t, task after task, into ``numerator`` and ``denominator``."""
    _pcb_weighted_sum(vectors.numpy(), scores.numpy(), _per_task(low), _per_task(high), _per_task(threshold), _per_task(top),
                      numerator.numpy(), denominator.numpy())


PCB_TOLERANCE = 1e-4
"""Relative error allowed between a finite score estimate (:func:`_pcb_score_estimate`, within a few
10⁻⁶ of e^a·tanh(x)) and PyTorch's score (within 2·10⁻⁷: ``exp`` and ``tanh`` to one ulp, then a
product); ``tests/test_kernels.py`` checks both bounds."""

PCB_SAMPLE_STRIDE = 61
"""One block of :data:`BLOCK` columns in 61 estimates where a task's threshold lies (a prime, so that
the sampled blocks do not follow the period of a matrix's rows)."""

PCB_MAX_TASKS = 60
"""Above this many tasks, T·Norm² can reach the range where ``exp`` overflows float32: no estimates."""

_LOG2_E, _LN_2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453)
_ONE = np.float32(1.0)
_EXP_TAYLOR = tuple(np.float32(1.0 / factorial) for factorial in (2, 6, 24, 120, 720, 5040, 40320))
_TANH_TAYLOR = tuple(np.float32(c) for c in (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075))
_TANH_SERIES_BELOW = np.float32(0.55)


@_jit_inline
def _exp_estimate(y):
    """e^y for 0 ≤ y < 88 within 10⁻⁵ (relative), branch-free: 2^k·e^g with k = ⌊y·log₂e⌋ and
    g = (y·log₂e − k)·ln 2 ∈ [0, ln 2), e^g by its Taylor polynomial of degree 8 (error < 10⁻⁷)."""
    scaled = y * _LOG2_E
    k = np.int32(scaled)
    g = (scaled - np.float32(k)) * _LN_2
    c2, c3, c4, c5, c6, c7, c8 = _EXP_TAYLOR
    series = _ONE + g * (_ONE + g * (c2 + g * (c3 + g * (c4 + g * (c5 + g * (c6 + g * (c7 + g * c8)))))))
    return series * np.int32((k + 127) << 23).view(np.float32)


@_jit_inline
def _tanh_estimate(x):
    """tanh(x) for 0 ≤ x < 0.55 within 4·10⁻⁷ (relative), by its Taylor series to x¹³; +∞ from 0.55
    up ("unknown": such entries are always candidates and never counted as certain)."""
    z = x * x
    c3, c5, c7, c9, c11, c13 = _TANH_TAYLOR
    series = x + x * z * (c3 + z * (c5 + z * (c7 + z * (c9 + z * (c11 + z * c13)))))
    return series if x < _TANH_SERIES_BELOW else np.float32(np.inf)


@_jit_inline
def _pcb_score_estimate(intra, inter):
    """PCB's score exp(intra)·tanh(inter) of one entry, estimated without ``exp`` or ``tanh``."""
    estimate = _exp_estimate(intra) * _tanh_estimate(abs(inter))
    return estimate if inter >= 0 else -estimate


@_jit_apart
def _estimate_scores(values, partners, low, high, num_tasks, intra, inter, estimates):
    """The score arguments (exact) and the score estimates of a block of one task's columns."""
    for j in range(values.shape[0]):
        intra[j], inter[j] = _pcb_argument_pair(values[j], partners[j], low, high, num_tasks)
        estimates[j] = _pcb_score_estimate(intra[j], inter[j])


@_jit
def _pcb_candidates(row, partners, low, high, num_tasks, cut, first, stop, step, buffers, columns, intra, inter, estimates):
    """Of the blocks of ``buffers.shape[1]`` columns starting at ``first``, ``first + step``, … (below
    ``stop``): the columns whose estimated score is ≥ ``cut``, with their arguments and estimates (as
    many as fit); returns how many there are."""
    count, width = 0, buffers.shape[1]
    for start in range(first, stop, step):
        end = min(start + width, stop)
        _estimate_scores(row[start:end], partners[start:end], low, high, num_tasks, buffers[0], buffers[1], buffers[2])
        for j in range(end - start):
            if buffers[2, j] >= cut:
                if count < columns.shape[0]:
                    columns[count], intra[count], inter[count], estimates[count] = start + j, buffers[0, j], buffers[1, j], buffers[2, j]
                count += 1
    return count


@_jit
def _weighted_terms(row, columns, scores, low, high, threshold, top, kept_columns, terms, weights):
    """(w·τ̃, w) of the candidates whose weight is not 0, in column order; returns how many."""
    count = 0
    for i in range(columns.shape[0]):
        term, weight = _weighted_term(row[columns[i]], scores[i], low, high, threshold, top)
        if weight != 0:
            kept_columns[count], terms[count], weights[count] = columns[i], term, weight
            count += 1
    return count


@_jit
def _merge_candidates(columns, terms, weights, starts, ends, merged):
    """merged = Σ_t w_t τ̃_t / max(Σ_t w_t, 10⁻¹²) from each task's weighted entries (``starts[t]:ends[t]``,
    by column), summed block of columns by block of columns in task order."""
    position = starts.copy()
    numerator, denominator = np.empty(BLOCK, dtype=np.float32), np.empty(BLOCK, dtype=np.float32)
    for first in range(0, merged.shape[0], BLOCK):
        stop = min(first + BLOCK, merged.shape[0])
        numerator[:], denominator[:] = 0.0, 0.0
        for t in range(starts.shape[0]):
            i = position[t]
            while i < ends[t] and columns[i] < stop:
                numerator[columns[i] - first] += terms[i]
                denominator[columns[i] - first] += weights[i]
                i += 1
            position[t] = i
        for j in range(stop - first):
            merged[first + j] = numerator[j] / max(denominator[j], np.float32(1e-12))


class _ScoreCandidates:
    """One task's row with what its scores need: the partner sums, clip bounds and number of tasks."""

    def __init__(self, row: np.ndarray, partners: np.ndarray, low, high, num_tasks: int):
        self.arrays = row, partners, low, high, np.float32(num_tasks)
        self.buffers = np.empty((3, min(row.shape[0], BLOCK)), dtype=np.float32)

    def collect(self, cut: float, capacity: int, first: int = 0, step: int = BLOCK) -> tuple[np.ndarray, ...]:
        """(columns, intra, inter, estimates) of the entries estimated ≥ ``cut`` in the blocks from
        ``first`` every ``step`` columns (every entry for −∞)."""
        while True:
            found = np.empty(capacity, dtype=np.int64), *np.empty((3, capacity), dtype=np.float32)
            count = _pcb_candidates(*self.arrays, np.float32(cut), first, self.arrays[0].shape[0], step, self.buffers, *found)
            if count <= capacity:
                return tuple(array[:count] for array in found)
            capacity = count

    def sampled_cut(self, kept: int) -> float:
        """A score estimate a little below the ``kept``-th largest, read off one block of columns in
        :data:`PCB_SAMPLE_STRIDE` (every block of a row under 8 samples long) with a margin of four
        standard deviations, lowered by the tolerance (so that a tie at the threshold passes the check);
        −∞ where it is not a positive number (only positive thresholds have candidates)."""
        d = self.arrays[0].shape[0]
        step = PCB_SAMPLE_STRIDE * BLOCK if d >= 8 * PCB_SAMPLE_STRIDE * BLOCK else BLOCK
        first = (PCB_SAMPLE_STRIDE // 2) * BLOCK if step > BLOCK else 0
        sample = self.collect(-np.inf, -(-(d - first) // step) * BLOCK, first, step)[3]
        expected = kept * sample.shape[0] / d
        rank = min(sample.shape[0], int(expected * 1.05 + 4 * expected**0.5) + 16)
        cut = float(np.partition(sample, sample.shape[0] - rank)[sample.shape[0] - rank]) * (1 - PCB_TOLERANCE) / (1 + PCB_TOLERANCE)
        return cut if 1e-30 < cut < np.inf else -np.inf


def _pcb_exact_scores(intra: np.ndarray, inter: np.ndarray) -> torch.Tensor:
    """exp(intra) ⊙ tanh(inter) by PyTorch, as :func:`pcb_scores` computes them (``intra`` and ``inter``
    are overwritten)."""
    return torch.from_numpy(intra).exp_().mul_(torch.from_numpy(inter).tanh_())


def _certainly_above(estimates: np.ndarray, scores: torch.Tensor, cut: float, widen: float) -> int:
    """How many candidates certainly score ≥ cut/(1 − ε): finite estimates ≥ cut·(1 + ε)/(1 − ε), and
    entries estimated +∞ whose exact score is ≥ cut/(1 − ε)."""
    finite = np.count_nonzero((estimates >= cut * widen) & (estimates < np.inf))
    return finite + int(((scores.numpy() >= cut / (1 - PCB_TOLERANCE)) & (estimates == np.inf)).sum())


def pcb_candidate_merge(vectors: torch.Tensor, partners: torch.Tensor, low: torch.Tensor, high: torch.Tensor, kept: int) -> torch.Tensor:
    """PCB's τ_m = Σ_t w_t τ̃_t / max(Σ_t w_t, 10⁻¹²) over whole task vectors (``[T, d]``), the ``kept``
    highest scores of each task weighted, computing PyTorch's exact scores only for candidates.

    Every score is first estimated without ``exp`` or ``tanh``, within :data:`PCB_TOLERANCE` where
    |τ·partner| < 0.55; elsewhere the estimate is ±∞ (+∞: always a candidate and never counted below;
    −∞: a negative score, which a positive threshold never keeps). With ε = PCB_TOLERANCE and a cut c > 0
    read off a sample: if at least ``kept`` entries certainly score ≥ c/(1−ε) (a finite estimate
    ≥ c·(1+ε)/(1−ε), or an exact score that high), the ``kept``-th highest score s_k is ≥ c/(1−ε), so
    every entry with score ≥ s_k has its estimate ≥ c. Those candidates alone get the exact score (the
    same arguments, ``exp`` and ``tanh`` as :func:`pcb_scores`), which give the exact threshold s_k, the
    top score and every non-zero weight. Where the check fails (or the threshold is not positive), every entry of the task is a
    candidate. The entries of non-zero weight (fewer than ``kept`` per task: their scores exceed the
    threshold) are summed in task order, as :func:`pcb_weighted_sum` sums them (an entry of weight 0
    adds nothing), so the result is the same bit for bit."""
    num_tasks, d = vectors.shape
    rows, sums, lows, highs = vectors.numpy(), partners.numpy(), _per_task(low), _per_task(high)
    widen = (1 + PCB_TOLERANCE) / (1 - PCB_TOLERANCE)
    weighted = np.empty(num_tasks * kept, dtype=np.int64), *np.empty((2, num_tasks * kept), dtype=np.float32)
    starts = np.arange(num_tasks, dtype=np.int64) * kept
    ends = starts.copy()
    for t in range(num_tasks):
        candidates = _ScoreCandidates(rows[t], sums, lows[t], highs[t], num_tasks)
        cut = candidates.sampled_cut(kept)
        columns, intra, inter, estimates = candidates.collect(cut, d if cut == -np.inf else min(d, 4096 + d // 64 + kept + kept // 4))
        scores = _pcb_exact_scores(intra, inter)
        if cut != -np.inf and _certainly_above(estimates, scores, cut, widen) < kept:
            columns, intra, inter, estimates = candidates.collect(-np.inf, d)
            scores = _pcb_exact_scores(intra, inter)
        threshold = float(radix_select(scores, kept, magnitude=False)[0])
        ends[t] += _weighted_terms(rows[t], columns, scores.numpy(), lows[t], highs[t], np.float32(threshold), np.float32(scores.max()),
                                   *(array[starts[t] : starts[t] + kept] for array in weighted))
    merged = torch.empty(d, dtype=vectors.dtype)
    _merge_candidates(*weighted, starts, ends, merged.numpy())
    return merged


def _per_task(values: torch.Tensor) -> np.ndarray:
    return values.reshape(-1).to(torch.float32).contiguous().numpy()


def task_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ_t over the first dimension in task order, the order of every kernel (``torch.sum`` over an
    outer dimension may pair rows differently depending on the width); 16-bit rows are summed in
    float32, as ``torch.sum`` does, and the sum rounded once."""
    total = rows[0].to(torch.float32 if rows.element_size() < 4 else rows.dtype, copy=True)
    for row in rows[1:]:
        total += row
    return total.to(rows.dtype)

"""Exact top-k selection without sorting, and column-chunked passes over ``[T, N]`` task vectors.

**Top-k with a stated tie rule.** A row of d values keeps its k largest. The threshold v, the k-th
largest value, is found without a sort: for long float32 rows by a radix select on the bit patterns
(the bits of floats, negative ones with their 31 low bits flipped, order like the floats, so a
histogram of the top 16 bits locates the bin that holds the k-th largest and only that bin is
searched); for 16-bit floats the histogram of all 65,536 bit patterns gives v directly; short rows
use ``torch.kthvalue`` batched over rows. Every entry > v is kept, and among the entries equal to v
the tie rule decides:

* ``"lowest_index"``: the tied entries with the lowest indices, so exactly k are kept; the order of a
  stable descending sort (``torch.argsort(descending=True, stable=True)``);
* ``"highest_index"``: the tied entries with the highest indices, exactly k; the order of a stable
  ascending sort read from its end (mergekit's ``magnitude_outliers``);
* ``"keep_all"``: every entry equal to v, so k or more are kept;
* ``"descending_sort"`` / ``"ascending_sort"``: the first k of ``torch.argsort(descending=True)``, or
  the last k of ``torch.sort`` ascending, both without ``stable=True`` (in float32), exactly as mergekit
  calls them (``magnitude`` and ``magnitude_outliers``). Their order of tied entries is whatever
  PyTorch's unstable CPU sort gives, not an index order. Only a row where ties straddle the threshold
  depends on it (where exactly k entries are >= v, any sort puts those k first); in such a row the
  partitions of that sort are replayed until they settle which tied entries land among the k
  (:mod:`~mergebench.core.sort_order`, about three passes over the row instead of a sort), and the
  chosen ties are kept as flags, one per tied entry, which the chunked passes read like the other rules.
  Task vectors on a GPU get the CPU sort's order too (mergekit's when it merges on the CPU; CUDA's sort
  orders ties otherwise). A row holding NaN is refused.

**Over a whole vector held in parts.** :meth:`TopK.of_part` selects over a whole task vector of which
only a part (one tensor of a streamed merge) is held: it asks the threshold and the counts of the
entries above it, at it, and at it before the part of the
:class:`~mergebench.core.task_vectors.TaskVectors` (``order_statistics``, ``running_totals``), so the
tie rules keep the same entries as one selection over the flattened vector.

**Chunked passes.** The per-entry steps of a merge (masks, sign election, disjoint means) read the
task vectors column block by column block, ``[T, C]`` at a time with T·C·4 bytes about the size of a
core's L2 cache per thread, so that the several elementwise operations of a step reuse the block while it is in
cache instead of each streaming the whole ``[T, N]`` stack through memory.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from mergebench.core import kernels, sort_order
from mergebench.errors import MergebenchError

TIE_RULES = ("lowest_index", "highest_index", "keep_all", "descending_sort", "ascending_sort")
SORT_RULES = ("descending_sort", "ascending_sort")
CHUNK_BYTES = 1 << 20
RADIX_MIN_LENGTH = 1 << 16
_RADIX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class WholeVector(Protocol):
    """What :meth:`TopK.of_part` asks of the whole vector (a
    :class:`~mergebench.core.task_vectors.TaskVectors`, or one tensor of it in a streamed merge)."""

    @property
    def entries(self) -> int: ...

    def order_statistics(self, values: torch.Tensor, ranks: Sequence[int], *, magnitude: bool = False) -> list[torch.Tensor]: ...

    def running_totals(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def column_chunks(start: int, stop: int, num_rows: int, element_size: int = 4, multiple: int = 1) -> Iterator[slice]:
    """Consecutive slices of the columns ``start:stop`` of a ``[num_rows, N]`` tensor, each about
    ``CHUNK_BYTES`` and a multiple of ``multiple`` columns wide (a row length, to keep rows whole)."""
    width = max(1024, CHUNK_BYTES * torch.get_num_threads() // max(1, num_rows * element_size))
    width = max(multiple, width - width % multiple)
    for first in range(start, stop, width):
        yield slice(first, min(first + width, stop))


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """Σ of each row of ``[R, n]`` values in float64; boolean rows are counted exactly, column chunk by
    column chunk, so no ``[R, n]`` integer copy of them is made (a plain ``sum`` of booleans makes one)."""
    if values.dtype != torch.bool:
        return values.sum(dim=1, dtype=torch.float64)
    counts = torch.zeros(values.shape[0], dtype=torch.int64, device=values.device)
    for columns in column_chunks(0, values.shape[1], values.shape[0], element_size=8):
        counts += values[:, columns].sum(dim=1)
    return counts.to(torch.float64)


def _radix_select(values: torch.Tensor, k: int, signed: bool) -> tuple[torch.Tensor, int, int]:
    """(k-th largest, number of entries greater, number equal) of a long float 1-D tensor.

    16-bit floats must be non-negative; float32 may be signed when ``signed``."""
    if kernels.available(values) and values.is_contiguous():
        return kernels.radix_select(values, k, magnitude=False)
    if values.element_size() == 2:
        counts = torch.bincount(values.view(torch.int16).to(torch.int32), minlength=1 << 15)
        at_or_above = counts.flip(0).cumsum(0).flip(0)
        pattern = int((at_or_above >= k).nonzero().max())
        greater = int(at_or_above[pattern + 1]) if pattern + 1 < at_or_above.numel() else 0
        value = torch.tensor(pattern, dtype=torch.int16).view(values.dtype).to(values.device)
        return value, greater, int(counts[pattern])
    bits = values.view(torch.int32)
    if signed:
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    high_bits = (bits >> 16) + (1 << 15) if signed else bits >> 16
    at_or_above = torch.bincount(high_bits, minlength=1 << 16).flip(0).cumsum(0).flip(0)
    bin_index = int((at_or_above >= k).nonzero().max())
    above_bin = int(at_or_above[bin_index + 1]) if bin_index + 1 < at_or_above.numel() else 0
    in_bin = values[high_bits == bin_index]
    value = in_bin.kthvalue(in_bin.numel() - (k - above_bin) + 1).values
    return value, above_bin + int((in_bin > value).sum()), int((in_bin == value).sum())


def kth_largest(values: torch.Tensor, k: int, *, signed: bool = False) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (non-negative unless ``signed``), exactly."""
    if values.dtype in _RADIX_DTYPES and values.numel() >= RADIX_MIN_LENGTH and not (signed and values.element_size() == 2):
        return _radix_select(values, k, signed)[0]
    return values.kthvalue(values.numel() - k + 1).values


def kth_largest_per_row(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of each row of ``[R, d]`` as ``[R, 1]``, by a partial selection
    (``topk`` of the k largest or of the d − k + 1 smallest, whichever is fewer), several times faster
    than ``kthvalue`` for short rows."""
    d = rows.shape[1]
    if k <= d // 2:
        return rows.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    return rows.topk(d - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)


def kth_smallest(values: torch.Tensor, k: int, *, signed: bool = False) -> torch.Tensor:
    """The k-th smallest entry of a 1-D tensor (``sort(values)[k − 1]``), exactly."""
    return kth_largest(values, values.numel() - k + 1, signed=signed)


class TopK:
    """The exact top-k of each row of ``[R, d]`` values, applied in column chunks.

    Built with :meth:`of_magnitudes` (top-k of |x|) or :meth:`of_values`. ``keep(chunk)`` returns the
    boolean keep-mask of the next chunk of columns; chunks must be passed left to right and cover
    every column once (the tie rule counts tied entries across chunks).
    """

    def __init__(
        self, value: torch.Tensor, greater: torch.Tensor, equal: torch.Tensor, k: int, d: int, tie_rule: str,
        ties_before: torch.Tensor | None = None,
    ) -> None:
        if tie_rule not in TIE_RULES:
            raise ValueError(f"unknown tie rule {tie_rule!r}")
        self.value, self.rule = value, tie_rule
        self.empty, self.full = k <= 0, k >= d
        self.ties_to_keep, self.ties_total = (k - greater).reshape(-1), equal.reshape(-1)
        self.all_ties_kept = tie_rule == "keep_all" or bool((self.ties_to_keep == self.ties_total).all())
        self.ties_seen = torch.zeros_like(self.ties_total) if ties_before is None else ties_before.reshape(-1).to(self.ties_total)
        self.tie_offsets = torch.full_like(self.ties_total, -1)  # sort rules: row's first flag in kept_ties, or −1
        self.kept_ties = torch.zeros(0, dtype=torch.bool, device=self.ties_total.device)

    def order_ties_as_sort(self, rows: torch.Tensor, k: int, tie_rule: str, magnitude: bool) -> None:
        """Keep the tied entries that PyTorch's unstable CPU sort of each row (of |rows| with ``magnitude``)
        puts among its k largest (``tie_rule`` one of the sort rules), replayed by
        :func:`~mergebench.core.sort_order.ties_kept_by_sort`.
        A row where no tie straddles the k-th largest value v (exactly k entries are >= v) keeps its ties
        whatever the sort, so only the other rows are replayed."""
        self.rule = tie_rule
        straddling = (self.ties_to_keep != self.ties_total).nonzero().squeeze(1)
        self.all_ties_kept = not straddling.numel()
        if self.all_ties_kept:
            return
        ties = self.ties_total[straddling]
        self.tie_offsets[straddling] = torch.cumsum(ties, 0) - ties
        self.kept_ties = sort_order.ties_kept_by_sort(
            rows, straddling, self.value[straddling], k, tie_rule == "descending_sort", ties, magnitude=magnitude
        ).to(self.ties_total.device)

    @classmethod
    def of_values(cls, rows: torch.Tensor, k: int, tie_rule: str = "lowest_index", *, magnitude: bool = False, signed: bool = True) -> "TopK":
        """Top-k of each row of ``rows`` (of |rows| with ``magnitude``)."""
        num_rows, d = rows.shape
        empty = torch.zeros((num_rows, 1), dtype=torch.long, device=rows.device)
        if tie_rule in SORT_RULES and 0 < k < d:
            if not bool(torch.isfinite(rows.sum())) and bool(torch.isnan(rows).any()):  # a finite sum: no NaN
                raise MergebenchError(f"tie_rule={tie_rule} ranks values that hold NaN")
            selection = cls.of_values(rows, k, "keep_all", magnitude=magnitude, signed=signed)
            selection.order_ties_as_sort(rows, k, tie_rule, magnitude)
            return selection
        if k <= 0 or k >= d:
            return cls(torch.zeros((num_rows, 1), dtype=rows.dtype, device=rows.device), empty, empty, k, d, tie_rule)
        radix = rows.dtype in _RADIX_DTYPES and d >= RADIX_MIN_LENGTH and (magnitude or rows.element_size() == 4)
        if radix:
            selected = [
                kernels.radix_select(row, k, magnitude) if kernels.available(row) and row.is_contiguous()
                else _radix_select(row.abs() if magnitude else row, k, signed and not magnitude)
                for row in rows
            ]
            value = torch.stack([v for v, _, _ in selected]).reshape(num_rows, 1)
            greater = torch.tensor([g for _, g, _ in selected], device=rows.device).reshape(num_rows, 1)
            equal = torch.tensor([e for _, _, e in selected], device=rows.device).reshape(num_rows, 1)
        else:
            values = rows.abs() if magnitude else rows
            value = kth_largest_per_row(values, k)
            greater = (values > value).sum(dim=1, keepdim=True)
            equal = (values == value).sum(dim=1, keepdim=True)
        return cls(value, greater, equal, k, d, tie_rule)

    @classmethod
    def of_part(cls, whole: WholeVector, rows: torch.Tensor, k: int, tie_rule: str = "lowest_index", *, magnitude: bool = False) -> "TopK":
        """Top-k of each row over ``whole``'s entire task vectors, of which ``rows`` (``[R, n]``, an
        entry-wise function of ``whole.vectors``) is the part held now, such as one tensor of a streamed
        merge; k counts entries of the whole vector, and its columns are passed to :meth:`keep` as usual.

        The threshold v is the (d − k)-th smallest entry (``whole.order_statistics``); the entries > v and
        = v over the whole vector, and the entries = v before this part, come from
        ``whole.running_totals``, so the tie rule keeps the same entries as one selection over the whole
        vector (no counts are needed to keep every tie). The sort-order rules are refused: the order in
        which an unstable sort of the whole vector puts its ties cannot be had from its parts."""
        values = rows.abs() if magnitude else rows
        num_rows, d = values.shape[0], whole.entries
        if tie_rule in SORT_RULES and 0 < k < d:
            raise MergebenchError(
                f"tie_rule={tie_rule} orders ties as an unstable sort of the whole vector, which a merge holding "
                "one tensor at a time cannot reproduce; use an index tie rule, or select per tensor"
            )
        none = torch.zeros((num_rows, 1), dtype=torch.long, device=values.device)
        if k <= 0 or k >= d:
            return cls(torch.zeros((num_rows, 1), dtype=values.dtype, device=values.device), none, none, k, d, tie_rule)
        (value,) = whole.order_statistics(values, [d - k])
        if tie_rule == "keep_all":
            return cls(value, none, none, k, d, tie_rule)
        before, total = whole.running_totals(torch.cat([values > value, values == value]))
        greater, equal = total.to(torch.long).split(num_rows)
        return cls(value, greater, equal, k, d, tie_rule, ties_before=before[num_rows:].to(torch.long))

    @classmethod
    def of_magnitudes(cls, rows: torch.Tensor, k: int, tie_rule: str = "lowest_index") -> "TopK":
        """Top-k of each row of |rows|."""
        return cls.of_values(rows, k, tie_rule, magnitude=True)

    def keep(self, values: torch.Tensor) -> torch.Tensor:
        """Keep-mask of the next ``[R, c]`` chunk of columns (of the values the selection ranks)."""
        if self.empty:
            return torch.zeros_like(values, dtype=torch.bool)
        if self.full:
            return torch.ones_like(values, dtype=torch.bool)
        keep = values >= self.value
        if self.all_ties_kept:
            return keep
        rows, columns = (values == self.value).nonzero(as_tuple=True)  # row-major: each row's ties in index order
        if rows.numel():
            per_row = torch.bincount(rows, minlength=len(self.ties_seen))
            first_of_row = per_row.cumsum(0) - per_row
            position = torch.arange(len(rows), device=rows.device) - first_of_row[rows] + self.ties_seen[rows] + 1
            self.ties_seen += per_row
            if self.rule == "lowest_index":
                dropped = position > self.ties_to_keep[rows]
            elif self.rule == "highest_index":
                dropped = position <= self.ties_total[rows] - self.ties_to_keep[rows]
            else:
                offsets = self.tie_offsets[rows]
                dropped = (offsets >= 0) & ~self.kept_ties[(offsets + position - 1).clamp(min=0)]
            keep[rows[dropped], columns[dropped]] = False
        return keep


def top_k_mask(magnitudes: torch.Tensor, k: int, tie_rule: str = "lowest_index") -> torch.Tensor:
    """Boolean mask of the k largest entries of each row of a non-negative ``[R, d]`` tensor."""
    return TopK.of_values(magnitudes, k, tie_rule, signed=False).keep(magnitudes)

"""Exact order statistics of each row of a ``[T, N]`` matrix seen in column blocks (two-round radix select).

A float32 whose non-sign bits are flipped when it is negative sorts, read as a signed 32-bit integer,
exactly as the float sorts (−0 is first folded into +0, so the two zeros are one value). The r-th
smallest entry (0-based) of a row is found in two rounds over the row's blocks:

1. a histogram of the top 16 bits of every key locates the bin b holding rank r, and the rank r′ of the
   wanted entry inside it (r minus the entries of lower bins);
2. a histogram of the low 16 bits of the keys whose top bits are b locates the low bits l at rank r′.

The key ``b·2¹⁶ + l`` is the entry's bit pattern: the value is exact and does not depend on how the
row is cut into blocks, so a merge that streams tensor by tensor finds the same threshold as one over
the whole flattened task vector. Memory is two histograms of 2¹⁶ counts per row and rank.
"""

from __future__ import annotations

from typing import Sequence

import torch

BINS = 1 << 16
ROUNDS = 2
COLUMNS = 1 << 18
"""Columns counted at once: bounds the temporaries of a block (keys, bins, indices)."""


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys that sort as the float32 ``values`` do (−0 as +0)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)
    keys = bits >> 31
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values of :func:`sortable_keys` (its inverse)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


class RowOrderStatistics:
    """The entries of ranks ``ranks`` (0-based, ascending order) of each of ``rows`` rows, from blocks.

    Call :meth:`add` with every ``[rows, n]`` block of the matrix, then :meth:`next_round`; do it twice
    (:data:`ROUNDS`); :meth:`values` then holds one ``[rows, 1]`` column per rank.
    """

    def __init__(self, rows: int, ranks: Sequence[int], device: str | torch.device = "cpu"):
        self.rows = rows
        self.ranks = torch.tensor(list(ranks), dtype=torch.int64, device=device).expand(rows, -1).contiguous()
        self.device = device
        self.round = 0
        self.entries = 0
        self.counts = torch.zeros((rows, BINS), dtype=torch.int64, device=device)
        self.high_bins: torch.Tensor | None = None
        self.rank_in_bin: torch.Tensor | None = None
        self._values: list[torch.Tensor] | None = None

    def add(self, block: torch.Tensor) -> None:
        """Count one ``[rows, n]`` block (any floating dtype) in the current round."""
        if self.round >= ROUNDS:
            raise RuntimeError("both rounds are done")
        for start in range(0, block.shape[1], COLUMNS):  # temporaries of at most COLUMNS columns
            self._add(block[:, start : start + COLUMNS])
        if self.round == 0:
            self.entries += block.shape[1]

    def _add(self, block: torch.Tensor) -> None:
        keys = sortable_keys(block)
        high = keys >> 16  # in −2¹⁵..2¹⁵−1
        if self.round == 0:  # row by row: no [rows, BINS] temporary besides the counts
            high += BINS // 2
            for row in range(self.rows):
                self.counts[row] += torch.bincount(high[row], minlength=BINS)
            return
        low = keys & 0xFFFF
        for column in range(self.ranks.shape[1]):
            in_bin = high == (self.high_bins[:, column : column + 1] - BINS // 2).to(torch.int32)
            for row in range(self.rows):
                self.counts[column, row] += torch.bincount(low[row][in_bin[row]], minlength=BINS)

    def next_round(self) -> None:
        """Close the current round: locate each rank's bin (round 1) or its exact value (round 2)."""
        if self.round == 0:
            if self.entries == 0:
                raise ValueError("no entries to take order statistics of")
            if int(self.ranks.max()) >= self.entries or int(self.ranks.min()) < 0:
                raise ValueError(f"ranks {self.ranks[0].tolist()} outside 0..{self.entries - 1}")
            at_or_below = self.counts.cumsum(dim=1)
            self.high_bins = torch.searchsorted(at_or_below, self.ranks, right=True)
            below = torch.where(self.high_bins > 0, at_or_below.gather(1, (self.high_bins - 1).clamp(min=0)), 0)
            self.rank_in_bin = self.ranks - below
            self.counts = torch.zeros((self.ranks.shape[1], self.rows, BINS), dtype=torch.int64, device=self.device)
        else:
            at_or_below = self.counts.cumsum(dim=2)  # [ranks, rows, BINS]
            low_bins = torch.searchsorted(at_or_below, self.rank_in_bin.T.unsqueeze(2).contiguous(), right=True).squeeze(2).T
            keys = (self.high_bins - BINS // 2) * BINS + low_bins
            self._values = [key_values(keys[:, column : column + 1]) for column in range(keys.shape[1])]
            self.counts = None
        self.round += 1

    @property
    def done(self) -> bool:
        return self.round >= ROUNDS

    def values(self) -> list[torch.Tensor]:
        if self._values is None:
            raise RuntimeError("order statistics asked before both rounds were counted")
        return self._values


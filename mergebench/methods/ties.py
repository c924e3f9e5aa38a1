"""TIES-Merging (Yadav et al., NeurIPS 2023, "Resolving Interference When Merging Models").

Three steps over the task vectors τ_t, then θ = θ₀ + λ·τ_m:

1. **Trim**: keep the top-k% magnitudes of each τ_t, zero the rest. As in the authors' code the
   threshold is taken over the whole flattened task vector (``scope="global"``); ``scope="per_tensor"``
   trims each parameter tensor separately (mergekit's behaviour). We keep exactly ⌊k%·d⌋ entries;
   among magnitudes tied at the threshold the lowest-index ones are kept (``tie_rule="lowest_index"``,
   a stable descending sort); ``tie_rule="keep_all"`` keeps every tied entry (more than ⌊k%·d⌋ where
   ties straddle the threshold, common in bfloat16); ``tie_rule="descending_sort"`` keeps the first k of
   ``torch.argsort(|τ|, descending=True)`` as mergekit does (PyTorch's unstable sort, whose order of
   ties is not an index order; replayed without sorting, :mod:`~mergebench.core.sort_order`). The
   authors' ``kthvalue`` indexing
   keeps one more than ⌊k%·d⌋.
2. **Elect**: γ = sgn(Σ_t τ̂_t) per parameter ("mass" election). Where the sum is exactly zero (all
   kept values zero, or non-zero values cancelling) the sign of the majority of elected signs is used,
   as the authors' ``resolve_zero_signs``, and +1 if that too is zero (``zero_sign="majority"``);
   ``zero_sign="positive"`` takes +1 there, as mergekit (``sign_weight >= 0``). Only entries with
   non-zero kept values summing to 0 are affected.
3. **Disjoint merge**: τ_m = mean of the τ̂_t whose sign agrees with γ (entries with no agreeing task
   are 0).

The merge runs in a few passes over ``[T, N]``: one radix select per task for the threshold (see
:mod:`~mergebench.core.selection`), then trim, election and disjoint mean fused column chunk by
column chunk (:class:`ElectedMerge`), with no ``[T, N]`` temporary. The whole-vector statistics (the
global threshold with its tie rule, the majority sign) are asked of the
:class:`~mergebench.core.task_vectors.TaskVectors` (``top_k``, ``total``), so a streamed merge, which
holds one tensor at a time, counts them over every tensor and equals the in-memory merge bit for bit.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core import kernels
from mergebench.core.kernels import task_sum
from mergebench.core.selection import TIE_RULES, TopK, column_chunks
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, lam_grid, register

# λ chosen on validation; the disjoint mean keeps about one task's magnitude, so the optimum sits near 1
# for CLIP (the TIES paper searches 0.8–1.8) and lower when experts interfere more: the grid covers both.
TIES_LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)


TieRule = Annotated[
    str,
    HParam(
        "entries tied at the top-k threshold: the lowest-index or the highest-index ones up to exactly k, "
        "all of them (k or more), or those torch.argsort/torch.sort put first (exactly k; mergekit: descending_sort)",
        choices=TIE_RULES,
    ),
]
ZERO_SIGNS = ("majority", "positive")
ZeroSign = Annotated[
    str,
    HParam(
        "elected sign where the kept values sum to exactly 0: the majority of elected signs (authors' "
        "resolve_zero_signs) or + (mergekit)",
        choices=ZERO_SIGNS,
    ),
]


def trim_selections(task_vectors: TaskVectors, vectors: torch.Tensor, k_percent: float, scope: str, tie_rule: str):
    """``(start, stop, TopK)`` of the TIES trim of ``vectors`` (``task_vectors``'s own): one selection over
    the whole task vector, which :meth:`~mergebench.core.task_vectors.TaskVectors.top_k` takes exactly also
    when ``task_vectors`` holds one tensor of a streamed merge, or one per parameter tensor."""
    if scope == "global":
        yield 0, vectors.shape[1], task_vectors.top_k(vectors, int(task_vectors.entries * k_percent / 100), tie_rule, magnitude=True)
        return
    for slot in task_vectors.layout.slots:
        keep = int((slot.stop - slot.start) * k_percent / 100)
        yield slot.start, slot.stop, TopK.of_magnitudes(vectors[:, slot.start : slot.stop], keep, tie_rule)


def trimmed_columns(vectors: torch.Tensor, selections) -> torch.Tensor:
    """τ̂: ``vectors`` with the entries outside each ``(start, stop, TopK)`` selection zeroed."""
    trimmed = torch.empty_like(vectors)
    for start, stop, selection in selections:
        for columns in column_chunks(start, stop, vectors.shape[0]):
            block = vectors[:, columns]
            torch.where(selection.keep(block.abs()), block, block.new_zeros(()), out=trimmed[:, columns])
    return trimmed


def keep_top_magnitudes(vectors: torch.Tensor, k_percent: float, tie_rule: str = "lowest_index") -> torch.Tensor:
    """Zero all but the ⌊k%·d⌋ largest-magnitude entries of each row of ``[T, d]``."""
    d = vectors.shape[1]
    return trimmed_columns(vectors, [(0, d, TopK.of_magnitudes(vectors, int(d * k_percent / 100), tie_rule))])


def trim(task_vectors: TaskVectors, vectors: torch.Tensor, k_percent: float, scope: str, tie_rule: str = "lowest_index") -> torch.Tensor:
    """TIES trim step, over the whole task vector or per parameter tensor."""
    return trimmed_columns(vectors, trim_selections(task_vectors, vectors, k_percent, scope, tie_rule))


def elect_signs(vectors: torch.Tensor, zero_sign: str = "majority") -> torch.Tensor:
    """γ = sgn(Σ_t τ_t), zeros resolved to the majority sign (then +1), or to +1."""
    signs = torch.sign(task_sum(vectors))
    return torch.where(signs == 0, zero_fill(signs.sum(), zero_sign), signs)


def zero_fill(sign_total: torch.Tensor, zero_sign: str) -> torch.Tensor:
    """The sign given to entries whose sum is exactly 0, from Σ sgn(Σ_t τ_t) over all entries."""
    majority = torch.sign(sign_total)
    return majority if zero_sign == "majority" and majority != 0 else torch.ones_like(majority)


def disjoint_mean(vectors: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries whose sign equals the (non-zero) elected sign γ.

    With a_t = γ·τ_t, the agreeing entries are a_t > 0: their mean is γ·Σ max(a_t, 0) / #{a_t > 0}."""
    aligned = vectors * signs
    count = (aligned > 0).sum(dim=0).clamp(min=1).to(vectors.dtype)
    return signs * task_sum(aligned.clamp_(min=0)) / count


def disjoint_sum(vectors: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Σ_t of the entries whose sign equals the elected sign γ (the authors' "dis-sum")."""
    return signs * task_sum((vectors * signs).clamp_(min=0))


class ElectedMerge:
    """TIES steps 2–3 (sign election, then disjoint mean or sum), computed block of columns by block.

    γ = sgn(Σ_t τ̂_t) is known per column except where the sum is exactly 0, whose sign depends on all
    columns (the majority of elected signs). Each block is merged with its own γ; the few columns with
    a zero sum but non-zero entries are remembered and merged again once the majority is known. With
    ``whole``, the columns are (part of) ``whole``'s task vectors and the majority is taken over all of
    them (:meth:`~mergebench.core.task_vectors.TaskVectors.total`: every tensor of a streamed merge);
    without it, over the columns added. float32 CPU task vectors go through the fused kernel
    (:func:`~mergebench.core.kernels.elect_columns`: one pass, no temporaries), others through the
    PyTorch expressions above, chunk by chunk; both sum over tasks in task order and agree.
    """

    def __init__(self, num_columns: int, like: torch.Tensor, zero_sign: str = "majority", mean: bool = True, whole: TaskVectors | None = None) -> None:
        self.merged = torch.empty(num_columns, dtype=like.dtype, device=like.device)
        self.zero_sign, self.mean, self.whole = zero_sign, mean, whole
        self.sign_total = torch.zeros((), dtype=torch.long, device=like.device)
        self.undecided: list[tuple[torch.Tensor, torch.Tensor]] = []  # (columns, merged value for γ = −1)

    def add(self, columns: slice, vectors: torch.Tensor, selection: TopK | None = None, drop=None) -> None:
        """Merge the ``[T, c]`` task vectors at ``columns``, trimmed to ``selection`` (a top-k of their
        magnitudes, passed every column left to right) or dropped and rescaled by ``drop`` (DARE's
        ``DropMask`` over the whole stack, ``columns`` starting at a multiple of 8) when given."""
        if kernels.available(vectors, self.merged):
            elected = kernels.elect_columns(
                vectors, self.merged[columns], selection=selection, bits=None if drop is None else drop.bits, offset=columns.start,
                scale=1.0 if drop is None else 1.0 - drop.p, mean=self.mean,
            )
            self.add_elected(columns.start, *elected)
            return
        for chunk in column_chunks(columns.start, columns.stop, vectors.shape[0], multiple=8):
            block = vectors[:, chunk.start - columns.start : chunk.stop - columns.start]
            if selection is not None:
                block = block.where(selection.keep(block.abs()), 0.0)
            if drop is not None:
                block = drop.rescaled(block, chunk)
            self._add_block(chunk, block)

    def add_elected(self, start: int, sign_total: int, index: torch.Tensor, negative: torch.Tensor) -> None:
        """Take the columns from ``start`` on that a kernel merged into :attr:`merged` (its return value:
        Σ γ, undecided columns counted from ``start``, their values for γ = −1)."""
        self.sign_total += sign_total
        if index.numel():
            self.undecided.append((index + start, negative))

    def _add_block(self, columns: slice, vectors: torch.Tensor) -> None:
        combine = disjoint_mean if self.mean else disjoint_sum
        signs = torch.sign(task_sum(vectors))
        self.sign_total += signs.sum(dtype=torch.long)
        self.merged[columns] = combine(vectors, signs)
        zero_sum = (signs == 0).nonzero().squeeze(1)
        if zero_sum.numel():
            candidates = vectors[:, zero_sum]
            undecided = (candidates != 0).any(dim=0)
            if bool(undecided.any()):
                candidates = candidates[:, undecided]
                self.merged[zero_sum[undecided] + columns.start] = combine(candidates, torch.ones_like(candidates[0]))
                self.undecided.append((zero_sum[undecided] + columns.start, combine(candidates, -torch.ones_like(candidates[0]))))

    def result(self) -> torch.Tensor:
        """τ_m, once every column was added (the undecided columns hold their γ = +1 value until now)."""
        sign_total = self.sign_total
        if self.zero_sign == "majority" and self.whole is not None:
            sign_total = self.whole.total(sign_total)
        if zero_fill(sign_total, self.zero_sign) < 0:
            for index, negative in self.undecided:
                self.merged[index] = negative.to(self.merged)
        return self.merged


def elect_and_merge(vectors: torch.Tensor, zero_sign: str = "majority", mean: bool = True, whole: TaskVectors | None = None) -> torch.Tensor:
    """TIES steps 2–3 on already sparsified task vectors ``[T, N]`` (the majority sign over ``whole``'s
    entire task vectors when given, see :class:`ElectedMerge`)."""
    election = ElectedMerge(vectors.shape[1], vectors, zero_sign, mean, whole)
    election.add(slice(0, vectors.shape[1]), vectors)
    return election.result()


def ties_merge(task_vectors: TaskVectors, k_percent: float, scope: str, tie_rule: str, zero_sign: str, mean: bool = True) -> torch.Tensor:
    """Trim, elect, disjoint merge in one blocked pass after the top-k thresholds; the global threshold
    and the majority sign are those of the whole task vector also when ``task_vectors`` is one tensor of
    a streamed merge."""
    vectors = task_vectors.vectors
    election = ElectedMerge(vectors.shape[1], vectors, zero_sign, mean, whole=task_vectors)
    for start, stop, selection in trim_selections(task_vectors, vectors, k_percent, scope, tie_rule):
        election.add(slice(start, stop), vectors[:, start:stop], selection)
    return election.result()


@register(
    "ties",
    citation="Yadav et al., 2023 (TIES-Merging)",
    lam=lam_grid(1.0, TIES_LAMBDAS),
    entrywise=lambda setting: setting["scope"] == "global",  # per_tensor trims over the tensor it is given
)
def ties(
    task_vectors: TaskVectors,
    *,
    k: Annotated[float, HParam("percent of each task vector's magnitudes kept", low=0.0, high=100.0)] = 20.0,
    scope: Annotated[str, HParam("top-k over the whole task vector or per tensor", choices=("global", "per_tensor"))] = "global",
    tie_rule: TieRule = "lowest_index",
    zero_sign: ZeroSign = "majority",
) -> torch.Tensor:
    """Trim, elect sign, disjoint mean."""
    return ties_merge(task_vectors, k, scope, tie_rule, zero_sign)

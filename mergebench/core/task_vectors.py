"""Task vectors τ_t = θ_t − θ₀ (Ilharco et al., 2023), stacked into one ``[T, N]`` tensor.

Only floating-point parameters are merged. Buffers (BatchNorm running statistics, position ids,
integer counters) and any key the caller excludes are taken unchanged from the pretrained model.
Stacking every mergeable parameter of every task into one contiguous matrix lets a method work on
all tasks and all layers in a single vectorized pass, and lets a hyperparameter sweep reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from mergebench.core import kernels
from mergebench.core.checkpoints import StateDict, all_finite, check_compatible
from mergebench.core.selection import TopK, kth_smallest, row_sums
from mergebench.errors import MergebenchError


@dataclass(frozen=True)
class TensorSlot:
    """Where one named parameter lives in the flattened vector."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class ParamLayout:
    """The ordered list of mergeable parameters and their place in the flat vector."""

    slots: tuple[TensorSlot, ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> "ParamLayout":
        slots, offset = [], 0
        for name in names:
            numel = state[name].numel()
            slots.append(TensorSlot(name, tuple(state[name].shape), offset, offset + numel))
            offset += numel
        return cls(tuple(slots))

    @property
    def numel(self) -> int:
        return self.slots[-1].stop if self.slots else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a flat ``[N]`` vector in each parameter's shape (differentiable)."""
        return {slot.name: flat[slot.start : slot.stop].view(slot.shape) for slot in self.slots}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`views`: one flat ``[N]`` vector in layout order."""
        return torch.cat([tensors[slot.name].reshape(-1) for slot in self.slots])


@dataclass
class TaskVectors:
    """Pretrained weights θ₀ (``[N]``) and the task vectors of T tasks (``[T, N]``), flattened."""

    pretrained: torch.Tensor
    vectors: torch.Tensor
    layout: ParamLayout
    tasks: tuple[str, ...]

    @property
    def num_tasks(self) -> int:
        return self.vectors.shape[0]

    @property
    def entries(self) -> int:
        """d, the entries of each whole task vector (a streamed merge hands a method one tensor of it)."""
        return self.layout.numel

    def order_statistics(self, values: torch.Tensor, ranks: Sequence[int], *, magnitude: bool = False) -> list[torch.Tensor]:
        """The entries of ``ranks`` (0-based, ascending) of each row of ``values`` (of ``|values|`` with
        ``magnitude``) over the whole task vector.

        ``values`` is ``[T, n]``, an entry-wise function of :attr:`vectors`; the answer is exact (a radix
        select per row, :func:`~mergebench.core.kernels.order_statistics` or
        :func:`~mergebench.core.selection.kth_smallest`; −0 answered as +0), one ``[T, 1]`` column per
        rank. Methods ask their whole-vector thresholds here so that a streamed merge, which holds one
        tensor at a time, gets the same thresholds as an in-memory one
        (:mod:`mergebench.core.order_statistics`).
        """
        if kernels.available(values):
            return kernels.order_statistics(values, list(ranks), magnitude)
        values = values.abs() if magnitude else values
        return [torch.stack([kth_smallest(row, rank + 1, signed=True) for row in values]).reshape(-1, 1) + 0.0 for rank in ranks]

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of every entry of ``values`` (an entry-wise function of :attr:`vectors`, or a partial sum of
        one) over the whole task vector, in float64 (exact for signs and counts)."""
        return values.sum(dtype=torch.float64)

    def running_totals(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``values`` (``[R, n]``, an entry-wise function of :attr:`vectors`): Σ over the entries
        of the whole task vector that precede the part held (none here; earlier tensors in a streamed
        merge) and Σ over all of it, ``[R, 1]`` float64 each."""
        total = row_sums(values).unsqueeze(1)
        return torch.zeros_like(total), total

    def top_k(self, rows: torch.Tensor, k: int, tie_rule: str = "lowest_index", *, magnitude: bool = False) -> TopK:
        """The exact top-k of each row of ``rows`` (of ``|rows|`` with ``magnitude``) over the whole task
        vector, ``rows`` being ``[T, n]``, an entry-wise function of :attr:`vectors`
        (:class:`~mergebench.core.selection.TopK`; a streamed merge builds it with
        :meth:`~mergebench.core.selection.TopK.of_part` from the statistics above)."""
        return TopK.of_values(rows, k, tie_rule, magnitude=magnitude)

    def slices(self) -> Iterator[tuple[TensorSlot, torch.Tensor]]:
        """Each parameter's ``[T, numel]`` block of the stacked task vectors (a view)."""
        for slot in self.layout.slots:
            yield slot, self.vectors[:, slot.start : slot.stop]

    def finetuned(self) -> torch.Tensor:
        """θ_t = θ₀ + τ_t for every task, ``[T, N]``."""
        return self.pretrained.unsqueeze(0) + self.vectors

    def subset(self, tasks: Iterable[str]) -> "TaskVectors":
        index = [self.tasks.index(task) for task in tasks]
        return TaskVectors(self.pretrained, self.vectors[index], self.layout, tuple(self.tasks[i] for i in index))


def buffer_names(module: torch.nn.Module) -> set[str]:
    """Names of a module's buffers (BatchNorm statistics, position ids): taken from θ₀, never merged."""
    return {name for name, _ in module.named_buffers()}


def mergeable_names(state: Mapping[str, torch.Tensor], exclude: Iterable[str] = ()) -> list[str]:
    """Floating-point keys of ``state`` that are not explicitly excluded (buffers, heads)."""
    excluded = set(exclude)
    return [name for name, t in state.items() if t.is_floating_point() and name not in excluded]


def build_task_vectors(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    exclude: Iterable[str] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sources: Mapping[str, str] | None = None,
) -> TaskVectors:
    """Check the checkpoints agree, then stack τ_t = θ_t − θ₀ over all mergeable parameters.

    ``sources`` (``{"pretrained" or task: file}``) names the files in the messages about bad values."""
    if not finetuned:
        raise MergebenchError("no fine-tuned checkpoints to merge")
    check_compatible(pretrained, finetuned)
    layout = ParamLayout.of(pretrained, mergeable_names(pretrained, exclude))
    theta0 = _flatten(pretrained, layout, device, dtype)
    sources = dict(sources or {})
    _require_finite(theta0, "pretrained", pretrained, layout, sources.get("pretrained"))
    vectors = torch.empty((len(finetuned), layout.numel), device=device, dtype=dtype)
    for row, (task, state) in enumerate(finetuned.items()):
        theta = _flatten(state, layout, device, dtype)
        _require_finite(theta, task, state, layout, sources.get(task))
        torch.sub(theta, theta0, out=vectors[row])
    return TaskVectors(theta0, vectors, layout, tuple(finetuned))


def merged_state_dict(
    pretrained: Mapping[str, torch.Tensor], layout: ParamLayout, merged_flat: torch.Tensor
) -> StateDict:
    """The pretrained state dict with every mergeable parameter replaced from ``merged_flat``."""
    merged = layout.views(merged_flat)
    return {name: merged[name].to(tensor.dtype) if name in merged else tensor for name, tensor in pretrained.items()}


def _flatten(state: Mapping[str, torch.Tensor], layout: ParamLayout, device, dtype) -> torch.Tensor:
    flat = torch.empty(layout.numel, device=device, dtype=dtype)
    for slot in layout.slots:
        flat[slot.start : slot.stop] = state[slot.name].reshape(-1).to(device=device, dtype=dtype)
    return flat


def _require_finite(flat: torch.Tensor, owner: str, state, layout: ParamLayout, source: str | None = None) -> None:
    if all_finite(flat):
        return
    where = f" ({source})" if source else ""
    for slot in layout.slots:
        if not all_finite(state[slot.name]):
            raise MergebenchError(f"checkpoint {owner!r}{where} has NaN or infinite values in {slot.name!r}")

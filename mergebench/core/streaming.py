"""Merging checkpoints too large for memory, one tensor at a time.

The base model and every expert are opened as safetensors (a folder with
``model.safetensors.index.json`` and its shards, a folder with one ``*.safetensors`` file, or such a
file itself): only the header of each file is read up front (checked by ``safetensors.safe_open``), and
each tensor is read when asked for by a positioned read of its bytes (into a fresh tensor, or, in the
merge, straight into the engine's reused task-vector buffers). Nothing stays
mapped into the process: pages of a memory-mapped checkpoint, once touched, count in the process's
resident memory until the map is closed, which would grow with the number of experts; read this way,
the checkpoints' pages live in the kernel's page cache, shared and reclaimable, and the process holds
only the tensors it is working on. Before anything is written, the headers are compared; the first tensor whose
name, shape or dtype differs between the base and an expert is named in a :class:`MergebenchError`.

Then, for each tensor name of the base (shard by shard, in name order within a shard), the base
tensor and the experts' tensors of that name are read, a one-tensor
:class:`~mergebench.core.task_vectors.TaskVectors` (θ₀ and τ_t = θ_t − θ₀ over that tensor, float32)
is built, and the registered method's ``merge`` computes θ₀ + λ·τ_m for it. The result is cast back to
the base tensor's dtype (bf16 stays bf16, fp32 stays fp32) and appended to the output shard. Output
shards are written incrementally: their headers are known from the base's headers before any tensor is
merged, so a shard is streamed to disk tensor by tensor and never assembled in memory. At any moment
the process holds the T + 1 tensors of one name (plus the method's float32 work on them); peak memory
is set by the largest tensor (usually the embedding), not by the model. The output folder has the
base's file names, shard assignment and index layout, and the base's other files (``config.json``,
tokenizer, generation config) are copied, so it loads with ``from_pretrained``.

**Entry-wise methods are handed column blocks.** A method that declares itself entry-wise
(:attr:`~mergebench.methods.registry.MergeMethod.entrywise`: each entry of τ_m depends only on that
entry's task values and on whole-vector statistics asked of its task vectors; Task Arithmetic, TIES at
``scope=global``, PCB) is handed each tensor in parts of consecutive flat entries, ``[T, c]`` task
vectors of :data:`PART_BYTES` (c = PART_BYTES / 4T), each read alone from every checkpoint by a
positioned read of its byte range. The result is the same bit for bit, and the method's work no
longer grows with T; what still does is small: the histograms of its whole-vector statistics (2¹⁶
counts per task and rank). Other methods get whole tensors.

Tensors that are not floating point, and names passed in ``exclude``, are copied from the base.

**Whole-vector statistics are exact.** A method asks its whole-vector statistics of the
:class:`~mergebench.core.task_vectors.TaskVectors` it is given (``order_statistics``, ``total``,
``running_totals``, ``top_k``): TIES's global top-k (the threshold and, for the exact-k tie rules, the
entries above and at it and the tied entries of earlier tensors, so that ties are broken in the order of
the whole flattened vector) and majority sign, PCB's magnitude quantiles and score threshold. A
streamed merge answers them in passes over every tensor before the merging pass
(:class:`WholeVectorPasses`: for an order statistic a histogram of the values' top 16 bits, then of the
low 16 bits inside the bin that holds the rank; for sums one pass), so the streamed result equals the
in-memory one exactly; each statistic costs one or two extra reading passes. The same holds for
``consensus_ties``'s global trim and for the majority sign of every TIES-style method (``dare_ties``,
``della``, ``breadcrumbs_ties``, ``consensus_ties``). What stays per tensor: randomized methods (DARE,
DELLA) draw tensor ``name``'s masks from a generator seeded with :func:`tensor_seed` ``(seed, name)``,
so masks differ across tensors but are reproducible; they are not the masks of an in-memory merge
with the same seed.

Methods that need the whole model are refused: data-using methods (Fisher, RegMean, AdaMerging) and
post-scalers such as LiNeS (``lines``, ``<method>+lines``), whose per-layer coefficients depend on
every layer's depth.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from mergebench.core.checkpoints import all_finite, atomic_folder
from mergebench.core.order_statistics import RowOrderStatistics
from mergebench.core.selection import TopK, row_sums
from mergebench.core.task_vectors import ParamLayout, TaskVectors, TensorSlot
from mergebench.errors import MergebenchError

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

PART_BYTES = 1 << 23
"""The float32 ``[T, c]`` task vectors an entry-wise method is handed at once in a streamed merge (8 MiB):
a tensor's c = PART_BYTES / (4·T) columns, so that its memory does not grow with T."""

TV_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Storage dtypes of task vectors (``--tv-dtype``): ``bf16`` rounds each τ_t = θ_t − θ₀ to bfloat16."""

PER_TENSOR_NOTES: dict[str, str] = {
    name: f"{name} draws its random masks per tensor (seeded with the seed and the tensor's name) when streaming"
    for name in ("dare", "dare_ties", "della", "della_linear")
}
"""Methods whose streamed merge is not their in-memory merge (every whole-vector statistic is exact)."""

REFUSED_REASON = "needs the whole model at once (data access or per-layer coefficients), which a streamed merge does not hold"


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: its dtype (safetensors name), shape and the file that holds it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.torch_dtype).element_size()


class LiveTensorTracker:
    """Counts the tensors read from checkpoints that are still alive, and the peak of that count.

    Each tensor a :class:`SafetensorsCheckpoint` returns is registered with a finalizer; the count drops
    when the tensor is freed. ``peak`` is therefore the largest number of loaded tensors held at once.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.loaded = 0
        self.live_bytes = 0
        self.peak_bytes = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.loaded += 1
        self.live += 1
        self.live_bytes += nbytes
        self.peak = max(self.peak, self.live)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        self.live -= 1
        self.live_bytes -= nbytes


class SafetensorsCheckpoint(Mapping):
    """A safetensors checkpoint (sharded folder, single-file folder, or file), memory-mapped lazily.

    It is a read-only ``{name: tensor}`` mapping whose tensors are read when asked for, so it stands in
    for a state dict that is never loaded whole."""

    def __init__(self, path: str | os.PathLike, *, tracker: LiveTensorTracker | None = None) -> None:
        self.path = Path(path)
        self.tracker = tracker
        self.index_metadata: dict[str, Any] | None = None
        self._descriptors: dict[str, int] = {}
        self._starts: dict[str, int] = {}
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise MergebenchError(f"not a safetensors file: {self.path}")
            self.folder, files = self.path.parent, [self.path.name]
        elif self.path.is_dir():
            self.folder = self.path
            files = self._files_of_folder()
        else:
            raise MergebenchError(f"checkpoint not found: {self.path}")
        self.files = files
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            try:
                with safe_open(str(self.folder / file), framework="pt", device="cpu") as handle:
                    for name in sorted(handle.keys()):
                        if name in self.infos:
                            raise MergebenchError(f"checkpoint {self.path}: tensor {name!r} is in both {self.infos[name].file} and {file}")
                        piece = handle.get_slice(name)
                        dtype = piece.get_dtype()
                        if dtype not in SAFETENSORS_DTYPES:
                            raise MergebenchError(f"checkpoint {self.path}: tensor {name!r} has unsupported dtype {dtype}")
                        self.infos[name] = TensorInfo(name, dtype, tuple(piece.get_shape()), file)
            except (SafetensorError, OSError, ValueError) as error:
                raise MergebenchError(f"cannot read safetensors file {self.folder / file}: {error}") from error
            self._starts.update(_data_starts(self.folder / file))
        if self.index_metadata is not None:
            self._check_index()

    def _files_of_folder(self) -> list[str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                content = json.loads(index.read_text())
                self._weight_map = dict(content["weight_map"])
            except (ValueError, KeyError, TypeError) as error:
                raise MergebenchError(f"cannot read {index}: {type(error).__name__}: {error}") from error
            self.index_metadata = dict(content.get("metadata") or {})
            files = sorted(set(self._weight_map.values()))
            missing = [file for file in files if not (self.folder / file).is_file()]
            if missing:
                raise MergebenchError(f"checkpoint {self.folder}: shard {missing[0]} named in {INDEX_FILE} is missing")
            return files
        if (self.folder / "model.safetensors").is_file():
            return ["model.safetensors"]
        found = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if not found:
            raise MergebenchError(f"checkpoint {self.folder} has no safetensors weights ({INDEX_FILE} or *.safetensors)")
        raise MergebenchError(f"checkpoint {self.folder} has {len(found)} safetensors files but no {INDEX_FILE}")

    def _check_index(self) -> None:
        for name, file in self._weight_map.items():
            info = self.infos.get(name)
            if info is None or info.file != file:
                raise MergebenchError(f"checkpoint {self.folder}: {INDEX_FILE} puts {name!r} in {file}, which does not hold it")
        extra = [name for name in self.infos if name not in self._weight_map]
        if extra:
            raise MergebenchError(f"checkpoint {self.folder}: tensor {extra[0]!r} is in a shard but not in {INDEX_FILE}")

    def _descriptor(self, file: str) -> int:
        if file not in self._descriptors:
            try:
                self._descriptors[file] = os.open(self.folder / file, os.O_RDONLY)
            except OSError as error:
                raise MergebenchError(f"cannot read safetensors file {self.folder / file}: {error}") from error
        return self._descriptors[file]

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None

    def names_in(self, file: str) -> list[str]:
        return [name for name, info in self.infos.items() if info.file == file]

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Read one tensor into a fresh tensor, or the flat entries ``start:stop`` of it as a 1-D tensor,
        counted by the tracker if there is one."""
        info = self.infos.get(name)
        if info is None:
            raise MergebenchError(f"checkpoint {self.path} has no tensor {name!r}")
        numel = math.prod(info.shape)
        stop = numel if stop is None else stop
        data = torch.empty((stop - start) * _element_size(info), dtype=torch.uint8)
        self._read(info, data, start)
        tensor = data.view(info.torch_dtype)
        if (start, stop) == (0, numel):
            tensor = tensor.reshape(info.shape)
        return self.tracker.track(tensor) if self.tracker is not None else tensor

    def read_into(self, name: str, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Read the flat entries ``start:stop`` of one tensor into ``out`` (a contiguous CPU tensor of at
        least their size in bytes, of any dtype) and return them as a flat tensor of the checkpoint's dtype
        that shares ``out``'s memory.

        No tensor is allocated: the engine reads into buffers it reuses from tensor to tensor, whose pages
        are already mapped (a fresh buffer of a large tensor costs a page fault per 4 KiB on first write,
        more than the read itself). The tracker counts the read in ``loaded``, not as a live tensor."""
        info = self.infos.get(name)
        if info is None:
            raise MergebenchError(f"checkpoint {self.path} has no tensor {name!r}")
        stop = math.prod(info.shape) if stop is None else stop
        nbytes = (stop - start) * _element_size(info)
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() < nbytes:
            raise ValueError(f"read_into needs a contiguous CPU tensor of at least {nbytes} bytes")
        data = out.reshape(-1).view(torch.uint8)[:nbytes]
        self._read(info, data, start)
        if self.tracker is not None:
            self.tracker.loaded += 1
        return data.view(info.torch_dtype)

    def _read(self, info: TensorInfo, data: torch.Tensor, start: int) -> None:
        """Fill the byte tensor ``data`` from tensor ``info``'s bytes, beginning at its entry ``start``."""
        view, descriptor = memoryview(data.numpy()), self._descriptor(info.file)
        offset = self._starts[info.name] + start * _element_size(info)
        while view.nbytes:
            read = os.preadv(descriptor, [view], offset)
            if read <= 0:
                raise MergebenchError(f"safetensors file {self.folder / info.file} ends inside tensor {info.name!r}")
            view, offset = view[read:], offset + read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise KeyError(name)
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _data_starts(path: Path) -> dict[str, int]:
    """Byte offset in the file of each tensor's data (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def open_checkpoint(path: str | os.PathLike, *, tracker: LiveTensorTracker | None = None) -> SafetensorsCheckpoint:
    """Open a safetensors checkpoint (sharded folder, single-file folder or file) without reading tensors."""
    return SafetensorsCheckpoint(path, tracker=tracker)


def check_streaming_compatible(base: SafetensorsCheckpoint, experts: Mapping[str, SafetensorsCheckpoint]) -> None:
    """Raise naming the first tensor whose presence, shape or dtype differs between base and an expert."""
    if not experts:
        raise MergebenchError("no expert checkpoints to merge")
    for task, expert in experts.items():
        for name, info in base.infos.items():
            other = expert.infos.get(name)
            if other is None:
                raise MergebenchError(f"checkpoint for task {task!r} lacks tensor {name!r} of the base model")
            if other.shape != info.shape:
                raise MergebenchError(
                    f"checkpoint for task {task!r}: tensor {name!r} has shape {other.shape}, base has {info.shape}"
                )
            if other.dtype != info.dtype:
                raise MergebenchError(
                    f"checkpoint for task {task!r}: tensor {name!r} has dtype {other.dtype}, base has {info.dtype}"
                )
        extra = [name for name in expert.infos if name not in base.infos]
        if extra:
            raise MergebenchError(f"checkpoint for task {task!r} has tensor {extra[0]!r} that the base model lacks")


# --------------------------------------------------------------------------- writing


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor, its header fixed up front from (name, dtype, shape).

    Tensors must be written in the declared order; :meth:`close` checks that all were written and moves
    the file into place (a killed process leaves only a ``.partial`` file).
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[TensorInfo], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for entry in self.entries:
            header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        self.data_bytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._handle = open(self._partial, "wb")
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise MergebenchError(f"{self.path.name}: tensor {name!r} was not declared")
        entry = self.entries[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or TORCH_TO_SAFETENSORS.get(tensor.dtype) != entry.dtype:
            raise MergebenchError(
                f"{self.path.name}: expected tensor {entry.name!r} {entry.dtype}{list(entry.shape)}, got {name!r} "
                f"{TORCH_TO_SAFETENSORS.get(tensor.dtype, tensor.dtype)}{list(tensor.shape)}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._handle.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self.entries):
            self._partial.unlink(missing_ok=True)
            raise MergebenchError(f"{self.path.name}: {len(self.entries) - self._next} declared tensors were never written")
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._handle.close()
        self._partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- merging


def tensor_seed(seed: int, name: str) -> int:
    """The seed a randomized method gets for tensor ``name`` in a streamed merge (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**31 - 1)


class StatisticAsked(Exception):
    """A method asked a whole-vector statistic that is not known yet; this tensor's part of it is counted."""


class _Total:
    """Σ of every entry over all tensors, in float64 (one round)."""

    def __init__(self) -> None:
        self.sum = torch.zeros((), dtype=torch.float64)
        self.done = False

    def add(self, values: torch.Tensor) -> None:
        self.sum = self.sum.to(values.device) + values.sum(dtype=torch.float64)

    def next_round(self) -> None:
        self.done = True

    def values(self) -> torch.Tensor:
        return self.sum


class _RunningTotals:
    """Per-row Σ of each tensor's entries, recorded tensor by tensor in layout order (one round): the
    sums before each tensor and over all of them."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.done = False

    def add(self, values: torch.Tensor) -> None:
        self.parts.append(row_sums(values))

    def next_round(self) -> None:
        self.done = True

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = torch.stack(self.parts)  # [tensors, R]
        running = parts.cumsum(dim=0)
        return running - parts, running[-1]


class WholeVectorPasses:
    """The answers to a method's whole-vector statistics in a streamed merge, counted pass by pass.

    A method asks its statistics in the same order for every tensor. In a counting pass, the first
    statistic without an answer counts this tensor's part (and :class:`StatisticAsked` stops the method
    there); at the end of the pass, :meth:`end_pass` closes a round of it (an order statistic takes two).
    A pass in which the method asks only answered statistics is the merging pass.
    """

    def __init__(self, entries: int, device: str | torch.device = "cpu") -> None:
        self.entries = entries
        self.device = device
        self.answers: list[Any] = []
        self.counting: RowOrderStatistics | _Total | _RunningTotals | None = None
        self.passes = 0
        self._asked = 0

    def start_tensor(self) -> None:
        self._asked = 0

    def ask(self, make: Callable[[], RowOrderStatistics | _Total | _RunningTotals], values: torch.Tensor) -> Any:
        index, self._asked = self._asked, self._asked + 1
        if index < len(self.answers):
            return self.answers[index]
        if self.counting is None:
            self.counting = make()
        self.counting.add(values)
        raise StatisticAsked

    def end_pass(self) -> None:
        self.passes += 1
        self.counting.next_round()
        if self.counting.done:
            self.answers.append(self.counting.values())
            self.counting = None


class TensorOfTaskVectors(TaskVectors):
    """The task vectors of one tensor whose whole-vector statistics are those of every streamed tensor."""

    def __init__(self, part: TaskVectors, passes: WholeVectorPasses, position: int) -> None:
        super().__init__(part.pretrained, part.vectors, part.layout, part.tasks)
        self.passes = passes
        self.position = position
        """The tensor's index in the streamed layout order (the order of the whole task vector)."""

    @property
    def entries(self) -> int:
        return self.passes.entries

    def order_statistics(self, values: torch.Tensor, ranks: Sequence[int], *, magnitude: bool = False) -> list[torch.Tensor]:
        values = values.abs() if magnitude else values
        return self.passes.ask(lambda: RowOrderStatistics(values.shape[0], ranks, self.passes.device), values)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return self.passes.ask(_Total, values)

    def running_totals(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before, total = self.passes.ask(_RunningTotals, values)
        return before[self.position].unsqueeze(1), total.unsqueeze(1)

    def top_k(self, rows: torch.Tensor, k: int, tie_rule: str = "lowest_index", *, magnitude: bool = False) -> TopK:
        return TopK.of_part(self, rows, k, tie_rule, magnitude=magnitude)


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state.shape(name) if isinstance(state, SafetensorsCheckpoint) else tuple(state[name].shape)


def _element_size(info: TensorInfo) -> int:
    numel = math.prod(info.shape)
    return info.nbytes // numel if numel else 1


def _read(state: Mapping[str, torch.Tensor], name: str, start: int, stop: int) -> torch.Tensor:
    """The flat entries ``start:stop`` of tensor ``name`` (read from disk alone for a checkpoint)."""
    if isinstance(state, SafetensorsCheckpoint):
        return state.get(name, start, stop)
    return state[name].reshape(-1)[start:stop]


class StreamedTaskVectors:
    """τ_t = θ_t − θ₀ of every expert over the tensors ``names``, read one tensor at a time.

    ``base`` and each expert are ``{name: tensor}`` mappings: state dicts, or
    :class:`SafetensorsCheckpoint` objects whose tensors are read on demand. At any moment the engine
    holds one tensor (or one part of it, :meth:`each_tensor`) of the base and of one expert, and the
    ``[T, n]`` task vectors of that tensor or part, so memory is bounded by the largest tensor.
    ``dtype`` is how task vectors are stored: with ``torch.bfloat16`` each τ_t is rounded to bfloat16
    (methods still compute in float32).
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]],
        names: Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if not experts:
            raise MergebenchError("no expert checkpoints to merge")
        self.base = base
        self.experts = dict(experts)
        self.tasks = tuple(self.experts)
        self.dtype = dtype
        self.device = device
        slots, offset = [], 0
        for name in names:
            shape = _shape(base, name)
            numel = math.prod(shape)
            slots.append(TensorSlot(name, shape, offset, offset + numel))
            offset += numel
        self.layout = ParamLayout(tuple(slots))
        self._checked: set[str | tuple[str, int]] = set()  # tensors, or (tensor, first entry) of parts, checked finite
        self.passes_run = 0
        """Reading passes over the checkpoints made by the last :meth:`each_tensor` (counting and merging)."""

    def subset(self, tasks: Iterable[str]) -> "StreamedTaskVectors":
        experts = {task: self.experts[task] for task in tasks}
        return StreamedTaskVectors(self.base, experts, self.layout.names, dtype=self.dtype, device=self.device)

    def tensor(self, slot: TensorSlot, start: int = 0, stop: int | None = None, workspace: "_Workspace | None" = None) -> TaskVectors:
        """The task vectors of one tensor, or of its flat entries ``start:stop``: θ₀ ``[n]`` and
        τ_t = θ_t − θ₀ ``[T, n]`` in float32 (τ rounded through :attr:`dtype`), each checkpoint's entries
        read straight into their row.

        With a ``workspace`` (:meth:`each_tensor`'s), θ₀ and τ are views of its buffers, overwritten by
        the next call; without one they are fresh tensors.

        The first time entries are read, every checkpoint's copy of them is checked for NaN and infinite
        values: τ_t = θ_t − θ₀ is non-finite wherever θ_t or θ₀ is, so one check of the ``[T, n]`` task
        vectors (:func:`all_finite`) clears them all; only when it fails is each checkpoint's copy
        checked, in order (base first), to name the first that holds one."""
        stop = slot.stop - slot.start if stop is None else stop
        numel = stop - start
        workspace = workspace if workspace is not None else _Workspace(len(self.experts), numel, self.device)
        theta0, vectors = workspace.views(numel)
        self._read_flat(self.base, slot.name, theta0, workspace, start, stop)
        for row, expert in enumerate(self.experts.values()):
            self._read_flat(expert, slot.name, vectors[row], workspace, start, stop)
            vectors[row].sub_(theta0)
        if slot.name not in self._checked and (slot.name, start) not in self._checked:
            if not all_finite(vectors):
                for owner, state in {"base": self.base, **self.experts}.items():
                    _require_finite(_read(state, slot.name, start, stop), owner, slot.name)
            self._checked.add((slot.name, start))
        if self.dtype != torch.float32:
            vectors.copy_(vectors.to(self.dtype))
        shape = slot.shape if (start, stop) == (0, slot.stop - slot.start) else (numel,)
        layout = ParamLayout((TensorSlot(slot.name, shape, 0, numel),))
        return TaskVectors(theta0, vectors, layout, self.tasks)

    @staticmethod
    def _read_flat(state: Mapping[str, torch.Tensor], name: str, out: torch.Tensor, workspace: "_Workspace", start: int = 0, stop: int | None = None) -> None:
        """The flat entries ``start:stop`` of tensor ``name`` of ``state`` into the float32 ``out``: a float32
        safetensors tensor is read into ``out`` itself, another dtype (or for another device) through the
        workspace's reusable CPU buffer and converted; a state dict's tensor is copied (and converted)."""
        if isinstance(state, SafetensorsCheckpoint):
            info = state.infos.get(name)
            if info is not None and info.torch_dtype == out.dtype and out.device.type == "cpu":
                state.read_into(name, out, start, stop)
            else:
                nbytes = out.numel() * (_element_size(info) if info is not None else 0)
                out.copy_(state.read_into(name, workspace.raw(nbytes), start, stop))
            return
        out.copy_(state[name].reshape(-1)[start:stop])

    def part_entries(self) -> int:
        """The columns of a tensor handed at once to an entry-wise method: :data:`PART_BYTES` of float32 task vectors."""
        return max(1, PART_BYTES // (4 * len(self.experts)))

    def require_finite(self, sources: Mapping[str, str] | None = None) -> None:
        """Raise naming the first checkpoint and tensor holding NaN or infinite values (reads every tensor once)."""
        sources = dict(sources or {})
        for owner, state in {"pretrained": self.base, **self.experts}.items():
            for slot in self.layout.slots:
                where = f" ({sources[owner]})" if owner in sources else ""
                _require_finite(state[slot.name], f"{owner}{where}" if where else owner, slot.name)
        self._checked.update(slot.name for slot in self.layout.slots)

    def each_tensor(
        self, merge: Callable[[TaskVectors, int], torch.Tensor], seed: int = 0, part_entries: int | None = None
    ) -> Iterator[tuple[TensorSlot, torch.Tensor]]:
        """``(slot, merge(task vectors of the tensor, its seed))`` for every tensor, in layout order.

        With ``part_entries``, ``merge`` is handed each tensor in parts of at most that many consecutive
        flat entries (column blocks of the ``[T, n]`` task vectors), which an entry-wise method merges as
        it would the whole tensor (:attr:`~mergebench.methods.registry.MergeMethod.entrywise`); the
        parts' results are put together into the tensor's. Whole-vector statistics the method asks for
        are counted first, in passes over every part (:class:`WholeVectorPasses`); the tensors are then
        merged in one more pass. Every part's task vectors are read into the same buffers
        (:class:`_Workspace`), so ``merge`` must not keep them past its call; a result that shares their
        memory is copied before it is kept.
        """
        passes = WholeVectorPasses(self.layout.numel, self.device)
        largest = max((slot.stop - slot.start for slot in self.layout.slots), default=0)
        workspace = _Workspace(len(self.experts), largest if part_entries is None else min(largest, part_entries), self.device)
        while True:
            merging, position = None, 0
            for slot in self.layout.slots:
                numel = slot.stop - slot.start
                width = numel if part_entries is None or numel == 0 else part_entries
                merged = None
                for start in range(0, max(numel, 1), max(width, 1)):
                    passes.start_tensor()
                    part = TensorOfTaskVectors(self.tensor(slot, start, min(start + width, numel), workspace), passes, position)
                    position += 1
                    try:
                        result = workspace.detached(merge(part, tensor_seed(seed, slot.name)))
                    except StatisticAsked:
                        result = None
                    del part  # before the next part is read
                    if result is None:
                        if merging:
                            raise MergebenchError(f"the method asked a whole-vector statistic at tensor {slot.name!r} that earlier tensors did not ask") from None
                        merging = False
                        continue
                    if merging is False:
                        raise MergebenchError(f"the method asked fewer whole-vector statistics at tensor {slot.name!r} than at earlier tensors")
                    if merging is None:
                        self.passes_run = passes.passes + 1
                    merging = True
                    if result.shape[-1] == numel:
                        merged = result
                    else:  # the parts' results side by side along their last axis
                        if merged is None:
                            merged = torch.empty((*result.shape[:-1], numel), dtype=result.dtype, device=result.device)
                        merged[..., start : start + result.shape[-1]] = result
                    del result
                if merging:
                    yield slot, merged
            if merging is not False:
                return
            passes.end_pass()

    def merged_vector(self, method, setting: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
        """τ_m of ``method`` at ``setting`` over every tensor, ``[N]`` (without λ), merged tensor by tensor
        (in column blocks where the method merges entry-wise at ``setting``)."""
        merged = torch.empty(self.layout.numel, device=self.device)
        parts = self.part_entries() if method.merges_entrywise(setting) else None
        for slot, part in self.each_tensor(lambda part, tensor_seed: method.merged_vector(part, setting, seed=tensor_seed), seed, parts):
            merged[slot.start : slot.stop] = part
        return merged

    def pretrained(self) -> torch.Tensor:
        """θ₀ flattened over every tensor, ``[N]`` float32."""
        flat = torch.empty(self.layout.numel, device=self.device)
        workspace = _Workspace(0, 0, self.device)
        for slot in self.layout.slots:
            self._read_flat(self.base, slot.name, flat[slot.start : slot.stop], workspace)
        return flat


class _Workspace:
    """The buffers :meth:`StreamedTaskVectors.each_tensor` reads every part's θ₀ and τ into, reused from
    part to part: one float32 block of (T + 1) × the largest part's entries, and a byte buffer for
    tensors that need a conversion (another dtype, another device). Reused buffers keep their pages
    mapped; a fresh tensor per read pays a page fault per 4 KiB of it on first write, which costs more
    than reading the bytes from the page cache."""

    def __init__(self, rows: int, numel: int, device: str | torch.device) -> None:
        self.rows, self.device = rows, device
        self.flat = torch.empty((rows + 1) * numel, device=device)
        self._raw = torch.empty(0, dtype=torch.uint8)

    def views(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """θ₀ ``[numel]`` and τ ``[T, numel]``, views of the float32 block (grown if too small)."""
        needed = (self.rows + 1) * numel
        if self.flat.numel() < needed:
            self.flat = torch.empty(needed, device=self.device)
        return self.flat[:numel], self.flat[numel:needed].view(self.rows, numel)

    def raw(self, nbytes: int) -> torch.Tensor:
        """A CPU byte buffer of at least ``nbytes``."""
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw

    def detached(self, result: Any) -> Any:
        """``result``, copied if it shares the float32 block's memory (a method that returned θ₀ or a row
        of τ), so that reading the next part does not overwrite it."""
        if isinstance(result, torch.Tensor) and self.flat.numel() and result.untyped_storage().data_ptr() == self.flat.untyped_storage().data_ptr():
            return result.clone()
        return result


@dataclass
class StreamMergeReport:
    """What a streamed merge did."""

    out_dir: Path
    method: str
    setting: dict[str, Any]
    tensors_merged: int
    tensors_copied: int
    files: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    passes: int = 1
    """Reading passes over the checkpoints: one per round of whole-vector statistics, then the merge."""


def streaming_support(method) -> str | None:
    """None if ``method`` can be merged tensor by tensor, else why not."""
    return None if method.tensorwise else f"method {method.name} {REFUSED_REASON}"


def stream_merge(
    base: str | os.PathLike,
    experts: Mapping[str, str | os.PathLike],
    method,
    out_dir: str | os.PathLike,
    setting: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    exclude: Iterable[str] = (),
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    copy_files: bool = True,
    tracker: LiveTensorTracker | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
    tv_dtype: torch.dtype = torch.float32,
) -> StreamMergeReport:
    """Merge ``experts`` (task name -> checkpoint) onto ``base`` with ``method``, tensor by tensor, into ``out_dir``.

    ``method`` is a registered :class:`~mergebench.methods.registry.MergeMethod`; ``setting`` overrides its
    defaults (checked as on the command line). ``on_tensor(i, n, name)`` is called after
    each tensor is written. ``tv_dtype`` is the storage dtype of the task vectors
    (:class:`StreamedTaskVectors`). Returns a :class:`StreamMergeReport`; its ``notes`` say where the
    method's statistics became per-tensor.
    """
    refused = streaming_support(method)
    if refused:
        raise MergebenchError(refused)
    full_setting = method.defaults() | method.check_overrides(dict(setting or {}))
    notes = _notes(method.name)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MergebenchError(f"output folder {out_dir} is not empty (pass overwrite=True to replace it)")
    excluded = set(exclude)

    started = time.perf_counter()
    base_ckpt = open_checkpoint(base, tracker=tracker)
    expert_ckpts = {task: open_checkpoint(path, tracker=tracker) for task, path in experts.items()}
    check_streaming_compatible(base_ckpt, expert_ckpts)
    unknown = sorted(excluded - set(base_ckpt.infos))
    if unknown:
        raise MergebenchError(f"excluded tensor {unknown[0]!r} is not in the base checkpoint")

    order = [base_ckpt.infos[name] for file in base_ckpt.files for name in sorted(base_ckpt.names_in(file))]
    mergeable = {info.name for info in order if info.torch_dtype.is_floating_point and info.name not in excluded}
    streamed = StreamedTaskVectors(base_ckpt, expert_ckpts, [info.name for info in order if info.name in mergeable], dtype=tv_dtype, device=device)
    total = len(order)
    done = 0
    try:
        parts = streamed.part_entries() if method.merges_entrywise(full_setting) else None
        merged_tensors = streamed.each_tensor(lambda part, tensor_seed: method.merge(part, full_setting, seed=tensor_seed), seed, parts)
        with atomic_folder(out_dir) as partial:
            for file in base_ckpt.files:
                entries = [base_ckpt.infos[name] for name in sorted(base_ckpt.names_in(file))]
                writer = SafetensorsStreamWriter(partial / file, entries)
                try:
                    for entry in entries:
                        if entry.name in mergeable:
                            _, flat = next(merged_tensors)
                            if not all_finite(flat):
                                raise MergebenchError(f"method {method.name} produced NaN or infinite values in {entry.name!r}")
                            tensor = flat.reshape(entry.shape).to(device="cpu", dtype=entry.torch_dtype)
                            del flat
                        else:
                            tensor = base_ckpt.get(entry.name)
                        writer.write(entry.name, tensor)
                        del tensor
                        done += 1
                        if on_tensor is not None:
                            on_tensor(done, total, entry.name)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
            if base_ckpt.sharded:
                metadata = dict(base_ckpt.index_metadata or {})
                metadata["total_size"] = sum(info.nbytes for info in base_ckpt.infos.values())
                weight_map = {name: info.file for name, info in sorted(base_ckpt.infos.items())}
                (partial / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
            if copy_files and base_ckpt.path.is_dir():
                _copy_side_files(base_ckpt.folder, partial)
    finally:
        base_ckpt.close()
        for checkpoint in expert_ckpts.values():
            checkpoint.close()
    files = list(base_ckpt.files) + ([INDEX_FILE] if base_ckpt.sharded else [])
    return StreamMergeReport(
        out_dir, method.name, full_setting, len(mergeable), total - len(mergeable), files, notes,
        time.perf_counter() - started, streamed.passes_run,
    )


def _require_finite(tensor: torch.Tensor, owner: str, name: str) -> None:
    if not all_finite(tensor):
        raise MergebenchError(f"checkpoint {owner!r} has NaN or infinite values in {name!r}")


def _notes(name: str) -> list[str]:
    return [PER_TENSOR_NOTES[name]] if name in PER_TENSOR_NOTES else []


def _copy_side_files(source: Path, target: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != INDEX_FILE and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".partial"):
            shutil.copy2(path, target / path.name)

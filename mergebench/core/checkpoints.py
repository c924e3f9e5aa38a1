"""Reading, writing, hashing and checking checkpoints stored as state dicts.

Safetensors is the preferred format. ``.pt``/``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)``, so no arbitrary Python object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mergebench.errors import MergebenchError

StateDict = dict[str, torch.Tensor]

_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Load a checkpoint file as a flat ``{name: tensor}`` dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise MergebenchError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif path.suffix in _PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise MergebenchError(
                f"unsupported checkpoint format {path.suffix!r} for {path}: "
                "use .safetensors, .pt, .pth or .bin"
            )
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergebenchError(f"cannot read checkpoint {path}: {first_line}") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MergebenchError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(state)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` as safetensors atomically (a killed process never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({name: t.detach().contiguous().cpu() for name, t in state.items()}, str(partial))
    os.replace(partial, path)
    return path


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, the identity recorded with every result."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (no NaN, no ±inf), exactly.

    One sum first: a NaN or an infinity among the entries makes any sum of them NaN or infinite (no
    addition turns them finite again: inf − inf is NaN), so a finite sum proves every entry finite, at
    the cost of one reading pass and no temporary (``torch.isfinite(t).all()`` writes a boolean tensor
    and reads it again, about 25 times slower on a large tensor). Only when the sum is not finite (a
    non-finite entry, or finite entries whose sum overflows) are the entries themselves checked.
    Half-precision tensors are summed in float32, which keeps their overflow out of the sum."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_compatible(pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise naming the first key whose presence, shape or dtype differs from the pretrained model."""
    for task, state in finetuned.items():
        missing = [name for name in pretrained if name not in state]
        if missing:
            raise MergebenchError(f"checkpoint for task {task!r} lacks key {missing[0]!r} of the pretrained model")
        extra = [name for name in state if name not in pretrained]
        if extra:
            raise MergebenchError(f"checkpoint for task {task!r} has key {extra[0]!r} that the pretrained model lacks")
        for name, reference in pretrained.items():
            tensor = state[name]
            if tensor.shape != reference.shape:
                raise MergebenchError(
                    f"checkpoint for task {task!r}: key {name!r} has shape {tuple(tensor.shape)}, "
                    f"pretrained has {tuple(reference.shape)}"
                )
            if tensor.dtype != reference.dtype:
                raise MergebenchError(
                    f"checkpoint for task {task!r}: key {name!r} has dtype {tensor.dtype}, pretrained has {reference.dtype}"
                )


Header = dict[str, tuple[tuple[int, ...], str]]
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def safetensors_header(path: str | os.PathLike) -> Header:
    """``{name: (shape, dtype)}`` of a safetensors file, read from its header alone (no weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            return {name: (tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())) for name, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise MergebenchError(f"checkpoint {path} is not a readable safetensors file ({error})") from None


def check_header(reference: Header, header: Header, what: str) -> None:
    """Raise naming the first tensor whose presence, shape or dtype differs from ``reference``."""
    missing = [name for name in reference if name not in header]
    if missing:
        raise MergebenchError(f"{what} lacks tensor {missing[0]!r} of the pretrained model")
    extra = [name for name in header if name not in reference]
    if extra:
        raise MergebenchError(f"{what} has tensor {extra[0]!r} that the pretrained model lacks")
    for name, (shape, dtype) in reference.items():
        if header[name] != (shape, dtype):
            raise MergebenchError(f"{what}: tensor {name!r} is {header[name][1]} {list(header[name][0])}, the pretrained model's {dtype} {list(shape)}")


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` that replaces it when the block succeeds and is removed if it fails.

    A killed process leaves only a ``<name>.*.partial`` folder, never a half-written ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".partial", dir=out_dir.parent))
    partial.chmod(0o755)
    try:
        yield partial
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def cache_directory(override: str | Path | None = None) -> Path:
    """``override``, else ``$MERGEBENCH_CACHE``, else ``~/.cache/mergebench``."""
    if override:
        return Path(override)
    return Path(os.environ.get("MERGEBENCH_CACHE", Path.home() / ".cache" / "mergebench"))

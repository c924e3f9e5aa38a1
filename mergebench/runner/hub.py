"""Published checkpoints and datasets: Hugging Face Hub repositories, their cache, and local copies.

Shared by the suite kinds whose experts and data are published (``clip``, ``glue``). Checkpoints are
fetched with ``huggingface_hub.snapshot_download`` (config, tokenizer and preprocessing files and
``*.safetensors``; ``*.bin`` only where a repository has no safetensors) into the Hugging Face cache;
with ``HF_HUB_OFFLINE=1`` only the cache is read. A checkpoint's recorded hash is the sha256 of its
weight file (several: of their ``name:sha256`` lines); files in the Hugging Face cache are named by
their sha256 (Git LFS blobs), which is taken without re-reading. A task's dataset is
``<data>/<task>`` (``--data``, default ``$MERGEBENCH_DATA``) when that ``DatasetDict.save_to_disk``
folder exists, else ``datasets.load_dataset(dataset, config, split=...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from mergebench.core.checkpoints import file_sha256
from mergebench.errors import MergebenchError
from mergebench.runner.kinds import KindOption

HUB_FILES = ["*.json", "*.txt", "*.safetensors"]
DATA_ENV = "MERGEBENCH_DATA"

CHECKPOINTS = KindOption(
    "checkpoints",
    "'hub' (default: the suite file's Hugging Face ids, via the HF cache) or a folder: Hub-style folders named like "
    "the repositories (PATH/clip-vit-base-patch32_dtd), or for CLIP suites tall_masks open_clip files "
    "(PATH/ViT-B-32/<Task>Val/nonlinear_finetuned.pt)",
    {"metavar": "PATH|hub"},
)
ALLOW_PICKLE = KindOption(
    "allow_pickle", "unpickle tall_masks .pt files that hold whole modules (runs their code) once, converting each to .safetensors beside it",
    {"action": "store_true"},
)
DATA = KindOption(
    "data",
    f"folder of local datasets, <data>/<Task> saved by DatasetDict.save_to_disk (default: ${DATA_ENV}; tasks "
    "without one load the suite file's Hub dataset)",
    {"type": Path},
)


def repo_name(repo_id: str) -> str:
    """The folder name of a Hub repository under ``--checkpoints PATH``: ``tanganke/x`` → ``x``."""
    return repo_id.rsplit("/", 1)[-1]


def hub_download_hint(repo_id: str, root: Path | None) -> str:
    from huggingface_hub import constants

    if root is not None:
        return f"hf download {repo_id} --local-dir {root / repo_name(repo_id)}"
    return f"hf download {repo_id} (into the Hugging Face cache {constants.HF_HUB_CACHE})"


def hub_cached(repo_id: str, subfolder: str | None = None) -> Path | None:
    """The cached snapshot folder of a Hub model (``subfolder`` of it) if its ``config.json`` is cached (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, f"{subfolder}/config.json" if subfolder else "config.json")
    except ValueError:  # not a valid repository id
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_folder(repo_id: str, what: str, root: Path | None, subfolder: str | None = None) -> Path:
    """A Hub model's snapshot folder (``subfolder`` of it), downloaded if needed; one-line error when neither cache nor Hub has it."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[prefix + pattern for pattern in HUB_FILES])) / (subfolder or "")
        if not any(folder.glob("*.safetensors")):
            patterns = [prefix + pattern for pattern in HUB_FILES + ["*.bin"]]
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns)) / (subfolder or "")
    except (OSError, ValueError) as error:
        where = f" nor in {root}" if root is not None else ""
        raise MergebenchError(
            f"{what} {repo_id}{'/' + subfolder if subfolder else ''} is not in the Hugging Face cache{where} and could "
            f"not be fetched ({type(error).__name__}): {hub_download_hint(repo_id, root)}"
        ) from None
    weight_files(folder, f"{what} {repo_id}")
    return folder


def weight_files(folder: Path, what: str) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise MergebenchError(f"{folder} holds no *.safetensors or *.bin weights of {what}: download them (hf download)")
    return files


_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a file; a Hugging Face cache blob is named by it already (Git LFS)."""
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and _SHA256_NAME.fullmatch(resolved.name):
        return resolved.name
    return file_sha256(resolved)


def folder_sha256(folder: Path, what: str) -> str:
    """sha256 of a model folder's weight files: the file's own, or that of the ``name:sha256`` lines of several."""
    files = weight_files(folder, what)
    if len(files) == 1:
        return checkpoint_sha256(files[0])
    lines = "".join(f"{path.name}:{checkpoint_sha256(path)}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def data_root(data: str | os.PathLike | None) -> Path | None:
    given = data or os.environ.get(DATA_ENV)
    return Path(given) if given else None


class TaskDataSource:
    """One task's dataset: a local ``save_to_disk`` folder or a Hub id through ``datasets.load_dataset``.

    ``task`` has a ``name``, a Hub ``dataset`` id (or a folder ``load_dataset`` reads), a ``config`` (or
    None) and the ``columns`` it reads.
    """

    def __init__(self, task, root: Path | None):
        self.task = task
        self.root = root
        candidate = root / task.name if root is not None else None
        self.folder = candidate if candidate is not None and candidate.is_dir() else None

    def describe(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return self.task.dataset + (f" ({self.task.config})" if self.task.config else "")

    def fingerprint(self, split: str) -> str | None:
        """A local split's ``datasets`` fingerprint (``state.json``), part of the cache key."""
        if self.folder is None:
            return None
        try:
            return json.loads((self.folder / split / "state.json").read_text()).get("_fingerprint")
        except (OSError, ValueError):
            return None

    def missing_hint(self) -> str:
        where = f"{self.root / self.task.name}" if self.root is not None else f"${DATA_ENV}/{self.task.name}"
        return f"hf download --repo-type dataset {self.task.dataset}, or a DatasetDict.save_to_disk folder at {where}"

    def status(self) -> tuple[str, str | None]:
        """``(status, how to get it)`` of the task's dataset on this machine (no network)."""
        if self.folder is not None:
            return f"data local ({self.folder})", None
        if Path(self.task.dataset).is_dir():  # a local dataset folder that load_dataset reads
            return f"data local ({self.task.dataset})", None
        import datasets
        from huggingface_hub import constants

        org_name = self.task.dataset.split("/")
        if (Path(datasets.config.HF_DATASETS_CACHE) / "___".join(org_name)).is_dir() or (
            Path(constants.HF_HUB_CACHE) / ("datasets--" + "--".join(org_name))
        ).is_dir():
            return "data in the Hugging Face cache", None
        return "data missing", self.missing_hint()

    def open(self, split: str):
        """The ``datasets.Dataset`` of one split, its columns checked."""
        import datasets

        task = self.task
        if self.folder is not None:
            try:
                loaded = datasets.load_from_disk(str(self.folder))
            except (OSError, ValueError) as error:
                raise MergebenchError(f"cannot read the dataset folder {self.folder} of task {task.name}: {error}") from None
            if not isinstance(loaded, datasets.DatasetDict) or split not in loaded:
                raise MergebenchError(f"{self.folder} must be a DatasetDict.save_to_disk folder with split {split!r} (task {task.name})")
            dataset = loaded[split]
        else:
            try:
                dataset = datasets.load_dataset(task.dataset, task.config, split=split)
            except (OSError, ValueError) as error:  # ConnectionError, DatasetNotFoundError, unknown split
                raise MergebenchError(
                    f"dataset {self.describe()} split {split!r} of task {task.name} is not available "
                    f"({type(error).__name__}): {self.missing_hint()}"
                ) from None
        for column in task.columns:
            if column not in dataset.column_names:
                raise MergebenchError(f"dataset {self.describe()} of task {task.name} has no column {column!r} (columns: {dataset.column_names})")
        return dataset

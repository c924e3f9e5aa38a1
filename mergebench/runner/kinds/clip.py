"""``kind: clip``: suites of published CLIP experts (vit-8/14/20 in ``tasks/vit.yaml``).

Kind-specific keys of a suite file
    ``models.<name>``: ``hf`` (the base CLIP on the Hub), ``open_clip`` (the open_clip model name),
    ``finetuned_hub_prefix`` (FusionBench's experts ``<prefix>_<fusion_bench slug>``). ``tasks[i]``:
    ``dataset`` (Hub id), ``config``, ``splits: {train, test}``, ``columns: {image, label}``,
    ``fusion_bench`` (the slug, or null where FusionBench publishes no expert), ``validation_split`` (the
    dataset's own validation split; absent: carved from train by the file's ``validation`` policy), and
    ``classnames`` / ``templates`` (lists) unless the file's top-level ``classnames`` / ``templates``
    mappings (``tasks/_vit-classes.yaml``, included by ``vit.yaml``) name them for the task.
    ``open_clip_checkpoints: {finetuned, zeroshot}``: path patterns of tall_masks' files.

What is merged
    Only the vision encoder (pixels → L2-normalized projected image embedding); every task keeps its
    frozen zero-shot head. The backbone is a :class:`~mergebench.models.clip.ClipImageEncoder` (transformers
    keys) for FusionBench's experts, an :class:`~mergebench.models.clip.OpenClipImageEncoder` (open_clip's
    ``visual.*`` keys, built by open_clip from the model's ``open_clip`` architecture name) for tall_masks'.

    * Hub-style experts (FusionBench ``tanganke/clip-vit-*_<task>``) are ``CLIPVisionModel`` folders, the
      vision tower alone. FusionBench merges that ``CLIPVisionModel`` and scores every model with the
      pre-trained CLIP's ``visual_projection``; so here every state dict holds the pre-trained projection
      and ``visual_projection.weight`` is left out of the task vectors (``PreparedSuite.buffers``).
    * tall_masks open_clip experts fine-tune the whole open_clip ``visual`` tower, projection
      (``visual.proj``) included: every key, projection included, is merged.

Checkpoints (``checkpoints=``, the command line's ``--checkpoints``)
    * ``None`` or ``"hub"``: the suite file's Hub ids, base ``models.<model>.hf`` (e.g.
      ``openai/clip-vit-base-patch32``) and experts ``<finetuned_hub_prefix>_<fusion_bench slug>``.
      Each is fetched with ``huggingface_hub.snapshot_download`` (config, tokenizer and preprocessing
      files and ``*.safetensors``; ``*.bin`` only where a repository has no safetensors) into the
      Hugging Face cache; with ``HF_HUB_OFFLINE=1`` only the cache is read.
    * ``PATH`` holding ``PATH/<open_clip model>/`` (e.g. ``PATH/ViT-B-32/``): the tall_masks layout of the
      suite file's ``open_clip_checkpoints`` (``PATH/ViT-B-32/DTDVal/nonlinear_finetuned.pt``). The
      pre-trained weights are the first task's ``nonlinear_zeroshot.pt`` (tall_masks saves the same
      model in every task folder). open_clip (the ``[clip]`` extra) builds the architecture
      (``models.<model>.open_clip``, e.g. ``ViT-B-32``) as tall_masks does, and each file's ``visual.*``
      tensors must fit it exactly. Each ``.pt`` is read from ``<stem>.safetensors`` beside it when that
      exists, else as a plain state dict (``weights_only``; what tall_masks' ``ImageEncoder.save``
      writes). A file holding a whole pickled module is unpickled (unpickling runs code) only with
      ``allow_pickle=True`` (``--allow-pickle``), once, and written beside it as ``<stem>.safetensors`` by
      :func:`mergebench.models.clip.convert_open_clip_checkpoint`, which later runs read instead.
      The text encoder, tokenizer and preprocessing come from the Hugging Face base model (``PATH/<base
      repo name>`` if present, else the Hub id): OpenAI's CLIP weights, the ones open_clip's ``openai``
      pretrained tag loads.
    * any other ``PATH``: Hub-style folders named like the repositories, ``PATH/clip-vit-base-patch32``
      (base; the Hub id when the folder is absent) and ``PATH/clip-vit-base-patch32_stanford-cars``.

    Recorded checkpoint hashes: the sha256 of each file read; for a folder, of its ``*.safetensors``
    (``*.bin`` if none) — one file's own hash, or the hash of the ``name:sha256`` lines of several. Files in
    the Hugging Face cache are named by their sha256 (Git LFS blobs), which is taken without re-reading.

Heads
    A bias-free ``nn.Linear`` per task from the pre-trained text encoder, the task's CLIP class names and
    templates (the suite file's ``classnames`` and ``templates``), :func:`~mergebench.models.clip.zero_shot_head`:
    normalized, averaged over templates, scaled by ``exp(logit_scale)``. Built once per (model, task) and
    cached as ``<cache>/heads/<model>/<task>-<key>.safetensors``; the key hashes the text encoder's
    checkpoint hash, the class names and the templates.

Data (``data=``, ``--data``, default ``$MERGEBENCH_DATA``)
    A task reads ``<data>/<Task>`` (e.g. ``$MERGEBENCH_DATA/DTD``) when that folder exists: a
    ``DatasetDict.save_to_disk`` folder holding the task's split names. Otherwise
    ``datasets.load_dataset(dataset, config, split=...)`` with the suite file's Hub id (the datasets cache
    only, under ``HF_DATASETS_OFFLINE=1``). Validation is carved from the train split as
    :class:`~mergebench.suites.published.ValidationPolicy` says (tall_masks: ``min(int(0.1·n), 5000)``
    examples, ``torch.utils.data.random_split`` with ``Generator().manual_seed(0)``), unless a task
    names its own validation split. Each validation and test split is decoded, resized and
    center-cropped once, exactly as the base model's ``preprocessor_config.json`` says, and cached as
    ``uint8`` in ``<cache>/data/<preprocess key>/<task>-<split>-<key>.safetensors`` (tensors ``inputs``
    ``[N, 3, H, W]`` and ``labels``; 150 KB per 224-px image); rescaling and normalization run on the
    device inside the backbone, so evaluating a merged model is forward passes only. The key hashes the
    dataset id, config, split, columns, validation policy and, for a local folder, its fingerprint.
    Training data (data-using methods) is the train split minus the carved validation, in the order of
    the same seeded permutation, decoded on first use as far as a method reads into it.

Device
    On CUDA the suite's ``eval_batch_size`` under bf16 autocast (``correct_examples``); on the CPU the same
    code in float32 with batches of at most :data:`CPU_EVAL_BATCH`.
"""


from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.core.checkpoints import StateDict, file_sha256, load_state_dict, save_state_dict
from mergebench.errors import MergebenchError
from mergebench.models.clip import (
    OPEN_CLIP_EXTRA,
    ClipImageEncoder,
    OpenClipImageEncoder,
    convert_open_clip_checkpoint,
    import_open_clip,
    load_vision_tower_state,
    make_resize_crop,
    open_clip_visual,
    open_clip_visual_state,
    read_image_processor_config,
    vision_encoder_of,
    zero_shot_head,
)
from mergebench.runner.hub import (
    ALLOW_PICKLE,
    CHECKPOINTS,
    DATA,
    TaskDataSource,
    checkpoint_sha256,
    data_root,
    folder_sha256,
    hub_cached,
    hub_download_hint,
    hub_folder,
    repo_name,
)
from mergebench.runner.evaluators import InMemoryEvaluator
from mergebench.runner.kinds import TV_DTYPE, Kind, TaskStatus, register_kind
from mergebench.runner.prepared import LazyInputs, PreparedSuite, TaskData
from mergebench.store.database import content_key
from mergebench.suites.schema import Fields, SuiteBase, SuiteDocument, ValidationPolicy

HUB = "hub"
FAMILIES = {"hub": "fusion_bench", "folders": "fusion_bench", "open_clip": "tall_masks"}
"""The checkpoint family each layout of ``--checkpoints`` holds."""
PROJECTION = "visual_projection.weight"
CPU_EVAL_BATCH = 64
DECODE_CHUNK = 64

TRAIN_FRACTION = "train_fraction"


@dataclass(frozen=True)
class ClipModelSpec:
    name: str
    hf: str
    open_clip: str
    finetuned_hub_prefix: str


@dataclass(frozen=True)
class ClipTaskSpec:
    name: str
    fusion_bench: str | None
    dataset: str
    config: str | None
    train_split: str
    test_split: str
    validation: str
    """``train_fraction`` or the name of the dataset's own validation split."""
    image_column: str
    label_column: str
    classnames: tuple[str, ...] = field(default=(), repr=False)
    """Class names in label order (left out of the repr, and so of result keys: the heads' hashes carry them)."""
    templates: tuple[str, ...] = field(default=(), repr=False)
    """Zero-shot prompt templates, each with one ``{c}`` placeholder."""

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.image_column, self.label_column)


@dataclass(frozen=True)
class ClipSuite(SuiteBase):
    name: str
    family: str
    tasks: tuple[ClipTaskSpec, ...]
    models: Mapping[str, ClipModelSpec]
    model_default: str
    validation: ValidationPolicy
    open_clip_finetuned: str
    open_clip_zeroshot: str
    eval_batch_size: int
    source_file: Path
    kind: str = "clip"

    def context(self) -> tuple:
        """What evaluation data and heads depend on, besides tasks, model and checkpoints."""
        return (self.validation,)

    def describe(self) -> dict[str, Any]:
        """The suite's settings as recorded with every result."""
        return {
            "datasets": {t.name: [t.dataset, t.config, t.train_split, t.test_split, t.validation] for t in self.tasks},
            "validation": self.validation.__dict__, "suite_file": self.source_file.name,
        }

    def finetuned_hub_id(self, model: str, task: ClipTaskSpec) -> str:
        """FusionBench's fine-tuned vision encoder, e.g. ``tanganke/clip-vit-base-patch32_stanford-cars``."""
        if task.fusion_bench is None:
            raise MergebenchError(f"FusionBench publishes no fine-tuned encoder for task {task.name}")
        return f"{self.model(model).finetuned_hub_prefix}_{task.fusion_bench}"

    def open_clip_paths(self, root: str | Path, model: str, task: ClipTaskSpec) -> tuple[Path, Path]:
        """``(finetuned, zeroshot)`` files of a tall_masks checkpoint folder."""
        fields = {"root": str(root), "model": self.model(model).open_clip, "task": task.name, "task_val": task.name + "Val"}
        return Path(self.open_clip_finetuned.format(**fields)), Path(self.open_clip_zeroshot.format(**fields))


# ----------------------------------------------------------------------------------------- sources


class CheckpointSource:
    """Where the checkpoints of one suite and model come from (see the module docstring)."""

    def __init__(self, suite: ClipSuite, model: str, checkpoints: str | os.PathLike | None, allow_pickle: bool = False):
        self.suite = suite
        self.model = model
        self.spec = suite.model(model)
        self.allow_pickle = allow_pickle
        self.root = None if checkpoints is None or str(checkpoints) == HUB else Path(checkpoints)
        if self.root is None:
            self.layout = "hub"
        elif (self.root / self.spec.open_clip).is_dir():
            self.layout = "open_clip"
        else:
            self.layout = "folders"

    def require_root(self) -> None:
        if self.root is not None and not self.root.is_dir():
            raise MergebenchError(f"--checkpoints {self.root}: no such folder (or pass --checkpoints hub)")

    # base model: text encoder, tokenizer, preprocessing (and the pre-trained vision weights unless open_clip)

    def base_local(self) -> Path | None:
        folder = self.root / repo_name(self.spec.hf) if self.root is not None else None
        return folder if folder is not None and folder.is_dir() else None

    def base_folder(self) -> Path:
        return self.base_local() or hub_folder(self.spec.hf, "pre-trained CLIP", self.root)

    def base_status(self) -> TaskStatus:
        local = self.base_local()
        if local is not None:
            return TaskStatus("pretrained", str(local), "ready")
        cached = hub_cached(self.spec.hf)
        if cached is not None:
            return TaskStatus("pretrained", self.spec.hf, f"ready (Hugging Face cache {cached})")
        return TaskStatus("pretrained", self.spec.hf, "missing", hub_download_hint(self.spec.hf, self.root))

    # experts

    def expert_repo(self, task: ClipTaskSpec) -> str:
        try:
            return self.suite.finetuned_hub_id(self.model, task)
        except MergebenchError as error:
            raise MergebenchError(f"{error}; pass --checkpoints PATH with tall_masks open_clip files instead") from None

    def expert_folder(self, task: ClipTaskSpec) -> Path:
        """A Hub-style expert's local folder (downloaded into the Hugging Face cache in the ``hub`` layout)."""
        repo = self.expert_repo(task)
        if self.layout == "hub":
            return hub_folder(repo, f"fine-tuned encoder for task {task.name}", None)
        folder = self.root / repo_name(repo)
        if not (folder / "config.json").is_file():
            raise MergebenchError(
                f"fine-tuned encoder for task {task.name} not found: expected a save_pretrained folder {folder} "
                f"(`hf download {repo} --local-dir {folder}`)"
            )
        return folder

    def open_clip_files(self, task: ClipTaskSpec) -> tuple[Path, Path]:
        return self.suite.open_clip_paths(self.root, self.model, task)

    def zeroshot_file(self) -> Path:
        """The first task's ``nonlinear_zeroshot.pt`` that is present (all hold the same pre-trained model)."""
        candidates = [self.open_clip_files(task)[1] for task in self.suite.tasks]
        present = [path for path in candidates if path.is_file() or path.with_suffix(".safetensors").is_file()]
        return (present or candidates)[0]

    def expert_status(self, task: ClipTaskSpec) -> tuple[str, str | None]:
        """``(status, how to get it)`` of a task's fine-tuned encoder."""
        if self.layout == "open_clip":
            return open_clip_file_status(self.open_clip_files(task)[0], self.allow_pickle)
        try:
            repo = self.expert_repo(task)
        except MergebenchError:
            return "encoder missing", "FusionBench publishes no encoder for this task: use tall_masks open_clip files (--checkpoints PATH)"
        if self.layout == "folders":
            folder = self.root / repo_name(repo)
            if (folder / "config.json").is_file():
                return f"encoder ready ({folder})", None
            return "encoder missing", hub_download_hint(repo, self.root)
        return ("encoder ready (Hugging Face cache)", None) if hub_cached(repo) else ("encoder missing", hub_download_hint(repo, None))


def open_clip_file_status(path: Path, allow_pickle: bool) -> tuple[str, str | None]:
    converted = path.with_suffix(".safetensors")
    if converted.is_file():
        return f"encoder ready ({converted})", None
    if path.is_file():
        how = "converted on first run if pickled" if allow_pickle else "if it is a pickled module, pass --allow-pickle once to convert it"
        return f"encoder present ({path}; {how})", None
    return f"encoder missing ({path})", f"tall_masks download_checkpoints.py into {path.parents[2]}"


def read_open_clip_file(path: Path, allow_pickle: bool) -> tuple[StateDict, Path]:
    """The open_clip state of a tall_masks ``.pt`` and the file it was read from (see module docstring)."""
    converted = path.with_suffix(".safetensors")
    if converted.is_file():
        return load_state_dict(converted), converted
    if not path.is_file():
        raise MergebenchError(f"open_clip checkpoint not found: {path} (download the tall_masks checkpoints into {path.parents[2]})")
    try:
        return load_state_dict(path), path
    except MergebenchError:
        if not allow_pickle:
            raise MergebenchError(
                f"{path} is not a plain state dict but a pickled module (unpickling runs code): pass "
                f"--allow-pickle to convert it once to {converted.name} beside it, or convert it with "
                "mergebench.models.clip.convert_open_clip_checkpoint(src, dst, allow_pickle=True)"
            ) from None
    try:
        convert_open_clip_checkpoint(path, converted, allow_pickle=True)
    except OSError as error:
        raise MergebenchError(f"cannot write {converted} beside {path.name} ({error}): convert it elsewhere and copy it there") from None
    return load_state_dict(converted), converted


def read_visual(path: Path, allow_pickle: bool) -> tuple[StateDict, Path]:
    """The image tower's tensors (``visual.*``) of a tall_masks file and the file they were read from."""
    state, read = read_open_clip_file(path, allow_pickle)
    try:
        return open_clip_visual_state(state), read
    except MergebenchError as error:
        raise MergebenchError(f"{read}: {error}") from None


# -------------------------------------------------------------------------------------------- data


def carve_validation(train_examples: int, policy) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices as tall_masks' ``split_train_into_train_val`` draws them."""
    validation = policy.size(train_examples)
    train = train_examples - validation
    if validation <= 0 or train <= 0:
        raise MergebenchError(f"cannot carve a validation split from {train_examples} training examples")
    train_subset, validation_subset = torch.utils.data.random_split(
        range(train_examples), [train, validation], generator=torch.Generator().manual_seed(policy.seed)
    )
    return list(train_subset.indices), list(validation_subset.indices)


def labels_of(dataset, task: ClipTaskSpec, classes: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
    """The integer labels at ``indices``, checked against the task's CLIP class names."""
    feature = dataset.features[task.label_column]
    names = getattr(feature, "names", None)
    if names is not None and len(names) != len(classes):
        raise MergebenchError(f"task {task.name}: the dataset has {len(names)} classes, its CLIP class names {len(classes)}")
    labels = torch.as_tensor(np.asarray(list(dataset[task.label_column]), dtype=np.int64))[torch.as_tensor(indices, dtype=torch.long)]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise MergebenchError(f"task {task.name}: labels span {int(labels.min())}..{int(labels.max())}, but there are {len(classes)} classes")
    return labels


def decode_images(dataset, column: str, indices: Sequence[int], resize_crop: Callable, crop: tuple[int, int], desc: str) -> torch.Tensor:
    """``uint8 [N, 3, H, W]`` of the images at ``indices``, decoded and cropped by a pool of threads."""
    import datasets

    images = dataset.select_columns([column])
    decoder = datasets.Image()
    out = torch.empty((len(indices), 3, *crop), dtype=torch.uint8)
    chunks = [list(indices[start : start + DECODE_CHUNK]) for start in range(0, len(indices), DECODE_CHUNK)]

    def work(chunk: list[int]) -> torch.Tensor:
        decoded = []
        for image in images[chunk][column]:
            if isinstance(image, dict):  # an Image column stored without decoding
                image = decoder.decode_example(image)
            decoded.append(resize_crop(image))
        return torch.stack(decoded)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(indices), desc=desc, unit="img", leave=False) as bar:
        start = 0
        for batch in pool.map(work, chunks):
            out[start : start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    return out


class ClipData:
    """Cached, preprocessed splits of a suite's tasks for one image preprocessing."""

    def __init__(self, suite: ClipSuite, cache: Path, processor: dict, root: Path | None):
        self.suite = suite
        self.processor = processor
        self.resize_crop = make_resize_crop(processor)
        self.crop = (int(processor["crop_size"]["height"]), int(processor["crop_size"]["width"]))
        geometry = (processor["size"]["shortest_edge"], self.crop, int(processor.get("resample", 3)))
        self.folder = cache / "data" / f"clip-{self.crop[0]}px-{content_key(*geometry)[:8]}"
        self.root = root
        self.sources = {task.name: TaskDataSource(task, root) for task in suite.tasks}

    def key(self, task: ClipTaskSpec, split: str) -> str:
        source = self.sources[task.name]
        if split == "test":
            spec, used = ("split", task.test_split), task.test_split
        elif task.validation == TRAIN_FRACTION:
            spec, used = ("carved", task.train_split, dataclasses.asdict(self.suite.validation)), task.train_split
        else:
            spec, used = ("split", task.validation), task.validation
        return content_key(task.dataset, task.config, task.image_column, task.label_column, spec, source.fingerprint(used))[:12]

    def path(self, task: ClipTaskSpec, split: str) -> Path:
        return self.folder / f"{task.name}-{split}-{self.key(task, split)}.safetensors"

    def load(self, task: ClipTaskSpec, split: str) -> TaskData:
        """A validation or test split from the cache, decoded and cached first if missing."""
        classes = task.classnames
        path = self.path(task, split)
        if not path.is_file():
            dataset, indices = self._split_indices(task, split)
            inputs = decode_images(dataset, task.image_column, indices, self.resize_crop, self.crop, f"{task.name} {split}")
            save_state_dict({"inputs": inputs, "labels": labels_of(dataset, task, classes, indices)}, path)
        tensors = load_state_dict(path)
        return TaskData(tensors["inputs"], tensors["labels"], classes)

    def load_train(self, task: ClipTaskSpec) -> TaskData:
        """The train split minus the carved validation, in seeded random order, decoded as far as it is read."""
        dataset = self.sources[task.name].open(task.train_split)
        if task.validation == TRAIN_FRACTION:
            indices, _ = carve_validation(len(dataset), self.suite.validation)
        else:
            indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.suite.validation.seed)).tolist()
        classes = task.classnames

        def decode(chunk: Sequence[int]) -> torch.Tensor:
            return decode_images(dataset, task.image_column, chunk, self.resize_crop, self.crop, f"{task.name} train")

        return TaskData(LazyInputs(decode, indices), labels_of(dataset, task, classes, indices), classes)

    def _split_indices(self, task: ClipTaskSpec, split: str):
        source = self.sources[task.name]
        if split == "test":
            dataset = source.open(task.test_split)
            return dataset, list(range(len(dataset)))
        if task.validation == TRAIN_FRACTION:
            dataset = source.open(task.train_split)
            return dataset, carve_validation(len(dataset), self.suite.validation)[1]
        dataset = source.open(task.validation)
        return dataset, list(range(len(dataset)))

    def status(self, task: ClipTaskSpec) -> tuple[str, str | None]:
        if all(self.path(task, split).is_file() for split in ("validation", "test")):
            return f"data cached ({self.folder})", None
        return self.sources[task.name].status()


# ------------------------------------------------------------------------------------------- heads


def head_path(cache: Path, model: str, task: ClipTaskSpec, text_sha256: str) -> Path:
    key = content_key(text_sha256, task.classnames, task.templates)[:12]
    return cache / "heads" / model / f"{task.name}-{key}.safetensors"


def load_head(path: Path, device: torch.device) -> nn.Linear:
    weight = load_state_dict(path)["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head.to(device).eval()


def build_heads(tasks: Sequence[ClipTaskSpec], paths: dict[str, Path], clip_model: Callable[[], Any], base: Path, device: torch.device) -> None:
    """Write the zero-shot head of every task whose cached file is missing."""
    missing = [task for task in tasks if not paths[task.name].is_file()]
    if not missing:
        return
    from transformers import AutoTokenizer

    model = clip_model()
    tokenizer = AutoTokenizer.from_pretrained(base)
    for task in tqdm(missing, desc="zero-shot heads", unit="task", leave=False):
        head = zero_shot_head(model, tokenizer, task.classnames, task.templates, device)
        save_state_dict({"weight": head.weight}, paths[task.name])


# --------------------------------------------------------------------------------------- preparing


def prepare_clip_suite(
    suite: ClipSuite,
    model: str,
    device: torch.device,
    cache: Path,
    checkpoints: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    data: str | os.PathLike | None = None,
) -> PreparedSuite:
    """Checkpoints, zero-shot heads and cached evaluation data of a ``kind: clip`` suite (module docstring)."""
    source = CheckpointSource(suite, model, checkpoints, allow_pickle)
    source.require_root()
    # every checkpoint is found (downloaded, converted) before any data is decoded
    base = source.base_folder()
    if source.layout == "open_clip":
        visual = open_clip_visual(source.spec.open_clip)  # open_clip installed and the architecture known, before any file is read
        # the text tower's tensors are dropped at once: no task keeps them in memory
        experts = {task.name: read_visual(source.open_clip_files(task)[0], allow_pickle) for task in suite.tasks}
        zeroshot = read_visual(source.zeroshot_file(), allow_pickle)
    else:
        folders = {task.name: source.expert_folder(task) for task in suite.tasks}
    processor = read_image_processor_config(base)
    clip_data = ClipData(suite, cache, processor, data_root(data))
    evaluation = {split: {task.name: clip_data.load(task, split) for task in suite.tasks} for split in ("validation", "test")}

    @functools.cache
    def clip_model():
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(base).float().eval()

    text_sha256 = folder_sha256(base, f"pre-trained CLIP {source.spec.hf}")
    hashes = {"text_encoder": text_sha256}
    if source.layout == "open_clip":
        backbone = OpenClipImageEncoder(visual, processor)
        pretrained = fitted(zeroshot[0], backbone, f"pre-trained {zeroshot[1]}")
        finetuned = {name: fitted(state, backbone, str(path)) for name, (state, path) in experts.items()}
        hashes["pretrained"] = checkpoint_sha256(zeroshot[1])
        hashes.update({name: checkpoint_sha256(path) for name, (_, path) in experts.items()})
        excluded: set[str] = set()
    else:
        backbone = ClipImageEncoder(vision_encoder_of(clip_model()), processor)
        pretrained = {key: value.detach().clone() for key, value in backbone.state_dict().items()}
        finetuned = {}
        for name, folder in folders.items():  # vision tower fine-tuned, projection pre-trained (FusionBench)
            state = load_vision_tower_state(folder)
            state[PROJECTION] = pretrained[PROJECTION]
            finetuned[name] = fitted(state, backbone, str(folder))
        hashes["pretrained"] = text_sha256
        hashes.update({name: folder_sha256(folder, f"fine-tuned encoder for task {name}") for name, folder in folders.items()})
        excluded = {PROJECTION}

    paths = {task.name: head_path(cache, model, task, text_sha256) for task in suite.tasks}
    build_heads(suite.tasks, paths, clip_model, base, device)
    clip_model.cache_clear()  # the text tower is no longer needed
    heads = {task: load_head(path, device) for task, path in paths.items()}
    for task in suite.tasks:
        hashes[f"{task.name}.head"] = file_sha256(paths[task.name])
        for split in ("validation", "test"):
            hashes[f"{task.name}.{split}.data"] = clip_data.key(task, split)

    if device.type != "cuda":
        suite = dataclasses.replace(suite, eval_batch_size=min(suite.eval_batch_size, CPU_EVAL_BATCH))
    by_name = {task.name: task for task in suite.tasks}
    return PreparedSuite(
        suite, model, device, backbone.to(device).eval(), pretrained, finetuned, heads, evaluation, hashes, excluded,
        load_train=lambda name: clip_data.load_train(by_name[name]),
    )


def fitted(state: StateDict, backbone: nn.Module, what: str) -> StateDict:
    """``state`` as float32, after checking it has exactly the backbone's keys and shapes."""
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise MergebenchError(f"{what} does not fit the CLIP vision encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, reference in expected.items():
        if tuple(state[key].shape) != tuple(reference.shape):
            raise MergebenchError(f"{what}: {key} has shape {tuple(state[key].shape)}, the encoder {tuple(reference.shape)} (another model size?)")
    return {key: state[key].float() if state[key].is_floating_point() else state[key] for key in expected}


def _model(name: str, spec: Fields) -> ClipModelSpec:
    spec.only("hf", "open_clip", "finetuned_hub_prefix")
    return ClipModelSpec(name, spec.string("hf"), spec.string("open_clip"), spec.string("finetuned_hub_prefix"))


def _task(entry: Fields, classnames: Fields, templates: Fields) -> ClipTaskSpec:
    entry.only("name", "fusion_bench", "dataset", "config", "splits", "validation_split", "columns", "classnames", "templates")
    name = entry.data["name"]
    splits = entry.fields("splits").only("train", "test")
    columns = entry.fields("columns").only("image", "label")
    if "fusion_bench" not in entry:
        raise MergebenchError(f"{entry.where}: missing key 'fusion_bench' (the FusionBench slug, or null)")
    lists = {}
    for key, table in (("classnames", classnames), ("templates", templates)):
        if key in entry:
            lists[key] = entry.strings(key)
        elif name in table:
            lists[key] = table.strings(name)
        else:
            raise MergebenchError(f"{entry.where}: no {key} (give them inline or in the file's top-level {key!r} mapping)")
    bad = [template for template in lists["templates"] if "{c}" not in template]
    if bad:
        raise MergebenchError(f"{entry.where}: template {bad[0]!r} has no {{c}} placeholder")
    return ClipTaskSpec(
        name=name,
        fusion_bench=entry.string("fusion_bench", None),
        dataset=entry.string("dataset"),
        config=entry.string("config", None),
        train_split=splits.string("train"),
        test_split=splits.string("test"),
        validation=entry.string("validation_split", TRAIN_FRACTION),
        image_column=columns.string("image"),
        label_column=columns.string("label"),
        classnames=lists["classnames"],
        templates=lists["templates"],
    )


@register_kind
class ClipKind(Kind):
    """Published CLIP vision experts (Hub or tall_masks open_clip files), zero-shot heads, Hub datasets."""

    name = "clip"
    settings = frozenset({"open_clip_checkpoints", "classnames", "templates"})
    options = (CHECKPOINTS, ALLOW_PICKLE, DATA, TV_DTYPE)

    def suites(self, document: SuiteDocument) -> list[ClipSuite]:
        top = document.settings
        models = {name: _model(name, spec) for name, spec in document.models.items()}
        layout = top.fields("open_clip_checkpoints").only("finetuned", "zeroshot")
        classnames, templates = top.fields("classnames", {}), top.fields("templates", {})
        tasks = {entry.data["name"]: _task(entry, classnames, templates) for entry in document.tasks}
        validation = document.validation_of(Fields({}, document.where))
        if not isinstance(validation, ValidationPolicy):
            raise MergebenchError(f"{document.where}: validation must be {{fraction, max_examples, seed}} (carved from train) for a CLIP suite")
        return [
            ClipSuite(
                name=name, family=document.family, tasks=tuple(tasks[task] for task in members), models=models,
                model_default=document.default_model, validation=validation,
                open_clip_finetuned=layout.string("finetuned"), open_clip_zeroshot=layout.string("zeroshot"),
                eval_batch_size=document.eval_batch_size or 256, source_file=document.path,
            )
            for name, members in document.suites.items()
        ]

    def status(self, suite: ClipSuite, model: str, cache: Path, checkpoints=None, allow_pickle=False, data=None, **options) -> list[TaskStatus]:
        """The base model first, then per task its encoder and its data (no network)."""
        source = CheckpointSource(suite, model, checkpoints, allow_pickle)
        if source.root is not None and not source.root.is_dir():
            return [TaskStatus("checkpoints", str(source.root), "missing: no such folder")]
        rows = [source.base_status()]
        if source.layout == "open_clip":
            try:
                import_open_clip()
            except MergebenchError:
                rows.append(TaskStatus("open_clip", source.spec.open_clip, "missing: reads the tall_masks checkpoints", OPEN_CLIP_EXTRA))
        base = source.base_local() or hub_cached(source.spec.hf)
        clip_data = None
        if base is not None:
            try:
                clip_data = ClipData(suite, cache, read_image_processor_config(base), data_root(data))
            except MergebenchError:
                clip_data = None
        root = data_root(data)
        for task in suite.tasks:
            encoder, encoder_hint = source.expert_status(task)
            data_source = TaskDataSource(task, root)
            data_status, data_hint = clip_data.status(task) if clip_data is not None else data_source.status()
            rows.append(TaskStatus(task.name, data_source.describe(), f"{encoder}; {data_status}", "; ".join(filter(None, (encoder_hint, data_hint))) or None))
        return rows

    def checkpoint_family(self, suite: ClipSuite, model: str, checkpoints=None, allow_pickle=False, **options) -> str:
        """tall_masks' open_clip files, or FusionBench's encoders (from the Hub or in folders named like its repositories)."""
        source = CheckpointSource(suite, model, checkpoints, allow_pickle)
        source.require_root()
        return FAMILIES[source.layout]

    def evaluator(self, suite: ClipSuite, model: str, device: torch.device, cache: Path, tv_dtype: str = "fp32", **options) -> InMemoryEvaluator:
        return InMemoryEvaluator(prepare_clip_suite(suite, model, device, cache, **options), tv_dtype)

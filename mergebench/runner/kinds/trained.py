"""``kind: trained``: suites whose experts mergebench fine-tunes itself from the suite's seeded recipe.

The suite file names a pretrained backbone per model (EfficientNet-Lite on rendered images, a BERT-like
sentence encoder on token ids: the ``modality``), the examples each split takes from each task's data
source, and the recipe. Its kind-specific keys::

    modality: image            # image (default) or text
    image_size: 48             # image suites: pixels; text suites give max_length (tokens) instead
    data_seed: 0
    splits: {train: 3000, test: 1000}      # a task may override them, and its validation size
    validation: {examples: 300}            # drawn from the task's source, never trained or tested on
    recipe: {steps: 150, batch_size: 64, lr: 1.0e-4, head_lr: 1.0e-3, weight_decay: 0.0, seed: 0}
    batchnorm: {policy: frozen}            # or {policy: recalibrate, batches_per_task: N}

Fine-tuned experts are built from the recipe and cached under
``<cache>/checkpoints/<family>/<model>/<recipe key>/`` (``MERGEBENCH_CACHE``, default
``~/.cache/mergebench``); a later run, or another suite of the same family, reuses them. Files are
written atomically, so an interrupted build resumes with the next missing task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.core.checkpoints import StateDict, check_header, file_sha256, load_state_dict, safetensors_header, save_state_dict
from mergebench.core.recipe import Recipe
from mergebench.core.streaming import open_checkpoint
from mergebench.core.task_vectors import buffer_names
from mergebench.errors import MergebenchError
from mergebench.evaluation.classification import recalibrate_batchnorm
from mergebench.models import efficientnet, text_encoder
from mergebench.models.finetune import finetune
from mergebench.runner.evaluators import InMemoryEvaluator
from mergebench.runner.kinds import TV_DTYPE, Kind, TaskStatus, register_kind
from mergebench.runner.prepared import PreparedSuite, TaskData
from mergebench.store.database import content_key
from mergebench.suites import image_sources, text_sources
from mergebench.suites.schema import Fields, SampledValidation, SuiteBase, SuiteDocument

SPLITS = ("train", "validation", "test")
BUILT_HERE = "mergebench"
"""The checkpoint family of experts fine-tuned by mergebench from a suite's recipe (any machine's build)."""
BATCHNORM_POLICIES = ("frozen", "recalibrate")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data source and how many examples each split takes from it."""

    name: str
    source: str
    split_sizes: Mapping[str, int]


@dataclass(frozen=True)
class Suite(SuiteBase):
    """One suite: a backbone, an ordered task list, splits, and the recipe that builds its experts."""

    name: str
    family: str
    models: Mapping[str, str]
    model_default: str
    image_size: int | None
    tasks: tuple[TaskSpec, ...]
    data_seed: int
    recipe: Recipe
    batchnorm: str
    recalibration_batches: int
    eval_batch_size: int
    source_file: Path
    kind: str = "trained"
    modality: str = "image"
    max_length: int | None = None
    """Text suites: tokens per example (longer texts are truncated)."""

    def context(self) -> tuple:
        """What evaluation data and merged models depend on, besides tasks, model and checkpoints."""
        images = self.data_seed, self.image_size, self.batchnorm, self.recalibration_batches
        return images if self.modality == "image" else (*images, self.modality, self.max_length)

    def describe(self) -> dict[str, Any]:
        """The suite's settings as recorded with every result."""
        return {
            "modality": self.modality, "image_size": self.image_size, "max_length": self.max_length,
            "split_sizes": {t.name: dict(t.split_sizes) for t in self.tasks},
            "data_seed": self.data_seed, "recipe": self.recipe.__dict__, "batchnorm": self.batchnorm,
            "suite_file": self.source_file.name,
        }


@dataclass(frozen=True)
class Modality:
    """How a modality's backbone is built, its task data turned into model inputs, and its sources checked."""

    size_key: str
    """The suite file's key for input size: ``image_size`` (pixels) or ``max_length`` (tokens)."""
    backbone: Callable[[Suite, str], nn.Module]
    pretrained_state: Callable[[str], StateDict]
    load: Callable[[Suite, str, TaskSpec, str], TaskData]
    source_status: Callable[[str], str]
    sources: Callable[[], tuple[str, ...]]


def _images(suite: Suite, model: str, task: TaskSpec, split: str) -> TaskData:
    dataset = image_sources.load_images(task.source, split, task.split_sizes[split], size=suite.image_size, seed=suite.data_seed)
    inputs = efficientnet.to_model_input(torch.from_numpy(dataset.images))
    return TaskData(inputs, torch.from_numpy(dataset.labels), dataset.classes)


@lru_cache(maxsize=None)
def _tokenizer(model: str):
    return text_encoder.load_tokenizer(model)


def _texts(suite: Suite, model: str, task: TaskSpec, split: str) -> TaskData:
    dataset = text_sources.load_texts(task.source, split, task.split_sizes[split], seed=suite.data_seed)
    inputs = text_encoder.tokenize(dataset.texts, _tokenizer(model), suite.max_length)
    return TaskData(inputs, torch.from_numpy(dataset.labels), dataset.classes)


MODALITIES = {
    "image": Modality(
        "image_size", lambda suite, model: efficientnet.EfficientNetBackbone(model, suite.image_size),
        efficientnet.pretrained_backbone_state, _images, image_sources.source_status, lambda: tuple(image_sources.SOURCES),
    ),
    "text": Modality(
        "max_length", lambda suite, model: text_encoder.TextEncoderBackbone(model),
        text_encoder.pretrained_backbone_state, _texts, text_sources.source_status, lambda: tuple(text_sources.SOURCES),
    ),
}
"""The modalities a trained suite can have: one registry entry each, chosen by the file's ``modality`` key."""


def load_task_data(suite: Suite, model: str, task: TaskSpec, split: str) -> TaskData:
    """One split of one task as model inputs for backbone ``model``."""
    return MODALITIES[suite.modality].load(suite, model, task, split)


def expert_folder(suite: Suite, model: str, cache: Path) -> Path:
    inputs = (suite.image_size,) if suite.modality == "image" else (suite.modality, suite.max_length)
    recipe_key = content_key(suite.recipe, *inputs, suite.data_seed, model)[:12]
    return cache / "checkpoints" / suite.family / model / recipe_key


def expert_stem(task: TaskSpec) -> str:
    """File stem of a task's expert: its name and a key of the data it was fine-tuned on."""
    return f"{task.name}-{content_key(task.source, task.split_sizes['train'])[:8]}"


def build_missing_experts(suite: Suite, model: str, folder: Path, device: torch.device = torch.device("cpu")) -> None:
    """Fine-tune, with a progress bar, every task of ``suite`` whose checkpoint is not cached yet."""
    pretrained_path = folder / "pretrained.safetensors"
    if not pretrained_path.exists():
        save_state_dict(MODALITIES[suite.modality].pretrained_state(model), pretrained_path)
    missing = [task for task in suite.tasks if not (folder / f"{expert_stem(task)}.head.safetensors").exists()]
    if not missing:
        return
    torch.set_flush_denormal(True)
    for task in missing:
        started = time.perf_counter()
        train = load_task_data(suite, model, task, "train")
        backbone = MODALITIES[suite.modality].backbone(suite, model)
        backbone.load_state_dict(load_state_dict(pretrained_path))
        backbone.to(device)
        with tqdm(total=suite.recipe.steps, desc=f"fine-tune {task.name}", unit="step", leave=False) as bar:
            def on_step(loss: float) -> None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")

            head = finetune(backbone, train.inputs, train.labels, len(train.classes), suite.recipe, on_step)
        save_state_dict(backbone.state_dict(), folder / f"{expert_stem(task)}.safetensors")
        save_state_dict(head.state_dict(), folder / f"{expert_stem(task)}.head.safetensors")
        tqdm.write(f"built expert {task.name} ({model}) in {time.perf_counter() - started:.0f} s")


def recalibrate(prepared: PreparedSuite) -> None:
    """Re-estimate BatchNorm statistics of the loaded backbone on unlabeled training batches of every task."""
    suite = prepared.suite
    recalibrate_batchnorm(prepared.backbone, prepared.train_batches(suite.recipe.batch_size, suite.recalibration_batches))


def prepare_trained_suite(suite: Suite, model: str, device: torch.device, cache: Path, splits=("validation", "test")) -> PreparedSuite:
    """Load data, build missing experts, and load every checkpoint of ``suite``."""
    torch.set_flush_denormal(True)  # tiny activations of the pretrained nets otherwise slow CPUs ~6x
    torch.manual_seed(suite.recipe.seed)
    data = {split: {} for split in splits}
    for task in tqdm(suite.tasks, desc=f"data {suite.name}", unit="task", leave=False):
        for split in splits:
            data[split][task.name] = load_task_data(suite, model, task, split)
    folder = expert_folder(suite, model, cache)
    build_missing_experts(suite, model, folder, device)
    pretrained = load_state_dict(folder / "pretrained.safetensors")
    # experts stay memory-mapped: the merge engine reads one tensor of each at a time
    finetuned = {task.name: open_checkpoint(folder / f"{expert_stem(task)}.safetensors") for task in suite.tasks}
    backbone = MODALITIES[suite.modality].backbone(suite, model).to(device)
    heads = {}
    for task in suite.tasks:
        head_state = load_state_dict(folder / f"{expert_stem(task)}.head.safetensors")
        head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
        head.load_state_dict(head_state)
        heads[task.name] = head.to(device).eval()
    hashes = {"pretrained": file_sha256(folder / "pretrained.safetensors")}
    for task in suite.tasks:
        hashes[task.name] = file_sha256(folder / f"{expert_stem(task)}.safetensors")
        hashes[f"{task.name}.head"] = file_sha256(folder / f"{expert_stem(task)}.head.safetensors")
    train = {task.name: task for task in suite.tasks}
    files = {"pretrained": str(folder / "pretrained.safetensors")} | {t.name: str(folder / f"{expert_stem(t)}.safetensors") for t in suite.tasks}
    return PreparedSuite(
        suite, model, device, backbone, pretrained, finetuned, heads, data, hashes, buffer_names(backbone),
        load_train=lambda name: load_task_data(suite, model, train[name], "train"),
        after_load=recalibrate if suite.batchnorm == "recalibrate" else None, checkpoint_files=files,
    )


def _split_sizes(entry: Fields, defaults: Mapping[str, int], validation: Any) -> dict[str, int]:
    """``{train, validation, test}`` example counts of a task: the file's, overridden by the task's own."""
    given = entry.fields("splits", {}).only("train", "test")
    if not isinstance(validation, SampledValidation):
        raise MergebenchError(f"{entry.where}: validation must be {{examples: N}} (drawn from the task's source) for a trained suite")
    return {
        "train": given.integer("train", defaults.get("train", ...)),
        "validation": validation.examples,
        "test": given.integer("test", defaults.get("test", ...)),
    }


@register_kind
class TrainedKind(Kind):
    """Experts fine-tuned here from a seeded recipe on data that package registries ship."""

    name = "trained"
    settings = frozenset({"modality", "image_size", "max_length", "data_seed", "splits", "recipe", "batchnorm"})
    options = (TV_DTYPE,)

    def suites(self, document: SuiteDocument) -> list[Suite]:
        top = document.settings
        modality = top.choice("modality", tuple(MODALITIES), "image")
        spec = MODALITIES[modality]
        for other in {m.size_key for m in MODALITIES.values()} - {spec.size_key}:
            if other in top:
                raise MergebenchError(f"{top.at(other)}: a {modality} suite gives {spec.size_key}, not {other}")
        size = top.integer(spec.size_key)
        defaults = top.fields("splits").only("train", "test")
        default_sizes = {split: defaults.integer(split) for split in ("train", "test")}
        recipe_fields = top.fields("recipe").only("steps", "batch_size", "lr", "head_lr", "weight_decay", "seed")
        recipe = Recipe(
            steps=recipe_fields.integer("steps"), batch_size=recipe_fields.integer("batch_size"),
            lr=recipe_fields.number("lr"), head_lr=recipe_fields.number("head_lr"),
            weight_decay=recipe_fields.number("weight_decay", 0.0), seed=recipe_fields.integer("seed", 0, minimum=0),
        )
        batchnorm = top.fields("batchnorm", {"policy": "frozen"}).only("policy", "batches_per_task")
        sources = spec.sources()
        tasks = {}
        for entry in document.tasks:
            entry.only("name", "source", "splits", "validation")
            source = entry.choice("source", sources)
            tasks[entry.data["name"]] = TaskSpec(entry.data["name"], source, _split_sizes(entry, default_sizes, document.validation_of(entry)))
        return [
            Suite(
                name=name, family=document.family, models={model: model for model in document.models},
                model_default=document.default_model, image_size=size if modality == "image" else None,
                tasks=tuple(tasks[task] for task in members), data_seed=top.integer("data_seed", 0, minimum=0), recipe=recipe,
                batchnorm=batchnorm.choice("policy", BATCHNORM_POLICIES), recalibration_batches=batchnorm.integer("batches_per_task", 0, minimum=0),
                eval_batch_size=document.eval_batch_size or 256, source_file=document.path, modality=modality,
                max_length=size if modality == "text" else None,
            )
            for name, members in document.suites.items()
        ]

    def status(self, suite: Suite, model: str, cache: Path, **options: Any) -> list[TaskStatus]:
        folder = expert_folder(suite, model, cache)
        rows = []
        for task in suite.tasks:
            built = (folder / f"{expert_stem(task)}.head.safetensors").exists()
            expert = "expert built" if built else "expert not built"
            hint = None if built else f"mergebench build --suite {suite.name} --model {model}"
            rows.append(TaskStatus(task.name, task.source, f"{MODALITIES[suite.modality].source_status(task.source)}; {expert}", hint))
        return rows

    def checkpoint_family(self, suite: Suite, model: str, **options: Any) -> str:
        return BUILT_HERE

    def check_checkpoints(self, suite: Suite, model: str, cache: Path, **options: Any) -> None:
        folder = expert_folder(suite, model, cache)
        if not (folder / "pretrained.safetensors").is_file():
            return
        reference = safetensors_header(folder / "pretrained.safetensors")
        for task in suite.tasks:
            path = folder / f"{expert_stem(task)}.safetensors"
            if path.is_file():
                check_header(reference, safetensors_header(path), f"expert {task.name!r} ({path})")

    def build(self, suite: Suite, model: str, cache: Path, device: torch.device, **options: Any) -> str:
        folder = expert_folder(suite, model, cache)
        build_missing_experts(suite, model, folder, device)
        return str(folder)

    def evaluator(self, suite: Suite, model: str, device: torch.device, cache: Path, tv_dtype: str = "fp32", **options: Any) -> InMemoryEvaluator:
        return InMemoryEvaluator(prepare_trained_suite(suite, model, device, cache), tv_dtype)

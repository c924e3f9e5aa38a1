"""The CLIP ViT suites (vit-8 / vit-14 / vit-20): ``kind: clip`` files such as ``tasks/vit.yaml``.

The schema differs from the ``kind: trained`` families of :mod:`mergebench.suites.registry`: tasks come from
Hugging Face datasets, experts are published checkpoints (FusionBench Hub folders or tall_masks
open_clip files), and heads are zero-shot text heads. Task order and suites follow nik-dim/tall_masks
``ALL_DATASETS``; dataset ids and encoder slugs follow tanganke/fusion_bench (see the YAML comments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergebench.errors import MergebenchError
from mergebench.suites.published import (
    PublishedSuite, ValidationPolicy, default_model, eval_batch_size, keyed_tasks, mapping, require, string,
    suite_tasks, validation_policy,
)

TALL_MASKS_TASKS = (
    "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397",
    "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
    "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST",
)
"""tall_masks ``ALL_DATASETS``; vit-N is its first N tasks."""

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

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.image_column, self.label_column)


@dataclass(frozen=True)
class VitSuite(PublishedSuite):
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


def load_vit_suites(path: str | Path) -> dict[str, VitSuite]:
    """Parse and validate a ``kind: clip`` file; every error names the file and the offending entry."""
    path = Path(path)
    if not path.is_file():
        raise MergebenchError(f"suite file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MergebenchError(f"{path}: not valid YAML ({error})") from error
    return vit_suites_from(raw, path)


def vit_suites_from(raw: Any, path: Path) -> dict[str, VitSuite]:
    """The suites of an already parsed ``kind: clip`` file."""
    where = str(path)
    raw = mapping(raw, where)
    if raw.get("kind") != "clip":
        raise MergebenchError(f"{where}: expected 'kind: clip', found {raw.get('kind')!r}")
    family = string(require(raw, "family", where), f"{where}: family")
    models = {name: _model(name, spec, f"{where}: models.{name}") for name, spec in mapping(require(raw, "models", where), f"{where}: models").items()}
    model_default = default_model(raw, models, where)
    batch_size = eval_batch_size(raw, 256, where)
    validation = validation_policy(mapping(require(raw, "validation", where), f"{where}: validation"), f"{where}: validation")
    layout = mapping(require(raw, "open_clip_checkpoints", where), f"{where}: open_clip_checkpoints")
    finetuned = string(require(layout, "finetuned", f"{where}: open_clip_checkpoints"), f"{where}: open_clip_checkpoints.finetuned")
    zeroshot = string(require(layout, "zeroshot", f"{where}: open_clip_checkpoints"), f"{where}: open_clip_checkpoints.zeroshot")
    tasks = keyed_tasks(require(raw, "tasks", where), _task, where)
    suites = {}
    for suite_name, names in mapping(require(raw, "suites", where), f"{where}: suites").items():
        suites[suite_name] = VitSuite(
            name=suite_name,
            family=family,
            tasks=suite_tasks(names, tasks, suite_name, where),
            models=models,
            model_default=model_default,
            validation=validation,
            open_clip_finetuned=finetuned,
            open_clip_zeroshot=zeroshot,
            eval_batch_size=batch_size,
            source_file=path,
        )
    return suites


def _model(name: str, spec: Any, where: str) -> ClipModelSpec:
    spec = mapping(spec, where)
    fields = {key: string(require(spec, key, where), f"{where}.{key}") for key in ("hf", "open_clip", "finetuned_hub_prefix")}
    return ClipModelSpec(name=name, **fields)


def _task(spec: Mapping[str, Any], where: str) -> ClipTaskSpec:
    name = string(require(spec, "name", where), f"{where}.name")
    where = f"{where} ({name})"
    if name not in TALL_MASKS_TASKS:
        raise MergebenchError(f"{where}: unknown task {name!r}; expected one of {', '.join(TALL_MASKS_TASKS)}")
    fusion_bench = require(spec, "fusion_bench", where)
    config = spec.get("config")
    splits = mapping(require(spec, "splits", where), f"{where}.splits")
    columns = mapping(require(spec, "columns", where), f"{where}.columns")
    return ClipTaskSpec(
        name=name,
        fusion_bench=None if fusion_bench is None else string(fusion_bench, f"{where}.fusion_bench"),
        dataset=string(require(spec, "dataset", where), f"{where}.dataset"),
        config=None if config is None else string(config, f"{where}.config"),
        train_split=string(require(splits, "train", f"{where}.splits"), f"{where}.splits.train"),
        test_split=string(require(splits, "test", f"{where}.splits"), f"{where}.splits.test"),
        validation=string(require(spec, "validation", where), f"{where}.validation"),
        image_column=string(require(columns, "image", f"{where}.columns"), f"{where}.columns.image"),
        label_column=string(require(columns, "label", f"{where}.columns"), f"{where}.columns.label"),
    )

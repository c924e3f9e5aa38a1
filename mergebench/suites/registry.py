"""Suites as YAML data under ``tasks/``: a tiny registry in the manner of lm-evaluation-harness.

One YAML file describes a *family*: its backbone, data splits, fine-tuning recipe and tasks, and names
the suites it defines as nested task lists (``mini-vision-4`` ⊂ ``mini-vision-8``), which form the
task-count axis. ``MERGEBENCH_TASKS`` points at another folder of YAML files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergebench.errors import MergebenchError
from mergebench.core.recipe import Recipe
from mergebench.suites.glue_suite import glue_suites_from
from mergebench.suites.llm_suite import llm_suites_from
from mergebench.suites.vit_suite import vit_suites_from

SPLITS = ("train", "validation", "test")
BATCHNORM_POLICIES = ("frozen", "recalibrate")
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data source and how many examples each split takes from it."""

    name: str
    source: str
    split_sizes: Mapping[str, int]


@dataclass(frozen=True)
class Suite:
    """One suite: a backbone, an ordered task list, splits, and the recipe that builds its experts."""

    name: str
    family: str
    model: str
    models: tuple[str, ...]
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

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.models

    def context(self) -> tuple:
        """What evaluation data and merged models depend on, besides tasks, model and checkpoints."""
        images = self.data_seed, self.image_size, self.batchnorm, self.recalibration_batches
        return images if self.modality == "image" else (*images, self.modality, self.max_length)

    def describe(self) -> dict[str, Any]:
        """The suite's settings as recorded with every result."""
        return {
            "modality": self.modality, "image_size": self.image_size, "max_length": self.max_length, "split_sizes": {t.name: dict(t.split_sizes) for t in self.tasks},
            "data_seed": self.data_seed, "recipe": self.recipe.__dict__, "batchnorm": self.batchnorm,
            "suite_file": self.source_file.name,
        }

    def resolve_model(self, model: str | None) -> str:
        """``model`` if the suite offers it, the suite's default when ``None``."""
        if model is None:
            return self.model
        if model not in self.models:
            raise MergebenchError(f"suite {self.name} has no model {model!r}; choose from {', '.join(self.models)}")
        return model


def tasks_directory() -> Path:
    override = os.environ.get("MERGEBENCH_TASKS")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "tasks"


@lru_cache(maxsize=None)
def _load_all(directory: Path) -> dict[str, Suite]:
    if not directory.is_dir():
        raise MergebenchError(f"suite folder not found: {directory} (set MERGEBENCH_TASKS)")
    suites: dict[str, Suite] = {}
    for path in sorted(directory.glob("*.yaml")):
        for suite in _parse_family(path):
            if suite.name in suites:
                raise MergebenchError(f"suite {suite.name!r} defined twice ({suites[suite.name].source_file}, {path})")
            suites[suite.name] = suite
    return suites


def all_suites() -> dict[str, Suite]:
    return dict(_load_all(tasks_directory()))


def get_suite(name: str) -> Suite:
    suites = all_suites()
    if name not in suites:
        raise MergebenchError(f"unknown suite {name!r}; known suites: {', '.join(sorted(suites)) or 'none'}")
    return suites[name]


def _parse_family(path: Path) -> list[Suite]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MergebenchError(f"broken YAML in {path}{where}: {problem}") from None
    if not isinstance(data, dict):
        raise MergebenchError(f"{path}: expected a mapping at the top level")
    kind = data.get("kind", "trained")
    if kind == "clip":
        return list(vit_suites_from(data, path).values())
    if kind == "llm":
        return list(llm_suites_from(data, path).values())
    if kind == "glue":
        return list(glue_suites_from(data, path).values())
    if kind != "trained":
        raise MergebenchError(f"{path}: unknown suite kind {kind!r}; kinds are trained, clip, llm, glue")
    try:
        return _suites_from(data, path)
    except (KeyError, TypeError, ValueError) as error:
        raise MergebenchError(f"{path}: invalid suite definition: {_describe(error)}") from None


def _split_sizes(given: Mapping[str, Any], defaults: Mapping[str, int]) -> dict[str, int]:
    unknown = [split for split in given if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
    sizes = {split: int(given.get(split, defaults.get(split, 0))) for split in SPLITS}
    if any(size <= 0 for size in sizes.values()):
        raise ValueError("every split needs a positive number of examples")
    return sizes


def _describe(error: Exception) -> str:
    return f"missing field {error}" if isinstance(error, KeyError) else str(error)


def _suites_from(data: Mapping[str, Any], path: Path) -> list[Suite]:
    default_splits = _split_sizes(data["splits"], {})
    tasks = {
        entry["name"]: TaskSpec(entry["name"], entry["source"], _split_sizes(entry.get("splits", {}), default_splits))
        for entry in data["tasks"]
    }
    model = data["model"]
    recipe = Recipe(**data["recipe"])
    modality = data.get("modality", "image")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}")
    size_field = "image_size" if modality == "image" else "max_length"
    size = int(data[size_field])
    if size <= 0:
        raise ValueError(f"{size_field} must be positive")
    batchnorm = data.get("batchnorm", {"policy": "frozen"})
    if batchnorm["policy"] not in BATCHNORM_POLICIES:
        raise ValueError(f"batchnorm policy must be one of {', '.join(BATCHNORM_POLICIES)}")
    suites = []
    for name, task_names in data["suites"].items():
        unknown = [task for task in task_names if task not in tasks]
        if unknown:
            raise ValueError(f"suite {name} lists unknown task {unknown[0]!r}")
        suites.append(
            Suite(
                name=name,
                family=data["family"],
                model=model["default"],
                models=tuple(model["choices"]),
                image_size=size if modality == "image" else None,
                tasks=tuple(tasks[task] for task in task_names),
                data_seed=int(data.get("data_seed", 0)),
                recipe=recipe,
                batchnorm=batchnorm["policy"],
                recalibration_batches=int(batchnorm.get("batches_per_task", 0)),
                eval_batch_size=int(data.get("eval_batch_size", 256)),
                source_file=path,
                modality=modality,
                max_length=size if modality == "text" else None,
            )
        )
    return suites

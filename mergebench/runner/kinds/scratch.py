"""``kind: scratch``: models trained here from random initializations, merged by aligning their units.

Every "task" of such a suite is one endpoint model: an architecture of :mod:`mergebench.models.scratch`
(the suite's model, with its width: the scale axis) trained from its own seed on an image source of
:mod:`mergebench.suites.image_sources`, on all its classes or on a subset of them. Models of one suite
trained on the same classes with different seeds are the Git Re-Basin setting; models trained on
disjoint halves of the classes are the ZipIt! / CCA Merge setting. Every model keeps one output layer
over all classes, so a task's column is the accuracy on the test images of its classes with the
prediction taken over *all* classes: the mean over the columns of disjoint halves is the joint
accuracy. There is no pretrained model: θ₀ = 0, so τ_t = θ_t and the ``pretrained`` reference row is
the all-zero network (chance). Merged weights have their BatchNorm statistics re-estimated on
training batches of every task (RESET) before they are scored. Kind-specific keys::

    source: fashion_mnist
    image_size: 16
    data_seed: 0
    splits: {train: 6000, test: 1000}     # examples of the source; a task keeps those of its classes
    validation: {examples: 500}
    recipe: {steps: 300, batch_size: 64, lr: 3.0e-3, weight_decay: 5.0e-4}
    batchnorm: {batches_per_task: 4}      # training batches per task that re-estimate merged statistics
    models: {vgg-x1: {architecture: vgg, width: 1}, ...}
    tasks: [{name: seed0, seed: 0}, {name: classes-0-4, seed: 10, classes: [0, 1, 2, 3, 4]}, ...]

Models are cached under ``<cache>/checkpoints/<family>/<model>/<recipe key>/<task>-<key>.safetensors``,
one file per endpoint, written atomically, so an interrupted build resumes with the next missing model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.core.checkpoints import check_header, file_sha256, load_state_dict, safetensors_header, save_state_dict
from mergebench.core.task_vectors import buffer_names, merged_state_dict
from mergebench.errors import MergebenchError
from mergebench.evaluation.classification import recalibrate_batchnorm
from mergebench.models import scratch
from mergebench.models.efficientnet import to_model_input
from mergebench.runner.evaluators import Evaluation, InMemoryEvaluator
from mergebench.runner.kinds import Kind, TaskStatus, register_kind
from mergebench.runner.kinds.trained import BUILT_HERE
from mergebench.runner.prepared import PreparedSuite, TaskData
from mergebench.store.database import content_key
from mergebench.suites import image_sources
from mergebench.suites.schema import SampledValidation, SuiteBase, SuiteDocument


@dataclass(frozen=True)
class Endpoint:
    """One model of a suite: its training seed and the classes it sees (all when ``classes`` is None)."""

    name: str
    seed: int
    classes: tuple[int, ...] | None


@dataclass(frozen=True)
class Architecture:
    architecture: str
    width: int


@dataclass(frozen=True)
class ScratchRecipe:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class Suite(SuiteBase):
    name: str
    family: str
    models: Mapping[str, Architecture]
    model_default: str
    tasks: tuple[Endpoint, ...]
    source: str
    image_size: int
    data_seed: int
    split_sizes: Mapping[str, int]
    recipe: ScratchRecipe
    calibration_batches: int
    eval_batch_size: int
    source_file: Path
    kind: str = "scratch"

    def context(self) -> tuple:
        return self.source, self.image_size, self.data_seed, dict(self.split_sizes), self.calibration_batches

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source, "image_size": self.image_size, "data_seed": self.data_seed, "split_sizes": dict(self.split_sizes),
            "recipe": self.recipe.__dict__, "endpoints": {t.name: {"seed": t.seed, "classes": t.classes} for t in self.tasks},
            "batchnorm_batches_per_task": self.calibration_batches, "suite_file": self.source_file.name,
        }


def load_split(suite: Suite, endpoint: Endpoint, split: str) -> TaskData:
    """The examples of ``split`` whose labels are among the endpoint's classes, as model inputs."""
    dataset = image_sources.load_images(suite.source, split, suite.split_sizes[split], size=suite.image_size, seed=suite.data_seed)
    labels = torch.from_numpy(dataset.labels)
    keep = torch.ones_like(labels, dtype=torch.bool) if endpoint.classes is None else torch.isin(labels, torch.tensor(endpoint.classes))
    return TaskData(to_model_input(torch.from_numpy(dataset.images))[keep], labels[keep], dataset.classes)


def num_classes(suite: Suite) -> int:
    return len(image_sources.load_images(suite.source, "test", 1, size=suite.image_size, seed=suite.data_seed).classes)


def fresh_model(suite: Suite, model: str, classes: int) -> nn.Module:
    spec = suite.model(model)
    return scratch.build_model(spec.architecture, spec.width, classes, image_size=suite.image_size)


def model_folder(suite: Suite, model: str, cache: Path) -> Path:
    recipe_key = content_key(suite.recipe, suite.model(model), suite.source, suite.image_size, suite.data_seed, suite.split_sizes["train"])[:12]
    return cache / "checkpoints" / suite.family / model / recipe_key


def model_file(folder: Path, endpoint: Endpoint) -> Path:
    return folder / f"{endpoint.name}-{content_key(endpoint.seed, endpoint.classes)[:8]}.safetensors"


def build_missing_models(suite: Suite, model: str, folder: Path, device: torch.device) -> None:
    """Train, with a progress bar, every endpoint of ``suite`` whose checkpoint is not cached yet."""
    missing = [endpoint for endpoint in suite.tasks if not model_file(folder, endpoint).exists()]
    classes = num_classes(suite) if missing else 0
    for endpoint in missing:
        started = time.perf_counter()
        train = load_split(suite, endpoint, "train")
        torch.manual_seed(endpoint.seed)
        network = fresh_model(suite, model, classes).to(device)
        with tqdm(total=suite.recipe.steps, desc=f"train {endpoint.name}", unit="step", leave=False) as bar:
            def on_step(loss: float) -> None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")

            scratch.train_from_scratch(network, train.inputs, train.labels, steps=suite.recipe.steps, batch_size=suite.recipe.batch_size,
                                       lr=suite.recipe.lr, weight_decay=suite.recipe.weight_decay, seed=endpoint.seed, on_step=on_step)
        save_state_dict(network.state_dict(), model_file(folder, endpoint))
        tqdm.write(f"trained {endpoint.name} ({model}) in {time.perf_counter() - started:.0f} s")


def prepare(suite: Suite, model: str, device: torch.device, cache: Path) -> PreparedSuite:
    """Build missing models, load every endpoint and the evaluation data of each task."""
    folder = model_folder(suite, model, cache)
    build_missing_models(suite, model, folder, device)
    backbone = fresh_model(suite, model, num_classes(suite)).to(device).eval()
    zero = {name: torch.zeros_like(tensor) for name, tensor in backbone.state_dict().items()}
    endpoints = {t.name: t for t in suite.tasks}
    data = {split: {t.name: load_split(suite, t, split) for t in suite.tasks} for split in ("validation", "test")}
    files = {t.name: model_file(folder, t) for t in suite.tasks}
    return PreparedSuite(
        suite, model, device, backbone, zero, {name: load_state_dict(path) for name, path in files.items()},
        {t.name: nn.Identity() for t in suite.tasks}, data, {name: file_sha256(path) for name, path in files.items()},
        buffer_names(backbone), load_train=lambda name: load_split(suite, endpoints[name], "train"),
        checkpoint_files={name: str(path) for name, path in files.items()},
    )


class ScratchEvaluator(InMemoryEvaluator):
    """Flat merged weights are loaded and their BatchNorm statistics re-estimated before scoring."""

    def evaluate(self, merged: torch.Tensor | nn.Module, split: str, columns: tuple[str, ...] | None = None) -> Evaluation:
        if isinstance(merged, torch.Tensor):
            backbone = self.prepared.backbone
            backbone.load_state_dict(merged_state_dict(self.prepared.pretrained, self.streamed.layout, merged))
            with torch.no_grad():
                recalibrate_batchnorm(backbone, self.prepared.train_batches(self.suite.recipe.batch_size, self.suite.calibration_batches))
            merged = backbone
        return super().evaluate(merged, split, columns)


@register_kind
class ScratchKind(Kind):
    """Models trained here from random initializations; merged by alignment methods."""

    name = "scratch"
    settings = frozenset({"source", "image_size", "data_seed", "splits", "recipe", "batchnorm"})

    def suites(self, document: SuiteDocument) -> list[Suite]:
        top = document.settings
        models = {
            name: Architecture(spec.choice("architecture", scratch.ARCHITECTURES), spec.integer("width", 1))
            for name, spec in ((name, spec.only("architecture", "width")) for name, spec in document.models.items())
        }
        splits = top.fields("splits").only("train", "test")
        recipe = top.fields("recipe").only("steps", "batch_size", "lr", "weight_decay")
        tasks = {}
        for entry in document.tasks:
            entry.only("name", "seed", "classes")
            if not isinstance(document.validation_of(entry), SampledValidation):
                raise MergebenchError(f"{document.where}: validation must be {{examples: N}} (drawn from the source) for a scratch suite")
            classes = entry.get("classes")
            if classes is not None and (not isinstance(classes, list) or not classes or not all(isinstance(c, int) and c >= 0 for c in classes)):
                raise MergebenchError(f"{entry.at('classes')}: expected a list of class indices, got {classes!r}")
            tasks[entry.data["name"]] = Endpoint(entry.data["name"], entry.integer("seed", minimum=0), tuple(classes) if classes else None)
        validation = document.validation_of(document.tasks[0])
        return [
            Suite(
                name=name, family=document.family, models=models, model_default=document.default_model,
                tasks=tuple(tasks[t] for t in members), source=top.choice("source", tuple(image_sources.SOURCES)),
                image_size=top.integer("image_size"), data_seed=top.integer("data_seed", 0, minimum=0),
                split_sizes={"train": splits.integer("train"), "validation": validation.examples, "test": splits.integer("test")},
                recipe=ScratchRecipe(recipe.integer("steps"), recipe.integer("batch_size"), recipe.number("lr"), recipe.number("weight_decay", 0.0)),
                calibration_batches=top.fields("batchnorm", {}).only("batches_per_task").integer("batches_per_task", 4),
                eval_batch_size=document.eval_batch_size or 256, source_file=document.path,
            )
            for name, members in document.suites.items()
        ]

    def status(self, suite: Suite, model: str, cache: Path, **options: Any) -> list[TaskStatus]:
        folder = model_folder(suite, model, cache)
        rows = []
        for endpoint in suite.tasks:
            built = model_file(folder, endpoint).exists()
            hint = None if built else f"mergebench build --suite {suite.name} --model {model}"
            state = "model trained" if built else "model not trained"
            rows.append(TaskStatus(endpoint.name, suite.source, f"{image_sources.source_status(suite.source)}; {state}", hint))
        return rows

    def checkpoint_family(self, suite: Suite, model: str, **options: Any) -> str:
        return BUILT_HERE

    def check_checkpoints(self, suite: Suite, model: str, cache: Path, **options: Any) -> None:
        folder = model_folder(suite, model, cache)
        present = [(endpoint, model_file(folder, endpoint)) for endpoint in suite.tasks if model_file(folder, endpoint).is_file()]
        if len(present) < 2:
            return
        reference = safetensors_header(present[0][1])
        for endpoint, path in present[1:]:
            check_header(reference, safetensors_header(path), f"model {endpoint.name!r} ({path})")

    def build(self, suite: Suite, model: str, cache: Path, device: torch.device, **options: Any) -> str:
        folder = model_folder(suite, model, cache)
        build_missing_models(suite, model, folder, device)
        return str(folder)

    def evaluator(self, suite: Suite, model: str, device: torch.device, cache: Path, **options: Any) -> ScratchEvaluator:
        return ScratchEvaluator(prepare(suite, model, device, cache))

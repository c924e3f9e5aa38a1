"""A suite made ready to merge: its evaluation data, its pretrained and fine-tuned checkpoints.

Fine-tuned experts are built by mergebench from the suite's seeded recipe and cached under
``<cache>/checkpoints/<family>/<model>/<recipe key>/`` (``MERGEBENCH_CACHE``, default
``~/.cache/mergebench``); a later run, or another suite of the same family, reuses them. Files are
written atomically, so an interrupted build resumes with the next missing task.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.core.checkpoints import StateDict, file_sha256, load_state_dict, save_state_dict
from mergebench.evaluation.classification import count_correct, recalibrate_batchnorm
from mergebench.models.efficientnet import EfficientNetBackbone, buffer_names, pretrained_backbone_state, to_model_input
from mergebench.models.finetune import finetune
from mergebench.store.database import content_key
from mergebench.suites.image_sources import load_images
from mergebench.suites.registry import Suite, TaskSpec


def cache_directory(override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    return Path(os.environ.get("MERGEBENCH_CACHE", Path.home() / ".cache" / "mergebench"))


@dataclass
class TaskData:
    inputs: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


@dataclass
class PreparedSuite:
    """Everything a sweep over one suite and backbone needs, loaded once."""

    suite: Suite
    model: str
    device: torch.device
    backbone: nn.Module
    pretrained: StateDict
    finetuned: dict[str, StateDict]
    heads: dict[str, nn.Linear]
    data: dict[str, dict[str, TaskData]]
    checkpoint_hashes: dict[str, str]
    buffers: set[str] = field(default_factory=set)

    @property
    def context_key(self) -> str:
        """Identity of what results depend on besides the method: checkpoints and evaluation data."""
        suite = self.suite
        return content_key(
            suite.tasks, self.model, self.checkpoint_hashes, suite.data_seed,
            suite.image_size, suite.batchnorm, suite.recalibration_batches,
        )

    def evaluate(self, backbone_state: StateDict, split: str, tasks: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
        """``{task: (correct, total)}`` of the backbone with each task's own head."""
        self.backbone.load_state_dict(backbone_state)
        if self.suite.batchnorm == "recalibrate":
            recalibrate_batchnorm(self.backbone, self._recalibration_batches())
        outcomes = {}
        for task in tasks or self.suite.task_names:
            data = self.data[split][task]
            correct = count_correct(self.backbone, self.heads[task], data.inputs, data.labels, self.suite.eval_batch_size)
            outcomes[task] = (correct, len(data.labels))
        return outcomes

    def train_data(self, task: str) -> TaskData:
        """A task's training split, loaded on first use."""
        train = self.data.setdefault("train", {})
        if task not in train:
            train[task] = load_task_data(self.suite, next(t for t in self.suite.tasks if t.name == task), "train")
        return train[task]

    def _recalibration_batches(self):
        batch_size = self.suite.recipe.batch_size
        for task in self.suite.task_names:
            inputs = self.train_data(task).inputs
            for b in range(self.suite.recalibration_batches):
                yield inputs[b * batch_size : (b + 1) * batch_size]


def load_task_data(suite: Suite, task: TaskSpec, split: str) -> TaskData:
    dataset = load_images(task.source, split, task.split_sizes[split], size=suite.image_size, seed=suite.data_seed)
    return TaskData(to_model_input(torch.from_numpy(dataset.images)), torch.from_numpy(dataset.labels), dataset.classes)


def prepare_suite(suite: Suite, model: str | None, device: torch.device, cache: Path, splits=("validation", "test")) -> PreparedSuite:
    """Load data, build missing experts, and load every checkpoint of ``suite``."""
    model = suite.resolve_model(model)
    torch.set_flush_denormal(True)  # tiny activations of the pretrained nets otherwise slow CPUs ~6x
    torch.manual_seed(suite.recipe.seed)
    data = {split: {} for split in splits}
    for task in tqdm(suite.tasks, desc=f"data {suite.name}", unit="task", leave=False):
        for split in splits:
            data[split][task.name] = load_task_data(suite, task, split)
    folder = expert_folder(suite, model, cache)
    build_missing_experts(suite, model, folder, device)
    pretrained = load_state_dict(folder / "pretrained.safetensors")
    finetuned = {task.name: load_state_dict(folder / f"{expert_stem(task)}.safetensors") for task in suite.tasks}
    backbone = EfficientNetBackbone(model, suite.image_size).to(device)
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
    return PreparedSuite(suite, model, device, backbone, pretrained, finetuned, heads, data, hashes, buffer_names(backbone))


def expert_folder(suite: Suite, model: str, cache: Path) -> Path:
    recipe_key = content_key(
        suite.recipe, suite.image_size, suite.data_seed, model
    )[:12]
    return cache / "checkpoints" / suite.family / model / recipe_key


def expert_stem(task: TaskSpec) -> str:
    """File stem of a task's expert: its name and a key of the data it was fine-tuned on."""
    return f"{task.name}-{content_key(task.source, task.split_sizes['train'])[:8]}"


def build_missing_experts(suite: Suite, model: str, folder: Path, device: torch.device = torch.device("cpu")) -> None:
    """Fine-tune, with a progress bar, every task of ``suite`` whose checkpoint is not cached yet."""
    pretrained_path = folder / "pretrained.safetensors"
    if not pretrained_path.exists():
        save_state_dict(pretrained_backbone_state(model), pretrained_path)
    missing = [task for task in suite.tasks if not (folder / f"{expert_stem(task)}.head.safetensors").exists()]
    if not missing:
        return
    torch.set_flush_denormal(True)
    for task in missing:
        started = time.perf_counter()
        train = load_task_data(suite, task, "train")
        backbone = EfficientNetBackbone(model, suite.image_size)
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

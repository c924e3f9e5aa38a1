"""A suite made ready to merge, whatever its model family: checkpoints, heads and evaluation data.

Every family (experts fine-tuned here from a recipe, published CLIP experts, …) produces the same
:class:`PreparedSuite`: the pretrained and fine-tuned backbone state dicts, one frozen head per task,
each split's inputs as tensors, and a backbone module that evaluation loads merged weights into. The
sweep, the data-access grant and the store see only this object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mergebench.core.checkpoints import StateDict
from mergebench.core.scores import ACCURACY, TaskScore
from mergebench.errors import MergebenchError
from mergebench.evaluation.classification import correct_examples, head_outputs
from mergebench.evaluation.metrics import score_outputs
from mergebench.store.database import content_key


@dataclass
class TaskData:
    """One split of one task: model-ready inputs, labels (integer classes, or float targets), class names."""

    inputs: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    metric: str = ACCURACY
    """How the task is scored (:mod:`mergebench.evaluation.metrics`)."""


class LazyInputs:
    """Training inputs decoded on first use: a prefix that grows to the end of the largest slice read."""

    def __init__(self, decode: Callable[[Sequence[int]], torch.Tensor], indices: Sequence[int]):
        self._decode = decode
        self._indices = list(indices)
        self._decoded: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, key: slice) -> torch.Tensor:
        if not isinstance(key, slice):
            raise TypeError("training inputs are read by slices")
        _, stop, _ = key.indices(len(self))
        have = 0 if self._decoded is None else len(self._decoded)
        if stop > have:
            more = self._decode(self._indices[have:stop])
            self._decoded = more if self._decoded is None else torch.cat([self._decoded, more])
        return self._decoded[key]


@dataclass
class PreparedSuite:
    """Everything a sweep over one suite and backbone needs, loaded once."""

    suite: object
    model: str
    device: torch.device
    backbone: nn.Module
    pretrained: StateDict
    finetuned: dict[str, Mapping[str, torch.Tensor]]
    """Each expert's backbone: a state dict, or a memory-mapped checkpoint read tensor by tensor."""
    heads: dict[str, nn.Module]
    data: dict[str, dict[str, TaskData]]
    checkpoint_hashes: dict[str, str]
    buffers: set[str] = field(default_factory=set)
    load_train: Callable[[str], TaskData] | None = None
    """Loads a task's training split on first use (data-using methods); ``None`` if the family has none."""
    after_load: Callable[["PreparedSuite"], None] | None = None
    """Runs after merged weights are loaded, before evaluation (e.g. BatchNorm re-estimation)."""
    checkpoint_files: dict[str, str] = field(default_factory=dict)
    """Where each checkpoint (``pretrained``, each task) was read from, for messages about its contents."""
    examples_evaluated: int = 0
    seconds_evaluating: float = 0.0
    """Totals behind the examples/s (images/s) of the run summary."""

    def __post_init__(self) -> None:
        self.backbone.load_state_dict(self.pretrained)  # never left at its random initialization

    @property
    def context_key(self) -> str:
        """Identity of what results depend on besides the method: checkpoints and evaluation data."""
        return content_key(self.suite.tasks, self.model, self.checkpoint_hashes, *self.suite.context())

    @property
    def examples_per_second(self) -> float | None:
        return self.examples_evaluated / self.seconds_evaluating if self.seconds_evaluating else None

    def evaluate(self, backbone: StateDict | nn.Module, split: str, tasks: tuple[str, ...] | None = None) -> dict[str, TaskScore]:
        """``{task: TaskScore}`` of the backbone with each task's own head, by the task's metric.

        ``backbone`` is a state dict loaded into the suite's backbone, or a whole merged backbone
        (from a method that upscales the model), evaluated as it is.
        """
        if isinstance(backbone, nn.Module):
            if self.after_load is not None:
                raise MergebenchError(
                    f"suite {self.suite.name} re-estimates BatchNorm statistics after merging, which an upscaled merged model does not support"
                )
        else:
            self.backbone.load_state_dict(backbone)
            if self.after_load is not None:
                self.after_load(self)
            backbone = self.backbone
        outcomes = {}
        started = time.perf_counter()
        for task in tasks or self.suite.task_names:
            data = self.data[split][task]
            if data.metric == ACCURACY:
                correct = correct_examples(backbone, self.heads[task], data.inputs, data.labels, self.suite.eval_batch_size)
                outcomes[task] = TaskScore.of_correct(correct.numpy())
            else:
                outputs = head_outputs(backbone, self.heads[task], data.inputs, self.suite.eval_batch_size)
                outcomes[task] = score_outputs(data.metric, outputs, data.labels)
        self.examples_evaluated += sum(outcome.total for outcome in outcomes.values())
        self.seconds_evaluating += time.perf_counter() - started
        return outcomes

    def train_data(self, task: str) -> TaskData:
        """A task's training split, loaded on first use."""
        if self.load_train is None:
            raise MergebenchError(f"suite {self.suite.name} provides no training data to data-using methods")
        train = self.data.setdefault("train", {})
        if task not in train:
            train[task] = self.load_train(task)
        return train[task]

    def train_batches(self, batch_size: int, batches_per_task: int) -> Iterable[torch.Tensor]:
        """The first ``batches_per_task`` training batches of every task, inputs only."""
        for task in self.suite.task_names:
            inputs = self.train_data(task).inputs
            for b in range(batches_per_task):
                yield inputs[b * batch_size : (b + 1) * batch_size]

"""What the sweep needs from a suite: merged models, and their scores on each split.

An :class:`Evaluator` stands for one suite on one model, made ready by its kind. It scores the two
reference rows (the pretrained model and each expert on its own tasks), produces the merged model of
each hyperparameter setting of a method, and scores it. The sweep (:mod:`mergebench.runner.sweep`) is
written once against this interface; two implementations exist:

* :class:`InMemoryEvaluator` (trained, CLIP and GLUE suites): the merged model is held in memory,
  loaded into the suite's backbone and scored with each task's own head
  (:class:`~mergebench.runner.prepared.PreparedSuite`). A method that merges tensor by tensor (every
  data-free method) is merged by the one merge engine,
  :class:`~mergebench.core.streaming.StreamedTaskVectors`, reading one tensor of every expert at a
  time (from memory-mapped safetensors where the kind keeps its experts so), so memory is flat in the
  number of tasks; only a method that needs every task vector at once (data-using methods, LiNeS,
  upscaling) gets the ``[T, N]`` stack, built on first use;
* the LLM kind's evaluator (:mod:`mergebench.runner.kinds.llm`): each merge is streamed tensor by
  tensor into a checkpoint folder and scored through lm-eval.

How a setting is chosen is the evaluator's :class:`SelectionRule`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from mergebench.core.checkpoints import check_compatible
from mergebench.core.scores import TaskScore
from mergebench.core.streaming import TV_DTYPES, StreamedTaskVectors
from mergebench.core.task_vectors import TaskVectors, build_task_vectors, merged_state_dict, mergeable_names
from mergebench.store.database import content_key
from mergebench.evaluation.metrics import NormalizationError, mean_accuracy, normalized_accuracy
from mergebench.methods.registry import SCALE, MergeMethod, scale_onto
from mergebench.runner.access import GrantedAccess
from mergebench.runner.prepared import PreparedSuite

Outcomes = Mapping[str, TaskScore | tuple[int, int]]


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model on one split, and what scoring it cost."""

    outcomes: Outcomes
    seconds: float
    parameters: int | None = None


@dataclass(frozen=True)
class SelectionRule:
    """How a method's setting is chosen on validation: the criterion's words and its score."""

    criterion: str
    score: Callable[[Mapping[str, float], Mapping[str, float]], float]
    """``score(merged validation scores, experts' validation scores)``, higher is better."""


def _normalized_or_nan(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    try:
        return normalized_accuracy(scores, reference)
    except NormalizationError:
        return math.nan


NORMALIZED_VALIDATION = SelectionRule("mean normalized validation accuracy", _normalized_or_nan)
MEAN_VALIDATION = SelectionRule("mean validation score of the tasks with a validation split", lambda scores, _: mean_accuracy(scores))
FIXED_DEFAULTS = SelectionRule("fixed defaults: the suite has no validation split", lambda scores, _: math.nan)


class Evaluator(Protocol):
    """One suite on one model, ready to merge and score (module docstring)."""

    suite: Any
    model: str
    device: torch.device
    context_key: str
    """Identity of what results depend on besides the method: checkpoints, evaluation data, options."""
    checkpoint_hashes: Mapping[str, str]
    splits: tuple[str, ...]
    """``("validation", "test")``, or ``("test",)`` for a suite without a validation split."""
    selection: SelectionRule

    def columns(self, split: str) -> tuple[str, ...]:
        """The task columns scored on ``split``."""

    def experts(self, split: str) -> Mapping[str, tuple[str, ...]]:
        """Each expert scored on ``split`` and the columns it is scored on (its own tasks)."""

    def evaluate_reference(self, which: str, split: str) -> Evaluation:
        """The pretrained model (``"pretrained"``) on every column, or expert ``which`` on its own."""

    def settings(self, method: MergeMethod, overrides: Mapping[str, Any]) -> list[dict]:
        """The settings of ``method`` tried on validation (the only one, without validation)."""

    def data_access(self, method: MergeMethod, examples: int | None) -> str:
        """What data ``method`` sees here: ``none``, ``unlabeled-test`` or ``train-samples:N``."""

    def merges(self, method: MergeMethod, settings: Sequence[dict], seed: int, examples: int | None) -> Iterator[tuple[dict, Any]]:
        """``(setting, merged model)`` for each setting, lazily (the sweep times each step)."""

    def evaluate(self, merged: Any, split: str, columns: tuple[str, ...] | None = None) -> Evaluation:
        """A merged model's scores on ``split`` (every column, or ``columns``)."""

    def describe(self) -> dict[str, Any]:
        """What is recorded with every result besides the cell: the suite's settings, options."""

    @property
    def examples_per_second(self) -> float | None: ...


class InMemoryEvaluator:
    """Merged models held in memory and scored with the suite's backbone and heads (module docstring)."""

    def __init__(self, prepared: PreparedSuite, tv_dtype: str = "fp32"):
        self.prepared = prepared
        self.suite = prepared.suite
        self.model = prepared.model
        self.device = prepared.device
        self.tv_dtype = tv_dtype
        # results with task vectors rounded to bf16 are other results than fp32 ones
        self.context_key = prepared.context_key if tv_dtype == "fp32" else content_key(prepared.context_key, f"tv_dtype={tv_dtype}")
        self.checkpoint_hashes = prepared.checkpoint_hashes
        self.splits = ("validation", "test")
        self.selection = NORMALIZED_VALIDATION
        self.statistics: dict = {}  # Fisher diagonals, Gram matrices…: shared by every method and setting
        # every checkpoint is checked (keys, shapes, dtypes, finite values) before the first row of the suite is stored
        check_compatible(prepared.pretrained, prepared.finetuned)
        self.streamed = StreamedTaskVectors(
            prepared.pretrained, prepared.finetuned, mergeable_names(prepared.pretrained, prepared.buffers),
            dtype=TV_DTYPES[tv_dtype], device=self.device,
        )
        self.streamed.require_finite(prepared.checkpoint_files)
        self.pretrained_flat = self.streamed.pretrained()
        self._task_vectors: TaskVectors | None = None

    @property
    def task_vectors(self) -> TaskVectors:
        """τ_t = θ_t − θ₀ of every expert stacked ``[T, N]``, for the methods that need them all at once."""
        if self._task_vectors is None:
            self._task_vectors = build_task_vectors(
                self.prepared.pretrained, self.prepared.finetuned, exclude=self.prepared.buffers, device=self.device,
                sources=self.prepared.checkpoint_files,
            )
            if self.tv_dtype != "fp32":
                self._task_vectors.vectors = self._task_vectors.vectors.to(TV_DTYPES[self.tv_dtype]).float()
        return self._task_vectors

    def columns(self, split: str) -> tuple[str, ...]:
        return self.suite.task_names

    def experts(self, split: str) -> dict[str, tuple[str, ...]]:
        return {task: (task,) for task in self.suite.task_names}

    def evaluate_reference(self, which: str, split: str) -> Evaluation:
        started = time.perf_counter()
        if which in self.prepared.finetuned:
            outcomes = self.prepared.evaluate(self.prepared.finetuned[which], split, (which,))
        else:
            outcomes = self.prepared.evaluate(self.prepared.pretrained, split)
        return Evaluation(outcomes, time.perf_counter() - started)

    def settings(self, method: MergeMethod, overrides: Mapping[str, Any]) -> list[dict]:
        return method.settings(overrides)

    def data_access(self, method: MergeMethod, examples: int | None) -> str:
        return f"train-samples:{examples or method.examples}" if method.data == "train-samples" else method.data

    def granted(self, method: MergeMethod, examples: int | None) -> GrantedAccess | None:
        """The model and data slice ``method`` declared, or None for a data-free method."""
        if not method.uses_data:
            return None
        return GrantedAccess(self.prepared, self.streamed.layout, method.data, examples or method.examples, self.statistics)

    def merges(self, method: MergeMethod, settings: Sequence[dict], seed: int, examples: int | None) -> Iterator[tuple[dict, Any]]:
        if method.tensorwise:
            return self._streamed_sweep(self.streamed, method, settings, seed)
        return method.sweep(self.task_vectors, list(settings), seed=seed, model=self.granted(method, examples))

    def _streamed_sweep(self, streamed: StreamedTaskVectors, method: MergeMethod, settings: Sequence[dict], seed: int):
        """As :meth:`MergeMethod.sweep`: τ_m merged tensor by tensor once per setting of the hyperparameters
        other than λ, then θ₀ + λ·τ_m for each λ."""
        cached_key, merged_vector = None, None
        for setting in settings:
            key = tuple((name, value) for name, value in setting.items() if name != SCALE)
            if key != cached_key:
                cached_key, merged_vector = key, streamed.merged_vector(method, setting, seed)
            yield setting, scale_onto(self.pretrained_flat, merged_vector, setting)

    def merge_subset(self, method: MergeMethod, setting: dict, tasks: Sequence[str], seed: int, examples: int | None) -> Any:
        """The merge of the experts of ``tasks`` alone (continual merging: the models arrived so far)."""
        if method.tensorwise:
            return next(self._streamed_sweep(self.streamed.subset(tuple(tasks)), method, [setting], seed))[1]
        return method.merge(self.task_vectors.subset(tuple(tasks)), setting, seed=seed, model=self.granted(method, examples))

    def evaluate(self, merged: torch.Tensor | nn.Module, split: str, columns: tuple[str, ...] | None = None) -> Evaluation:
        started = time.perf_counter()
        if isinstance(merged, nn.Module):
            parameters = sum(p.numel() for p in merged.parameters())
            backbone = merged
        else:
            parameters = self.streamed.layout.numel
            backbone = merged_state_dict(self.prepared.pretrained, self.streamed.layout, merged)
        outcomes = self.prepared.evaluate(backbone, split, columns)
        return Evaluation(outcomes, time.perf_counter() - started, parameters)

    def describe(self) -> dict[str, Any]:
        described = dict(self.suite.describe())
        if self.tv_dtype != "fp32":
            described["tv_dtype"] = self.tv_dtype
        return described

    @property
    def examples_per_second(self) -> float | None:
        return self.prepared.examples_per_second

"""Sweeping merging methods over an LLM suite (``kind: llm``): streamed merges, lm-eval scores, one store.

Before any model is loaded, the request is checked (:func:`check_llm_request`): every method must merge
tensor by tensor (:func:`mergebench.core.streaming.streaming_support`: no data access, no whole-model
coefficients), code-executing tasks need both opt-ins of :func:`mergebench.evaluation.lm_harness.check_code_execution`,
and lm-eval and the packages the tasks import must be installed.

Every merged model is produced by :func:`mergebench.core.streaming.stream_merge` from the memory-mapped
safetensors of the base and the experts into a temporary folder under ``<cache>/llm/merges/``, then
loaded (bfloat16 on CUDA, the checkpoint's dtype on the CPU) and evaluated in memory through lm-eval's
``HFLM`` and ``simple_evaluate``; the folder is deleted after evaluation. One path serves every size:
a 135M model streams in seconds, and an 8B model never has more than one tensor per checkpoint in
memory while merging.

References, as in the other suites: the base model is the ``pretrained`` row (every task) and each
expert the ``individual`` row on its own tasks. A score is stored as ``correct/total`` = metric ×
documents (exact match or pass@1, one sample). ``--limit`` caps the documents per task and is part of
the context key, so limited and full runs are never mixed. Suites with a validation split choose each
method's setting on it (λ over the suite's ``lam_grid``, the method's other hyperparameters at their
grid) by the mean validation score; suites without one run each method at its defaults, which the
stored config says.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergebench.core.memory import PeakMemory
from mergebench.core.streaming import stream_merge, streaming_support
from mergebench.errors import MergebenchError
from mergebench.evaluation import lm_harness
from mergebench.evaluation.metrics import NormalizationError, mean_accuracy, normalized_accuracy
from mergebench.methods.registry import SCALE, MergeMethod
from mergebench.runner.llm_experts import checkpoint_folder, checkpoint_hash, expert_folders
from mergebench.store.database import INDIVIDUAL, PRETRAINED, Cell, ResultStore, canonical_json, content_key
from mergebench.suites.llm_suite import LlmSuite, LlmTask

VALIDATION_CRITERION = "mean validation score of the tasks with a validation split"
FIXED_DEFAULTS = "fixed defaults: the suite has no validation split"


def check_llm_request(suite: LlmSuite, methods: Sequence[MergeMethod], allow_code_execution: bool) -> None:
    """Refuse, in one line and before any model loads, what this suite cannot run."""
    for method in methods:
        refused = streaming_support(method)
        if refused:
            raise MergebenchError(f"{refused}; suite {suite.name} merges tensor by tensor")
    lm_harness.check_code_execution(suite.task_names, allow_code_execution)
    lm_harness.check_task_requirements(suite.task_names)


def task_configs(suite: LlmSuite, task: LlmTask, split: str) -> list[str | dict[str, Any]]:
    """The lm-eval tasks of expert task ``task`` on ``split``: local tasks as inline configs, Hub tasks by name."""
    configs: list[str | dict[str, Any]] = []
    for name in task.eval:
        generation = {"max_gen_toks": task.max_gen_toks} if task.max_gen_toks else {}
        if name == lm_harness.MINI_MATH_TASK:
            size = task.validation if split == "validation" else task.test
            configs.append(lm_harness.mini_math_task(
                split=split, size=size or 200, seed=suite.data_seed, sources=task.math_sources, **generation))
        elif split == "validation":
            raise MergebenchError(f"suite {suite.name}: task {name} has no validation split")
        elif name == lm_harness.HUMANEVAL_TASK:
            configs.append(lm_harness.humaneval_task(**generation))
        else:
            configs.append(name)
    return configs


class LlmSweep:
    """The cells of one LLM suite and model, evaluated and stored."""

    def __init__(self, suite: LlmSuite, model: str, store: ResultStore, run_id: str, *, device: torch.device,
                 cache: Path, seed: int = 0, limit: int | None = None, allow_code_execution: bool = False):
        self.suite, self.model, self.store, self.run_id = suite, model, store, run_id
        self.device, self.cache, self.seed, self.limit = device, cache, seed, limit
        self.allow_code_execution = allow_code_execution
        self.base = checkpoint_folder(suite.model(model).base, cache)
        self.experts = expert_folders(suite, model, cache, device)
        self.hashes = {"pretrained": checkpoint_hash(self.base), **{t: checkpoint_hash(f) for t, f in self.experts.items()}}
        described = suite.describe()
        self.context_key = content_key(
            suite.task_names, model, self.hashes, described["splits"], described["sources"], described["max_gen_toks"],
            suite.data_seed, limit,
        )
        self.splits = ("validation", "test") if suite.validated else ("test",)
        self.selection = VALIDATION_CRITERION if suite.validated else FIXED_DEFAULTS

    def tasks(self, split: str, experts: Sequence[LlmTask] | None = None) -> tuple[LlmTask, ...]:
        """The expert tasks scored on ``split`` (those with a validation split, on validation)."""
        chosen = tuple(experts or self.suite.tasks)
        return tuple(t for t in chosen if t.validation) if split == "validation" else chosen

    def columns(self, split: str, experts: Sequence[LlmTask] | None = None) -> tuple[str, ...]:
        return tuple(name for task in self.tasks(split, experts) for name in task.eval)

    def cell(self, method: str, hparams: Mapping[str, Any], split: str, seed: int | None = None) -> Cell:
        return Cell(self.context_key, self.suite.name, self.model, method, dict(hparams), self.seed if seed is None else seed, split)

    def done(self, cell: Cell, columns: Sequence[str]) -> bool:
        return self.store.finished_tasks(cell, columns) == set(columns)

    def load(self, folder: Path):
        """A checkpoint folder as an in-memory model on the device (bfloat16 on CUDA)."""
        from mergebench.models.llm import load_causal_lm

        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        return load_causal_lm(folder, dtype=dtype, device=self.device, cache_dir=self.cache)

    def evaluate(self, folder: Path, split: str, experts: Sequence[LlmTask] | None = None) -> tuple[dict[str, tuple[int, int]], float, int]:
        """``({lm-eval task: (correct, total)}, seconds, parameters)`` of the checkpoint in ``folder``."""
        network, tokenizer = self.load(folder)
        configs = [config for task in self.tasks(split, experts) for config in task_configs(self.suite, task, split)]
        result = lm_harness.evaluate_lm(
            network, tokenizer, configs, limit=self.limit, batch_size=self.suite.eval_batch_size,
            allow_code_execution=self.allow_code_execution, random_seed=0,
        )
        parameters = sum(p.numel() for p in network.parameters())
        del network
        outcomes = {}
        for name, score in result.scores.items():
            if not score.samples:
                raise MergebenchError(f"lm-eval scored no documents of task {name}")
            outcomes[name] = (round(score.value * score.samples), score.samples)
        return outcomes, result.seconds, parameters

    def _store(self, cell: Cell, outcomes, merge_seconds=None, eval_seconds=None, **costs) -> None:
        config = {
            "data_access": cell.data_access, "suite": self.suite.name, "tasks": list(self.suite.task_names), "model": self.model,
            "method": cell.method, "hparams": dict(cell.hparams), "seed": cell.seed, "split": cell.split,
            "device": str(self.device), "limit": self.limit, "selection": self.selection, "merge": "streamed, tensor by tensor",
            **self.suite.describe(),
        }
        self.store.record(cell, self.run_id, outcomes, config=config, checkpoints=self.hashes,
                          merge_seconds=merge_seconds, eval_seconds=eval_seconds, **costs)

    def references(self) -> None:
        """The base on every task, and each expert on its own tasks, on each split."""
        for split in self.splits:
            cell = self.cell(PRETRAINED, {}, split, seed=0)
            if not self.done(cell, self.columns(split)):
                outcomes, seconds, _ = self.evaluate(self.base, split)
                self._store(cell, outcomes, eval_seconds=seconds)
            cell = self.cell(INDIVIDUAL, {}, split, seed=0)
            for task in tqdm(self.tasks(split), desc=f"experts {split}", unit="expert", leave=False):
                if not self.done(cell, self.columns(split, [task])):
                    outcomes, seconds, _ = self.evaluate(self.experts[task.name], split, [task])
                    self._store(cell, outcomes, eval_seconds=seconds)

    def settings(self, method: MergeMethod, overrides: Mapping[str, Any]) -> list[dict]:
        """The settings tried on validation (λ over the suite's grid), or the defaults without validation."""
        if not self.suite.validated:
            return [method.defaults() | method.check_overrides(dict(overrides))]
        if self.suite.lam_grid and SCALE in method.hparams and SCALE not in overrides:
            return [s for lam in self.suite.lam_grid for s in method.settings({**overrides, SCALE: lam})]
        return method.settings(overrides)

    def merge_and_evaluate(self, method: MergeMethod, setting: dict, split: str) -> None:
        """Stream-merge ``setting`` into a temporary folder, evaluate it on ``split`` and store the cell."""
        scratch = self.cache / "llm" / "merges"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            out = Path(folder) / "merged"
            with tqdm(desc=f"merge {method.name}", unit="tensor", leave=False) as bar:
                def on_tensor(done: int, total: int, name: str) -> None:
                    bar.total = total
                    bar.update()

                started = time.perf_counter()
                with PeakMemory(self.device) as peak:
                    stream_merge(self.base, self.experts, method, out, setting, seed=self.seed, device=self.device, on_tensor=on_tensor)
                seconds = time.perf_counter() - started
            outcomes, eval_seconds, parameters = self.evaluate(out, split)
        self._store(self.cell(method.name, setting, split), outcomes, seconds, eval_seconds,
                    merge_peak_mb=peak.megabytes, parameters=parameters)

    def method(self, method: MergeMethod, overrides: Mapping[str, Any]):
        """Sweep ``method`` on validation (or take its defaults), evaluate the chosen setting on test."""
        from mergebench.runner.sweep import MethodSummary

        settings = self.settings(method, overrides)
        best, best_score = settings[0], 0.0
        if self.suite.validated:
            columns = self.columns("validation")
            pending = [s for s in settings if not self.done(self.cell(method.name, s, "validation"), columns)]
            with tqdm(total=len(settings), initial=len(settings) - len(pending), desc=method.name, unit="setting", leave=False) as bar:
                for setting in pending:
                    self.merge_and_evaluate(method, setting, "validation")
                    bar.update()
            best, best_score = self._select(method, settings)
        test_cell = self.cell(method.name, best, "test")
        if not self.done(test_cell, self.columns("test")):
            self.merge_and_evaluate(method, best, "test")
        self.store.select(test_cell, best_score, self.selection, self.run_id)
        test = self.store.accuracies(self.context_key, method.name, "test", self.seed)[canonical_json(best)]
        costs = self.store.merge_costs(self.context_key, method.name)
        validation = self._normalized(method.name, best, "validation") if self.suite.validated else math.nan
        return MethodSummary(
            self.suite.name, method.name, best, validation, mean_accuracy(test),
            self._normalized(method.name, best, "test"), costs["seconds"], costs["peak_mb"],
        )

    def _normalized(self, method: str, setting: Mapping[str, Any], split: str) -> float:
        """Normalized score of ``setting`` on ``split``, NaN when an expert scored 0 on one of its tasks
        (the ratio is undefined)."""
        merged = self.store.accuracies(self.context_key, method, split, self.seed)[canonical_json(dict(setting))]
        try:
            return normalized_accuracy(merged, self.store.individual_scores(self.context_key, split))
        except NormalizationError:
            return math.nan

    def _select(self, method: MergeMethod, settings: list[dict]) -> tuple[dict, float]:
        """The setting with the best mean validation score (the first one on ties)."""
        validation = self.store.accuracies(self.context_key, method.name, "validation", self.seed)
        scored = [(mean_accuracy(validation[canonical_json(s)]), -i, s) for i, s in enumerate(settings)]
        score, _, best = max(scored, key=lambda item: item[:2])
        return best, score


def run_llm_suite(suite: LlmSuite, methods: Sequence[MergeMethod], request, store: ResultStore, run_id: str,
                  device: torch.device, cache: Path, report: Callable[[str], None]) -> list:
    """Every cell of ``suite`` for ``methods``; one summary line per method."""
    sweep = LlmSweep(suite, suite.resolve_model(request.model), store, run_id, device=device, cache=cache,
                     seed=request.seed, limit=request.limit, allow_code_execution=request.allow_code_execution)
    sweep.references()
    summaries = []
    for method in methods:
        summary = sweep.method(method, request.overrides.get(method.name, {}))
        report(summary.line())
        summaries.append(summary)
    return summaries

"""The sweep: suites × methods × hyperparameter grid, chosen on validation, reported on test.

For every suite the experts are prepared once and the task vectors stacked once; every method and
every setting of its grid reuses them. Each setting is evaluated on the validation split of every
task; the setting with the best mean normalized validation accuracy is then evaluated on test. The
pretrained backbone (with each task's fine-tuned head) and the individual experts are the reference
rows. Everything goes to the result store as it is measured; finished cells are skipped.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import mergebench
from mergebench.core.memory import PeakMemory
from mergebench.core.task_vectors import ParamLayout, build_task_vectors, merged_state_dict
from mergebench.errors import MergebenchError
from mergebench.evaluation.metrics import mean_accuracy, normalized_accuracy
from mergebench.methods.registry import MergeMethod, get_method
from mergebench.runner.access import GrantedAccess
from mergebench.runner.families import prepare_suite, suite_options
from mergebench.core.checkpoints import cache_directory
from mergebench.runner.prepared import PreparedSuite
from mergebench.store.database import INDIVIDUAL, PRETRAINED, Cell, ResultStore, canonical_json
from mergebench.suites.registry import get_suite

SELECTION_CRITERION = "mean normalized validation accuracy"
RECORDED_PACKAGES = ("torch", "numpy", "safetensors", "efficientnet-lite-pytorch", "scikit-learn", "mlxtend")


@dataclass(frozen=True)
class SweepRequest:
    suites: Sequence[str]
    methods: Sequence[str]
    overrides: Mapping[str, Mapping[str, Any]]
    device: str = "auto"
    out: Path = Path("results")
    cache: Path | None = None
    model: str | None = None
    seed: int = 0
    examples: int | None = None
    checkpoints: str | None = None
    """``kind: clip`` suites: ``hub`` (the default) or a folder of checkpoints (``mergebench.runner.clip_experts``)."""
    allow_pickle: bool = False
    data: Path | None = None
    """``kind: clip`` suites: a folder of local datasets, ``<data>/<Task>`` (default ``$MERGEBENCH_DATA``)."""
    limit: int | None = None
    """``kind: llm`` suites: documents per lm-eval task (part of the results' context)."""
    allow_code_execution: bool = False
    """``kind: llm`` suites: run tasks that execute model-generated code (``HF_ALLOW_CODE_EVAL=1`` too)."""

    @property
    def options(self) -> dict[str, Any]:
        """The options handed to each suite's preparer."""
        return {"checkpoints": self.checkpoints, "allow_pickle": self.allow_pickle, "data": self.data,
                "limit": self.limit, "allow_code_execution": self.allow_code_execution}


@dataclass(frozen=True)
class Merge:
    """One merged model of a sweep and what producing it cost."""

    setting: dict
    weights: torch.Tensor | nn.Module
    """Flat merged weights in ``layout``, or the whole merged backbone of a method that upscales it."""
    layout: ParamLayout
    seconds: float
    peak_mb: float | None

    @property
    def parameters(self) -> int:
        """Parameters of the merged model (base model's if flat; every tensor the module holds if upscaled)."""
        if isinstance(self.weights, nn.Module):
            return sum(p.numel() for p in self.weights.parameters())
        return self.layout.numel

    def backbone(self, pretrained) -> dict | nn.Module:
        """What :meth:`PreparedSuite.evaluate` takes: the merged state dict, or the merged module itself."""
        if isinstance(self.weights, nn.Module):
            return self.weights
        return merged_state_dict(pretrained, self.layout, self.weights)


@dataclass(frozen=True)
class MethodSummary:
    suite: str
    method: str
    hparams: Mapping[str, Any]
    validation_normalized: float
    test_accuracy: float
    test_normalized: float
    merge_seconds: float | None
    merge_peak_mb: float | None = None
    examples_per_second: float | None = None

    def line(self) -> str:
        setting = " ".join(f"{k}={v}" for k, v in self.hparams.items()) or "-"
        merge = "-" if self.merge_seconds is None else f"{self.merge_seconds:.2f} s"
        if self.merge_peak_mb is not None:
            merge += f", peak {self.merge_peak_mb:.0f} MiB"
        speed = "-" if self.examples_per_second is None else f"{self.examples_per_second:.0f} examples/s"
        return (
            f"{self.suite:<16} {self.method:<16} {setting:<32} val norm {100 * self.validation_normalized:5.1f}%  "
            f"test avg {100 * self.test_accuracy:5.1f}%  test norm {100 * self.test_normalized:5.1f}%  merge {merge}  eval {speed}"
        )


def resolve_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present and the CPU otherwise; an explicit ``cuda`` must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MergebenchError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise MergebenchError(f"unknown device {requested!r}: use auto, cpu or cuda")
    return torch.device(requested)


def start_run(request: SweepRequest) -> tuple[ResultStore, str, torch.device]:
    """Open the store and record a new run (command, commit, package versions, device)."""
    device = resolve_device(request.device)
    store = ResultStore(request.out)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    store.start_run(run_id, shlex.join(sys.argv), git_commit(), package_versions(), str(device))
    return store, run_id, device


def checked(request: SweepRequest) -> tuple[list[MergeMethod], list]:
    """The request's methods and suites, every name, hyperparameter and option checked before anything runs."""
    methods = [get_method(name) for name in request.methods]
    for method in methods:
        method.check_overrides(request.overrides.get(method.name, {}))
    unknown = [name for name in request.overrides if name not in request.methods]
    if unknown:
        raise MergebenchError(f"--hparams names method {unknown[0]!r} that is not in --methods")
    suites = [get_suite(name) for name in request.suites]
    for suite in suites:
        suite.resolve_model(request.model)
        suite_options(suite, request.options)
        if suite.kind == "llm":
            from mergebench.runner.llm_sweep import check_llm_request

            check_llm_request(suite, methods, request.allow_code_execution)
    return methods, suites


def run_sweep(request: SweepRequest, report: Callable[[str], None] = tqdm.write) -> list[MethodSummary]:
    """Run (or resume) every cell of the request; returns one summary per suite and method."""
    methods, suites = checked(request)
    store, run_id, device = start_run(request)
    summaries = []
    for suite in suites:
        if suite.kind == "llm":
            from mergebench.runner.llm_sweep import run_llm_suite

            summaries += run_llm_suite(suite, methods, request, store, run_id, device, cache_directory(request.cache), report)
            continue
        prepared = prepare_suite(suite, request.model, device, cache_directory(request.cache), **request.options)
        sweep = SuiteSweep(prepared, store, run_id, request.seed, request.examples)
        sweep.references()
        task_vectors = build_task_vectors(
            prepared.pretrained, prepared.finetuned, exclude=prepared.buffers, device=device
        )
        for method in methods:
            summary = sweep.method(method, task_vectors, request.overrides.get(method.name, {}))
            report(summary.line())
            summaries.append(summary)
    return summaries


class SuiteSweep:
    """The cells of one prepared suite, evaluated and stored."""

    def __init__(self, prepared: PreparedSuite, store: ResultStore, run_id: str, seed: int, examples: int | None = None):
        self.prepared = prepared
        self.store = store
        self.run_id = run_id
        self.seed = seed
        self.examples = examples
        self.context_key = prepared.context_key
        self.tasks = prepared.suite.task_names
        self.statistics: dict = {}  # Fisher diagonals, Gram matrices…: shared by every method and setting

    def data_access(self, method: MergeMethod) -> str:
        """``none``, ``unlabeled-test``, or ``train-samples:N`` with N examples per task."""
        return f"train-samples:{self.examples or method.examples}" if method.data == "train-samples" else method.data

    def granted(self, method: MergeMethod, layout) -> GrantedAccess | None:
        if not method.uses_data:
            return None
        return GrantedAccess(self.prepared, layout, method.data, self.examples or method.examples, self.statistics)

    def cell(self, method: str, hparams: Mapping[str, Any], split: str, seed: int | None = None, data_access: str = "none") -> Cell:
        suite = self.prepared.suite
        seed = self.seed if seed is None else seed
        return Cell(self.context_key, suite.name, self.prepared.model, method, dict(hparams), seed, split, data_access)

    def _store(self, cell: Cell, outcomes, merge_seconds=None, eval_seconds=None, **costs) -> None:
        suite = self.prepared.suite
        config = {
            "data_access": cell.data_access,
            "suite": suite.name, "tasks": list(self.tasks), "model": self.prepared.model, "method": cell.method,
            "hparams": dict(cell.hparams), "seed": cell.seed, "split": cell.split,
            "device": str(self.prepared.device), **suite.describe(),
        }
        self.store.record(
            cell, self.run_id, outcomes, config=config, checkpoints=self.prepared.checkpoint_hashes,
            merge_seconds=merge_seconds, eval_seconds=eval_seconds, **costs,
        )

    def references(self) -> None:
        """Pretrained backbone with fine-tuned heads, and each expert on its own task."""
        for split in ("validation", "test"):
            cell = self.cell(PRETRAINED, {}, split, seed=0)
            if self.store.finished_tasks(cell, self.tasks) != set(self.tasks):
                self._store(cell, self.prepared.evaluate(self.prepared.pretrained, split))
            cell = self.cell(INDIVIDUAL, {}, split, seed=0)
            done = self.store.finished_tasks(cell, self.tasks)
            for task in tqdm([t for t in self.tasks if t not in done], desc=f"experts {split}", unit="task", leave=False):
                self._store(cell, self.prepared.evaluate(self.prepared.finetuned[task], split, (task,)))

    def finetuned_accuracy(self, split: str) -> dict[str, float]:
        return self.store.individual_scores(self.context_key, split)

    def evaluate_merge(self, cell: Cell, merge: Merge, tasks: tuple[str, ...] | None = None) -> None:
        """Evaluate a merged model on ``tasks`` (all of the suite's by default) and store the scores and costs."""
        started = time.perf_counter()
        outcomes = self.prepared.evaluate(merge.backbone(self.prepared.pretrained), cell.split, tasks)
        self._store(
            cell, outcomes, merge.seconds, time.perf_counter() - started,
            merge_peak_mb=merge.peak_mb, parameters=merge.parameters,
        )

    def _timed(self, merges: Iterator[tuple[dict, torch.Tensor]], layout) -> Iterator["Merge"]:
        """The merges of ``merges``, each with its wall time and peak memory."""
        while True:
            started = time.perf_counter()
            with PeakMemory(self.prepared.device) as peak:
                try:
                    setting, weights = next(merges)
                except StopIteration:
                    return
            yield Merge(setting, weights, layout, time.perf_counter() - started, peak.megabytes)

    def timed(self, produce: Callable[[], torch.Tensor], setting: dict, layout: ParamLayout) -> Merge:
        """One merge, ``produce()``, with its wall time and peak memory."""
        return next(self._timed(((setting, produce()) for _ in range(1)), layout))

    def method(self, method: MergeMethod, task_vectors, overrides: Mapping[str, Any]) -> MethodSummary:
        settings = method.settings(overrides)
        access = self.data_access(method)
        model = self.granted(method, task_vectors.layout)
        pending = [
            s for s in settings
            if self.store.finished_tasks(self.cell(method.name, s, "validation", data_access=access), self.tasks) != set(self.tasks)
        ]
        layout = task_vectors.layout
        last = None  # the newest merge: reused on test when its setting wins
        with tqdm(total=len(settings), initial=len(settings) - len(pending), desc=f"{method.name}", unit="setting", leave=False) as bar:
            for last in self._timed(method.sweep(task_vectors, pending, seed=self.seed, model=model), layout):
                self.evaluate_merge(self.cell(method.name, last.setting, "validation", data_access=access), last)
                bar.update()
        best, best_score = self._select(method, settings, access)
        test_cell = self.cell(method.name, best, "test", data_access=access)
        if self.store.finished_tasks(test_cell, self.tasks) != set(self.tasks):
            if last is None or last.setting != best:
                last = next(self._timed(method.sweep(task_vectors, [best], seed=self.seed, model=model), layout))
            self.evaluate_merge(test_cell, last)
        self.store.select(test_cell, best_score, SELECTION_CRITERION, self.run_id)
        test = self.store.accuracies(self.context_key, method.name, "test", self.seed, access)[canonical_json(best)]
        costs = self.store.merge_costs(self.context_key, method.name, access)
        return MethodSummary(
            self.prepared.suite.name, method.name, best, best_score, mean_accuracy(test),
            normalized_accuracy(test, self.finetuned_accuracy("test")), costs["seconds"], costs["peak_mb"],
            examples_per_second=self.prepared.examples_per_second,
        )

    def _select(self, method: MergeMethod, settings, access: str) -> tuple[dict, float]:
        """The setting with the best mean normalized validation accuracy (first one on ties)."""
        validation = self.store.accuracies(self.context_key, method.name, "validation", self.seed, access)
        reference = self.finetuned_accuracy("validation")
        scored = [(normalized_accuracy(validation[canonical_json(s)], reference), i, s) for i, s in enumerate(settings)]
        score, _, best = max(scored, key=lambda item: (item[0], -item[1]))
        return best, score


def git_commit() -> str | None:
    """The commit of the mergebench checkout, with ``-dirty`` when it has uncommitted changes."""
    root = Path(mergebench.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "mergebench": mergebench.__version__}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    versions["cuda"] = torch.version.cuda or "none"
    return versions


"""The sweep: suites × models × methods × hyperparameter grid, chosen on validation, reported on test.

One loop for every kind of suite. For every suite and model, the suite's kind prepares an
:class:`~mergebench.runner.evaluators.Evaluator` once; every method and every setting of its grid
reuses it. Each setting is evaluated on the validation split of every task; the setting the
evaluator's selection rule scores best (mean normalized validation accuracy for most suites) is then
evaluated on test. The pretrained model and the individual experts are the reference rows.
Everything goes to the result store as it is measured; finished cells are skipped, so a killed sweep
resumes where it stopped.
"""

from __future__ import annotations

import math
import platform
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

import mergebench
from mergebench.core.checkpoints import cache_directory
from mergebench.core.memory import PeakMemory
from mergebench.errors import MergebenchError
from mergebench.evaluation.metrics import NormalizationError, mean_accuracy, normalized_accuracy
from mergebench.methods.registry import MergeMethod, get_method
from mergebench.runner.catalog import get_suite
from mergebench.runner.evaluators import Evaluation, Evaluator
from mergebench.runner.kinds import Kind, kind_of
from mergebench.store.database import INDIVIDUAL, PRETRAINED, WHOLE_GRID, Cell, ResultStore, canonical_json
from mergebench.suites.schema import SuiteBase

RECORDED_PACKAGES = ("torch", "numpy", "safetensors", "efficientnet-lite-pytorch", "scikit-learn", "mlxtend")


@dataclass(frozen=True)
class SweepRequest:
    suites: Sequence[str]
    methods: Sequence[str]
    overrides: Mapping[str, Mapping[str, Any]]
    device: str = "auto"
    out: Path = Path("results")
    cache: Path | None = None
    models: Sequence[str] | None = None
    """Models to sweep: None for each suite's default, ``("all",)`` for every model a suite offers."""
    seed: int = 0
    examples: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    """Kind options (``checkpoints``, ``data``, ``limit``…): each suite's kind takes the ones it declares."""
    executor: str = "serial"
    """Where the sweep's jobs run (:mod:`mergebench.runner.executors`): ``serial`` here, ``ray`` on a Ray cluster."""
    address: str | None = None
    """The Ray cluster to join (``ray://host:10001``, ``auto``); None starts a local one."""
    shard: tuple[int, int] | None = None
    """``(i, n)``: run only the i-th of n disjoint parts of the method jobs (a scheduler's array task)."""


@dataclass(frozen=True)
class Merge:
    """One merged model of a sweep and what producing it cost."""

    setting: dict
    merged: Any
    """What the evaluator's merges yield: flat merged weights, a merged module, a merged checkpoint folder."""
    seconds: float
    peak_mb: float | None


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
    model: str = ""

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


@dataclass(frozen=True)
class Plan:
    """A checked request: the methods, and each suite with its kind, models and the options its kind takes."""

    methods: list[MergeMethod]
    suites: list[tuple[SuiteBase, Kind, tuple[str, ...], dict[str, Any]]]


def checked(request: SweepRequest, *, continual: bool = False) -> Plan:
    """The request's methods and suites, every name, hyperparameter and option checked before anything runs."""
    methods = [get_method(name) for name in request.methods]
    for method in methods:
        method.check_overrides(request.overrides.get(method.name, {}))
    unknown = [name for name in request.overrides if name not in request.methods]
    if unknown:
        raise MergebenchError(f"--hparams names method {unknown[0]!r} that is not in --methods")
    suites = []
    for name in request.suites:
        suite = get_suite(name)
        kind = kind_of(suite)
        if continual and not kind.continual:
            raise MergebenchError(f"suite {suite.name} is of kind {kind.name!r}, which continual runs do not support")
        models = suite.resolve_models(tuple(request.models or ()))
        options = kind.accepted(dict(request.options), suite)
        kind.check(suite, methods, options)
        for model in models:
            kind.check_checkpoints(suite, model, cache_directory(request.cache), **options)
        suites.append((suite, kind, models, options))
    return Plan(methods, suites)


@dataclass(frozen=True)
class SweepJob:
    """One unit of a sweep: the reference rows of a suite on a model (``method`` None), or one method's
    validation grid and chosen test cell there. Jobs of one suite and model share its evaluator."""

    suite: str
    model: str
    method: str | None = None

    @property
    def target(self) -> tuple[str, str]:
        return (self.suite, self.model)


def jobs(plan: Plan, shard: tuple[int, int] | None = None) -> list[SweepJob]:
    """Every job of ``plan``: each (suite, model)'s references, then its methods. With ``shard = (i, n)``, the
    i-th of n disjoint parts of the method jobs (every part keeps the references its selections need)."""
    found = []
    for suite, _, models, _ in plan.suites:
        for model in models:
            found.append(SweepJob(suite.name, model))
            found += [SweepJob(suite.name, model, method.name) for method in plan.methods]
    if shard is None:
        return found
    index, count = shard
    methods = [job for job in found if job.method is not None]
    mine = set(methods[index::count])
    return [job for job in found if job.method is None and any(j.target == job.target for j in mine) or job in mine]


class Evaluators:
    """The evaluator of each (suite, model), prepared on first use; only the newest is kept in memory."""

    def __init__(self, plan: Plan, request: SweepRequest, device: torch.device):
        self.plan, self.request, self.device = plan, request, device
        self.cache = cache_directory(request.cache)
        self._held: tuple[tuple[str, str], Evaluator, str] | None = None

    def get(self, target: tuple[str, str]) -> tuple[Evaluator, str]:
        """The evaluator of ``target`` and the checkpoint family of its experts."""
        if self._held is None or self._held[0] != target:
            self._held = None  # free the previous suite's checkpoints before loading the next
            suite, kind, _, options = next(entry for entry in self.plan.suites if entry[0].name == target[0])
            evaluator = kind.evaluator(suite, target[1], self.device, self.cache, **options)
            self._held = (target, evaluator, kind.checkpoint_family(suite, target[1], **options))
        return self._held[1], self._held[2]


def run_job(job: SweepJob, evaluators: Evaluators, store: ResultStore, run_id: str) -> MethodSummary | None:
    """Evaluate and store every missing cell of ``job``; a method job returns its summary."""
    request = evaluators.request
    evaluator, family = evaluators.get(job.target)
    sweep = SuiteSweep(evaluator, store, run_id, request.seed, request.examples, family)
    if job.method is None:
        sweep.references()
        return None
    method = next(method for method in evaluators.plan.methods if method.name == job.method)
    return sweep.method(method, request.overrides.get(method.name, {}))


def selection_label(method: MergeMethod, overrides: Mapping[str, Any]) -> str:
    """:data:`~mergebench.store.database.WHOLE_GRID`, or ``fixed k=v …`` for hyperparameters fixed by ``--hparams``."""
    if not overrides:
        return WHOLE_GRID
    fixed = method.check_overrides(overrides)
    return "fixed " + " ".join(f"{name}={fixed[name]}" for name in method.hparams if name in fixed)


class SuiteSweep:
    """The cells of one suite on one model, evaluated and stored."""

    def __init__(self, evaluator: Evaluator, store: ResultStore, run_id: str, seed: int, examples: int | None = None,
                 family: str | None = None):
        self.evaluator = evaluator
        self.family = family
        self.store = store
        self.run_id = run_id
        self.seed = seed
        self.examples = examples
        self.context_key = evaluator.context_key
        self.suite = evaluator.suite

    def cell(self, method: str, hparams: Mapping[str, Any], split: str, seed: int | None = None, data_access: str = "none") -> Cell:
        seed = self.seed if seed is None else seed
        return Cell(self.context_key, self.suite.name, self.evaluator.model, method, dict(hparams), seed, split, data_access)

    def done(self, cell: Cell, columns: Sequence[str]) -> bool:
        return self.store.finished_tasks(cell, columns) == set(columns)

    def _store(self, cell: Cell, evaluation: Evaluation, merge: Merge | None = None) -> None:
        config = {
            "data_access": cell.data_access, "suite": self.suite.name, "tasks": list(self.evaluator.columns("test")),
            "model": self.evaluator.model, "method": cell.method, "hparams": dict(cell.hparams), "seed": cell.seed,
            "split": cell.split, "device": str(self.evaluator.device), "selection": self.evaluator.selection.criterion,
            "checkpoint_family": self.family,
            **self.evaluator.describe(),
        }
        self.store.record(
            cell, self.run_id, evaluation.outcomes, config=config, checkpoints=self.evaluator.checkpoint_hashes,
            merge_seconds=None if merge is None else merge.seconds, eval_seconds=evaluation.seconds,
            merge_peak_mb=None if merge is None else merge.peak_mb,
            parameters=None if merge is None else evaluation.parameters,
        )

    def references(self) -> None:
        """The pretrained model on every task, and each expert on its own tasks, on each split."""
        for split in self.evaluator.splits:
            cell = self.cell(PRETRAINED, {}, split, seed=0)
            if not self.done(cell, self.evaluator.columns(split)):
                self._store(cell, self.evaluator.evaluate_reference(PRETRAINED, split))
            cell = self.cell(INDIVIDUAL, {}, split, seed=0)
            pending = [name for name, columns in self.evaluator.experts(split).items() if not self.done(cell, columns)]
            for name in tqdm(pending, desc=f"experts {split}", unit="expert", leave=False):
                self._store(cell, self.evaluator.evaluate_reference(name, split))

    def evaluate_merge(self, cell: Cell, merge: Merge, columns: tuple[str, ...] | None = None) -> None:
        """Score a merged model on ``columns`` (every column of the split by default) and store it with its costs."""
        self._store(cell, self.evaluator.evaluate(merge.merged, cell.split, columns), merge)

    def timed(self, merges: Iterator[tuple[dict, Any]]) -> Iterator[Merge]:
        """The merges of ``merges``, each with its wall time and peak memory."""
        while True:
            started = time.perf_counter()
            with PeakMemory(self.evaluator.device) as peak:
                try:
                    setting, merged = next(merges)
                except StopIteration:
                    return
            yield Merge(setting, merged, time.perf_counter() - started, peak.megabytes)

    def timed_one(self, setting: dict, produce: Callable[[], Any]) -> Merge:
        """One merge, ``produce()``, with its wall time and peak memory."""
        return next(self.timed((setting, produce()) for _ in range(1)))

    def method(self, method: MergeMethod, overrides: Mapping[str, Any]) -> MethodSummary:
        """Sweep ``method`` on validation (or take its only setting), evaluate the chosen setting on test."""
        evaluator = self.evaluator
        settings = evaluator.settings(method, overrides)
        access = evaluator.data_access(method, self.examples)
        last = None  # the newest merge: reused on test when its setting wins
        best, best_score = settings[0], math.nan
        if "validation" in evaluator.splits:
            columns = evaluator.columns("validation")
            pending = [s for s in settings if not self.done(self.cell(method.name, s, "validation", data_access=access), columns)]
            with tqdm(total=len(settings), initial=len(settings) - len(pending), desc=method.name, unit="setting", leave=False) as bar:
                for last in self.timed(evaluator.merges(method, pending, self.seed, self.examples)):
                    self.evaluate_merge(self.cell(method.name, last.setting, "validation", data_access=access), last)
                    bar.update()
            best, best_score = self._select(method, settings, access)
        test_cell = self.cell(method.name, best, "test", data_access=access)
        if not self.done(test_cell, evaluator.columns("test")):
            if last is None or last.setting != best:
                last = next(self.timed(evaluator.merges(method, [best], self.seed, self.examples)))
            self.evaluate_merge(test_cell, last)
        self.store.select(test_cell, best_score, evaluator.selection.criterion, self.run_id, selection_label(method, overrides))
        test = self._scores(method.name, best, "test", access)
        costs = self.store.merge_costs(self.context_key, method.name, access)
        validation = self._normalized(method.name, best, "validation", access) if "validation" in evaluator.splits else math.nan
        return MethodSummary(
            self.suite.name, method.name, best, validation, mean_accuracy(test),
            self._normalized(method.name, best, "test", access), costs["seconds"], costs["peak_mb"],
            examples_per_second=evaluator.examples_per_second, model=evaluator.model,
        )

    def _scores(self, method: str, setting: Mapping[str, Any], split: str, access: str) -> dict[str, float]:
        return self.store.accuracies(self.context_key, method, split, self.seed, access)[canonical_json(dict(setting))]

    def _normalized(self, method: str, setting: Mapping[str, Any], split: str, access: str) -> float:
        """Normalized score of ``setting`` on ``split``; NaN when an expert scored 0 on its task (undefined ratio)."""
        try:
            return normalized_accuracy(self._scores(method, setting, split, access), self.store.individual_scores(self.context_key, split))
        except NormalizationError:
            return math.nan

    def _select(self, method: MergeMethod, settings: list[dict], access: str) -> tuple[dict, float]:
        """The setting the evaluator's selection rule scores best on validation (the first one on ties)."""
        validation = self.store.accuracies(self.context_key, method.name, "validation", self.seed, access)
        reference = self.store.individual_scores(self.context_key, "validation")
        scored = [(self.evaluator.selection.score(validation[canonical_json(s)], reference), i, s) for i, s in enumerate(settings)]
        score, _, best = max(scored, key=lambda item: (-math.inf if math.isnan(item[0]) else item[0], -item[1]))
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


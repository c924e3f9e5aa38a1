"""Published tables as data: ``tasks/references/<source>/<table>.yaml``, each with an id (``iso/table1``).

A table names the checkpoint family its numbers were obtained with, the split, a tolerance in
percentage points, how its hyperparameters were chosen (``validation``, or a fixed setting per method),
the mapping from its row names to mergebench methods, the known traps (each attached to the cells it
touches), and one cell per published number. ``tasks/references/README.md`` describes the format; this
module reads and checks it against the suites and the method registry, every problem one line naming
the file and the entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from mergebench.core.scores import ACCURACY, MATTHEWS, SPEARMAN
from mergebench.errors import MergebenchError
from mergebench.methods.registry import get_method
from mergebench.runner.catalog import all_suites, folders
from mergebench.store.database import REFERENCE_METHODS
from mergebench.suites.schema import Fields, read_yaml

REFERENCES = "references"
KEYS = ("title", "source", "checkpoint_family", "split", "tolerance", "hyperparameters", "methods", "traps", "cells")
CELL_KEYS = ("row", "suite", "model", "task", "metric", "absolute", "normalized", "hparams", "note")
WHERE_KEYS = ("suite", "model", "method", "task")
VALIDATION = "validation"
STORED_METRICS = (ACCURACY, MATTHEWS, SPEARMAN)
"""Metrics mergebench stores, and so can compare; a cell published under another is not comparable."""
METRICS = (*STORED_METRICS, "accuracy_f1_mean", "pearson_spearman_mean", "exact_match", "pass@1", "normalized_only", "mixed")
SCORED_AS_ACCURACY = ("exact_match", "pass@1")
"""LLM metrics stored as right/wrong per document, i.e. as accuracy."""


@dataclass(frozen=True)
class Trap:
    note: str
    where: Mapping[str, Any]

    def touches(self, cell: "ReferenceCell") -> bool:
        values = {"suite": cell.suite, "model": cell.model, "method": cell.method, "task": cell.task}
        return all(values[key] == value for key, value in self.where.items())


@dataclass(frozen=True)
class ReferenceCell:
    """One published number (percent): a row's mean over a suite (``task`` None) or its score on one task."""

    row: str
    method: str | None
    suite: str
    model: str
    task: str | None
    metric: str
    absolute: float | None
    normalized: float | None
    hparams: Mapping[str, Any] | None = None
    note: str | None = None

    @property
    def comparable_metric(self) -> bool:
        return self.metric in STORED_METRICS or self.metric in SCORED_AS_ACCURACY


@dataclass(frozen=True)
class ReferenceTable:
    id: str
    title: str
    source: str
    checkpoint_family: str
    split: str
    tolerance: float
    hyperparameters: str | Mapping[str, Mapping[str, Any]]
    methods: Mapping[str, str | None]
    traps: tuple[Trap, ...]
    cells: tuple[ReferenceCell, ...]
    path: Path = field(compare=False)

    def traps_of(self, cell: ReferenceCell) -> list[str]:
        return [trap.note for trap in self.traps if trap.touches(cell)]

    def setting_of(self, cell: ReferenceCell) -> Mapping[str, Any] | None:
        """The hyperparameters the paper fixed for ``cell``'s method (None: chosen on validation)."""
        if cell.hparams is not None:
            return cell.hparams
        if isinstance(self.hyperparameters, Mapping):
            return self.hyperparameters.get(cell.method or "", {})
        return None


def reference_folders() -> list[Path]:
    """``references/`` of every suite folder (the shipped ``tasks/`` and the user's)."""
    return [folder / REFERENCES for folder in folders() if (folder / REFERENCES).is_dir()]


@lru_cache(maxsize=None)
def _load(roots: tuple[Path, ...]) -> dict[str, ReferenceTable]:
    tables: dict[str, ReferenceTable] = {}
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            table = read_table(path, path.relative_to(root).with_suffix("").as_posix())
            if table.id in tables:
                raise MergebenchError(f"reference table {table.id!r} defined twice ({tables[table.id].path}, {path})")
            tables[table.id] = table
    return tables


def all_tables() -> dict[str, ReferenceTable]:
    return dict(_load(tuple(reference_folders())))


def get_table(table_id: str) -> ReferenceTable:
    tables = all_tables()
    if table_id not in tables:
        raise MergebenchError(f"unknown reference table {table_id!r}; tables: {', '.join(sorted(tables)) or 'none'}")
    return tables[table_id]


def _method(name: str, where: str) -> None:
    if name not in REFERENCE_METHODS:
        try:
            get_method(name)
        except MergebenchError as error:
            raise MergebenchError(f"{where}: {error}") from None


def _setting(method: str | None, hparams: Fields) -> dict[str, Any]:
    if method is None or method in REFERENCE_METHODS:
        raise MergebenchError(f"{hparams.where}: hyperparameters given for a row without a merging method")
    try:
        return get_method(method).check_overrides(hparams.data)
    except MergebenchError as error:
        raise MergebenchError(f"{hparams.where}: {error}") from None


def _percent(cell: Fields, key: str) -> float | None:
    if key not in cell:
        return None
    value = cell.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not -100 <= value <= 100:
        raise MergebenchError(f"{cell.at(key)}: a percentage in [-100, 100], got {value!r}")
    return float(value)


def read_table(path: Path, table_id: str) -> ReferenceTable:
    """One reference table, checked against the suites and the methods."""
    top = Fields(read_yaml(path), str(path)).only(*KEYS)
    for key in KEYS:
        top.require(key)
    suites = all_suites()
    methods = {}
    for row, method in top.fields("methods").data.items():
        if method is not None:
            _method(Fields({"m": method}, top.at(f"methods.{row}")).string("m"), top.at(f"methods.{row}"))
        methods[str(row)] = method
    mapped = {method for method in methods.values() if method is not None}
    hyperparameters: Any = top.get("hyperparameters")
    if hyperparameters != VALIDATION:
        fixed = top.fields("hyperparameters")
        hyperparameters = {}
        for method in fixed.data:
            if method not in mapped:
                raise MergebenchError(f"{fixed.at(method)}: no row maps to method {method!r}")
            hyperparameters[method] = _setting(method, fixed.fields(method))
    cells, seen = [], set()
    for index, entry in enumerate(top.listing("cells")):
        cell = Fields(entry, f"{top.at('cells')}[{index}]").only(*CELL_KEYS)
        row = cell.string("row")
        if row not in methods:
            raise MergebenchError(f"{cell.at('row')}: {row!r} is not a row of methods")
        suite_name, model, task = cell.string("suite"), cell.string("model"), cell.string("task", None)
        if suite_name not in suites:
            raise MergebenchError(f"{cell.at('suite')}: unknown suite {suite_name!r}")
        suite = suites[suite_name]
        if model not in suite.model_names:
            raise MergebenchError(f"{cell.at('model')}: suite {suite_name} has no model {model!r}")
        if task is not None and task not in suite.task_names:
            raise MergebenchError(f"{cell.at('task')}: suite {suite_name} has no task {task!r}")
        metric = cell.choice("metric", METRICS)
        absolute, normalized = _percent(cell, "absolute"), _percent(cell, "normalized")
        if absolute is None and normalized is None:
            raise MergebenchError(f"{cell.where}: needs absolute and/or normalized")
        hparams = _setting(methods[row], cell.fields("hparams")) if "hparams" in cell else None
        parsed = ReferenceCell(row, methods[row], suite_name, model, task, metric, absolute, normalized, hparams, cell.string("note", None))
        key = (row, suite_name, model, task, metric)
        if key in seen:
            raise MergebenchError(f"{cell.where}: a second cell for {key}")
        seen.add(key)
        cells.append(parsed)
    traps = []
    for index, entry in enumerate(top.listing("traps")):
        trap = Fields(entry, f"{top.at('traps')}[{index}]").only("note", "where")
        where = trap.fields("where").only(*WHERE_KEYS)
        parsed_trap = Trap(trap.string("note"), dict(where.data))
        if not any(parsed_trap.touches(cell) for cell in cells):
            raise MergebenchError(f"{trap.where}: touches no cell")
        traps.append(parsed_trap)
    tolerance = top.number("tolerance")
    if tolerance <= 0:
        raise MergebenchError(f"{top.at('tolerance')}: must be positive")
    return ReferenceTable(
        table_id, top.string("title"), top.string("source"), top.string("checkpoint_family"), top.string("split"), tolerance,
        hyperparameters, methods, tuple(traps), tuple(cells), path,
    )

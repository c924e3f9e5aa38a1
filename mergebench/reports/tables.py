"""Result tables in the layout of the model-merging papers: methods as rows, tasks as columns.

A table is read from the result store for one (suite, model): the context with the most recent
result, its two reference rows (``pretrained``, ``individual``) and, per merged method, the test rows
of the setting selected on validation. It is written as Markdown, CSV and LaTeX (booktabs).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from mergebench.core.atomic import write_text
from mergebench.errors import MergebenchError
from mergebench.core.scores import ACCURACY, METRIC_LABELS, PerExample
from mergebench.evaluation.metrics import NormalizationError, mean_accuracy, normalized_accuracy
from mergebench.reports.intervals import Comparison, Interval, Resampler, compare, suite_interval
from mergebench.store.database import INDIVIDUAL, PRETRAINED, REFERENCE_METHODS, WHOLE_GRID, ResultStore

REFERENCE_SEED = 0
SPLIT = "test"


@dataclass(frozen=True)
class MethodRow:
    """One method's test scores (fractions: accuracy, or the task's correlation metric) on the tasks of a suite."""

    method: str
    accuracies: Mapping[str, float]
    mean_accuracy: float
    normalized_accuracy: float | None
    """None where an expert scores 0 or below on its own task, which no ratio can be taken to."""
    setting: Mapping[str, Any]
    data_access: str
    costs: Mapping[str, float | None] = field(default_factory=dict)
    """``seconds`` (mean per merge), ``peak_mb`` (largest, MiB) and ``parameters`` of the merged model."""
    selection: str = WHOLE_GRID
    """How the setting was chosen: from the method's whole grid, or fixed on the command line (``fixed k=v``)."""
    examples: Mapping[str, PerExample] = field(default_factory=dict, repr=False)
    """What each test example contributed, per task (empty for results stored before it was kept)."""
    interval: Interval | None = None
    """95% bootstrap interval of the normalized score (of the average where normalization is undefined)."""

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    @property
    def label(self) -> str:
        return row_label(self.method, self.selection)


def row_label(method: str, selection: str = WHOLE_GRID) -> str:
    """A row's name in a table: the method, with ``(fixed k=v)`` for a fixed setting."""
    return method if selection == WHOLE_GRID else f"{method} ({selection})"


@dataclass(frozen=True)
class ResultTable:
    """The reference rows, then the merged methods in the order they were selected."""

    suite: str
    model: str
    context_key: str
    tasks: tuple[str, ...]
    rows: tuple[MethodRow, ...]
    metrics: Mapping[str, str] = field(default_factory=dict)
    """``{task: metric}`` where a task is not scored by accuracy."""
    resampler: Resampler | None = field(default=None, repr=False)
    """The bootstrap draws over the test examples (None where a row lacks per-example outcomes)."""
    checkpoint_family: str = "unspecified"
    """Whose experts were merged (``mergebench``, ``fusion_bench``, ``tall_masks``…), as the run recorded it."""

    def compare(self, a: MethodRow, b: MethodRow) -> Comparison | None:
        """Paired bootstrap of ``a − b`` (normalized where defined), or None without per-example outcomes."""
        if self.resampler is None or not a.examples or not b.examples:
            return None
        experts = self.row(INDIVIDUAL).examples if self.row(PRETRAINED).normalized_accuracy is not None else None
        return compare(self.resampler, a.examples, b.examples, experts)

    def comparisons(self) -> list[tuple[MethodRow, Comparison]]:
        """Every other merged method against the best one (by normalized score, else average)."""
        merged = sorted(self.merged, key=_ranking_score, reverse=True)
        found = [(row, self.compare(merged[0], row)) for row in merged[1:]] if merged else []
        return [(row, comparison) for row, comparison in found if comparison is not None]

    @property
    def merged(self) -> tuple[MethodRow, ...]:
        return tuple(row for row in self.rows if not row.is_reference)

    def row(self, name: str) -> MethodRow:
        """The row labelled ``name`` (a method's row chosen from its whole grid is labelled by the method)."""
        for row in self.rows:
            if row.label == name:
                return row
        raise KeyError(name)

    @property
    def base_parameters(self) -> int | None:
        """Parameters of the merged model of a method that keeps the base model's size (the scale of a model)."""
        counts = [row.costs.get("parameters") for row in self.merged if row.costs.get("parameters")]
        return min(counts) if counts else None


# --- reading the store ------------------------------------------------------------------------


def available(store: ResultStore) -> list[tuple[str, str]]:
    """Every (suite, model) pair with stored results, sorted."""
    rows = store.query("SELECT DISTINCT suite, model FROM results ORDER BY suite, model")
    return [(row["suite"], row["model"]) for row in rows]


def load_table(store: ResultStore, suite: str, model: str | None = None, seed: int = 0, context_key: str | None = None) -> ResultTable:
    """The test-split table of ``suite`` on ``model`` (the only model stored for it when None), under the context
    with the most recent result or the one given."""
    model = _resolve_model(store, suite, model)
    context_key = context_key or _latest_context(store, suite, model)
    tasks = _suite_tasks(store, context_key)
    individual = _test_rows(store, context_key, INDIVIDUAL, "{}", REFERENCE_SEED, "none", tasks)
    rows = [
        _method_row(store, context_key, method, "{}", REFERENCE_SEED, "none", tasks, individual)
        for method in REFERENCE_METHODS
    ]
    for selection in _selections(store, context_key, seed):
        row = _method_row(store, context_key, selection["method"], selection["hparams"], seed, selection["data_access"], tasks, individual)
        rows.append(replace(row, selection=selection["selection"]))
    metrics = {task: metric for task, metric in store.metrics(context_key).items() if metric != ACCURACY}
    rows, resampler = _with_intervals(rows, tasks, metrics)
    return ResultTable(suite, model, context_key, tasks, tuple(rows), metrics, resampler, _checkpoint_family(store, context_key))


def _checkpoint_family(store: ResultStore, context_key: str) -> str:
    stored = store.query("SELECT config FROM results WHERE context_key = ? LIMIT 1", (context_key,))
    return json.loads(stored[0]["config"]).get("checkpoint_family", "unspecified") if stored else "unspecified"


def _with_intervals(rows: list[MethodRow], tasks: tuple[str, ...], metrics: Mapping[str, str]) -> tuple[list[MethodRow], Resampler | None]:
    """Rows with their 95% intervals, from one set of bootstrap draws over the experts' test examples."""
    experts = next(row for row in rows if row.method == INDIVIDUAL).examples
    if set(experts) != set(tasks):
        return rows, None
    resampler = Resampler({task: len(experts[task].values) for task in tasks}, metrics)
    normalizable = next(row for row in rows if row.method == PRETRAINED).normalized_accuracy is not None
    with_intervals = []
    for row in rows:
        interval = None
        if set(row.examples) == set(tasks) and row.method != INDIVIDUAL:
            interval = suite_interval(resampler, row.examples, experts if normalizable else None)
        with_intervals.append(replace(row, interval=interval))
    return with_intervals, resampler


def _ranking_score(row: MethodRow) -> float:
    return row.normalized_accuracy if row.normalized_accuracy is not None else row.mean_accuracy


def _resolve_model(store: ResultStore, suite: str, model: str | None) -> str:
    pairs = available(store)
    if not pairs:
        raise MergebenchError(f"the results store {store.path} holds no results")
    models = [m for s, m in pairs if s == suite]
    if not models:
        suites = ", ".join(sorted({s for s, _ in pairs}))
        raise MergebenchError(f"no results for suite {suite!r} in {store.path} (it holds: {suites})")
    if model is None:
        if len(models) > 1:
            raise MergebenchError(f"suite {suite!r} has results for several models ({', '.join(models)}): name one")
        return models[0]
    if model not in models:
        raise MergebenchError(f"no results for suite {suite!r} on model {model!r} (it has: {', '.join(models)})")
    return model


def _latest_context(store: ResultStore, suite: str, model: str) -> str:
    rows = store.query(
        "SELECT context_key FROM results WHERE suite=? AND model=? ORDER BY created_at DESC LIMIT 1", (suite, model)
    )
    return rows[0]["context_key"]


def _suite_tasks(store: ResultStore, context_key: str) -> tuple[str, ...]:
    rows = store.query(
        "SELECT config FROM results WHERE context_key=? ORDER BY created_at DESC LIMIT 1", (context_key,)
    )
    return tuple(json.loads(rows[0]["config"])["tasks"])


def _selections(store: ResultStore, context_key: str, seed: int) -> list[Any]:
    return store.query(
        "SELECT method, hparams, data_access, selection FROM selections WHERE context_key=? AND seed=? "
        "ORDER BY selection != ?, created_at, method",
        (context_key, seed, WHOLE_GRID),
    )


def _test_rows(
    store: ResultStore, context_key: str, method: str, hparams_json: str, seed: int, data_access: str, tasks: tuple[str, ...]
) -> dict[str, float]:
    """``{task: score}`` of one method's test rows for one setting and data access, in task order."""
    rows = store.query(
        "SELECT task, score FROM results "
        "WHERE context_key=? AND method=? AND hparams=? AND seed=? AND split=? AND data_access=?",
        (context_key, method, hparams_json, seed, SPLIT, data_access),
    )
    measured = {row["task"]: row["score"] for row in rows}
    missing = [task for task in tasks if task not in measured]
    if missing:
        raise MergebenchError(
            f"{method} {hparams_json} has no {SPLIT} result for task {missing[0]!r} (context {context_key[:12]})"
        )
    return {task: measured[task] for task in tasks}


def _method_row(
    store: ResultStore,
    context_key: str,
    method: str,
    hparams_json: str,
    seed: int,
    data_access: str,
    tasks: tuple[str, ...],
    individual: Mapping[str, float],
) -> MethodRow:
    accuracies = _test_rows(store, context_key, method, hparams_json, seed, data_access, tasks)
    try:
        normalized = normalized_accuracy(accuracies, individual)
    except NormalizationError:
        normalized = None  # an expert scores 0 or below: the ratio is undefined (see the caption)
    costs = {} if method in REFERENCE_METHODS else store.merge_costs(context_key, method, data_access)
    examples = store.examples(context_key, method, SPLIT, hparams_json, seed, data_access)
    return MethodRow(method, accuracies, mean_accuracy(accuracies), normalized, json.loads(hparams_json), data_access, costs, examples=examples)


# --- formatting -------------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_setting(setting: Mapping[str, Any]) -> str:
    """``{"k": 20, "lam": 1.0}`` -> ``k=20 lam=1.0``."""
    return " ".join(f"{name}={value}" for name, value in setting.items())


def task_labels(table: ResultTable) -> list[str]:
    """Task names, each followed by its metric's label where that is not accuracy (``cola (MCC)``)."""
    return [f"{task} ({METRIC_LABELS[table.metrics[task]]})" if task in table.metrics else task for task in table.tasks]


def _columns(table: ResultTable) -> list[str]:
    return [*task_labels(table), "Avg.", "Norm."]


def _values(table: ResultTable, row: MethodRow) -> list[str]:
    scores = [row.accuracies[task] for task in table.tasks] + [row.mean_accuracy, row.normalized_accuracy]
    return ["—" if score is None else percent(score) for score in scores]


COST_COLUMNS = ("Merge s", "Peak MiB", "Params")
CI_COLUMN = "95% CI"


def _costs(row: MethodRow, shown: bool = True) -> list[str]:
    """Seconds per merge, peak memory of a merge, and the merged model's parameter count; ``—`` if unknown
    (nothing when ``shown`` is False: a report that two runs reproduce byte for byte)."""
    if not shown:
        return []
    seconds, peak, parameters = (row.costs.get(key) for key in ("seconds", "peak_mb", "parameters"))
    return [
        "—" if seconds is None else f"{seconds:.2f}",
        "—" if peak is None else f"{peak:.0f}",
        "—" if parameters is None else f"{parameters / 1e6:.2f}M",
    ]


def _best_merged(table: ResultTable) -> list[str]:
    """Per column, the best displayed value among the merged methods."""
    columns = zip(*(_values(table, row) for row in table.merged))
    return [max(column, key=lambda value: -math.inf if value == "—" else float(value)) for column in columns]


def _cells(table: ResultTable, row: MethodRow, emphasize: Callable[[str], str]) -> list[str]:
    """The row's values, the best merged ones passed through ``emphasize``."""
    values = _values(table, row)
    if row.is_reference:
        return values
    return [emphasize(value) if value == best != "—" else value for value, best in zip(values, _best_merged(table))]


def _title(table: ResultTable) -> str:
    return f"{table.suite} on {table.model}"


def _cost_columns(shown: bool) -> tuple[str, ...]:
    return COST_COLUMNS if shown else ()


def _caption(table: ResultTable, costs: bool = True) -> str:
    if table.metrics:
        scores = "test score (%) per task (accuracy unless a task names its metric), its average and the normalized score"
    else:
        scores = "test accuracy (%) per task, its average and the normalized accuracy"
    unscaled = [task for task in table.tasks if table.row(INDIVIDUAL).accuracies[task] <= 0]
    undefined = f" Norm. is — because the expert of {', '.join(unscaled)} scores 0 or below on its own task." if unscaled else ""
    return (
        f"{_title(table)}: {scores} "
        f"(merged / individual expert, per task). Merged methods use the setting selected on validation, "
        f"or the one fixed where a row says (fixed ...); 95% CI: bootstrap interval of Norm. over the test examples"
        + ("; costs are seconds per merge, peak memory of a merge, and the merged model's parameters." if costs else ".")
        + undefined
    )


def _interval(row: MethodRow) -> str:
    return "—" if row.interval is None else str(row.interval)


def comparison_lines(table: ResultTable) -> list[str]:
    """One line per merged method: its paired difference from the best one, and whether it is beyond noise."""
    comparisons = table.comparisons()
    if not comparisons:
        return []
    best = max(table.merged, key=_ranking_score)
    what = "normalized score" if table.row(PRETRAINED).normalized_accuracy is not None else "average score"
    lines = [f"Paired comparisons with {best.label} ({what}, bootstrap over the same test examples, 95%):", ""]
    for row, comparison in comparisons:
        verdict = "worse beyond noise" if comparison.beyond_noise else "within noise"
        lines.append(f"- {row.label}: {100 * -comparison.difference:+.1f} points {_flipped(comparison.interval)}, {verdict}")
    return lines


def _flipped(interval: Interval) -> str:
    """The interval of ``b − a`` from that of ``a − b``."""
    return str(Interval(-interval.high, -interval.low))


def to_markdown(table: ResultTable, costs: bool = True) -> str:
    header = ["Method", *_columns(table), CI_COLUMN, "Setting", "Data", *_cost_columns(costs)]
    lines = [
        f"### {_title(table)}",
        "",
        _caption(table, costs),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(_columns(table)) + 1), ":---", ":---", *["---:"] * len(_cost_columns(costs))]) + "|",
    ]
    for row in table.rows:
        cells = _cells(table, row, lambda value: f"**{value}**")
        setting = format_setting(row.setting) or "—"
        lines.append("| " + " | ".join([row.label, *cells, _interval(row), setting, row.data_access, *_costs(row, costs)]) + " |")
    comparisons = comparison_lines(table)
    return "\n".join(lines + ([""] + comparisons if comparisons else [])) + "\n"


def to_csv(table: ResultTable, costs: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Method", *_columns(table), CI_COLUMN, "Setting", "Data access", *_cost_columns(costs)])
    for row in table.rows:
        writer.writerow([row.label, *_values(table, row), _interval(row), format_setting(row.setting), row.data_access, *_costs(row, costs)])
    return buffer.getvalue()


_LATEX_SPECIALS = re.compile(r"([&%$#_{}])")


def latex_escape(text: str) -> str:
    return _LATEX_SPECIALS.sub(r"\\\1", text)


def _latex_row(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def _latex_method_row(table: ResultTable, row: MethodRow, costs: bool) -> str:
    cells = _cells(table, row, lambda value: rf"\textbf{{{value}}}")
    setting = latex_escape(format_setting(row.setting)) or "--"
    cost_cells = [cost.replace("—", "--") for cost in _costs(row, costs)]
    interval = _interval(row).replace("—", "--")
    return _latex_row([latex_escape(row.label), *cells, interval, setting, latex_escape(row.data_access), *cost_cells])


def to_latex(table: ResultTable, costs: bool = True) -> str:
    columns = _columns(table)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(_caption(table, costs))}}}",
        rf"\label{{tab:{report_stem(table)}}}",
        r"\begin{tabular}{l" + "r" * (len(columns) + 1) + "ll" + "r" * len(_cost_columns(costs)) + "}",
        r"\toprule",
        _latex_row(["Method", *(latex_escape(column) for column in columns), latex_escape(CI_COLUMN), "Setting", "Data", *_cost_columns(costs)]),
        r"\midrule",
    ]
    references = [row for row in table.rows if row.is_reference]
    lines += [_latex_method_row(table, row, costs) for row in references]
    if table.merged:
        lines.append(r"\midrule")
        lines += [_latex_method_row(table, row, costs) for row in table.merged]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_scale_markdown(tables: list[ResultTable]) -> str:
    """The paper-style table of a family over models and task counts (Iso-C's Table 1 layout): one row
    per method, one column per (model, task count), each cell ``absolute (normalized)`` test score."""
    columns = sorted(tables, key=lambda t: (t.base_parameters or 0, t.model, len(t.tasks)))
    names = list(dict.fromkeys(row.label for table in columns for row in table.rows))
    header = [f"{t.model} ({t.base_parameters / 1e6:.1f}M), {len(t.tasks)} tasks" if t.base_parameters else f"{t.model}, {len(t.tasks)} tasks"
              for t in columns]
    lines = [
        "| Method | " + " | ".join(header) + " |",
        "|:---|" + "|".join(["---:"] * len(columns)) + "|",
    ]
    for name in names:
        cells = []
        for table in columns:
            try:
                row = table.row(name)
            except KeyError:
                cells.append("—")
                continue
            normalized = "" if row.normalized_accuracy is None or name == INDIVIDUAL else f" ({percent(row.normalized_accuracy)})"
            cells.append(f"{percent(row.mean_accuracy)}{normalized}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- files ------------------------------------------------------------------------------------


def suite_family(suite: str) -> str:
    """The name shared by suites that differ only by their trailing task count (``mini-vision-4``, ``mini-vision-8``)."""
    stem, _, count = suite.rpartition("-")
    return stem if count.isdigit() else suite


def report_stem(table: ResultTable) -> str:
    """``<suite>-<model>`` with anything unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{table.suite}-{table.model}")


def to_reference(tables: list[ResultTable], source: str, tolerance: float) -> str:
    """The stored tables as a reference table (the format of ``tasks/references``) of our own measured runs.

    One cell per row and suite mean (absolute and normalized), for the rows chosen on validation and the
    two reference rows; ``source`` names the command that produced the store.
    """
    families = sorted({table.checkpoint_family for table in tables})
    if len(families) != 1:
        raise MergebenchError(f"a reference table holds one checkpoint family; the stored tables have {', '.join(families)}")
    cells = []
    for table in tables:
        for row in table.rows:
            if row.selection != WHOLE_GRID:
                continue
            cell = {"row": row.method, "suite": table.suite, "model": table.model, "metric": ACCURACY,
                    "absolute": round(100 * row.mean_accuracy, 2)}
            if row.normalized_accuracy is not None:
                cell["normalized"] = round(100 * row.normalized_accuracy, 2)
            cells.append(cell)
    suites = ", ".join(sorted({table.suite for table in tables}))
    models = ", ".join(sorted({table.model for table in tables}))
    document = {
        "title": f"{suites} on {models}, as measured by mergebench (test split, mean over tasks)",
        "source": source,
        "checkpoint_family": families[0],
        "split": "test",
        "tolerance": tolerance,
        "hyperparameters": "validation",
        "methods": {cell["row"]: cell["row"] for cell in cells},
        "traps": [{"note": "experts built on another processor, torch build or thread count differ slightly; the tolerance allows for it",
                   "where": {}}],
        "cells": cells,
    }
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=200, allow_unicode=True)


FORMATS = {"md": to_markdown, "csv": to_csv, "tex": to_latex}
"""The table formats, by file suffix."""


def write_reports(table: ResultTable, directory: str | Path, costs: bool = True) -> list[Path]:
    """Write ``<directory>/<suite>-<model>.md``, ``.csv`` and ``.tex``; return their paths."""
    directory = Path(directory)
    documents = {f".{suffix}": render(table, costs) for suffix, render in FORMATS.items()}
    paths = [directory / f"{report_stem(table)}{suffix}" for suffix in documents]
    try:
        for path, text in zip(paths, documents.values()):
            write_text(path, text)
    except OSError as error:
        raise MergebenchError(f"cannot write reports to {directory}: {error.strerror or error}") from error
    return paths

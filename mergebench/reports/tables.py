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

from mergebench.errors import MergebenchError
from mergebench.core.scores import ACCURACY, METRIC_LABELS
from mergebench.evaluation.metrics import NormalizationError, mean_accuracy, normalized_accuracy
from mergebench.store.database import INDIVIDUAL, REFERENCE_METHODS, WHOLE_GRID, ResultStore

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

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    @property
    def label(self) -> str:
        """The row's name in a table: the method, with ``(fixed k=v)`` for a fixed setting."""
        return self.method if self.selection == WHOLE_GRID else f"{self.method} ({self.selection})"


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

    @property
    def merged(self) -> tuple[MethodRow, ...]:
        return tuple(row for row in self.rows if not row.is_reference)

    def row(self, method: str) -> MethodRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(method)


# --- reading the store ------------------------------------------------------------------------


def available(store: ResultStore) -> list[tuple[str, str]]:
    """Every (suite, model) pair with stored results, sorted."""
    rows = store.query("SELECT DISTINCT suite, model FROM results ORDER BY suite, model")
    return [(row["suite"], row["model"]) for row in rows]


def load_table(store: ResultStore, suite: str, model: str | None = None, seed: int = 0) -> ResultTable:
    """The test-split table of ``suite`` on ``model`` (the only model stored for it when None)."""
    model = _resolve_model(store, suite, model)
    context_key = _latest_context(store, suite, model)
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
    return ResultTable(suite, model, context_key, tasks, tuple(rows), metrics)


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
    return MethodRow(method, accuracies, mean_accuracy(accuracies), normalized, json.loads(hparams_json), data_access, costs)


# --- formatting -------------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_setting(setting: Mapping[str, Any]) -> str:
    """``{"k": 20, "lam": 1.0}`` -> ``k=20 lam=1.0``."""
    return " ".join(f"{name}={value}" for name, value in setting.items())


def _columns(table: ResultTable) -> list[str]:
    """Task names, each followed by its metric's label where that is not accuracy (``cola (MCC)``)."""
    tasks = [f"{task} ({METRIC_LABELS[table.metrics[task]]})" if task in table.metrics else task for task in table.tasks]
    return [*tasks, "Avg.", "Norm."]


def _values(table: ResultTable, row: MethodRow) -> list[str]:
    scores = [row.accuracies[task] for task in table.tasks] + [row.mean_accuracy, row.normalized_accuracy]
    return ["—" if score is None else percent(score) for score in scores]


COST_COLUMNS = ("Merge s", "Peak MiB", "Params")


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
        f"or the one fixed where a row says (fixed ...)"
        + ("; costs are seconds per merge, peak memory of a merge, and the merged model's parameters." if costs else ".")
        + undefined
    )


def to_markdown(table: ResultTable, costs: bool = True) -> str:
    header = ["Method", *_columns(table), "Setting", "Data", *_cost_columns(costs)]
    lines = [
        f"### {_title(table)}",
        "",
        _caption(table, costs),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * len(_columns(table)), ":---", ":---", *["---:"] * len(_cost_columns(costs))]) + "|",
    ]
    for row in table.rows:
        cells = _cells(table, row, lambda value: f"**{value}**")
        setting = format_setting(row.setting) or "—"
        lines.append("| " + " | ".join([row.label, *cells, setting, row.data_access, *_costs(row, costs)]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: ResultTable, costs: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Method", *_columns(table), "Setting", "Data access", *_cost_columns(costs)])
    for row in table.rows:
        writer.writerow([row.label, *_values(table, row), format_setting(row.setting), row.data_access, *_costs(row, costs)])
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
    return _latex_row([latex_escape(row.label), *cells, setting, latex_escape(row.data_access), *cost_cells])


def to_latex(table: ResultTable, costs: bool = True) -> str:
    columns = _columns(table)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(_caption(table, costs))}}}",
        rf"\label{{tab:{report_stem(table)}}}",
        r"\begin{tabular}{l" + "r" * len(columns) + "ll" + "r" * len(_cost_columns(costs)) + "}",
        r"\toprule",
        _latex_row(["Method", *(latex_escape(column) for column in columns), "Setting", "Data", *_cost_columns(costs)]),
        r"\midrule",
    ]
    references = [row for row in table.rows if row.is_reference]
    lines += [_latex_method_row(table, row, costs) for row in references]
    if table.merged:
        lines.append(r"\midrule")
        lines += [_latex_method_row(table, row, costs) for row in table.merged]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --- files ------------------------------------------------------------------------------------


def report_stem(table: ResultTable) -> str:
    """``<suite>-<model>`` with anything unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{table.suite}-{table.model}")


FORMATS = {"md": to_markdown, "csv": to_csv, "tex": to_latex}
"""The table formats, by file suffix."""


def write_reports(table: ResultTable, directory: str | Path, costs: bool = True) -> list[Path]:
    """Write ``<directory>/<suite>-<model>.md``, ``.csv`` and ``.tex``; return their paths."""
    directory = Path(directory)
    documents = {f".{suffix}": render(table, costs) for suffix, render in FORMATS.items()}
    paths = [directory / f"{report_stem(table)}{suffix}" for suffix in documents]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in zip(paths, documents.values()):
            path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise MergebenchError(f"cannot write reports to {directory}: {error.strerror or error}") from error
    return paths

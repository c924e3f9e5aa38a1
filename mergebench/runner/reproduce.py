"""``mergebench reproduce TABLE``: run what a published table needs, then compare cell by cell.

For each (suite, model) of the table the checkpoint family the request would use is compared with the
table's first (:meth:`~mergebench.runner.kinds.Kind.checkpoint_family`, no weights read): numbers of
another family are never compared, and their cells are not run. The comparable ones are swept like any
other run (resuming from the store: only missing cells are evaluated), with the hyperparameters the
paper fixed or chosen on validation where it chose them so. Then every cell gets the paper's number,
ours, Δ and a verdict:

* ``within`` / ``outside``: |ours − paper| against the table's tolerance (percentage points);
* ``not run``: the row has no mergebench method, or its result is not in the store (``--no-run``);
* ``not comparable``: another checkpoint family (the one the request would use, or the one recorded with
  the stored results: of a suite stored with several checkpoints, the latest results of the table's
  family are compared), or a metric mergebench does not store (DARE's mean
  of accuracy and F1, say), or a normalized number where our experts score 0.

The traps the table attaches to a cell (a wrong DTD split, EMNIST digits vs letters…) are printed
beside it. The command exits non-zero when a cell is outside its tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from mergebench.errors import MergebenchError
from mergebench.methods.registry import get_method
from mergebench.reports.tables import ResultTable, load_table, row_label
from mergebench.runner.catalog import get_suite
from mergebench.runner.kinds import kind_of
from mergebench.runner.references import ReferenceCell, ReferenceTable, get_table
from mergebench.runner.executors import run_sweep
from mergebench.runner.sweep import SweepRequest, selection_label
from mergebench.store.database import REFERENCE_METHODS, ResultStore

WITHIN, OUTSIDE, NOT_RUN, NOT_COMPARABLE = "within", "outside", "not run", "not comparable"


@dataclass(frozen=True)
class Verdict:
    cell: ReferenceCell
    paper: float | None
    ours: float | None
    verdict: str
    why: str = ""
    traps: tuple[str, ...] = ()

    @property
    def delta(self) -> float | None:
        return None if self.paper is None or self.ours is None else self.ours - self.paper


@dataclass(frozen=True)
class ReproduceRequest:
    table: str
    sweep: SweepRequest
    """Where results go, the device, the kind options (``--checkpoints``…); its suites and methods are the table's."""
    run: bool = True
    methods: Sequence[str] | None = None
    """Only these of the table's methods (all by default)."""
    models: Sequence[str] | None = None
    """Only the table's cells of these models (all by default)."""


def _families(table: ReferenceTable, request: SweepRequest) -> dict[tuple[str, str], str]:
    """The checkpoint family the request would use for each (suite, model) of the table."""
    families = {}
    for suite_name, model in sorted({(cell.suite, cell.model) for cell in table.cells}):
        suite = get_suite(suite_name)
        kind = kind_of(suite)
        families[(suite_name, model)] = kind.checkpoint_family(suite, model, **kind.accepted(dict(request.options), suite, strict=False))
    return families


def _overrides(table: ReferenceTable, method: str) -> dict[str, Any]:
    """The setting the paper fixed for ``method`` (empty: chosen on validation, or nothing to fix)."""
    fixed = table.hyperparameters.get(method, {}) if isinstance(table.hyperparameters, dict) else {}
    return {name: str(value) for name, value in fixed.items()}


def plan(table: ReferenceTable, request: ReproduceRequest) -> list[SweepRequest]:
    """The sweeps that fill the table's comparable cells: one per (suite, model) and fixed-or-validated setting."""
    families = _families(table, request.sweep)
    wanted = set(request.methods) if request.methods else None
    sweeps = []
    by_target: dict[tuple[str, str], set[str]] = {}
    for cell in table.cells:
        if cell.method is None or families[(cell.suite, cell.model)] != table.checkpoint_family or not cell.comparable_metric:
            continue
        methods = by_target.setdefault((cell.suite, cell.model), set())  # the reference rows come with every run
        if cell.method in REFERENCE_METHODS or cell.hparams is not None:
            continue  # a setting of one cell alone, which the table's other cells do not share, is not swept
        if wanted is None or cell.method in wanted:
            methods.add(cell.method)
    for (suite, model), methods in sorted(by_target.items()):
        ordered = sorted(methods)
        overrides = {method: _overrides(table, method) for method in ordered if _overrides(table, method)}
        sweeps.append(replace(request.sweep, suites=[suite], methods=ordered, models=[model], overrides=overrides))
    return sweeps


def _ours(cell: ReferenceCell, stored: ResultTable, label: str, normalized: bool) -> float | None:
    row = stored.row(label)
    if cell.task is None:
        value = row.normalized_accuracy if normalized else row.mean_accuracy
    else:
        if normalized:
            expert = stored.row("individual").accuracies[cell.task]
            value = row.accuracies[cell.task] / expert if expert > 0 else None
        else:
            value = row.accuracies[cell.task]
    return None if value is None else 100 * value


def verdicts(table: ReferenceTable, store: ResultStore, request: SweepRequest) -> list[Verdict]:
    """Paper vs ours for every cell of ``table`` (module docstring)."""
    families = _families(table, request)
    loaded: dict[tuple[str, str], ResultTable | None] = {}
    found = []
    for cell in table.cells:
        traps = tuple(table.traps_of(cell))
        normalized = cell.absolute is None
        paper = cell.normalized if normalized else cell.absolute

        def give(verdict: str, why: str = "", ours: float | None = None) -> None:
            found.append(Verdict(cell, paper, ours, verdict, why, traps))

        family = families[(cell.suite, cell.model)]
        if family != table.checkpoint_family:
            give(NOT_COMPARABLE, f"checkpoints are {family}, the table's {table.checkpoint_family}")
            continue
        if not cell.comparable_metric:
            give(NOT_COMPARABLE, f"metric {cell.metric} is not one mergebench stores")
            continue
        if cell.method is None:
            give(NOT_RUN, f"row {cell.row!r} has no mergebench method")
            continue
        key = (cell.suite, cell.model)
        if key not in loaded:
            try:
                loaded[key] = load_table(store, cell.suite, cell.model, context_key=_family_context(store, *key, table.checkpoint_family))
            except MergebenchError:
                loaded[key] = None
        stored = loaded[key]
        label = cell.method if cell.method in REFERENCE_METHODS else _label(table, cell)
        if stored is None or label not in {row.label for row in stored.rows}:
            give(NOT_RUN, "no stored result")
            continue
        stored_families = _stored_families(store, stored.context_key)
        if stored_families != {table.checkpoint_family}:
            give(NOT_COMPARABLE, f"stored results are of {', '.join(sorted(stored_families))} checkpoints, the table's {table.checkpoint_family}")
            continue
        ours = _ours(cell, stored, label, normalized)
        if ours is None:
            give(NOT_COMPARABLE, "our expert scores 0 on this task: no normalized score")
            continue
        within = abs(ours - paper) <= table.tolerance
        give(WITHIN if within else OUTSIDE, "" if within else f"|Δ| > {table.tolerance:g}", ours)
    return found


def _family_context(store: ResultStore, suite: str, model: str, family: str) -> str | None:
    """The latest stored context of ``suite`` on ``model`` whose results record checkpoints of ``family``."""
    rows = store.query(
        "SELECT context_key FROM results WHERE suite=? AND model=? AND json_extract(config, '$.checkpoint_family')=? "
        "ORDER BY created_at DESC LIMIT 1", (suite, model, family),
    )
    return rows[0]["context_key"] if rows else None


def _stored_families(store: ResultStore, context_key: str) -> set[str]:
    """The checkpoint families recorded with the stored results of one context (``unrecorded`` where a result has none)."""
    rows = store.query(
        "SELECT DISTINCT json_extract(config, '$.checkpoint_family') AS family FROM results WHERE context_key=?", (context_key,)
    )
    return {row["family"] or "unrecorded" for row in rows}


def _label(table: ReferenceTable, cell: ReferenceCell) -> str:
    """The stored row of the setting the paper used: chosen on validation, or fixed as the paper fixed it."""
    return row_label(cell.method, selection_label(get_method(cell.method), _overrides(table, cell.method)))


def selected(request: ReproduceRequest) -> ReferenceTable:
    """The table of ``request``, with only the cells of the models it names."""
    table = get_table(request.table)
    if not request.models:
        return table
    cells = tuple(cell for cell in table.cells if cell.model in request.models)
    if not cells:
        models = sorted({cell.model for cell in table.cells})
        raise MergebenchError(f"table {table.id} has no cells of model {', '.join(request.models)} (it has {', '.join(models)})")
    return replace(table, cells=cells)


def reproduce(request: ReproduceRequest, report: Callable[[str], None] = print) -> list[Verdict]:
    """Run the missing cells (unless ``request.run`` is False), then compare every cell."""
    table = selected(request)
    if request.run:
        for sweep in plan(table, request):
            run_sweep(sweep, report=report)
    return verdicts(table, ResultStore(request.sweep.out), request.sweep)


def to_markdown(table: ReferenceTable, found: Sequence[Verdict]) -> str:
    """The verdict table: paper, ours, Δ, verdict and the traps, then a count per verdict."""
    lines = [
        f"### {table.id}: {table.title}",
        "",
        f"Source: {table.source}. Checkpoints: {table.checkpoint_family}. Tolerance: ±{table.tolerance:g} points. "
        f"Hyperparameters: {'chosen on validation' if table.hyperparameters == 'validation' else 'as the paper fixed them'}.",
        "",
        "| Row | Suite | Model | Task | Paper | Ours | Δ | Verdict | Traps |",
        "|:---|:---|:---|:---|---:|---:|---:|:---|:---|",
    ]
    notes: dict[str, int] = {}
    for item in found:
        cell = item.cell
        marks = []
        for trap in item.traps:
            notes.setdefault(trap, len(notes) + 1)
            marks.append(f"[{notes[trap]}]")
        paper = f"{item.paper:.1f}" + ("" if cell.absolute is not None else " (norm.)")
        ours = "—" if item.ours is None else f"{item.ours:.1f}"
        delta = "—" if item.delta is None else f"{item.delta:+.1f}"
        verdict = item.verdict + (f": {item.why}" if item.why else "")
        lines.append(f"| {cell.row} | {cell.suite} | {cell.model} | {cell.task or 'mean'} | {paper} | {ours} | {delta} | {verdict} | {' '.join(marks)} |")
    counts = {verdict: sum(item.verdict == verdict for item in found) for verdict in (WITHIN, OUTSIDE, NOT_RUN, NOT_COMPARABLE)}
    lines += ["", "Cells: " + ", ".join(f"{count} {verdict}" for verdict, count in counts.items() if count) + "."]
    lines += [""] + [f"[{number}] {trap}" for trap, number in notes.items()] if notes else []
    return "\n".join(lines) + "\n"

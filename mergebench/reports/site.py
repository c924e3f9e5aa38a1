"""The leaderboard as a static site: plain HTML pages, one small script for sorting and filtering, PNG plots.

The site is read from one result store (a leaderboard's, or stores and bundles joined into one) and opens
from the file system: no server, no CDN, nothing fetched. ``index.html`` lays out the suites × models
with results, each linking to its page; a page ranks the merged methods of one suite on one model, every
checkpoint family and seed stored for it, in a sortable, filterable table (method, data access, normalized
and absolute score with its 95% interval, per-task scores, merge seconds, peak memory, parameters,
checkpoint family, versions), shows the per-task, task-count and scale plots of
:mod:`mergebench.reports.plots`, and lists the published numbers of that suite and model beside ours —
never ranked with them.

Ranks: the merged rows sorted by normalized score (the average where an expert scores 0 or below); a row's
rank is 1 + the number of rows above it that are better beyond noise (:func:`~mergebench.reports.intervals.ranks`),
by the paired bootstrap where both rows were scored on the same examples with the same experts (one context), and
otherwise only where their 95% intervals do not overlap. Rows within noise of each other share a rank.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mergebench.core.atomic import write_text
from mergebench.errors import MergebenchError
from mergebench.reports.intervals import Comparison, Interval, ranks
from mergebench.reports.plots import plot_per_task, plot_scale, plot_task_count
from mergebench.reports.tables import (
    SPLIT, MethodRow, ResultTable, available, format_setting, load_table, percent, report_stem, suite_family, task_labels,
)
from mergebench.store.bundle import family_of
from mergebench.store.database import PRETRAINED, ResultStore, canonical_json

SCRIPT = "site.js"
STYLE = "site.css"
PLOTS = "plots"


@dataclass(frozen=True)
class PublishedNumber:
    """One number of a published table (percent), as the site shows it: a row's suite mean (``task`` None) or one task."""

    table: str
    """The reference table's id (``iso/table1``)."""
    source: str
    checkpoint_family: str
    row: str
    method: str | None
    suite: str
    model: str
    task: str | None
    metric: str
    absolute: float | None
    normalized: float | None


@dataclass(frozen=True)
class Entry:
    """One row of a page: a method's row of the table of one context and seed."""

    table: ResultTable
    row: MethodRow
    family: str
    seed: int
    versions: str
    versions_detail: str

    @property
    def score(self) -> float:
        return self.row.normalized_accuracy if self.row.normalized_accuracy is not None else self.row.mean_accuracy


# --- reading the store ------------------------------------------------------------------------


def _contexts(store: ResultStore, suite: str, model: str) -> list[str]:
    """The contexts of ``suite`` on ``model`` (one per set of experts and data), newest first."""
    rows = store.query("SELECT context_key FROM results WHERE suite=? AND model=? GROUP BY context_key ORDER BY MAX(created_at) DESC",
                       (suite, model))
    return [row["context_key"] for row in rows]


def _seeds(store: ResultStore, context_key: str) -> list[int]:
    rows = store.query("SELECT DISTINCT seed FROM selections WHERE context_key=? ORDER BY seed", (context_key,))
    return [row["seed"] for row in rows] or [0]


def _family(store: ResultStore, context_key: str) -> str:
    return family_of(store.query("SELECT config FROM results WHERE context_key=? LIMIT 1", (context_key,))[0]["config"])


def _versions(store: ResultStore, table: ResultTable, row: MethodRow, seed: int) -> tuple[str, str]:
    """The package versions and commits of the runs that produced a row's test cells: short, and in full."""
    runs = store.query(
        "SELECT DISTINCT runs.versions AS versions, runs.git_commit AS git_commit FROM results JOIN runs USING (run_id) "
        "WHERE context_key=? AND method=? AND hparams=? AND seed=? AND split=? AND data_access=?",
        (table.context_key, row.method, canonical_json(dict(row.setting)),
         seed if not row.is_reference else 0, SPLIT, row.data_access),
    )
    short, detail = [], []
    for run in runs:
        versions = json.loads(run["versions"])
        commit = run["git_commit"] or ""
        short.append(" ".join(f"{name} {versions[name]}" for name in ("mergebench", "torch") if name in versions) + (f" @{commit[:8]}" if commit else ""))
        detail.append(", ".join(f"{name} {value}" for name, value in sorted(versions.items())) + (f", commit {commit}" if commit else ""))
    return "; ".join(short) or "—", "; ".join(detail)


def load_entries(store: ResultStore, suite: str, model: str) -> list[Entry]:
    """Every row of every context and seed of ``suite`` on ``model``, the reference rows once per context."""
    entries = []
    for context_key in _contexts(store, suite, model):
        family = _family(store, context_key)
        for index, seed in enumerate(_seeds(store, context_key)):
            table = load_table(store, suite, model, seed, context_key)
            for row in table.rows:
                if row.is_reference and index:
                    continue
                versions = _versions(store, table, row, seed)
                entries.append(Entry(table, row, family, 0 if row.is_reference else seed, *versions))
    return entries


def _comparison(a: Entry, b: Entry) -> Comparison | None:
    """``a − b``: paired where both rows share their examples and experts (one context, any seed), else the
    conservative interval of two independent ones (beyond noise only where they do not overlap)."""
    if a.table.context_key == b.table.context_key:
        return a.table.compare(a.row, b.row)
    normalized = (a.row.normalized_accuracy is None) == (b.row.normalized_accuracy is None)
    if a.row.interval is None or b.row.interval is None or not normalized:
        return None
    low, high = a.row.interval, b.row.interval
    return Comparison(a.score - b.score, Interval(low.low - high.high, low.high - high.low))


def ranked(entries: Sequence[Entry]) -> list[tuple[int, Entry]]:
    """The merged entries best first, each with its rank (shared by entries within noise of each other)."""
    merged = sorted((entry for entry in entries if not entry.row.is_reference), key=lambda entry: entry.score, reverse=True)
    return list(zip(ranks(len(merged), lambda above, below: _comparison(merged[above], merged[below])), merged))


# --- pages ------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(text: str, value: float | int | None = None, title: str | None = None) -> str:
    """A table cell; ``value`` is what sorting compares (none: the text; ``None``: missing, sorted last)."""
    attributes = "" if value is None and text != "—" else f' data-value="{"" if value is None else value}"'
    if title:
        attributes += f' title="{_e(title)}"'
    return f"<td{attributes}>{_e(text)}</td>"


def _score_cell(score: float | None) -> str:
    return _cell("—" if score is None else percent(score), None if score is None else round(100 * score, 4))


def _document(title: str, body: str, depth: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n"
        f"<link rel=\"stylesheet\" href=\"{depth}{STYLE}\">\n<script src=\"{depth}{SCRIPT}\" defer></script>\n"
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _published_text(numbers: Iterable[PublishedNumber]) -> str:
    return "; ".join(
        f"{_number(number.absolute)}" + (f" ({_number(number.normalized)})" if number.normalized is not None else "")
        + f" {number.table}, {number.checkpoint_family}"
        for number in numbers
    )


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _filters(table_id: str, columns: Mapping[str, int], entries: Sequence[Entry]) -> str:
    """A text box over the whole row, and one choice per column in ``columns`` among the values it takes."""
    controls = [f'<label>Filter <input type="search" data-filter="{table_id}" placeholder="method, setting, family…"></label>']
    values = {"Data access": [entry.row.data_access for entry in entries], "Checkpoints": [entry.family for entry in entries]}
    for name, index in columns.items():
        options = "".join(f'<option value="{_e(value)}">{_e(value)}</option>' for value in sorted(set(values[name])))
        controls.append(f'<label>{_e(name)} <select data-filter="{table_id}" data-column="{index}"><option value="">all</option>'
                        f"{options}</select></label>")
    return f'<p class="filters">{" ".join(controls)} <span data-count="{table_id}"></span></p>'


def _leaderboard_table(entries: Sequence[Entry], published: Sequence[PublishedNumber]) -> str:
    tasks = entries[0].table.tasks
    header = ["Rank", "Method", "Setting", "Data access", "Norm. %", "95% CI", "Avg. %", *task_labels(entries[0].table),
              "Merge s", "Peak MiB", "Params", "Checkpoints", "Seed", "Versions", "Published (not ranked)"]
    lines = ['<div class="wide"><table id="leaderboard" class="sortable">', "<thead><tr>" + "".join(f"<th>{_e(name)}</th>" for name in header)
             + "</tr></thead>", "<tbody>"]
    for rank, entry in ranked(entries):
        row = entry.row
        costs = row.costs
        parameters = costs.get("parameters")
        interval = row.interval
        cells = [
            _cell(str(rank), rank), _cell(row.label), _cell(format_setting(row.setting) or "—"), _cell(row.data_access),
            _score_cell(row.normalized_accuracy),
            _cell("—" if interval is None else str(interval), None if interval is None else round(100 * interval.low, 4)),
            _score_cell(row.mean_accuracy), *(_score_cell(row.accuracies[task]) for task in tasks),
            _cell("—" if costs.get("seconds") is None else f"{costs['seconds']:.2f}", costs.get("seconds")),
            _cell("—" if costs.get("peak_mb") is None else f"{costs['peak_mb']:.0f}", costs.get("peak_mb")),
            _cell("—" if parameters is None else f"{parameters / 1e6:.2f}M", parameters),
            _cell(entry.family, title=f"context {entry.table.context_key}"), _cell(str(entry.seed), entry.seed),
            _cell(entry.versions, title=entry.versions_detail),
            _cell(_published_text(number for number in published if number.method == row.method and number.task is None) or "—"),
        ]
        lines.append(f'<tr data-method="{_e(row.method)}">' + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table></div>"]
    return _filters("leaderboard", {"Data access": 3, "Checkpoints": header.index("Checkpoints")}, entries) + "\n" + "\n".join(lines)


def _reference_table(entries: Sequence[Entry]) -> str:
    """Our pretrained and individual rows, per checkpoint family: what normalization divides by; not ranked."""
    references = [entry for entry in entries if entry.row.is_reference]
    tasks = entries[0].table.tasks
    header = ["Row", "Checkpoints", "Norm. %", "95% CI", "Avg. %", *task_labels(entries[0].table), "Versions"]
    lines = ['<table id="references" class="sortable">', "<thead><tr>" + "".join(f"<th>{_e(name)}</th>" for name in header)
             + "</tr></thead>", "<tbody>"]
    for entry in references:
        row = entry.row
        interval = "—" if row.interval is None else str(row.interval)
        cells = [_cell(row.label), _cell(entry.family), _score_cell(row.normalized_accuracy), _cell(interval),
                 _score_cell(row.mean_accuracy), *(_score_cell(row.accuracies[task]) for task in tasks),
                 _cell(entry.versions, title=entry.versions_detail)]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</tbody>", "</table>"])


def _published_table(published: Sequence[PublishedNumber]) -> str:
    if not published:
        return "<p>No published table reports this suite on this model.</p>"
    header = ["Source", "Row", "Method", "Task", "Metric", "Absolute %", "Normalized %", "Checkpoints"]
    lines = ['<table id="published" class="sortable">', "<thead><tr>" + "".join(f"<th>{_e(name)}</th>" for name in header)
             + "</tr></thead>", "<tbody>"]
    for number in published:
        cells = [_cell(number.table, title=number.source), _cell(number.row), _cell(number.method or "—"),
                 _cell(number.task or "suite mean"), _cell(number.metric), _cell(_number(number.absolute), number.absolute),
                 _cell(_number(number.normalized), number.normalized), _cell(number.checkpoint_family)]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</tbody>", "</table>"])


CAPTION = (
    "Merged methods on the test split, each with the setting it reports (chosen on validation, or fixed where the setting "
    "says so). Norm.: the mean over tasks of the merged score divided by the task's own expert's score; 95% CI: percentile "
    "bootstrap of Norm. (of Avg. where Norm. is undefined) over the test examples. Rank: 1 + the number of rows above that "
    "are better beyond noise (paired bootstrap on the same checkpoints, otherwise non-overlapping intervals), so rows within "
    "noise share a rank. Costs: mean seconds per merge, peak memory of a merge (MiB), parameters of the merged model. "
    "Click a column to sort it; published numbers are shown beside ours and never ranked."
)


def _page(suite: str, model: str, entries: Sequence[Entry], published: Sequence[PublishedNumber], figures: Sequence[str]) -> str:
    body = [
        '<p><a href="index.html">← all suites and models</a></p>',
        f"<h1>{_e(suite)} on {_e(model)}</h1>",
        f"<p>{_e(CAPTION)}</p>",
        _leaderboard_table(entries, published),
        "<h2>Reference rows (not ranked)</h2>",
        "<p>The pretrained model on every task and each task's own fine-tuned expert, per checkpoint family.</p>",
        _reference_table(entries),
        "<h2>Plots</h2>",
        *figures,
        "<h2>Published numbers (not ranked)</h2>",
        "<p>Transcribed from the papers (tasks/references); comparable with ours only for the same checkpoint family.</p>",
        _published_table(published),
    ]
    return _document(f"{suite} on {model} — mergebench leaderboard", "\n".join(body))


def _index(grid: Mapping[tuple[str, str], tuple[str, Entry | None, int]], figures: Sequence[str]) -> str:
    suites = sorted({suite for suite, _ in grid})
    models = sorted({model for _, model in grid})
    lines = ['<table id="index" class="sortable">', "<thead><tr><th>Suite</th>" + "".join(f"<th>{_e(m)}</th>" for m in models)
             + "</tr></thead>", "<tbody>"]
    for suite in suites:
        cells = [_cell(suite)]
        for model in models:
            if (suite, model) not in grid:
                cells.append(_cell("—", None))
                continue
            page, best, count = grid[(suite, model)]
            text = f"{count} methods" + (f", best {best.row.label} {percent(best.score)}" if best else "")
            cells.append(f'<td data-value="{"" if best is None else round(100 * best.score, 4)}"><a href="{_e(page)}">{_e(text)}</a></td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    body = [
        "<h1>mergebench leaderboard</h1>",
        "<p>Suites (rows) × models (columns) with results: each cell links to the suite's page on that model, ranking the "
        "merged methods by normalized test score with 95% intervals. Best: the normalized score (%) of the first-ranked method.</p>",
        _filters_index(),
        "\n".join(lines),
        "<h2>Plots</h2>" if figures else "",
        *figures,
    ]
    return _document("mergebench leaderboard", "\n".join(body))


def _filters_index() -> str:
    return '<p class="filters"><label>Filter <input type="search" data-filter="index" placeholder="suite…"></label> <span data-count="index"></span></p>'


# --- the site ---------------------------------------------------------------------------------


def build_site(store: ResultStore, published: Sequence[PublishedNumber], out: str | Path) -> list[Path]:
    """Write the site of every (suite, model) in ``store`` to ``out`` (new, empty, or a site built before, whose
    pages and plots of suites no longer there are removed); returns the pages written, the index first."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SCRIPT).is_file())):
        raise MergebenchError(f"{out} exists and is not a leaderboard site: choose a new or empty folder for --out")
    pairs = available(store)
    if not pairs:
        raise MergebenchError(f"no results in {store.path}: nothing to publish")
    latest = {pair: load_table(store, *pair) for pair in pairs}
    family_plots, model_plots = _family_plots(store, list(latest.values()), out)
    written = [plot.path for plots in [*family_plots.values(), *model_plots.values()] for plot in plots]
    pages, grid = [], {}
    for (suite, model), table in latest.items():
        entries = load_entries(store, suite, model)
        stem = report_stem(table)
        plots = [Plot(plot_per_task(table, out / PLOTS / f"{stem}-per-task.png"),
                      f"Per-task test accuracy of {suite} on {model} (latest checkpoints)")]
        plots += model_plots.get((suite_family(suite), model), []) + family_plots.get(suite_family(suite), [])
        written.append(plots[0].path)
        mine = [number for number in published if number.suite == suite and number.model == model]
        pages.append(_write(out / f"{stem}.html", _page(suite, model, entries, mine, [plot.html(out) for plot in plots])))
        best = ranked(entries)
        grid[(suite, model)] = (f"{stem}.html", best[0][1] if best else None, len(best))
    _write(out / SCRIPT, (Path(__file__).parent / "site_assets" / SCRIPT).read_text(encoding="utf-8"))
    _write(out / STYLE, (Path(__file__).parent / "site_assets" / STYLE).read_text(encoding="utf-8"))
    index_plots = [plot for plots in [*family_plots.values(), *model_plots.values()] for plot in plots]
    pages.insert(0, _write(out / "index.html", _index(grid, [plot.html(out) for plot in index_plots])))
    for path in [*out.glob("*.html"), *(out / PLOTS).glob("*.png")]:
        if path not in written and path not in pages:
            path.unlink()  # a page or plot of an earlier build, of a suite and model no longer in the results
    return pages


@dataclass(frozen=True)
class Plot:
    path: Path
    caption: str

    def html(self, site: Path) -> str:
        source = _e(self.path.relative_to(site).as_posix())
        return f'<figure><img src="{source}" alt="{_e(self.caption)}"><figcaption>{_e(self.caption)}</figcaption></figure>'


def _family_plots(store: ResultStore, tables: list[ResultTable], out: Path) -> tuple[dict[str, list[Plot]], dict[tuple[str, str], list[Plot]]]:
    """The task-count plot of each (suite family, model) with several normalizable suites, and the scale plot of
    each family with several models: ``({family: [plot]}, {(family, model): [plot]})``."""
    by_family: dict[str, list[ResultTable]] = {}
    for table in tables:
        by_family.setdefault(suite_family(table.suite), []).append(table)
    family_plots: dict[str, list[Plot]] = {}
    model_plots: dict[tuple[str, str], list[Plot]] = {}
    for family, members in sorted(by_family.items()):
        for model in sorted({table.model for table in members}):
            suites = [t.suite for t in members if t.model == model and t.row(PRETRAINED).normalized_accuracy is not None]
            if len(suites) > 1:
                path = plot_task_count(store, suites, model, out / PLOTS / f"{family}-{model}-task-count.png")
                model_plots[(family, model)] = [Plot(path, f"{family} on {model}: normalized accuracy against the number of tasks")]
        if len({table.model for table in members if table.base_parameters}) > 1:
            path = plot_scale(members, out / PLOTS / f"{family}-scale.png")
            family_plots[family] = [Plot(path, f"{family}: normalized accuracy against model size")]
    return family_plots, model_plots


def _write(path: Path, text: str) -> Path:
    try:
        return write_text(path, text)
    except OSError as error:
        raise MergebenchError(f"cannot write {path}: {error.strerror or error}") from None

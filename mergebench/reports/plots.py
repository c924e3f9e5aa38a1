"""Figures of the model-merging papers, drawn from result tables with matplotlib (Agg, 150 dpi PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

from mergebench.core.atomic import atomic_path  # noqa: E402
from mergebench.errors import MergebenchError  # noqa: E402
from mergebench.reports.tables import MethodRow, ResultTable, load_table  # noqa: E402
from mergebench.store.database import INDIVIDUAL, PRETRAINED, ResultStore  # noqa: E402

DPI = 150
MAX_UPRIGHT_LABEL = 10  # characters of a task name that fit under its group of bars unrotated
REFERENCE_STYLE = {PRETRAINED: {"color": "gray", "linestyle": "--"}, INDIVIDUAL: {"color": "black", "linestyle": ":"}}


def plot_task_count(store: ResultStore, suites: list[str], model: str | None, path: str | Path) -> Path:
    """Normalized test accuracy (%) of each method against the number of merged tasks, one point per suite."""
    if not suites:
        raise MergebenchError("plot_task_count needs at least one suite")
    tables = sorted((load_table(store, suite, model) for suite in suites), key=lambda table: len(table.tasks))
    models = sorted({table.model for table in tables})
    if len(models) > 1:
        raise MergebenchError(f"the suites were run on different models ({', '.join(models)}): name one")
    counts = [len(table.tasks) for table in tables]

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    axes.axhline(100, label=INDIVIDUAL, linewidth=1.5, **REFERENCE_STYLE[INDIVIDUAL])
    axes.plot(counts, [100 * t.row(PRETRAINED).normalized_accuracy for t in tables], marker="s",
              label=PRETRAINED, **REFERENCE_STYLE[PRETRAINED])
    for method in _merged_methods(tables):
        points = [(len(t.tasks), 100 * t.row(method).normalized_accuracy) for t in tables if _has(t, method)]
        axes.plot(*zip(*points), marker="o", linewidth=2, label=method)
        _error_bars(axes, [(len(t.tasks), t.row(method)) for t in tables if _has(t, method)])
    axes.set_xticks(sorted(set(counts)))
    axes.set_xlabel("Number of tasks")
    axes.set_ylabel("Normalized test accuracy (%)")
    axes.set_title(f"Merging more tasks: {models[0]}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return _save(figure, path)


def plot_per_task(table: ResultTable, path: str | Path) -> Path:
    """Grouped bars of each method's test accuracy (%) per task, the individual expert as a black line."""
    bar_rows = [row for row in table.rows if row.method != INDIVIDUAL]
    positions = range(len(table.tasks))
    group_width = 0.8
    bar_width = group_width / len(bar_rows)

    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(table.tasks) + 3), 4.5))
    for index, row in enumerate(bar_rows):
        offsets = [p - group_width / 2 + (index + 0.5) * bar_width for p in positions]
        heights = [100 * row.accuracies[task] for task in table.tasks]
        color = REFERENCE_STYLE.get(row.method, {}).get("color")
        axes.bar(offsets, heights, width=bar_width, label=row.label, color=color)
    individual = table.row(INDIVIDUAL)
    axes.hlines(
        [100 * individual.accuracies[task] for task in table.tasks],
        [p - group_width / 2 for p in positions], [p + group_width / 2 for p in positions],
        colors="black", linewidth=2.5, label=INDIVIDUAL,
    )
    axes.set_xticks(list(positions))
    crowded = max(len(task) for task in table.tasks) > MAX_UPRIGHT_LABEL
    axes.set_xticklabels(table.tasks, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axes.set_ylim(0, 105)
    axes.set_ylabel("Test accuracy (%)")
    axes.set_title(f"Per-task test accuracy: {table.suite}, {table.model}")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return _save(figure, path)


def plot_scale(tables: list[ResultTable], path: str | Path) -> Path:
    """Normalized test accuracy (%) against the model's parameter count (log axis), one line per method,
    one panel per task count: the scale axis of the merging papers (Iso-C Table 1, as a figure)."""
    sized = [table for table in tables if table.base_parameters and table.row(PRETRAINED).normalized_accuracy is not None]
    counts = sorted({len(table.tasks) for table in sized})
    if not counts or len({table.model for table in sized}) < 2:
        raise MergebenchError("a scale plot needs results of at least two models of one suite family")
    figure, panels = plt.subplots(1, len(counts), figsize=(4.2 * len(counts) + 2.5, 4.2), sharey=True, squeeze=False)
    for axes, count in zip(panels[0], counts):
        group = sorted((t for t in sized if len(t.tasks) == count), key=lambda t: t.base_parameters)
        sizes = [t.base_parameters for t in group]
        axes.plot(sizes, [100 * t.row(PRETRAINED).normalized_accuracy for t in group], marker="s", label=PRETRAINED,
                  **REFERENCE_STYLE[PRETRAINED])
        for method in _merged_methods(group):
            present = [t for t in group if _has(t, method)]
            axes.plot([t.base_parameters for t in present], [100 * t.row(method).normalized_accuracy for t in present],
                      marker="o", linewidth=2, label=method)
            _error_bars(axes, [(t.base_parameters, t.row(method)) for t in present])
        axes.set_xscale("log")
        axes.set_xticks(sizes, [f"{t.model}\n{t.base_parameters / 1e6:.1f}M" for t in group], fontsize=8)
        axes.minorticks_off()
        axes.set_title(f"{count} tasks")
        axes.set_xlabel("Model (parameters, log scale)")
        axes.grid(True, alpha=0.3)
    panels[0][0].set_ylabel("Normalized test accuracy (%)")
    panels[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    figure.suptitle("Merging at larger scale (error bars: 95% bootstrap intervals)")
    return _save(figure, path)


def _error_bars(axes, points: list[tuple[float, MethodRow]]) -> None:
    """95% interval bars of the points whose rows have one."""
    shown = [(x, row) for x, row in points if row.interval is not None and row.normalized_accuracy is not None]
    if shown:
        xs = [x for x, _ in shown]
        ys = [100 * row.normalized_accuracy for _, row in shown]
        low = [100 * (row.normalized_accuracy - row.interval.low) for _, row in shown]
        high = [100 * (row.interval.high - row.normalized_accuracy) for _, row in shown]
        axes.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor="gray", elinewidth=1, capsize=2)


def _has(table: ResultTable, method: str) -> bool:
    return any(row.label == method for row in table.merged)


def _merged_methods(tables: list[ResultTable]) -> list[str]:
    """The merged rows of all tables (by label), in order of first appearance."""
    return list(dict.fromkeys(row.label for table in tables for row in table.merged))


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as partial:
            figure.savefig(partial, dpi=DPI, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    except OSError as error:
        raise MergebenchError(f"cannot write figure {path}: {error.strerror or error}") from error
    finally:
        plt.close(figure)
    return path

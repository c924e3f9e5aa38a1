"""Accuracy after each arrival of a continual-merging run, read from the store: a table and a plot.

Each stored point is one (method, order, arrivals t) cell: the merged model's test accuracy on the t
tasks seen so far, normalized per task by the individual experts. Over the orders, the table gives the
mean and the standard deviation (the spread that the order of arrival causes) after each arrival.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from mergebench.errors import MergebenchError  # noqa: E402
from mergebench.evaluation.metrics import normalized_accuracy  # noqa: E402
from mergebench.reports.tables import load_table  # noqa: E402
from mergebench.store.database import ARRIVAL_ORDER, ARRIVED, INDIVIDUAL, ResultStore  # noqa: E402

DPI = 150


@dataclass(frozen=True)
class ArrivalPoint:
    method: str
    order: tuple[str, ...]
    arrived: int
    normalized: float


def load_arrivals(store: ResultStore, suite: str, model: str | None = None) -> list[ArrivalPoint]:
    """Every complete (method, order, arrivals) point of ``suite``'s latest context."""
    table = load_table(store, suite, model)
    individual = table.row(INDIVIDUAL).accuracies
    rows = store.query(
        "SELECT method, hparams, seed, data_access, task, score FROM results WHERE context_key=? AND split='test' "
        "AND hparams LIKE ?", (table.context_key, f'%"{ARRIVED}"%'),
    )
    cells: dict[tuple, dict[str, float]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["hparams"], row["seed"], row["data_access"]), {})[row["task"]] = row["score"]
    points = []
    for (method, hparams_json, _, _), accuracies in cells.items():
        hparams = json.loads(hparams_json)
        order, arrived = tuple(hparams[ARRIVAL_ORDER]), int(hparams[ARRIVED])
        if set(accuracies) == set(order[:arrived]):
            points.append(ArrivalPoint(method, order, arrived, normalized_accuracy(accuracies, individual)))
    if not points:
        raise MergebenchError(f"no continual results for suite {suite!r}: run `mergebench continual` first")
    return sorted(points, key=lambda p: (p.method, p.arrived, p.order))


def summarize(points: list[ArrivalPoint]) -> dict[str, dict[int, tuple[float, float, int]]]:
    """``{method: {t: (mean, standard deviation, orders)}}`` of normalized accuracy over the orders."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for point in points:
        grouped.setdefault(point.method, {}).setdefault(point.arrived, []).append(point.normalized)
    return {
        method: {t: (statistics.fmean(v), statistics.pstdev(v), len(v)) for t, v in sorted(by_t.items())}
        for method, by_t in grouped.items()
    }


def to_markdown(suite: str, summary: dict[str, dict[int, tuple[float, float, int]]]) -> str:
    arrivals = sorted({t for by_t in summary.values() for t in by_t})
    orders = max(n for by_t in summary.values() for _, _, n in by_t.values())
    lines = [
        f"### {suite}: continual merging, normalized test accuracy (%) on the tasks seen so far",
        "",
        f"Mean ± standard deviation over {orders} orders of arrival.",
        "",
        "| Method | " + " | ".join(f"t={t}" for t in arrivals) + " |",
        "|:---|" + "---:|" * len(arrivals),
    ]
    for method, by_t in summary.items():
        cells = [f"{100 * by_t[t][0]:.1f} ± {100 * by_t[t][1]:.1f}" if t in by_t else "—" for t in arrivals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_arrivals(suite: str, summary: dict[str, dict[int, tuple[float, float, int]]], path: str | Path) -> Path:
    """Mean normalized accuracy after each arrival, with a band of ± one standard deviation over orders."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for method, by_t in summary.items():
        arrivals = list(by_t)
        means = [100 * by_t[t][0] for t in arrivals]
        spreads = [100 * by_t[t][1] for t in arrivals]
        line, = axes.plot(arrivals, means, marker="o", linewidth=2, label=method)
        axes.fill_between(arrivals, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                          color=line.get_color(), alpha=0.2)
    axes.axhline(100, color="black", linestyle=":", linewidth=1.5, label=INDIVIDUAL)
    axes.set_xlabel("models merged so far")
    axes.set_ylabel("normalized accuracy on seen tasks (%)")
    axes.set_title(f"{suite}: accuracy after each arrival (mean ± sd over orders)")
    axes.legend(loc="lower left", fontsize=8)
    axes.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path

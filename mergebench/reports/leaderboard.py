"""Published reference numbers for the CLIP ViT suites, read from ``leaderboards/reference.csv``.

Each row is one published number with its source and checkpoint family; ``leaderboards/README.md``
describes the columns. Numbers of different checkpoint families are not comparable.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.suites.vit_suite import TALL_MASKS_TASKS

COLUMNS = ("suite", "model", "method", "task", "absolute_accuracy", "normalized_accuracy", "checkpoint_family", "source", "note")
SUITES = ("vit-8", "vit-14", "vit-20")
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
CHECKPOINT_FAMILIES = ("tall_masks", "task_vectors", "fusion_bench")


def default_path() -> Path:
    return Path(__file__).resolve().parents[2] / "leaderboards" / "reference.csv"


def load_reference(path: str | os.PathLike | None = None) -> list[dict]:
    """Every row as a dict; accuracies are floats in [0, 100] or ``None``, ``task`` is ``None`` for a suite mean."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise MergebenchError(f"reference table not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise MergebenchError(f"{path}: columns must be {', '.join(COLUMNS)}; found {reader.fieldnames}")
        return [_validated(row, f"{path}:{reader.line_num}") for row in reader]


def _validated(row: dict, where: str) -> dict:
    if None in row or any(value is None for value in row.values()):
        raise MergebenchError(f"{where}: expected {len(COLUMNS)} fields")
    for column, allowed in (("suite", SUITES), ("model", MODELS), ("checkpoint_family", CHECKPOINT_FAMILIES)):
        if row[column] not in allowed:
            raise MergebenchError(f"{where}: {column} {row[column]!r} is not one of {', '.join(allowed)}")
    if not row["method"] or not row["source"]:
        raise MergebenchError(f"{where}: method and source must not be empty")
    if row["task"] and row["task"] not in TALL_MASKS_TASKS:
        raise MergebenchError(f"{where}: unknown task {row['task']!r}")
    accuracies = {column: _accuracy(row[column], column, where) for column in ("absolute_accuracy", "normalized_accuracy")}
    if all(value is None for value in accuracies.values()):
        raise MergebenchError(f"{where}: needs an absolute or a normalized accuracy")
    return {**row, **accuracies, "task": row["task"] or None}


def _accuracy(text: str, column: str, where: str) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise MergebenchError(f"{where}: {column} {text!r} is not a number") from None
    if not 0 <= value <= 100:
        raise MergebenchError(f"{where}: {column} {value} is outside [0, 100]")
    return value

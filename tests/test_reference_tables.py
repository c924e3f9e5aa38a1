"""Format checks for the published reference tables in tasks/references/ (one YAML file per table).

The suites, models and tasks a cell names are checked against the suite files in tasks/*.yaml, read
directly; method names and the hyperparameters a table fixes against the method registry.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mergebench.errors import MergebenchError
from mergebench.methods.registry import get_method

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
REFERENCES = TASKS / "references"

REQUIRED = ("title", "source", "checkpoint_family", "split", "tolerance", "hyperparameters", "methods", "traps", "cells")
CELL_KEYS = {"row", "suite", "model", "task", "metric", "absolute", "normalized", "hparams", "note"}
WHERE_KEYS = {"suite", "model", "method", "task"}
BASELINES = {"pretrained", "individual"}
METRICS = {
    "accuracy", "matthews_correlation", "spearman", "accuracy_f1_mean", "pearson_spearman_mean",
    "exact_match", "pass@1", "normalized_only",
    "mixed",  # a suite mean over tasks scored with different metrics (e.g. MCC for CoLA, accuracy elsewhere)
}


def suite_catalogue() -> dict[str, dict[str, set[str]]]:
    """suite name → {"models": …, "tasks": …}, read from every tasks/*.yaml."""
    suites: dict[str, dict[str, set[str]]] = {}
    for path in sorted(TASKS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for name, suite in data.get("suites", {}).items():
            assert name not in suites, f"suite {name} defined twice ({path.name})"
            if isinstance(suite, list):  # vit, glue, mini-*: a list of task names; models at the top level
                if isinstance(data.get("models"), dict):
                    models = set(data["models"])
                else:
                    models = set(data["model"]["choices"])
                task_names = {t["name"] for t in data["tasks"]}
                assert set(suite) <= task_names, f"{path.name}: suite {name} names unknown tasks"
                suites[name] = {"models": models, "tasks": set(suite)}
            else:  # llm: each suite carries its models and its tasks' lm-eval task names
                evals = {e for task in suite["tasks"].values() for e in task["eval"]}
                suites[name] = {"models": set(suite["models"]), "tasks": evals}
    return suites


SUITES = suite_catalogue()
FILES = sorted(REFERENCES.rglob("*.yaml"))


def table_id(path: Path) -> str:
    return path.relative_to(REFERENCES).with_suffix("").as_posix()


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{table_id(path)}: not a mapping"
    return data


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_method(name: str, where: str) -> None:
    if name in BASELINES:
        return
    try:
        get_method(name)
    except MergebenchError as error:
        pytest.fail(f"{where}: {error}")


def check_hparams(method: str | None, hparams, where: str) -> None:
    assert isinstance(hparams, dict), f"{where}: hparams must be a mapping"
    assert method is not None and method not in BASELINES, f"{where}: hparams given for a row without a mergebench method"
    try:
        get_method(method).check_overrides(hparams)
    except MergebenchError as error:
        pytest.fail(f"{where}: {error}")


def test_the_folder_holds_tables():
    assert FILES, "no reference tables under tasks/references"
    assert all(path.suffix == ".yaml" for path in FILES)


def test_suite_catalogue_reads_every_suite_file():
    assert {"vit-8", "vit-14", "vit-20", "glue-8", "glue-7", "llm-math-code"} <= set(SUITES)
    assert "EMNIST" in SUITES["vit-20"]["tasks"] and "gsm8k" in SUITES["llm-math-code"]["tasks"]


@pytest.mark.parametrize("path", FILES, ids=table_id)
def test_reference_table_format(path: Path):
    tid = table_id(path)
    data = load(path)

    missing = [key for key in REQUIRED if key not in data]
    assert not missing, f"{tid}: missing keys {missing}"
    unknown = set(data) - set(REQUIRED)
    assert not unknown, f"{tid}: unknown keys {sorted(unknown)}"
    for key in ("title", "source", "checkpoint_family", "split"):
        assert isinstance(data[key], str) and data[key].strip(), f"{tid}: {key} must be a non-empty string"
    assert is_number(data["tolerance"]) and data["tolerance"] > 0, f"{tid}: tolerance must be a positive number"

    methods = data["methods"]
    assert isinstance(methods, dict) and methods, f"{tid}: methods must be a non-empty mapping"
    for row, method in methods.items():
        assert isinstance(row, str) and row, f"{tid}: row names are strings"
        if method is not None:
            assert isinstance(method, str), f"{tid}: method of row {row!r} must be a string or null"
            check_method(method, f"{tid}, row {row!r}")
    mapped = {m for m in methods.values() if m is not None}

    hyperparameters = data["hyperparameters"]
    if isinstance(hyperparameters, str):
        assert hyperparameters == "validation", f"{tid}: hyperparameters is 'validation' or a mapping"
    else:
        assert isinstance(hyperparameters, dict), f"{tid}: hyperparameters is 'validation' or a mapping"
        for method, hparams in hyperparameters.items():
            assert method in mapped, f"{tid}: hyperparameters for {method!r}, which no row maps to"
            check_hparams(method, hparams, f"{tid}, hyperparameters.{method}")

    cells = data["cells"]
    assert isinstance(cells, list) and cells, f"{tid}: cells must be a non-empty list"
    seen: set[tuple] = set()
    for i, c in enumerate(cells):
        where = f"{tid}, cell {i} {c!r}"
        assert isinstance(c, dict), where
        unknown = set(c) - CELL_KEYS
        assert not unknown, f"{where}: unknown keys {sorted(unknown)}"
        for key in ("row", "suite", "model", "metric"):
            assert isinstance(c.get(key), str), f"{where}: {key} is required"
        assert c["row"] in methods, f"{where}: row is not a key of methods"
        assert c["suite"] in SUITES, f"{where}: unknown suite"
        suite = SUITES[c["suite"]]
        assert c["model"] in suite["models"], f"{where}: model not in suite {c['suite']}"
        if "task" in c:
            assert c["task"] in suite["tasks"], f"{where}: task not in suite {c['suite']}"
        assert c["metric"] in METRICS, f"{where}: unknown metric"
        if c["metric"] == "mixed":
            assert "task" not in c, f"{where}: metric 'mixed' is for suite means only"
        numbers = [c[key] for key in ("absolute", "normalized") if key in c]
        assert numbers, f"{where}: needs absolute and/or normalized"
        for value in numbers:
            assert is_number(value) and -100 <= value <= 100, f"{where}: numbers are percentages in [-100, 100]"
        if c["metric"] == "normalized_only":
            assert "absolute" not in c, f"{where}: a normalized_only cell has no absolute number"
        if "hparams" in c:
            check_hparams(methods[c["row"]], c["hparams"], where)
        if "note" in c:
            assert isinstance(c["note"], str) and c["note"], f"{where}: note must be a string"
        key = (c["row"], c["suite"], c["model"], c.get("task"), c["metric"])
        assert key not in seen, f"{where}: duplicate (row, suite, model, task, metric)"
        seen.add(key)

    traps = data["traps"]
    assert isinstance(traps, list), f"{tid}: traps must be a list"
    for i, trap in enumerate(traps):
        where = f"{tid}, trap {i}"
        assert isinstance(trap, dict) and set(trap) == {"note", "where"}, f"{where}: a trap has exactly note and where"
        assert isinstance(trap["note"], str) and trap["note"].strip(), f"{where}: note must be a non-empty string"
        scope = trap["where"]
        assert isinstance(scope, dict), f"{where}: where must be a mapping ({{}} = every cell)"
        unknown = set(scope) - WHERE_KEYS
        assert not unknown, f"{where}: unknown where keys {sorted(unknown)}"
        if "suite" in scope:
            assert scope["suite"] in SUITES, f"{where}: unknown suite"
        if "model" in scope:
            assert any(scope["model"] in s["models"] for s in SUITES.values()), f"{where}: unknown model"
        if "method" in scope:
            assert scope["method"] in mapped, f"{where}: method {scope['method']!r} is not mapped by any row"
        if scope.get("task") is not None:  # task: null selects the suite means
            assert any(scope["task"] in s["tasks"] for s in SUITES.values()), f"{where}: unknown task"
        touched = [
            c for c in cells
            if all((methods[c["row"]] if k == "method" else c.get(k)) == v for k, v in scope.items())
        ]
        assert touched, f"{where}: touches no cell"


def test_readme_lists_every_table():
    readme = (REFERENCES / "README.md").read_text()
    missing = [table_id(path) for path in FILES if f"`{table_id(path)}`" not in readme]
    assert not missing, f"tasks/references/README.md does not list {missing}"

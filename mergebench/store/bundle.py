"""Results bundles: a store's rows as JSON Lines, for publishing results and submitting them to a leaderboard.

A bundle is a text file of one JSON object per line. The first line is the header::

    {"schema": "mergebench-results-bundle", "version": 1, "mergebench": "0.1.0", "exported_at": "…",
     "counts": {"runs": 1, "results": 96, "selections": 4}}

then one line per row of the store's three tables (:func:`~mergebench.store.database.export_rows`), named
by ``record``: ``run`` (the command, git commit, package versions and device of a run), ``result`` (one
evaluated cell: suite, model, method, hyperparameters, seed, split, task, data access, scores, costs, its
config — which names the checkpoint family — and the checkpoint hashes) and ``selection`` (the setting a
method reports). JSON-valued columns (``config``, ``checkpoints``, ``hparams``, ``versions``) are written
as objects; a cell's per-example outcomes (the store's compact blob) as base64 in ``examples``. Reading a
bundle back gives the rows exactly as the store held them, so export → import is lossless.

A bundle submitted to a leaderboard (:func:`admit`) is checked before anything is written: its schema
version, each cell's key against its identity, no cell given twice, and its checkpoints: every cell
names a checkpoint family, and a family the leaderboard already holds for a suite and model must come
with the same checkpoint hashes — experts of another family are recorded as that family, never mixed.
Cells that the leaderboard holds with other measurements are refused by
:func:`~mergebench.store.database.import_rows`.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import mergebench
from mergebench.core.atomic import atomic_path
from mergebench.errors import MergebenchError
from mergebench.store.database import (
    RESULT_COLUMNS, SELECTION_COLUMNS, SELECTION_KEY, Cell, ResultStore, StoredRows, canonical_json, export_rows, import_rows,
)

SCHEMA = "mergebench-results-bundle"
VERSION = 1
RUN_COLUMNS = ("run_id", "started_at", "command", "git_commit", "versions", "device")
RECORDS = {"run": RUN_COLUMNS, "result": RESULT_COLUMNS, "selection": SELECTION_COLUMNS}
"""The record kinds of a bundle and their columns, in the store's column order."""
TABLES = {"run": "runs", "result": "results", "selection": "selections"}
JSON_COLUMNS = {"run": ("versions",), "result": ("hparams", "config", "checkpoints"), "selection": ("hparams",)}
BINARY_COLUMNS = {"result": ("examples",)}
NUMBER_COLUMNS = {
    "run": {"started_at": False},
    "result": {"seed": False, "accuracy": False, "correct": False, "total": False, "created_at": False, "score": True,
               "merge_seconds": True, "eval_seconds": True, "merge_peak_mb": True, "parameters": True},
    "selection": {"seed": False, "created_at": False, "validation_score": True},
}
"""The numeric columns of each record, and whether each may be null."""
UNSPECIFIED_FAMILY = "unspecified"


@dataclass(frozen=True)
class Bundle:
    """A bundle's header and its rows, in the store's form."""

    header: Mapping[str, Any]
    rows: StoredRows
    source: str = field(default="")


def write_bundle(store: ResultStore, path: str | Path, suites: Iterable[str] = ()) -> dict[str, int]:
    """Write every row of ``store`` (of ``suites`` only, when named) to the bundle ``path``; returns the counts."""
    rows = export_rows(store)
    suites = set(suites)
    if suites:
        rows = _of_suites(rows, suites)
        if not rows.results:
            raise MergebenchError(f"{store.path} holds no results of {', '.join(sorted(suites))}")
    counts = {"runs": len(rows.runs), "results": len(rows.results), "selections": len(rows.selections)}
    header = {"schema": SCHEMA, "version": VERSION, "mergebench": mergebench.__version__,
              "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "counts": counts}
    lines = [json.dumps(header, sort_keys=True)]
    for record, table in (("run", rows.runs), ("result", rows.results), ("selection", rows.selections)):
        lines += [json.dumps(_to_json(record, row), sort_keys=True) for row in table]
    path = Path(path)
    try:
        with atomic_path(path) as partial:
            partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as error:
        raise MergebenchError(f"cannot write bundle {path}: {error.strerror or error}") from None
    return counts


def _of_suites(rows: StoredRows, suites: set[str]) -> StoredRows:
    suite = RESULT_COLUMNS.index("suite")
    results = [row for row in rows.results if row[suite] in suites]
    selections = [row for row in rows.selections if row[SELECTION_COLUMNS.index("suite")] in suites]
    run_ids = {row[RESULT_COLUMNS.index("run_id")] for row in results} | {row[SELECTION_COLUMNS.index("run_id")] for row in selections}
    return StoredRows([row for row in rows.runs if row[0] in run_ids], results, selections)


def _to_json(record: str, row: tuple) -> dict[str, Any]:
    values = dict(zip(RECORDS[record], row))
    for column in JSON_COLUMNS[record]:
        values[column] = json.loads(values[column])
    for column in BINARY_COLUMNS.get(record, ()):
        if values[column] is not None:
            values[column] = base64.b64encode(values[column]).decode("ascii")
    return {"record": record, **values}


def _from_json(record: str, values: dict[str, Any], where: str) -> tuple:
    columns = RECORDS[record]
    missing = [column for column in columns if column not in values]
    extra = sorted(set(values) - set(columns))
    if missing or extra:
        raise MergebenchError(f"{where}: a {record} record " + (f"lacks {missing[0]!r}" if missing else f"has an unknown field {extra[0]!r}"))
    for column, nullable in NUMBER_COLUMNS[record].items():
        value = values[column]
        if not (value is None and nullable) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise MergebenchError(f"{where}: {column} of a {record} record must be a number, not {value!r}")
    for column in JSON_COLUMNS[record]:
        values[column] = canonical_json(values[column])
    for column in BINARY_COLUMNS.get(record, ()):
        if values[column] is not None:
            try:
                values[column] = base64.b64decode(values[column], validate=True)
            except (binascii.Error, TypeError):
                raise MergebenchError(f"{where}: {column} is not base64") from None
    return tuple(values[column] for column in columns)


def read_bundle(path: str | Path) -> Bundle:
    """The rows of the bundle ``path``, checked line by line (every problem one line naming the file and line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MergebenchError(f"cannot read bundle {path}: {getattr(error, 'strerror', None) or error}") from None
    if not lines:
        raise MergebenchError(f"{path} is empty, not a mergebench results bundle")
    header = _line(path, 1, lines[0])
    if header.get("schema") != SCHEMA:
        raise MergebenchError(f"{path} is not a mergebench results bundle (its first line names no schema {SCHEMA!r})")
    if header.get("version") != VERSION:
        raise MergebenchError(f"{path} is a bundle of schema version {header.get('version')!r}; this mergebench reads version {VERSION}")
    tables: dict[str, list[tuple]] = {record: [] for record in RECORDS}
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        values = _line(path, number, text)
        record = values.pop("record", None)
        if record not in RECORDS:
            raise MergebenchError(f"{path}:{number}: unknown record {record!r} (expected one of {', '.join(RECORDS)})")
        tables[record].append(_from_json(record, values, f"{path}:{number}"))
    counts = {TABLES[record]: len(rows) for record, rows in tables.items()}
    if header.get("counts") != counts:
        raise MergebenchError(f"{path} holds {counts} where its header announces {header.get('counts')}: the bundle is incomplete")
    rows = StoredRows(tables["run"], tables["result"], tables["selection"])
    _check_identities(rows, path)
    return Bundle(header, rows, str(path))


def _line(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise MergebenchError(f"{path}:{number}: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise MergebenchError(f"{path}:{number}: not a JSON object")
    return value


def _check_identities(rows: StoredRows, path: Path) -> None:
    """Each result's key is that of its identity, no cell, selection or run is given twice, and every run named is described."""
    column = {name: index for index, name in enumerate(RESULT_COLUMNS)}
    seen: dict[str, str] = {}
    for row in rows.results:
        cell = Cell(row[column["context_key"]], row[column["suite"]], row[column["model"]], row[column["method"]],
                    json.loads(row[column["hparams"]]), row[column["seed"]], row[column["split"]], row[column["data_access"]])
        task = row[column["task"]]
        name = f"{cell.method} {row[column['hparams']]} seed {cell.seed} on {cell.suite}/{task} ({cell.split}, {cell.model})"
        if cell.key(task) != row[column["cell_key"]]:
            raise MergebenchError(f"{path}: the key of cell {name} does not match the cell (was the bundle edited?)")
        if row[column["cell_key"]] in seen:
            raise MergebenchError(f"{path} gives cell {name} twice")
        seen[row[column["cell_key"]]] = name
    selections = [tuple(row[SELECTION_COLUMNS.index(key)] for key in SELECTION_KEY) for row in rows.selections]
    twice = next((key for index, key in enumerate(selections) if key in selections[:index]), None)
    if twice is not None:
        raise MergebenchError(f"{path} selects a setting of {twice[1]} (seed {twice[2]}) twice")
    run_ids = [row[0] for row in rows.runs]
    if len(set(run_ids)) != len(run_ids):
        raise MergebenchError(f"{path} describes run {next(r for r in run_ids if run_ids.count(r) > 1)} twice")
    named = [row[column["run_id"]] for row in rows.results] + [row[SELECTION_COLUMNS.index("run_id")] for row in rows.selections]
    undescribed = sorted(set(named) - set(run_ids))
    if undescribed:
        raise MergebenchError(f"{path} names run {undescribed[0]} without describing it (its command and versions)")


# --- leaderboard submissions ------------------------------------------------------------------


def family_of(config_json: str) -> str:
    """The checkpoint family a cell's config names (``unspecified`` where its kind did not say)."""
    return json.loads(config_json).get("checkpoint_family") or UNSPECIFIED_FAMILY


EXPERT_COLUMNS = ("suite", "model", "config", "checkpoints")


def _experts(rows: Iterable[tuple], source: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """``{(suite, model, family): {checkpoint: hash}}`` of rows of :data:`EXPERT_COLUMNS`; one family of one suite
    and model has one set of experts."""
    found: dict[tuple[str, str, str], dict[str, str]] = {}
    for suite, model, config, checkpoints in rows:
        key = (suite, model, family_of(config))
        hashes = json.loads(checkpoints)
        differing = _differing(found.setdefault(key, hashes), hashes)
        if differing:
            raise MergebenchError(
                f"{source} holds suite {suite} on {model} with two sets of {key[2]!r} checkpoints ({differing} differs): "
                "one checkpoint family has one set of experts"
            )
    return found


def _differing(a: Mapping[str, str], b: Mapping[str, str]) -> str | None:
    """The first checkpoint whose hash differs between ``a`` and ``b`` (or that only one of them names)."""
    return next((name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)), None)


def relabel(bundle: Bundle, family: str) -> Bundle:
    """The bundle with every cell recorded as checkpoint family ``family``: a submitter's flag that its experts
    are not those of the family its runs named."""
    config = RESULT_COLUMNS.index("config")
    results = [
        row[:config] + (canonical_json(json.loads(row[config]) | {"checkpoint_family": family}),) + row[config + 1:]
        for row in bundle.rows.results
    ]
    return replace(bundle, rows=replace(bundle.rows, results=results))


@dataclass(frozen=True)
class Admitted:
    """What :func:`admit` added: new results, and per (suite, model, family) whether it is new to the leaderboard."""

    new_results: int
    families: Mapping[tuple[str, str, str], str]
    """Per (suite, model, family): ``matches`` (the hashes are those of the leaderboard's experts of that family),
    ``new`` (the leaderboard held nothing of that suite and model) or, flagged, another family than those it holds."""


def admit(leaderboard: ResultStore, bundle: Bundle) -> Admitted:
    """Check ``bundle`` against the leaderboard's store and add it in one transaction (nothing on a refusal)."""
    if not bundle.rows.results:
        raise MergebenchError(f"{bundle.source} holds no results")
    columns = [RESULT_COLUMNS.index(column) for column in EXPERT_COLUMNS]
    submitted = _experts((tuple(row[i] for i in columns) for row in bundle.rows.results), bundle.source)
    suites = sorted({suite for suite, _, _ in submitted})
    held_rows = leaderboard.query(
        f"SELECT DISTINCT {','.join(EXPERT_COLUMNS)} FROM results WHERE suite IN ({','.join('?' * len(suites))})", suites
    )
    held = _experts((tuple(row) for row in held_rows), str(leaderboard.path))
    families: dict[tuple[str, str, str], str] = {}
    for key, hashes in submitted.items():
        if key not in held:
            others = sorted(family for suite, model, family in held if (suite, model) == key[:2])
            families[key] = f"another checkpoint family than the leaderboard's {', '.join(others)}" if others else "new"
            continue
        differing = _differing(held[key], hashes)
        if differing:
            suite, model, family = key
            raise MergebenchError(
                f"{bundle.source}: its {family!r} checkpoints of suite {suite} on {model} are not the leaderboard's "
                f"({differing}: {str(hashes.get(differing))[:12]} where the leaderboard has {str(held[key].get(differing))[:12]}); "
                "if they are another family's experts, add the bundle with --family NAME"
            )
        families[key] = "matches"
    return Admitted(import_rows(leaderboard, bundle.rows, bundle.source), families)

"""Results in an embedded SQLite database: one row per evaluated cell, written in transactions.

A *cell* is one (suite, model, method, hyperparameter setting, seed, split, task) under one *context*
(the checkpoint hashes and the evaluation data). Each row carries its full config, the package
versions, the git commit and the checkpoint hashes. Rows are keyed by a hash of their identity and
inserted with ``INSERT OR IGNORE`` inside one transaction per merged model, so a killed sweep loses at
most the model being evaluated, and re-running skips finished cells without duplicating any.

Each row holds the arg-max ``accuracy`` (``correct`` of ``total``; 0 for a regression task) and the
task's own ``score`` under its ``metric`` (accuracy, Matthews or Spearman correlation:
:mod:`mergebench.evaluation.metrics`), which tables, selection and normalization read. A store
written before ``score`` existed gains the column with ``score = accuracy`` and ``metric = 'accuracy'``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sqlite3
import struct
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mergebench.errors import MergebenchError
from mergebench.core.scores import ACCURACY, PerExample, TaskScore

DATABASE_NAME = "mergebench.sqlite"
LOCK_TIMEOUT_S = 30  # how long a writer waits for another process's lock before giving up
PRETRAINED, INDIVIDUAL = "pretrained", "individual"
REFERENCE_METHODS = (PRETRAINED, INDIVIDUAL)  # the rows every run stores beside the merged methods
ARRIVED, ARRIVAL_ORDER = "arrived", "arrival_order"  # hyperparameters of a continual-merging cell

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    command TEXT NOT NULL,
    git_commit TEXT,
    versions TEXT NOT NULL,
    device TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    cell_key TEXT PRIMARY KEY,
    context_key TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    suite TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    hparams TEXT NOT NULL,
    seed INTEGER NOT NULL,
    split TEXT NOT NULL,
    task TEXT NOT NULL,
    data_access TEXT NOT NULL,
    accuracy REAL NOT NULL,
    correct INTEGER NOT NULL,
    total INTEGER NOT NULL,
    merge_seconds REAL,
    eval_seconds REAL,
    config TEXT NOT NULL,
    checkpoints TEXT NOT NULL,
    created_at REAL NOT NULL,
    score REAL,
    metric TEXT,
    merge_peak_mb REAL,
    parameters INTEGER,
    examples BLOB
);
CREATE INDEX IF NOT EXISTS results_by_context ON results(context_key, method, split);
CREATE TABLE IF NOT EXISTS selections (
    context_key TEXT NOT NULL,
    suite TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    hparams TEXT NOT NULL,
    data_access TEXT NOT NULL,
    validation_score REAL,
    criterion TEXT NOT NULL,
    run_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    selection TEXT NOT NULL,
    PRIMARY KEY (context_key, method, seed, data_access, selection)
);
"""
WHOLE_GRID = "grid"
"""The ``selection`` of a setting chosen from a method's whole grid (by its suite's rule, on validation where
there is a validation split); a setting fixed on the command line is its own row, labelled ``fixed k=v …``."""

SELECTION_COLUMNS = (
    "context_key", "suite", "model", "method", "seed", "hparams", "data_access", "validation_score", "criterion", "run_id",
    "created_at", "selection",
)
SELECTION_KEY = ("context_key", "method", "seed", "data_access", "selection")
ADDED_COLUMNS = {"merge_peak_mb": "REAL", "parameters": "INTEGER", "score": "REAL", "metric": "TEXT", "examples": "BLOB"}
RESULT_COLUMNS = (
    "cell_key", "context_key", "run_id", "suite", "model", "method", "hparams", "seed", "split", "task", "data_access",
    "accuracy", "correct", "total", "merge_seconds", "eval_seconds", "config", "checkpoints", "created_at",
    "merge_peak_mb", "parameters", "score", "metric", "examples",
)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_key(*parts: Any) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Cell:
    """The identity of one stored result, minus the task and the measurements."""

    context_key: str
    suite: str
    model: str
    method: str
    hparams: Mapping[str, Any]
    seed: int
    split: str
    data_access: str = "none"

    def key(self, task: str) -> str:
        identity = [self.context_key, self.method, dict(self.hparams), self.seed, self.split, task]
        if self.data_access != "none":
            identity.append(self.data_access)
        return content_key(*identity)


class ResultStore:
    """The SQLite file ``<directory>/mergebench.sqlite``."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.path = directory / DATABASE_NAME
        self._pending_runs: dict[str, tuple] = {}
        if directory.exists() and not directory.is_dir():
            raise MergebenchError(f"results folder {directory} is a file, not a folder (choose another --out)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MergebenchError(f"cannot create the results folder {directory}: {error.strerror or error}") from None
        if not os.access(directory, os.W_OK):
            raise MergebenchError(f"results folder {directory} is not writable (choose another --out)")
        try:
            with closing(self._connect()) as connection, connection:
                damage = connection.execute("PRAGMA quick_check").fetchone()[0]
                if damage != "ok":
                    raise MergebenchError(
                        f"results database {self.path} is damaged ({damage.splitlines()[0]}): its intact cells can be saved with "
                        f"`sqlite3 {self.path} .recover | sqlite3 recovered.sqlite`; move the damaged file away to start a new store"
                    )
                _migrate_selections(connection)
                connection.executescript(SCHEMA)
                present = {row["name"] for row in connection.execute("PRAGMA table_info(results)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in present:  # a store written before these cost and score columns existed
                        connection.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
                if "score" not in present:  # its rows are all accuracies
                    connection.execute("UPDATE results SET score = accuracy, metric = ?", (ACCURACY,))
        except sqlite3.DatabaseError as error:
            raise MergebenchError(f"cannot open results database {self.path}: {error}") from None

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)
        _enter_write_ahead_logging(connection)
        connection.execute("PRAGMA synchronous=FULL")
        connection.row_factory = sqlite3.Row
        return connection

    def query(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            with closing(self._connect()) as connection:
                return connection.execute(sql, tuple(parameters)).fetchall()
        except sqlite3.DatabaseError as error:
            raise MergebenchError(f"cannot read results database {self.path}: {error}") from None

    def start_run(self, run_id: str, command: str, git_commit: str | None, versions: Mapping[str, str], device: str) -> None:
        """Describe a run; its row is written with its first cell, so a run refused before storing anything leaves none."""
        self._pending_runs[run_id] = (run_id, time.time(), command, git_commit, canonical_json(versions), device)

    def adopt_run(self, row: tuple) -> None:
        """Write cells under another store's run (its :meth:`pending_run` row), the row going with the first cell."""
        self._pending_runs[row[0]] = tuple(row)

    def pending_run(self, run_id: str) -> tuple:
        """The row of a described run (:meth:`start_run`), stored or not yet."""
        if run_id in self._pending_runs:
            return self._pending_runs[run_id]
        return tuple(self.query("SELECT * FROM runs WHERE run_id=?", (run_id,))[0])

    def _write(self, what: str, statements: Iterable[tuple[str, Any]], run_id: str | None = None) -> None:
        """Execute ``statements`` (``(sql, parameters)``; ``executemany`` for a list of rows) in one transaction,
        the run's row first if it is not stored yet: a failure (a full disk, a lock) leaves the store as it was."""
        try:
            with closing(self._connect()) as connection, connection:
                if run_id in self._pending_runs:
                    connection.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?)", self._pending_runs[run_id])
                for sql, parameters in statements:
                    if isinstance(parameters, list):
                        connection.executemany(sql, parameters)
                    else:
                        connection.execute(sql, parameters)
        except sqlite3.Error as error:
            raise MergebenchError(
                f"cannot store {what} in {self.path} ({error}); every cell stored before it is kept: free the space or "
                "the lock, then run the same command again to resume"
            ) from None
        self._pending_runs.pop(run_id, None)

    def finished_tasks(self, cell: Cell, tasks: Iterable[str]) -> set[str]:
        tasks = list(tasks)
        keys = {cell.key(task): task for task in tasks}
        marks = ",".join("?" * len(keys))
        rows = self.query(f"SELECT cell_key FROM results WHERE cell_key IN ({marks})", keys)
        return {keys[row["cell_key"]] for row in rows}

    def record(
        self,
        cell: Cell,
        run_id: str,
        outcomes: Mapping[str, TaskScore | tuple[int, int]],
        *,
        config: Mapping[str, Any],
        checkpoints: Mapping[str, str],
        merge_seconds: float | None = None,
        eval_seconds: float | None = None,
        merge_peak_mb: float | None = None,
        parameters: int | None = None,
    ) -> None:
        """Store ``{task: TaskScore}`` (or an accuracy's ``(correct, total)``) for one cell in a single
        transaction, with the merge's costs."""
        now = time.time()
        scores = {task: TaskScore.of(outcome) for task, outcome in outcomes.items()}
        rows = [
            (
                cell.key(task), cell.context_key, run_id, cell.suite, cell.model, cell.method,
                canonical_json(dict(cell.hparams)), cell.seed, cell.split, task, cell.data_access,
                score.correct / score.total, score.correct, score.total,
                merge_seconds, eval_seconds, canonical_json(config), canonical_json(checkpoints), now,
                merge_peak_mb, parameters, score.score, score.metric, encode_examples(score.examples),
            )
            for task, score in scores.items()
        ]
        sql = f"INSERT OR IGNORE INTO results ({','.join(RESULT_COLUMNS)}) VALUES ({','.join('?' * len(RESULT_COLUMNS))})"
        self._write(f"the results of {cell.method} on {cell.suite}", [(sql, rows)], run_id)

    def accuracies(
        self, context_key: str, method: str, split: str, seed: int | None = None, data_access: str = "none"
    ) -> dict[str, dict[str, float]]:
        """``{hparams_json: {task: score}}`` for one method, split and data access (the task's metric; accuracy mostly)."""
        sql = "SELECT hparams, task, score FROM results WHERE context_key=? AND method=? AND split=? AND data_access=?"
        parameters: list[Any] = [context_key, method, split, data_access]
        if seed is not None:
            sql += " AND seed=?"
            parameters.append(seed)
        table: dict[str, dict[str, float]] = {}
        for row in self.query(sql, parameters):
            table.setdefault(row["hparams"], {})[row["task"]] = row["score"]
        return table

    def examples(
        self, context_key: str, method: str, split: str, hparams: Mapping[str, Any] | str, seed: int, data_access: str = "none"
    ) -> dict[str, PerExample]:
        """``{task: PerExample}`` of one stored setting (tasks stored without per-example outcomes are left out)."""
        hparams_json = hparams if isinstance(hparams, str) else canonical_json(dict(hparams))
        rows = self.query(
            "SELECT task, examples FROM results WHERE context_key=? AND method=? AND split=? AND hparams=? AND seed=? "
            "AND data_access=? AND examples IS NOT NULL",
            (context_key, method, split, hparams_json, seed, data_access),
        )
        return {row["task"]: decode_examples(row["examples"]) for row in rows}

    def metrics(self, context_key: str) -> dict[str, str]:
        """``{task: metric}`` of the tasks stored under one context."""
        rows = self.query("SELECT DISTINCT task, metric FROM results WHERE context_key=?", (context_key,))
        return {row["task"]: row["metric"] for row in rows}

    def individual_scores(self, context_key: str, split: str) -> dict[str, float]:
        """``{task: score}`` of each task's own expert (the ``individual`` reference row) on ``split``."""
        return next(iter(self.accuracies(context_key, INDIVIDUAL, split, seed=0).values()))

    def merge_costs(self, context_key: str, method: str, data_access: str = "none") -> dict[str, float | None]:
        """A method's costs over its stored merges: mean seconds, largest peak MiB, parameter count."""
        rows = self.query(
            "SELECT AVG(merge_seconds) AS seconds, MAX(merge_peak_mb) AS peak_mb, MAX(parameters) AS parameters FROM "
            "(SELECT DISTINCT hparams, seed, split, merge_seconds, merge_peak_mb, parameters FROM results "
            "WHERE context_key=? AND method=? AND data_access=?)",
            (context_key, method, data_access),
        )
        return dict(rows[0])

    def select(self, cell: Cell, validation_score: float | None, criterion: str, run_id: str,
               selection: str = WHOLE_GRID) -> None:
        """Record the setting ``cell`` as the one reported for its method under ``selection``: chosen on
        validation from the whole grid, or a fixed setting (its own row: it never replaces the validated one)."""
        score = None if validation_score is None or math.isnan(validation_score) else validation_score
        sql = f"INSERT OR REPLACE INTO selections ({','.join(SELECTION_COLUMNS)}) VALUES ({','.join('?' * len(SELECTION_COLUMNS))})"
        parameters = (
            cell.context_key, cell.suite, cell.model, cell.method, cell.seed, canonical_json(dict(cell.hparams)),
            cell.data_access, score, criterion, run_id, time.time(), selection,
        )
        self._write(f"the selection of {cell.method} on {cell.suite}", [(sql, parameters)], run_id)


BITS, ARRAYS = b"B", b"A"


@dataclass(frozen=True)
class StoredRows:
    """Rows of a store's three tables, as tuples in column order: what one store hands another."""

    runs: list[tuple]
    results: list[tuple]
    selections: list[tuple]

    def __len__(self) -> int:
        return len(self.results) + len(self.selections)


MEASURED = ("correct", "total", "score", "metric", "examples")
"""The columns that must agree when two stores hold the same cell."""


def export_rows(store: "ResultStore", context_key: str | None = None) -> StoredRows:
    """Every row of ``store`` (of one context, if given), with the run rows they refer to."""
    where, parameters = ("WHERE context_key=?", (context_key,)) if context_key else ("", ())
    results = [tuple(row) for row in store.query(f"SELECT {','.join(RESULT_COLUMNS)} FROM results {where} ORDER BY cell_key", parameters)]
    selections = [tuple(row) for row in store.query(f"SELECT {','.join(SELECTION_COLUMNS)} FROM selections {where}", parameters)]
    run_ids = {row[RESULT_COLUMNS.index("run_id")] for row in results} | {row[SELECTION_COLUMNS.index("run_id")] for row in selections}
    runs = [tuple(row) for row in store.query("SELECT * FROM runs") if row["run_id"] in run_ids]
    return StoredRows(runs, results, selections)


def import_rows(store: "ResultStore", rows: StoredRows, source: str) -> int:
    """Add ``rows`` to ``store`` in one transaction, refusing (in one line, adding nothing) a cell that the store
    holds with other measurements, or a selection of another setting; returns the number of new results."""
    cell_key, measured = RESULT_COLUMNS.index("cell_key"), [RESULT_COLUMNS.index(column) for column in MEASURED]
    keys = [row[cell_key] for row in rows.results]
    existing: dict[str, tuple] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        for row in store.query(f"SELECT cell_key, {','.join(MEASURED)} FROM results WHERE cell_key IN ({','.join('?' * len(chunk))})", chunk):
            existing[row["cell_key"]] = tuple(row)[1:]
    for row in rows.results:
        held = existing.get(row[cell_key])
        if held is not None and held != tuple(row[i] for i in measured):
            describe = {column: row[RESULT_COLUMNS.index(column)] for column in ("suite", "model", "method", "hparams", "split", "task")}
            raise MergebenchError(f"{source} holds cell {describe} with other results than {store.path}: refusing to merge")
    chosen = {tuple(row[SELECTION_COLUMNS.index(c)] for c in SELECTION_KEY): row[SELECTION_COLUMNS.index("hparams")]
              for row in store.query(f"SELECT {','.join(SELECTION_COLUMNS)} FROM selections")}
    for row in rows.selections:
        key = tuple(row[SELECTION_COLUMNS.index(c)] for c in SELECTION_KEY)
        if key in chosen and chosen[key] != row[SELECTION_COLUMNS.index("hparams")]:
            raise MergebenchError(f"{source} selects {key[1]} {row[SELECTION_COLUMNS.index('hparams')]} where {store.path} selects "
                                  f"{chosen[key]}: refusing to merge")
    new = sum(row[cell_key] not in existing for row in rows.results)
    store._write(
        f"the rows of {source}",
        [
            (f"INSERT OR IGNORE INTO runs VALUES ({','.join('?' * 6)})", rows.runs),
            (f"INSERT OR IGNORE INTO results ({','.join(RESULT_COLUMNS)}) VALUES ({','.join('?' * len(RESULT_COLUMNS))})", rows.results),
            (f"INSERT OR REPLACE INTO selections ({','.join(SELECTION_COLUMNS)}) VALUES ({','.join('?' * len(SELECTION_COLUMNS))})", rows.selections),
        ],
    )
    return new


def encode_examples(examples: PerExample | None) -> bytes | None:
    """Per-example outcomes, compactly: right/wrong as packed bits (``B``, the count, the bits), or
    predictions and labels of a correlation metric as two ``.npy`` arrays (``A``)."""
    if examples is None:
        return None
    values = np.asarray(examples.values)
    if values.dtype == bool:
        return BITS + struct.pack("<Q", len(values)) + np.packbits(values).tobytes()
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    np.save(buffer, np.asarray(examples.labels), allow_pickle=False)
    return ARRAYS + buffer.getvalue()


def decode_examples(blob: bytes) -> PerExample:
    if blob[:1] == BITS:
        (count,) = struct.unpack("<Q", blob[1:9])
        return PerExample(np.unpackbits(np.frombuffer(blob[9:], dtype=np.uint8), count=count).astype(bool))
    buffer = io.BytesIO(blob[1:])
    return PerExample(np.load(buffer, allow_pickle=False), np.load(buffer, allow_pickle=False))


def _enter_write_ahead_logging(connection: sqlite3.Connection) -> None:
    """Switch the file to WAL mode, which it then keeps. The switch needs the file to itself, and SQLite answers
    "locked" at once, without waiting, while another process opens the same new store: so wait here."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _migrate_selections(connection: sqlite3.Connection) -> None:
    """A store written before fixed settings had rows of their own: its selections were all chosen on validation."""
    columns = {row["name"] for row in connection.execute("PRAGMA table_info(selections)")}
    if not columns or "selection" in columns:
        return
    connection.execute("ALTER TABLE selections RENAME TO selections_before_fixed_rows")
    connection.executescript(SCHEMA)
    connection.execute(
        "INSERT INTO selections SELECT context_key, suite, model, method, seed, hparams, data_access, validation_score, "
        "criterion, run_id, created_at, ? FROM selections_before_fixed_rows", (WHOLE_GRID,),
    )
    connection.execute("DROP TABLE selections_before_fixed_rows")

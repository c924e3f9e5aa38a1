"""The SQLite result store: identity of cells, no duplicates, atomic writes, clear errors."""

import multiprocessing
import sqlite3

import pytest

from mergebench.errors import MergebenchError
from mergebench.store.database import DATABASE_NAME, SCHEMA, Cell, ResultStore


def cell(**changes):
    fields = dict(context_key="ctx", suite="s", model="m", method="ties", hparams={"k": 20.0, "lam": 1.0}, seed=0, split="validation")
    return Cell(**(fields | changes))


def test_record_twice_keeps_one_row_per_task(tmp_path):
    store = ResultStore(tmp_path)
    store.start_run("r1", "mergebench run", "abc", {"torch": "2.13.0"}, "cpu")
    for _ in range(2):
        store.record(cell(), "r1", {"a": (3, 4), "b": (1, 4)}, config={"suite": "s"}, checkpoints={"a": "h1"})
    rows = store.query("SELECT task, accuracy, checkpoints, config FROM results ORDER BY task")
    assert [(r["task"], r["accuracy"]) for r in rows] == [("a", 0.75), ("b", 0.25)]
    assert '"a":"h1"' in rows[0]["checkpoints"]


def test_finished_tasks_distinguishes_every_part_of_the_identity(tmp_path):
    store = ResultStore(tmp_path)
    store.record(cell(), "r1", {"a": (1, 1)}, config={}, checkpoints={})
    assert store.finished_tasks(cell(), ["a", "b"]) == {"a"}
    for change in [dict(hparams={"k": 20.0, "lam": 0.9}), dict(seed=1), dict(split="test"), dict(context_key="other"), dict(method="dare")]:
        assert store.finished_tasks(cell(**change), ["a"]) == set()


def test_hparam_order_does_not_change_identity():
    assert cell(hparams={"k": 20.0, "lam": 1.0}).key("a") == cell(hparams={"lam": 1.0, "k": 20.0}).key("a")


def test_failed_transaction_writes_nothing(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ZeroDivisionError):
        store.record(cell(), "r1", {"a": (1, 1), "b": (1, 0)}, config={}, checkpoints={})
    assert store.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 0


def test_selection_is_replaced_not_duplicated(tmp_path):
    store = ResultStore(tmp_path)
    store.select(cell(split="test"), 0.9, "criterion", "r1")
    store.select(cell(split="test", hparams={"k": 10.0}), 0.95, "criterion", "r2")
    rows = store.query("SELECT hparams, validation_score FROM selections")
    assert len(rows) == 1 and rows[0]["validation_score"] == 0.95


def test_corrupt_database_gives_one_line_error(tmp_path):
    (tmp_path / "mergebench.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(MergebenchError, match="cannot open results database"):
        ResultStore(tmp_path)


def test_database_is_plain_sqlite(tmp_path):
    store = ResultStore(tmp_path)
    store.record(cell(), "r1", {"a": (1, 2)}, config={}, checkpoints={})
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("SELECT accuracy FROM results").fetchone() == (0.5,)


def test_a_store_written_before_the_cost_columns_gains_them(tmp_path):
    old_schema = SCHEMA.replace(",\n    merge_peak_mb REAL,\n    parameters INTEGER,\n    examples BLOB\n", "\n")
    assert "merge_peak_mb" not in old_schema
    connection = sqlite3.connect(tmp_path / DATABASE_NAME)
    connection.executescript(old_schema)
    connection.close()
    store = ResultStore(tmp_path)
    cell = Cell("ctx", "s", "m", "ties", {"k": 20}, 0, "test")
    store.start_run("r", "cmd", None, {}, "cpu")
    store.record(cell, "r", {"a": (3, 4)}, config={}, checkpoints={}, merge_seconds=1.5, merge_peak_mb=12.0, parameters=7)
    assert store.merge_costs("ctx", "ties") == {"seconds": 1.5, "peak_mb": 12.0, "parameters": 7}


def test_a_full_disk_is_one_error_and_keeps_every_earlier_cell(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.start_run("r1", "mergebench run", None, {}, "cpu")
    store.record(cell(), "r1", {"a": (1, 2)}, config={}, checkpoints={})
    connect = ResultStore._connect

    def full(self):  # SQLite's own "database or disk is full": no page may be added
        connection = connect(self)
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")
        return connection

    monkeypatch.setattr(ResultStore, "_connect", full)
    big = {f"task{i}": (1, 2) for i in range(200)}
    with pytest.raises(MergebenchError, match="cannot store the results of ties on s .*database or disk is full.*every cell stored before it is kept"):
        store.record(cell(split="test"), "r1", big, config={"padding": "x" * 100_000}, checkpoints={})
    monkeypatch.undo()
    assert [row["task"] for row in store.query("SELECT task FROM results")] == ["a"]  # the failed cell left nothing behind


def test_a_fixed_setting_is_its_own_row_beside_the_validated_one(tmp_path):
    from mergebench.store.database import WHOLE_GRID

    store = ResultStore(tmp_path)
    chosen, fixed = cell(split="test", hparams={"lam": 0.4}), cell(split="test", hparams={"lam": 0.9})
    for c in (chosen, fixed):
        store.record(c, "r1", {"a": (1, 2)}, config={}, checkpoints={})
    store.select(chosen, 0.9, "mean normalized validation accuracy", "r1")
    store.select(fixed, 0.7, "mean normalized validation accuracy", "r1", selection="fixed lam=0.9")
    rows = store.query("SELECT hparams, selection FROM selections ORDER BY selection")
    assert [(row["hparams"], row["selection"]) for row in rows] == [('{"lam":0.9}', "fixed lam=0.9"), ('{"lam":0.4}', WHOLE_GRID)]


def test_a_run_that_stores_nothing_leaves_no_run_row(tmp_path):
    store = ResultStore(tmp_path)
    store.start_run("r1", "mergebench run", None, {}, "cpu")
    assert store.query("SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0
    store.record(cell(), "r1", {"a": (1, 2)}, config={}, checkpoints={})
    assert [row["run_id"] for row in store.query("SELECT run_id FROM runs")] == ["r1"]


def _open_when_released(directory, barrier):
    barrier.wait()
    try:
        ResultStore(directory)
    except MergebenchError as error:
        return str(error)
    return None


def test_processes_opening_one_new_store_at_once_all_open_it(tmp_path):
    """Turning a new file to WAL mode needs it alone, and SQLite refuses at once rather than waiting;
    before the store waited for that itself, about one round in three here failed with 'database is locked'."""
    context = multiprocessing.get_context("spawn")
    processes = 4
    with context.Manager() as manager, context.Pool(processes) as pool:
        barrier = manager.Barrier(processes)
        for round_ in range(8):
            directory = tmp_path / str(round_)
            errors = pool.starmap(_open_when_released, [(directory, barrier)] * processes)
            assert errors == [None] * processes

"""Killed (``kill -9``) at any step, or run twice at once, a sweep ends with the same store and reports as an
uninterrupted one: the same cells, none twice, no half-written file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mergebench.store.database import DATABASE_NAME

pytestmark = pytest.mark.slow

HELPER = Path(__file__).parent / "helpers" / "crash_at.py"
SUITE = """
kind: trained
family: crash
models: [efficientnet-lite0]
image_size: 32
data_seed: 0
splits: {train: 32, test: 16}
validation: {examples: 16}
recipe: {steps: 1, batch_size: 16, lr: 1.0e-4, head_lr: 1.0e-3, seed: 0}
eval_batch_size: 32
tasks:
  - {name: shapes, source: shapes}
  - {name: digits, source: digits}
suites:
  crash-2: [shapes, digits]
"""
RUN = ["run", "--suite", "crash-2", "--methods", "task_arithmetic,ties", "--hparams", "task_arithmetic.lam=0.3,ties.lam=1.0"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash-tasks")
    (folder / "crash.yaml").write_text(SUITE)
    return folder


def environment(tasks: Path, cache: Path) -> dict:
    return os.environ | {"MERGEBENCH_TASKS": str(tasks), "MERGEBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def mergebench(tasks, cache, *argv, step=None, count=1):
    command = [sys.executable, str(HELPER), step, str(count), *argv] if step else [sys.executable, "-m", "mergebench.cli", *argv]
    return subprocess.run(command, env=environment(tasks, cache), capture_output=True, text=True, timeout=600)


def cells(out: Path) -> list[tuple]:
    """Every stored cell's identity and measurement (not its timings), sorted; and the selections."""
    with sqlite3.connect(out / DATABASE_NAME) as connection:
        results = connection.execute("SELECT cell_key, task, correct, total, score, examples FROM results ORDER BY cell_key").fetchall()
        selections = connection.execute("SELECT context_key, method, hparams, selection FROM selections ORDER BY method").fetchall()
    return [results, selections]


def report(tasks, cache, out) -> str:
    done = mergebench(tasks, cache, "report", "--out", str(out), "--no-costs", "--format", "csv")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def uninterrupted(tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = mergebench(tasks, root / "cache", *RUN, "--out", str(root / "out"))
    assert done.returncode == 0, done.stderr
    return root, cells(root / "out"), report(tasks, root / "cache", root / "out")


@pytest.mark.parametrize("step, count", [("build", 2), ("merge", 2), ("evaluate", 8), ("report", 2)])
def test_a_killed_sweep_resumes_to_the_same_store_and_reports(tasks, uninterrupted, tmp_path, step, count):
    root, expected_cells, expected_report = uninterrupted
    cache = tmp_path / "cache" if step == "build" else root / "cache"  # a fresh build is killed half-way
    out = tmp_path / "out"
    killed = mergebench(tasks, cache, *RUN, "--out", str(out), step=step, count=count)
    assert killed.returncode == -9, killed.stderr
    leftovers = [path for path in out.rglob("*") if path.is_file() and path.suffix in (".md", ".csv", ".tex", ".png")]
    assert all(".partial" not in path.name for path in leftovers)  # nothing half-written under its final name
    resumed = mergebench(tasks, cache, *RUN, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert cells(out) == expected_cells
    assert report(tasks, cache, out) == expected_report
    assert not list(out.rglob("*.partial"))


def test_ctrl_c_while_building_experts_is_one_line_and_resumes(tasks, uninterrupted, tmp_path):
    root, expected_cells, expected_report = uninterrupted
    out = tmp_path / "out"
    interrupted = mergebench(tasks, tmp_path / "cache", *RUN, "--out", str(out), step="interrupt:build", count=2)
    assert interrupted.returncode == 130
    assert "Traceback" not in interrupted.stderr
    said = [line for line in interrupted.stderr.replace("\r", "\n").split("\n") if line.startswith("mergebench")]
    assert said == ["mergebench: interrupted; finished cells are stored — run the same command again to resume"]
    assert not list((tmp_path / "cache").rglob("*.partial"))  # the expert being written is not left half-written
    resumed = mergebench(tasks, tmp_path / "cache", *RUN, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert cells(out) == expected_cells and report(tasks, tmp_path / "cache", out) == expected_report


def test_two_concurrent_sweeps_on_one_store_equal_a_serial_one(tasks, uninterrupted, tmp_path):
    root, expected_cells, expected_report = uninterrupted
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mergebench.cli", *RUN, "--out", str(out)]
    first, second = (subprocess.Popen(command, env=environment(tasks, root / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for _ in range(2))
    for process in (first, second):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()
    assert cells(out) == expected_cells
    assert report(tasks, root / "cache", out) == expected_report

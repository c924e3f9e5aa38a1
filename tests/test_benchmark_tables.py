"""The benchmarks' ``--markdown`` tables: written between a page's markers, under the command, nothing else touched."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mergebench.core.task_vectors import ParamLayout, TaskVectors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def merge_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("merge_speed", BENCHMARKS / "merge_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_task_vectors(num_tasks: int, num_params: int, device: torch.device) -> TaskVectors:
    """A few kilobytes of task vectors in place of the benchmark's ViT-sized ones (the table is under test)."""
    state = {"w": torch.empty(64, 32, device="meta"), "b": torch.empty(32, device="meta")}
    layout = ParamLayout.of(state, list(state))
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn((num_tasks, layout.numel), generator=generator) * 1e-3
    return TaskVectors(torch.randn(layout.numel, generator=generator), vectors, layout, tuple(f"task{t}" for t in range(num_tasks)))


def run(module, monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["benchmarks/merge_speed.py", *arguments])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    module.main()


def test_merge_speed_writes_its_table_between_the_markers_only(merge_speed, monkeypatch, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- merge_speed.py table -->\nan old table\n<!-- end of merge_speed.py table -->\noutro\n")
    monkeypatch.setattr(merge_speed, "NO_GOAL", {"average"})
    monkeypatch.setattr(merge_speed, "random_task_vectors", small_task_vectors)
    run(merge_speed, monkeypatch, "--params", "2e4", "--tasks", "3", "--repeats", "1", "--methods", "ties,average,slerp",
        "--no-profile", "--markdown", str(page))
    text = page.read_text()
    assert text.startswith("intro\n<!-- merge_speed.py table -->\nWritten by `python benchmarks/merge_speed.py --params 2e4 ")
    assert text.endswith("<!-- end of merge_speed.py table -->\noutro\n")
    assert "an old table" not in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "ties", "average", "slerp"}
    assert rows["ties"][5].startswith(("met: ", "missed: ")) and rows["ties"][4] == "3×"
    assert rows["average"][4:6] == ["—", "no goal"]
    assert rows["slerp"][5] == "skipped: slerp merges exactly two models, got 3"
    alignment = next(line for line in text.splitlines() if line.startswith("|---"))
    assert alignment == "|---|---|---:|---:|---|---|---|"  # seconds and ratios right-aligned


def test_a_page_without_the_markers_is_refused_before_the_run_and_left_as_it_was(merge_speed, monkeypatch, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    monkeypatch.setattr(merge_speed, "random_task_vectors", None)  # the run must not start
    with pytest.raises(SystemExit, match="has no '<!-- merge_speed.py table -->'"):
        run(merge_speed, monkeypatch, "--methods", "average", "--markdown", str(page))
    assert page.read_text() == "no markers here\n"


@pytest.mark.parametrize("page", ["docs/merge-speed.md", "docs/peers.md"])
def test_the_committed_tables_were_written_by_their_benchmark(page):
    text = (BENCHMARKS.parent / page).read_text()
    script = {"docs/merge-speed.md": "merge_speed.py", "docs/peers.md": "peer_speed.py"}[page]
    table = text.split(f"<!-- {script} table -->\n", 1)[1].split(f"<!-- end of {script} table -->", 1)[0]
    assert table.startswith(f"Written by `OMP_NUM_THREADS=1 python benchmarks/{script} ")
    assert f"--markdown {page}`" in table.splitlines()[0]


def test_a_missed_della_names_its_rank_pass_and_its_share(merge_speed, monkeypatch, tmp_path):
    """No profiler sees inside DELLA's compiled kernel: its rank pass is timed alone and reported."""
    page = tmp_path / "page.md"
    page.write_text("<!-- merge_speed.py table -->\n<!-- end of merge_speed.py table -->\n")
    monkeypatch.setattr(merge_speed, "random_task_vectors", small_task_vectors)
    monkeypatch.setitem(merge_speed.ADD_GOALS, "della", 1e-9)  # missed on any machine
    run(merge_speed, monkeypatch, "--params", "2e4", "--tasks", "3", "--repeats", "1", "--methods", "della", "--markdown", str(page))
    row = next(line for line in page.read_text().splitlines() if line.startswith("| della |")).split(" | ")
    assert row[5].startswith("missed: ")
    assert row[6].startswith("the exact magnitude rank of every entry in its row: ") and "of the merge" in row[6]

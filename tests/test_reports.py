"""Reports read from a store filled with synthetic rows, written the way the runner writes them."""

from __future__ import annotations

import pytest

from mergebench.errors import MergebenchError
from mergebench.reports.plots import plot_per_task, plot_task_count
from mergebench.reports.tables import available, load_table, to_csv, to_latex, to_markdown, write_reports
from mergebench.store.database import Cell, ResultStore

MODEL = "efficientnet-lite0"
TOTAL = 200
TASKS_4 = ["mnist", "svhn", "cifar10", "eurosat"]
TASKS_8 = TASKS_4 + ["gtsrb", "dtd", "resisc45", "sun397"]
TA_SETTING = {"lam": 0.3}
TIES_SETTING = {"k": 20, "lam": 1.0}

# test-split correct counts out of TOTAL, per task of the 8-task suite (the 4-task suite uses the first four)
TEST_CORRECT = {
    "individual": [196, 180, 160, 192, 188, 150, 170, 140],
    "pretrained": [100, 60, 120, 80, 70, 90, 85, 110],
    "task_arithmetic": [180, 120, 150, 170, 140, 100, 130, 120],
    "ties": [190, 130, 140, 180, 150, 105, 125, 125],
}
# per merge: seconds, peak MiB, parameters of the merged model
MERGE_COSTS = {
    "task_arithmetic": {"merge_seconds": 0.5, "merge_peak_mb": 40.0, "parameters": 4_700_000},
    "ties": {"merge_seconds": 2.0, "merge_peak_mb": 310.4, "parameters": 4_700_000},
}


class Writer:
    """Records cells and selections through the store's public API, as the runner does."""

    def __init__(self, store: ResultStore, context_key: str, suite: str, tasks: list[str], model: str = MODEL):
        self.store, self.context_key, self.suite, self.tasks, self.model = store, context_key, suite, tasks, model

    def cell(self, method: str, hparams: dict, split: str) -> Cell:
        return Cell(self.context_key, self.suite, self.model, method, hparams, 0, split)

    def record(self, method: str, hparams: dict, split: str, correct: list[int], **costs) -> None:
        config = {"suite": self.suite, "tasks": self.tasks, "model": self.model, "method": method,
                  "hparams": hparams, "seed": 0, "split": split}
        outcomes = {task: (count, TOTAL) for task, count in zip(self.tasks, correct)}
        self.store.record(self.cell(method, hparams, split), "run-1", outcomes, config=config, checkpoints={}, **costs)

    def select(self, method: str, hparams: dict) -> None:
        self.store.select(self.cell(method, hparams, "test"), 0.9, "normalized_validation_accuracy", "run-1")


def fill_suite(store: ResultStore, context_key: str, suite: str, tasks: list[str], shift: int = 0, model: str = MODEL,
               parameters: int = 4_700_000) -> None:
    writer = Writer(store, context_key, suite, tasks, model)
    n = len(tasks)
    for method in ("pretrained", "individual"):
        writer.record(method, {}, "validation", [c - 5 for c in TEST_CORRECT[method][:n]])
        writer.record(method, {}, "test", [c - shift for c in TEST_CORRECT[method][:n]])
    for method, chosen, other in (("task_arithmetic", TA_SETTING, {"lam": 1.0}), ("ties", TIES_SETTING, {"k": 50, "lam": 1.0})):
        cost = MERGE_COSTS[method] | {"parameters": parameters}
        writer.record(method, chosen, "validation", [c + 2 for c in TEST_CORRECT[method][:n]], **cost)
        writer.record(method, other, "validation", [50] * n, **cost | {"merge_seconds": 3 * cost["merge_seconds"]})
        writer.record(method, chosen, "test", [c - shift for c in TEST_CORRECT[method][:n]], **cost)
        writer.select(method, chosen)
    # a test evaluation of a setting that was not selected must not reach the table
    writer.record("task_arithmetic", {"lam": 1.0}, "test", [TOTAL] * n, **MERGE_COSTS["task_arithmetic"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ResultStore:
    """Shared by the tests, which only read it."""
    store = ResultStore(tmp_path_factory.mktemp("store"))
    store.start_run("run-1", "mergebench run", None, {"torch": "x"}, "cpu")
    fill_suite(store, "old-context", "mini-vision-4", TASKS_4, shift=40)  # superseded by the next context
    fill_suite(store, "context-4", "mini-vision-4", TASKS_4)
    fill_suite(store, "context-8", "mini-vision-8", TASKS_8)
    return store


def accuracies(method: str, n: int) -> list[float]:
    return [c / TOTAL for c in TEST_CORRECT[method][:n]]


def expected_normalized(method: str, n: int) -> float:
    return sum(m / i for m, i in zip(accuracies(method, n), accuracies("individual", n))) / n


def test_available_lists_suites_and_models(store):
    assert available(store) == [("mini-vision-4", MODEL), ("mini-vision-8", MODEL)]


def test_table_uses_latest_context_selected_settings_and_task_order(store):
    table = load_table(store, "mini-vision-4")
    assert (table.suite, table.model, table.context_key) == ("mini-vision-4", MODEL, "context-4")
    assert table.tasks == tuple(TASKS_4)
    assert [row.method for row in table.rows] == ["pretrained", "individual", "task_arithmetic", "ties"]
    ta = table.row("task_arithmetic")
    assert list(ta.accuracies.values()) == pytest.approx(accuracies("task_arithmetic", 4))
    assert ta.setting == TA_SETTING
    assert ta.mean_accuracy == pytest.approx(sum(accuracies("task_arithmetic", 4)) / 4)
    assert ta.normalized_accuracy == pytest.approx(expected_normalized("task_arithmetic", 4))
    assert table.row("ties").setting == TIES_SETTING
    assert table.row("individual").normalized_accuracy == pytest.approx(1.0)
    assert table.row("pretrained").normalized_accuracy == pytest.approx(expected_normalized("pretrained", 4))
    assert {row.data_access for row in table.rows} == {"none"}


def test_markdown_and_csv_contain_expected_cells(store):
    table = load_table(store, "mini-vision-4", MODEL)
    ta_norm = f"{100 * expected_normalized('task_arithmetic', 4):.1f}"
    markdown = to_markdown(table)
    assert "| Method | mnist | svhn | cifar10 | eurosat | Avg. | Norm. | 95% CI | Setting |" in markdown
    assert "| individual | 98.0 | 90.0 | 80.0 | 96.0 | 91.0 | 100.0 | — | — | none | — | — | — |" in markdown
    # TA's stored merges: three at 0.5 s and one at 1.5 s (the other validation setting) -> 0.75 s on average
    # (no interval: these rows were stored without per-example outcomes, as before they were kept)
    assert f"| task_arithmetic | 90.0 | 60.0 | **75.0** | 85.0 | 77.5 | {ta_norm} | — | lam=0.3 | none | 0.75 | 40 | 4.70M |" in markdown
    lines = to_csv(table).splitlines()
    assert lines[0] == "Method,mnist,svhn,cifar10,eurosat,Avg.,Norm.,95% CI,Setting,Data access,Merge s,Peak MiB,Params"
    assert lines[3] == f"task_arithmetic,90.0,60.0,75.0,85.0,77.5,{ta_norm},—,lam=0.3,none,0.75,40,4.70M"
    assert lines[4].endswith(",k=20 lam=1.0,none,3.33,310,4.70M")


def test_latex_has_booktabs_midrule_escapes_and_bold_best_merged(store):
    latex = to_latex(load_table(store, "mini-vision-4"))
    ties_norm = f"{100 * expected_normalized('ties', 4):.1f}"
    assert r"\toprule" in latex and r"\bottomrule" in latex and latex.count(r"\midrule") == 2
    body = latex.split(r"\midrule")
    assert "individual" in body[1] and "task\\_arithmetic" in body[2]
    assert r"task\_arithmetic & 90.0 & 60.0 & \textbf{75.0} & 85.0" in latex
    assert rf"ties & \textbf{{95.0}} & \textbf{{65.0}} & 70.0 & \textbf{{90.0}} & \textbf{{80.0}} & \textbf{{{ties_norm}}}" in latex
    assert r"\textbf{98.0}" not in latex  # references are never bold


def test_write_reports_creates_three_files(store, tmp_path):
    paths = write_reports(load_table(store, "mini-vision-8"), tmp_path / "reports")
    assert [p.name for p in paths] == [f"mini-vision-8-{MODEL}.{suffix}" for suffix in ("md", "csv", "tex")]
    assert all(p.read_text() for p in paths)


def test_plots_are_non_empty_pngs(store, tmp_path):
    figures = [
        plot_task_count(store, ["mini-vision-4", "mini-vision-8"], MODEL, tmp_path / "task_count.png"),
        plot_per_task(load_table(store, "mini-vision-8"), tmp_path / "per_task.png"),
    ]
    for path in figures:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


def test_bad_input_raises_mergebench_error(store, tmp_path):
    with pytest.raises(MergebenchError, match="no results"):
        load_table(ResultStore(tmp_path / "empty"), "mini-vision-4")
    with pytest.raises(MergebenchError, match="mini-vision-99"):
        load_table(store, "mini-vision-99")
    with pytest.raises(MergebenchError, match="model"):
        load_table(store, "mini-vision-4", "no-such-model")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(MergebenchError, match="cannot write"):
        write_reports(load_table(store, "mini-vision-4"), blocker / "reports")


def test_an_expert_scoring_zero_leaves_the_normalized_score_undefined(tmp_path):
    store = ResultStore(tmp_path)
    writer = Writer(store, "ctx-zero", "zero-2", ["a", "b"])
    writer.record("pretrained", {}, "test", [20, 0])
    writer.record("individual", {}, "test", [100, 0])  # the expert of b gets nothing right
    writer.record("task_arithmetic", TA_SETTING, "test", [50, 10], **MERGE_COSTS["task_arithmetic"])
    writer.select("task_arithmetic", TA_SETTING)
    table = load_table(store, "zero-2")
    assert table.row("task_arithmetic").normalized_accuracy is None
    assert table.row("task_arithmetic").mean_accuracy == pytest.approx(0.15)
    markdown = to_markdown(table)
    assert "| task_arithmetic | **25.0** | **5.0** | **15.0** | — |" in markdown
    assert "expert of b scores 0 or below" in markdown


def test_several_models_report_side_by_side_with_a_scale_table_and_plot(tmp_path, capsys):
    from mergebench import cli

    store = ResultStore(tmp_path)
    store.start_run("run-1", "mergebench run", None, {"torch": "x"}, "cpu")
    for model, parameters, shift in (("efficientnet-lite0", 3_370_000, 0), ("efficientnet-lite1", 4_200_000, -4)):
        fill_suite(store, f"{model}-4", "mini-vision-4", TASKS_4, shift=shift, model=model, parameters=parameters)
        fill_suite(store, f"{model}-8", "mini-vision-8", TASKS_8, shift=shift, model=model, parameters=parameters)
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mini-vision-8 on efficientnet-lite0" in printed and "mini-vision-8 on efficientnet-lite1" in printed
    scale = (tmp_path / "reports" / "mini-vision-scale.md").read_text()
    header = scale.splitlines()[0]
    assert header.index("efficientnet-lite0 (3.4M), 4 tasks") < header.index("efficientnet-lite0 (3.4M), 8 tasks") < header.index("efficientnet-lite1 (4.2M), 4 tasks")
    ties_row = next(line for line in scale.splitlines() if line.startswith("| ties |"))
    lite0_4 = load_table(store, "mini-vision-4", "efficientnet-lite0").row("ties")
    assert f"{100 * lite0_4.mean_accuracy:.1f} ({100 * lite0_4.normalized_accuracy:.1f})" in ties_row
    for name in ("mini-vision-scale.png", "mini-vision-efficientnet-lite0-task-count.png", "mini-vision-efficientnet-lite1-task-count.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    assert cli.main(["report", "--out", str(tmp_path), "--model", "efficientnet-lite1", "--format", "md", "--no-costs"]) == 0
    only = capsys.readouterr().out
    assert "efficientnet-lite0" not in only and "Merge s" not in only and only.count("### ") == 2

"""A tiny real sweep: fine-tune EfficientNet-Lite0 experts for a few steps, merge, store, resume, report."""

import textwrap

import pytest
import torch

from mergebench import cli
from mergebench.runner.prepared import PreparedSuite
from mergebench.runner.executors import run_sweep
from mergebench.runner.sweep import SweepRequest
from mergebench.store.database import ResultStore
from test_method_registry import install_plugin, reloaded_registry  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

TINY_SUITE = """
kind: trained
family: tiny-vision
models: [efficientnet-lite0]
image_size: 32
data_seed: 0
splits: {train: 64, test: 24}
validation: {examples: 24}
recipe: {steps: 2, batch_size: 16, lr: 1.0e-4, head_lr: 1.0e-3, seed: 0}
batchnorm: {policy: %s, batches_per_task: 1}
eval_batch_size: 32
tasks:
  - {name: shapes, source: shapes}
  - {name: digits, source: digits}
  - {name: arrows, source: arrows}
suites:
  tiny-2: [shapes, digits]
  tiny-3: [shapes, digits, arrows]
"""


@pytest.fixture(scope="module")
def expert_cache(tmp_path_factory):
    """Experts are fine-tuned once for the whole module."""
    return tmp_path_factory.mktemp("cache")


def use_suite(tmp_path, monkeypatch, cache, batchnorm="frozen"):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TINY_SUITE % batchnorm)
    monkeypatch.setenv("MERGEBENCH_TASKS", str(tasks))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    return tmp_path


@pytest.fixture
def tiny_suites(tmp_path, monkeypatch, expert_cache):
    return use_suite(tmp_path, monkeypatch, expert_cache)


def test_run_report_resume(tiny_suites, capsys):
    out = tiny_suites / "results"
    argv = ["run", "--suite", "tiny-2,tiny-3", "--methods", "task_arithmetic,ties", "--out", str(out),
            "--hparams", "ties.lam=0.8,ties.k=20"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for row in ("pretrained", "individual", "task_arithmetic", "ties"):
        assert row in printed
    store = ResultStore(out)
    rows = store.query("SELECT method, split, COUNT(*) AS n FROM results WHERE suite='tiny-3' GROUP BY method, split")
    counts = {(r["method"], r["split"]): r["n"] for r in rows}
    assert counts[("task_arithmetic", "validation")] == 10 * 3  # the λ grid × 3 tasks
    assert counts[("ties", "validation")] == 3 and counts[("ties", "test")] == 3
    assert counts[("individual", "test")] == 3 and counts[("pretrained", "validation")] == 3
    record = store.query("SELECT config, checkpoints, run_id FROM results LIMIT 1")[0]
    assert '"recipe"' in record["config"] and '"pretrained"' in record["checkpoints"]
    versions = store.query("SELECT versions, git_commit FROM runs")[0]["versions"]
    assert '"torch"' in versions
    for name in ("tiny-3-efficientnet-lite0.md", "tiny-3-efficientnet-lite0.csv", "tiny-3-efficientnet-lite0.tex"):
        assert (out / "reports" / name).stat().st_size > 0
    assert (out / "plots" / "tiny-efficientnet-lite0-task-count.png").stat().st_size > 0
    assert (out / "plots" / "tiny-3-efficientnet-lite0-per-task.png").stat().st_size > 0

    # a second identical run evaluates nothing new and stores no duplicates
    before = store.query("SELECT COUNT(*) AS n FROM results")[0]["n"]
    assert cli.main(argv) == 0
    assert store.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == before


def test_killed_sweep_resumes_without_loss_or_duplicates(tiny_suites, monkeypatch):
    out = tiny_suites / "results"
    request = SweepRequest(suites=["tiny-2"], methods=["task_arithmetic"], overrides={}, out=out)
    evaluations = []
    original = PreparedSuite.evaluate

    def dying_evaluate(self, state, split, tasks=None):
        evaluations.append(split)
        if len(evaluations) == 11:  # after 6 reference evaluations and 4 λ settings the process is killed
            raise KeyboardInterrupt
        return original(self, state, split, tasks)

    monkeypatch.setattr(PreparedSuite, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(request, report=lambda line: None)
    store = ResultStore(out)
    stored = store.query("SELECT COUNT(*) AS n FROM results WHERE method='task_arithmetic'")[0]["n"]
    assert stored == 4 * 2  # four λ settings finished before the kill, two tasks each

    evaluations.clear()
    summaries = run_sweep(request, report=lambda line: None)
    assert evaluations.count("validation") == 6 and evaluations.count("test") == 1  # only what was missing
    assert store.query("SELECT COUNT(*) AS n FROM results WHERE method='task_arithmetic' AND split='validation'")[0]["n"] == 10 * 2
    assert summaries[0].hparams["lam"] in [round(0.1 * i, 1) for i in range(1, 11)]


def test_batchnorm_recalibration_policy_runs(tmp_path, monkeypatch, expert_cache):
    use_suite(tmp_path, monkeypatch, expert_cache, batchnorm="recalibrate")
    summaries = run_sweep(SweepRequest(["tiny-2"], ["average"], {}, out=tmp_path / "results"), report=lambda line: None)
    assert 0.0 <= summaries[0].test_accuracy <= 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--suite", "tiny-2", "--methods", "nope"], "unknown method 'nope'"),
        (["run", "--suite", "nope", "--methods", "ties"], "unknown suite 'nope'"),
        (["run", "--suite", "tiny-2", "--methods", "dare", "--hparams", "dare.p=2"], r"p=2.0 of dare: must be in"),
        (["run", "--suite", "tiny-2", "--methods", "ties", "--hparams", "k"], "not of the form"),
        (["run", "--suite", "tiny-2", "--methods", "ties", "--hparams", "dare.p=0.1"], "names method 'dare'"),
        (["run", "--suite", "tiny-2", "--methods", "ties", "--device", "tpu"], "unknown device 'tpu'"),
        pytest.param(
            ["run", "--suite", "tiny-2", "--methods", "ties", "--device", "cuda"], "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
        (["run", "--suite", "tiny-2", "--methods", "ties+nope"], "unknown post-scaler 'nope'"),
        (["run", "--suite", "tiny-2", "--methods", "ties", "--model", "resnet"], "has no model 'resnet'"),
        (["report", "--suite", "tiny-2"], "no results"),
        (["continual", "--suite", "tiny-2", "--methods", "opcm", "--hparams", "opcm.order=shuffled"], "leave opcm.order at 'given'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_suites, capsys, argv, message):
    out = tiny_suites / "results"
    assert cli.main(argv + ["--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mergebench: error:") and "\n" not in error
    assert __import__("re").search(message, error)
    assert not (out / "mergebench.sqlite").exists() or ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 0


def test_broken_yaml_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.yaml").write_text(textwrap.dedent("""
        family: x
        tasks: [
    """))
    monkeypatch.setenv("MERGEBENCH_TASKS", str(tmp_path))
    assert cli.main(["run", "--suite", "x", "--methods", "ties", "--out", str(tmp_path / "r")]) == 2
    assert "broken YAML in" in capsys.readouterr().err


def test_data_using_method_sees_only_its_granted_slice(tiny_suites, monkeypatch, capsys):
    from mergebench.methods import registry

    seen = {}

    def peek(task_vectors, *, model):
        """Average, after looking at the granted data."""
        for task in model.tasks:
            batches = list(model.batches(task, batch_size=5))
            seen[(model.access, task)] = (sum(len(x) for x, _ in batches), {y is None for _, y in batches})
        model.cached("calls", {"what": "count"}, lambda: seen.setdefault("computed", 0) + 1)
        return task_vectors.vectors.mean(dim=0)

    monkeypatch.setattr(registry, "METHODS", dict(registry.all_methods()))
    registry.register("peek_train", citation="test", data="train-samples", examples=7)(peek)
    registry.register("peek_test", citation="test", data="unlabeled-test")(peek)
    out = tiny_suites / "results"
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "peek_train,peek_test", "--out", str(out)]) == 0
    assert seen[("train-samples", "shapes")] == (7, {False})  # N labeled training examples
    assert seen[("unlabeled-test", "digits")] == (24, {True})  # the test inputs, without labels
    assert "train-samples:7" in capsys.readouterr().out
    access = ResultStore(out).query("SELECT DISTINCT method, data_access FROM results WHERE method LIKE 'peek%'")
    assert {(r["method"], r["data_access"]) for r in access} == {("peek_train", "train-samples:7"), ("peek_test", "unlabeled-test")}
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "peek_train", "--examples", "3", "--out", str(out)]) == 0
    assert seen[("train-samples", "shapes")] == (3, {False})


def test_continual_scores_each_arrival_over_orders_and_resumes(tiny_suites, capsys):
    from mergebench.reports.continual import load_arrivals, summarize
    from mergebench.runner.continual import task_order

    out = tiny_suites / "results"
    argv = ["continual", "--suite", "tiny-3", "--methods", "opcm,task_arithmetic", "--orders", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| opcm |" in capsys.readouterr().out
    assert (out / "plots" / "tiny-3-efficientnet-lite0-continual.png").stat().st_size > 0
    store = ResultStore(out)
    points = load_arrivals(store, "tiny-3")
    suite_order = ("shapes", "digits", "arrows")
    assert {p.order for p in points} == {suite_order, task_order(suite_order, 1)}
    assert sorted((p.method, p.arrived) for p in points) == sorted((m, t) for m in ("opcm", "task_arithmetic") for t in (1, 2, 3) for _ in range(2))
    summary = summarize(points)
    # one arrival: OPCM's merged model is that expert itself, so it scores exactly as the expert does
    assert summary["opcm"][1] == (pytest.approx(1.0), pytest.approx(0.0), 2)
    before = store.query("SELECT COUNT(*) AS n FROM results")[0]["n"]
    assert cli.main(argv) == 0
    assert store.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == before


def test_upscaled_model_is_evaluated_as_it_is_and_reports_its_size(tiny_suites, capsys):
    out = tiny_suites / "results"
    argv = ["run", "--suite", "tiny-2", "--methods", "task_arithmetic,wemoe", "--out", str(out),
            "--hparams", "task_arithmetic.lam=0.3,wemoe.steps=2,wemoe.batch_size=4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    wemoe_row = next(line for line in printed.splitlines() if line.startswith("| wemoe"))
    assert "unlabeled-test" in wemoe_row
    sizes = {
        row["method"]: row["parameters"]
        for row in ResultStore(out).query("SELECT DISTINCT method, parameters FROM results WHERE method IN ('task_arithmetic', 'wemoe')")
    }
    # θ₀ and two task vectors of every MBConv block, plus the routers: about 2.7× EfficientNet-Lite0
    assert 2.5 * sizes["task_arithmetic"] < sizes["wemoe"] < 3 * sizes["task_arithmetic"]


def test_a_plugin_method_runs_in_a_sweep(tiny_suites, tmp_path, monkeypatch, reloaded_registry, capsys):
    """A third-party method, installed as a distribution with a mergebench.methods entry point, sweeps like any other."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    install_plugin(plugin, monkeypatch)
    out = tiny_suites / "results"
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "median_merge", "--out", str(out)]) == 0
    rows = ResultStore(out).query("SELECT DISTINCT hparams, split FROM results WHERE method='median_merge'")
    assert len([row for row in rows if row["split"] == "validation"]) == 4  # shrink {0, 0.5} × λ {0.5, 1}
    assert "median_merge" in capsys.readouterr().out


def test_reproduce_runs_the_missing_cells_and_judges_each_against_its_tolerance(tiny_suites, capsys):
    """A table of one's own (beside the suite file): cells within and outside tolerance, a trap, a row without a method."""
    out = tiny_suites / "results"
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "task_arithmetic", "--hparams", "lam=0.3", "--out", str(out)]) == 0
    from mergebench.reports.tables import load_table

    ta = load_table(ResultStore(out), "tiny-2").row("task_arithmetic (fixed lam=0.3)")
    mean, shapes = 100 * ta.mean_accuracy, 100 * ta.accuracies["shapes"]
    folder = tiny_suites / "tasks" / "references" / "mine"
    folder.mkdir(parents=True)
    (folder / "tiny.yaml").write_text(textwrap.dedent(f"""
        title: "tiny-2 as measured"
        source: "this test"
        checkpoint_family: mergebench
        split: test
        tolerance: 1.0
        hyperparameters: {{task_arithmetic: {{lam: 0.3}}}}
        methods: {{TA: task_arithmetic, Mine: null, Zero-shot: pretrained}}
        traps:
          - {{note: "shapes are drawn anew", where: {{task: shapes}}}}
        cells:
          - {{row: TA, suite: tiny-2, model: efficientnet-lite0, metric: accuracy, absolute: {mean + 0.5:.2f}}}
          - {{row: TA, suite: tiny-2, model: efficientnet-lite0, task: shapes, metric: accuracy, absolute: {shapes + 5:.2f}}}
          - {{row: Mine, suite: tiny-2, model: efficientnet-lite0, metric: accuracy, absolute: 50.0}}
          - {{row: Zero-shot, suite: tiny-2, model: efficientnet-lite0, metric: accuracy_f1_mean, absolute: 50.0}}
    """))
    stored = ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"]
    assert cli.main(["reproduce", "mine/tiny", "--out", str(out)]) == 1  # a cell is outside its tolerance
    printed = capsys.readouterr().out
    assert ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"] == stored  # everything was in the store
    lines = {line.split(" | ")[3]: line for line in printed.splitlines() if line.startswith("| TA |")}
    assert "| -0.5 | within |" in lines["mean"] and "| -5.0 | outside: |Δ| > 1 | [1] |" in lines["shapes"]
    assert "not run: row 'Mine' has no mergebench method" in printed
    assert "not comparable: metric accuracy_f1_mean is not one mergebench stores" in printed
    assert "[1] shapes are drawn anew" in printed and "2 within" not in printed and "1 within, 1 outside" in printed


def test_a_measured_store_becomes_a_reference_table_that_reproduces_within_tolerance(tiny_suites, capsys):
    """report --format reference writes the table that reproduce reads back; every cell is within, and --model filters."""
    out = tiny_suites / "results"
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "task_arithmetic", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--suite", "tiny-2", "--out", str(out), "--format", "reference", "--source", "mergebench run --suite tiny-2"]) == 0
    folder = tiny_suites / "tasks" / "references" / "measured"
    folder.mkdir(parents=True)
    (folder / "tiny-2.yaml").write_text(capsys.readouterr().out)
    assert cli.main(["reproduce", "measured/tiny-2", "--out", str(out), "--model", "efficientnet-lite0"]) == 0
    printed = capsys.readouterr().out
    assert "Source: mergebench run --suite tiny-2. Checkpoints: mergebench." in printed
    assert "Cells: 3 within." in printed  # pretrained, individual, task arithmetic: suite means
    assert cli.main(["reproduce", "measured/tiny-2", "--out", str(out), "--model", "efficientnet-lite1"]) == 2
    assert "has no cells of model efficientnet-lite1" in capsys.readouterr().err

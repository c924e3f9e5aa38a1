"""The scratch kind end to end: models trained here, merged by alignment methods, stored and reported."""

import pytest

from mergebench import cli
from mergebench.store.database import ResultStore

TINY = """
kind: scratch
family: tiny-scratch
models: {mlp-x1: {architecture: mlp, width: 1}}
source: digits
image_size: 8
splits: {train: 400, test: 100}
validation: {examples: 60}
recipe: {steps: 60, batch_size: 32, lr: 1.0e-2}
tasks:
  - {name: low, seed: 0, classes: [0, 1, 2, 3, 4]}
  - {name: high, seed: 1, classes: [5, 6, 7, 8, 9]}
  - {name: again, seed: 2}
suites:
  tiny-split: [low, high]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch")
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(TINY)
    argv = ["run", "--tasks", str(root / "tasks"), "--suite", "tiny-split", "--methods", "average,weight_matching,zipit,zipit_partial,ensemble",
            "--hparams", "weight_matching.repair=on,zipit.repair=off,zipit_partial.zip_layers=1", "--device", "cpu", "--out", str(root / "out"),
            "--cache", str(root / "cache"), "--examples", "32"]
    assert cli.main(argv) == 0
    return root, argv


def test_a_run_trains_the_models_and_stores_every_method_and_reference(run):
    root, _ = run
    store = ResultStore(root / "out")
    rows = store.query("SELECT method, task, accuracy, parameters FROM results WHERE split='test'")
    methods = {row["method"] for row in rows}
    assert methods == {"pretrained", "individual", "average", "weight_matching", "zipit", "zipit_partial", "ensemble"}
    individual = {row["task"]: row["accuracy"] for row in rows if row["method"] == "individual"}
    assert set(individual) == {"low", "high"} and min(individual.values()) > 0.5  # each model learned its own half
    parameters = {row["method"]: row["parameters"] for row in rows if row["parameters"]}
    assert parameters["ensemble"] == 2 * parameters["average"] == 2 * parameters["weight_matching"]
    assert parameters["average"] < parameters["zipit_partial"] < parameters["ensemble"]  # the zipped trunk is counted once
    models = list((root / "cache" / "checkpoints" / "tiny-scratch" / "mlp-x1").glob("*/*.safetensors"))
    assert len(models) == 2  # the suite's two models, not the third task of the file
    assert (root / "out" / "reports" / "tiny-split-mlp-x1.md").read_text().count("| ensemble |") == 1


def test_a_second_run_reuses_the_cached_models(run, capsys):
    root, argv = run
    models = {path: path.stat().st_mtime_ns for path in (root / "cache").rglob("*.safetensors")}
    assert cli.main([*argv[:-4], "--out", str(root / "again"), *argv[-2:]]) == 0
    assert "trained" not in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in (root / "cache").rglob("*.safetensors")} == models


def test_alignment_methods_are_listed(capsys):
    assert cli.main(["methods"]) == 0
    listed = capsys.readouterr().out
    for name in ("weight_matching", "activation_matching", "zipit", "zipit_partial", "cca_merge", "ot_fusion", "average_repair", "ensemble"):
        assert name in listed


def test_a_bad_class_list_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(TINY.replace("classes: [0, 1, 2, 3, 4]", "classes: five"))
    assert cli.main(["suites", "--tasks", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mergebench: error:") and "classes" in error and "\n" not in error

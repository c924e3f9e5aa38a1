"""Suite kinds are one module each: a plugin kind runs through the one sweep; nothing else switches on a kind."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mergebench import cli
from mergebench.runner import kinds
from mergebench.store.database import ResultStore

ROOT = Path(__file__).resolve().parents[1]

TOY_KIND = '''
"""A third-party suite kind: linear experts around a random linear backbone, scored on separable points."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergebench.runner.evaluators import InMemoryEvaluator
from mergebench.runner.kinds import Kind, TaskStatus, register_kind
from mergebench.runner.prepared import PreparedSuite, TaskData
from mergebench.suites.schema import SuiteBase


@dataclass(frozen=True)
class ToyTask:
    name: str
    seed: int


@dataclass(frozen=True)
class ToySuite(SuiteBase):
    name: str
    family: str
    tasks: tuple
    models: dict
    model_default: str
    eval_batch_size: int
    source_file: Path
    kind: str = "toy"

    def context(self):
        return ()

    def describe(self):
        return {"toy": True}


def task_data(task, width, n, split):
    generator = torch.Generator().manual_seed(task.seed * 10 + (split == "test"))
    inputs = torch.randn(n, width, generator=generator)
    return TaskData(inputs, (inputs[:, task.seed % width] > 0).long(), ("no", "yes"))


@register_kind
class ToyKind(Kind):
    name = "toy"
    settings = frozenset({"width"})

    def suites(self, document):
        width = document.settings.integer("width")
        tasks = {entry.data["name"]: ToyTask(entry.data["name"], entry.integer("seed", minimum=0)) for entry in document.tasks}
        return [ToySuite(name, document.family, tuple(tasks[t] for t in members), {m: width for m in document.models},
                         document.default_model, 64, document.path) for name, members in document.suites.items()]

    def status(self, suite, model, cache, **options):
        return [TaskStatus(task.name, "generated", "ready") for task in suite.tasks]

    def evaluator(self, suite, model, device, cache, **options):
        width = suite.models[model]
        torch.manual_seed(0)
        backbone = nn.Linear(width, width)
        pretrained = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        finetuned, heads = {}, {}
        for task in suite.tasks:  # the expert moves the backbone toward the identity; its head reads one coordinate
            finetuned[task.name] = {"weight": torch.eye(width), "bias": torch.zeros(width)}
            head = nn.Linear(width, 2, bias=False)
            with torch.no_grad():
                head.weight.zero_()
                head.weight[1, task.seed % width] = 1.0
            heads[task.name] = head
        data = {split: {t.name: task_data(t, width, 64, split) for t in suite.tasks} for split in ("validation", "test")}
        hashes = {"pretrained": "toy", **{t.name: f"toy-{t.seed}" for t in suite.tasks}}
        return InMemoryEvaluator(PreparedSuite(suite, model, device, backbone, pretrained, finetuned, heads, data, hashes))
'''

TOY_SUITE = """
kind: toy
family: toy
width: 4
models: [toy-net]
tasks:
  - {name: first, seed: 0}
  - {name: second, seed: 1}
suites:
  toy-2: [first, second]
"""


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The kind as an installed distribution (an entry point of ``mergebench.kinds``) and a user's suite folder."""
    (tmp_path / "toy_kind.py").write_text(textwrap.dedent(TOY_KIND))
    info = tmp_path / "toy_kind-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-kind\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mergebench.kinds]\ntoy = toy_kind\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kinds.load_kinds()
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))  # the built-in kinds; entry points are read again
    monkeypatch.setattr(kinds, "_loaded", False)
    from mergebench.runner import catalog

    catalog._load.cache_clear()
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "toy.yaml").write_text(TOY_SUITE)
    yield folder
    catalog._load.cache_clear()
    sys.modules.pop("toy_kind", None)


def test_a_plugin_kind_runs_through_the_one_sweep(toy_plugin, tmp_path, capsys):
    out = tmp_path / "results"
    assert cli.main(["suites", "--tasks", str(toy_plugin)]) == 0
    assert re.search(r"toy.yaml \(kind toy, family toy\)", capsys.readouterr().out)
    assert cli.main(["run", "--tasks", str(toy_plugin), "--suite", "toy-2", "--methods", "task_arithmetic", "--out", str(out)]) == 0
    rows = ResultStore(out).query("SELECT method, split, task, accuracy FROM results WHERE split='test'")
    scores = {(row["method"], row["task"]): row["accuracy"] for row in rows if row["method"] != "task_arithmetic"}
    assert scores[("individual", "first")] == 1.0 and scores[("individual", "second")] == 1.0  # the identity reads the label
    assert "toy-2" in capsys.readouterr().out


def test_nothing_outside_the_kind_registry_switches_on_a_kind():
    found = subprocess.run(["grep", "-rn", r"kind ==\|kind in (", str(ROOT / "mergebench")], capture_output=True, text=True).stdout
    outside = [line for line in found.splitlines() if "/mergebench/runner/kinds/" not in line]
    assert outside == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "--suite", "vit-8"], "suite vit-8 is of kind 'clip', whose experts are published checkpoints: there is nothing to build"),
        (["build", "--suite", "glue-8"], "suite glue-8 is of kind 'glue', whose experts are published checkpoints"),
        (["continual", "--suite", "mini-llm", "--methods", "opcm"], "suite mini-llm is of kind 'llm', which continual runs do not support"),
    ],
)
def test_requests_a_kind_cannot_serve_are_one_line_and_store_nothing(tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mergebench: error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()

"""Bad input, named case by case: exit status 2, exactly one line on stderr starting ``mergebench: error:``,
no traceback, and the results store exactly as it was."""

from __future__ import annotations

import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebench import cli
from mergebench.store.database import DATABASE_NAME

pytestmark = pytest.mark.slow

SUITE = """
kind: trained
family: bad-input
models: [efficientnet-lite0]
image_size: 32
data_seed: 0
splits: {train: 48, test: 16}
validation: {examples: 16}
recipe: {steps: 1, batch_size: 16, lr: 1.0e-4, head_lr: 1.0e-3, seed: 0}
eval_batch_size: 32
tasks:
  - {name: shapes, source: shapes}
  - {name: digits, source: digits}
suites:
  tiny-2: [shapes, digits]
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny suite, its experts built once, and a store holding one good sweep."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(SUITE)
    patch = pytest.MonkeyPatch()
    patch.setenv("MERGEBENCH_TASKS", str(root / "tasks"))
    patch.setenv("MERGEBENCH_CACHE", str(root / "cache"))
    assert cli.main(["run", "--suite", "tiny-2", "--methods", "task_arithmetic", "--hparams", "lam=0.5", "--out", str(root / "store")]) == 0
    patch.undo()
    return root


def dump(store: Path) -> list | None:
    """Every row of the store (None if there is none)."""
    if not (store / DATABASE_NAME).is_file():
        return None
    with sqlite3.connect(store / DATABASE_NAME) as connection:
        return [sorted(connection.execute(f"SELECT * FROM {table}").fetchall(), key=repr) for table in ("runs", "results", "selections")]


def expert_file(cache: Path, task: str) -> Path:
    return next(path for path in cache.rglob(f"{task}-*.safetensors") if not path.name.endswith(".head.safetensors"))


def edit_expert(edit):
    def setup(root: Path) -> None:
        path = expert_file(root / "cache", "digits")
        state = load_file(path)
        edit(state)
        save_file(state, path)
    return setup


def first_weight(state):
    return next(name for name, tensor in state.items() if tensor.is_floating_point() and tensor.dim() > 1)


def nan_expert(state):
    state[first_weight(state)][0, 0] = float("nan")


def wrong_shape(state):
    name = first_weight(state)
    state[name] = state[name][:-1]


def missing_key(state):
    del state[first_weight(state)]


def half_precision(state):
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = tensor.half()


def write_file(relative: str, text: str):
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return setup


def garbage_store(root: Path) -> None:
    (root / "store" / DATABASE_NAME).write_bytes(b"not a database at all" * 100)


def damaged_pages(root: Path) -> None:
    """A valid SQLite header, then a page overwritten: quick_check finds it."""
    path = root / "store" / DATABASE_NAME
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[2 * page : 2 * page + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))


RUN = ["run", "--suite", "tiny-2"]
CASES = {
    # names of methods, suites and models
    "unknown method": (RUN + ["--methods", "nope"], "unknown method 'nope'"),
    "unknown suite": (["run", "--suite", "nope", "--methods", "ties"], "unknown suite 'nope'"),
    "empty methods": (RUN + ["--methods", ""], "empty method in ''"),
    "only a comma": (RUN + ["--methods", ","], "empty method in ','"),
    "trailing comma in suites": (["run", "--suite", "tiny-2,", "--methods", "ties"], "empty suite in 'tiny-2,'"),
    "method twice": (RUN + ["--methods", "ties,dare,ties"], "method 'ties' given twice"),
    "suite twice": (["run", "--suite", "tiny-2,tiny-2", "--methods", "ties"], "suite 'tiny-2' given twice"),
    "suite repeated by flag": (["run", "--suite", "tiny-2", "--suite", "tiny-2", "--methods", "ties"], "suite 'tiny-2' given twice"),
    "unknown post-scaler": (RUN + ["--methods", "ties+nope"], "unknown post-scaler 'nope'"),
    "upscaled model with a post-scaler": (RUN + ["--methods", "wemoe+lines"], "cannot compose wemoe and lines"),
    "unknown model": (RUN + ["--methods", "ties", "--model", "efficientnet-lite9"], "has no model 'efficientnet-lite9'"),
    "empty model": (RUN + ["--methods", "ties", "--model", ""], "empty model in ''"),
    "report of an unknown suite": (["report", "--suite", "nope"], "no results for suite 'nope'"),
    "reproduce an unknown table": (["reproduce", "nope/table"], "unknown reference table 'nope/table'"),
    "reproduce from a missing checkpoint folder": (["reproduce", "iso/table1", "--checkpoints", "/no/such/folder"],
                                                   "--checkpoints /no/such/folder: no such folder (or pass --checkpoints hub)"),
    "build a published suite": (["build", "--suite", "vit-8"], "there is nothing to build"),
    "continual on an llm suite": (["continual", "--suite", "mini-llm", "--methods", "opcm"], "which continual runs do not support"),
    # hyperparameters
    "unknown hyperparameter": (RUN + ["--methods", "ties", "--hparams", "ties.density=0.2"], "has no hyperparameter 'density'"),
    "out of range": (RUN + ["--methods", "ties", "--hparams", "ties.k=120"], r"k=120.0 of ties: must be in [0.0, 100.0]"),
    "not a number": (RUN + ["--methods", "ties", "--hparams", "ties.k=abc"], "k='abc' of ties: not a number"),
    "nan": (RUN + ["--methods", "ties", "--hparams", "ties.k=nan"], "k='nan' of ties: must be a finite number"),
    "infinity for an integer": (RUN + ["--methods", "consensus_ta", "--hparams", "consensus_ta.k=inf"], "k='inf' of consensus_ta: must be a finite number"),
    "nan scale": (RUN + ["--methods", "task_arithmetic", "--hparams", "task_arithmetic.lam=nan"], "must be a finite number"),
    "infinite scale": (RUN + ["--methods", "task_arithmetic", "--hparams", "lam=inf"], "must be a finite number"),
    "negative scale": (RUN + ["--methods", "task_arithmetic", "--hparams", "lam=-1"], "lam=-1.0 of task_arithmetic: must be >= 0.0"),
    "fraction for an integer": (RUN + ["--methods", "cabs", "--hparams", "cabs.n=2.5"], "n='2.5' of cabs: must be an integer"),
    "not a choice": (RUN + ["--methods", "ties", "--hparams", "ties.scope=layer"], "must be one of global, per_tensor"),
    "hyperparameter twice": (RUN + ["--methods", "ties", "--hparams", "ties.lam=0.3,ties.lam=0.5"], "gives ties.lam twice"),
    "hyperparameter twice by flag": (RUN + ["--methods", "ties", "--hparams", "lam=0.3", "--hparams", "ties.lam=0.3"], "gives ties.lam twice"),
    "no equals sign": (RUN + ["--methods", "ties", "--hparams", "lam"], "not of the form method.name=value"),
    "no name": (RUN + ["--methods", "ties", "--hparams", "=3"], "not of the form method.name=value"),
    "empty value": (RUN + ["--methods", "ties", "--hparams", "ties.k="], "not of the form method.name=value"),
    "method not run": (RUN + ["--methods", "ties", "--hparams", "dare.p=0.3"], "names method 'dare' that is not in --methods"),
    "unqualified with two methods": (RUN + ["--methods", "ties,dare", "--hparams", "lam=0.3"], "must name its method"),
    "fixed order in a continual run": (["continual", "--suite", "tiny-2", "--methods", "opcm", "--hparams", "order=shuffled"], "leave opcm.order at 'given'"),
    # options and arguments
    "option of another kind": (RUN + ["--methods", "ties", "--checkpoints", "hub"], "--checkpoints does not apply to suite tiny-2"),
    "limit on a trained suite": (RUN + ["--methods", "ties", "--limit", "3"], "--limit does not apply to suite tiny-2"),
    "missing cuda": (RUN + ["--methods", "ties", "--device", "cuda"], "no CUDA device is available"),
    "unknown device": (RUN + ["--methods", "ties", "--device", "tpu"], "unknown device 'tpu'"),
    "zero examples": (RUN + ["--methods", "regmean", "--examples", "0"], "argument --examples: must be a positive integer"),
    "zero orders": (["continual", "--suite", "tiny-2", "--methods", "opcm", "--orders", "0"], "argument --orders: must be a positive integer"),
    "unknown flag": (RUN + ["--methods", "ties", "--colour", "red"], "unrecognized arguments: --colour red"),
    "missing methods": (RUN, "the following arguments are required: --methods"),
    # output folder and store
    "out is a file": (RUN + ["--methods", "ties", "--out", "{root}/tasks/tiny.yaml"], "is a file, not a folder"),
    "out under a file": (RUN + ["--methods", "ties", "--out", "{root}/tasks/tiny.yaml/results"], "cannot create the results folder"),
    "garbage store": (RUN + ["--methods", "ties"], "cannot open results database", garbage_store),
    "damaged pages": (RUN + ["--methods", "ties"], "is damaged", damaged_pages),
    # suite files
    "broken yaml": (RUN + ["--methods", "ties"], "broken YAML in", write_file("tasks/broken.yaml", "kind: trained\nfamily: [x\n")),
    "unknown kind": (RUN + ["--methods", "ties"], "unknown suite kind 'vision'", write_file("tasks/other.yaml", "kind: vision\nfamily: x\n")),
    "missing suite key": (RUN + ["--methods", "ties"], "missing key 'suites'",
                          write_file("tasks/other.yaml", "kind: trained\nfamily: x\nmodels: [m]\ntasks: [{name: a}]\n")),
    "suite defined twice": (RUN + ["--methods", "ties"], "suite 'tiny-2' defined twice", lambda root: shutil.copy(root / "tasks" / "tiny.yaml", root / "tasks" / "again.yaml")),
    "unknown task source": (RUN + ["--methods", "ties"], "source must be one of",
                            write_file("tasks/other.yaml", SUITE.replace("tiny-2", "other-2").replace("source: digits", "source: imagenet"))),
    # checkpoints
    "expert with nan": (RUN + ["--methods", "ties"], ".safetensors)' has NaN or infinite values in", edit_expert(nan_expert)),
    "expert of another shape": (RUN + ["--methods", "ties"], "is float32 [", edit_expert(wrong_shape)),
    "expert missing a tensor": (RUN + ["--methods", "ties"], "lacks tensor", edit_expert(missing_key)),
    "expert in half precision": (RUN + ["--methods", "ties"], "is float16", edit_expert(half_precision)),
    "expert not a safetensors file": (RUN + ["--methods", "ties"], "is not a readable safetensors file",
                                      lambda root: expert_file(root / "cache", "digits").write_bytes(b"garbage")),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_stores_nothing(world, tmp_path, monkeypatch, capsys, case):
    argv, message, *setup = CASES[case]
    root = tmp_path / "root"
    shutil.copytree(world, root, symlinks=True)
    monkeypatch.setenv("MERGEBENCH_TASKS", str(root / "tasks"))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(root / "cache"))
    for step in setup:
        step(root)
    argv = [argument.format(root=root) for argument in argv]
    if "--out" not in argv and argv[0] in ("run", "continual", "report", "reproduce"):
        argv += ["--out", str(root / "store")]
    before = dump(root / "store") if case not in ("garbage store", "damaged pages") else None
    capsys.readouterr()
    assert cli.main(argv) == 2
    shown = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n")]  # as a terminal shows it:
    shown = [line for line in shown if line.strip()]  # progress bars redraw themselves with carriage returns
    assert len(shown) == 1 and shown[0].startswith("mergebench: error: "), shown
    assert message in shown[0] and not any("Traceback" in line for line in shown)
    if before is not None:
        assert dump(root / "store") == before


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40

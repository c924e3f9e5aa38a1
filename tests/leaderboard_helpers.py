"""Small stores written the way the runner writes them (per-example outcomes, checkpoint hashes and family,
costs, selections), for the bundle, leaderboard and site tests."""

from __future__ import annotations

import numpy as np

from mergebench.core.scores import TaskScore
from mergebench.store.database import Cell, ResultStore, content_key

EXAMPLES = 60
RATES = {"pretrained": 0.3, "individual": 0.9, "task_arithmetic": 0.7, "ties": 0.75}
"""The fraction of test examples each method gets right on every task (per-example bits drawn around it)."""
SETTINGS = {"task_arithmetic": {"lam": 0.3}, "ties": {"k": 20, "lam": 1.0}}
COSTS = {"task_arithmetic": (0.5, 40.0), "ties": (2.0, 310.5)}
"""Per merged method: seconds per merge and peak MiB."""


def hashes(tasks: list[str], salt: str = "") -> dict[str, str]:
    return {name: content_key(name, salt) * 2 for name in ["pretrained", *tasks]}


def fill(store: ResultStore, suite: str, tasks: list[str], model: str, *, family: str = "mergebench", salt: str = "",
         parameters: int = 4_700_000, run_id: str = "run-1", seed: int = 0) -> str:
    """Reference rows and two merged methods (validation and test) of ``suite`` on ``model``; returns the context."""
    checkpoints = hashes(tasks, salt)
    context_key = content_key(suite, model, checkpoints)
    store.start_run(run_id, f"mergebench run --suite {suite}", "0123abcd", {"mergebench": "0.1.0", "torch": "2.13.0"}, "cpu")
    generator = np.random.default_rng(len(suite) + len(model) + seed)
    for method, rate in RATES.items():
        hparams = SETTINGS.get(method, {})
        for split in ("validation", "test"):
            outcomes = {task: TaskScore.of_correct(generator.random(EXAMPLES) < rate + 0.01 * index) for index, task in enumerate(tasks)}
            config = {"suite": suite, "tasks": tasks, "model": model, "method": method, "hparams": hparams, "seed": 0,
                      "split": split, "checkpoint_family": family, "data_access": "none"}
            cell = Cell(context_key, suite, model, method, hparams, 0 if method in ("pretrained", "individual") else seed, split)
            seconds, peak = COSTS.get(method, (None, None))
            store.record(cell, run_id, outcomes, config=config, checkpoints=checkpoints, merge_seconds=seconds, eval_seconds=1.0,
                         merge_peak_mb=peak, parameters=None if seconds is None else parameters)
        if method in SETTINGS:
            store.select(Cell(context_key, suite, model, method, hparams, seed, "test"), 0.8, "normalized_validation_accuracy", run_id)
    return context_key

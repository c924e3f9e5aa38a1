"""Continual merging: models arrive one at a time, and the merged model is scored after each arrival.

For every task order (order 0 is the suite's; order k > 0 a permutation drawn from seed k) and every
arrival t = 1 … T, the method merges the first t task vectors of that order, and the merged model is
evaluated on the test split of the t tasks seen so far, as in the OPCM paper's accuracy-after-each-
arrival curves. A continual method (``opcm``) merges them in the order given, so its result after t
arrivals is exactly the state of its stream after t models; a one-shot method (task arithmetic, TIES…)
is re-merged from scratch, the baseline those curves compare against. Rows are stored like any other,
with ``arrived`` and the order in their hyperparameters, so the run resumes and reports read the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from mergebench.core.checkpoints import cache_directory
from mergebench.errors import MergebenchError
from mergebench.runner.sweep import SuiteSweep, SweepRequest, checked, start_run
from mergebench.store.database import ARRIVAL_ORDER, ARRIVED


def task_order(tasks: tuple[str, ...], order: int) -> tuple[str, ...]:
    """Order 0: the suite's own; order k: a permutation drawn from ``torch.Generator().manual_seed(k)``."""
    if order == 0:
        return tasks
    permutation = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(order)).tolist()
    return tuple(tasks[i] for i in permutation)


@dataclass(frozen=True)
class ContinualRequest:
    sweep: SweepRequest
    orders: int = 3


def run_continual(request: ContinualRequest, report: Callable[[str], None] = tqdm.write) -> None:
    """Merge after each arrival, for every order, method, suite and model of the request; store every score."""
    sweep_request = request.sweep
    if request.orders < 1:
        raise MergebenchError("--orders must be at least 1")
    plan = checked(sweep_request, continual=True)
    settings = {m.name: m.defaults() | m.check_overrides(sweep_request.overrides.get(m.name, {})) for m in plan.methods}
    for name, setting in settings.items():  # a method's own order of arrival (opcm.order) would undo --orders
        if setting.get("order", "given") != "given":
            raise MergebenchError(f"continual runs set the order themselves (--orders); leave {name}.order at 'given'")
    store, run_id, device = start_run(sweep_request)
    cache = cache_directory(sweep_request.cache)
    for suite, kind, models, options in plan.suites:
        for model in models:
            evaluator = kind.evaluator(suite, model, device, cache, **options)
            family = kind.checkpoint_family(suite, model, **options)
            sweep = SuiteSweep(evaluator, store, run_id, sweep_request.seed, sweep_request.examples, family)
            sweep.references()
            for method in plan.methods:
                access = evaluator.data_access(method, sweep_request.examples)
                for order in range(request.orders):
                    tasks = task_order(suite.task_names, order)
                    for arrived in tqdm(range(1, len(tasks) + 1), desc=f"{method.name} order {order}", unit="arrival", leave=False):
                        seen = tasks[:arrived]
                        setting = settings[method.name] | {ARRIVAL_ORDER: list(tasks), ARRIVED: arrived}
                        cell = sweep.cell(method.name, setting, "test", seed=order, data_access=access)
                        if sweep.done(cell, seen):
                            continue
                        merge = sweep.timed_one(
                            setting, lambda: evaluator.merge_subset(method, settings[method.name], seen, order, sweep_request.examples)
                        )
                        sweep.evaluate_merge(cell, merge, seen)
                report(f"{suite.name:<16} {method.name:<16} continual: {request.orders} orders × {len(tasks)} arrivals stored")

"""Where a sweep's jobs run, registered by name: ``serial`` (this process) or ``ray`` (workers of a Ray cluster).

Every executor runs the same jobs (:func:`mergebench.runner.sweep.jobs`: each suite and model's
references, then each method's validation grid and chosen test cell) and only the process that started
the sweep writes the store, so a sweep resumes the same way whatever ran it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from mergebench.errors import MergebenchError
from mergebench.runner.sweep import MethodSummary, Plan, SweepRequest, checked, start_run
from mergebench.store.database import ResultStore


class Executor(Protocol):
    def run(self, plan: Plan, request: SweepRequest, store: ResultStore, run_id: str, device: torch.device,
            report: Callable[[str], None]) -> list[MethodSummary]: ...


EXECUTORS: dict[str, Callable[[], Executor]] = {}


def register_executor(name: str):
    def decorate(factory):
        EXECUTORS[name] = factory
        return factory
    return decorate


def get_executor(name: str) -> Executor:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    if name not in EXECUTORS:
        raise MergebenchError(f"unknown executor {name!r}; executors are {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name]()


def run_sweep(request: SweepRequest, report: Callable[[str], None] = tqdm.write) -> list[MethodSummary]:
    """Run (or resume) every cell of the request; returns one summary per suite, model and method."""
    executor = get_executor(request.executor)
    plan = checked(request)
    store, run_id, device = start_run(request)
    return executor.run(plan, request, store, run_id, device, report)

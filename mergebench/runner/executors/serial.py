"""The jobs one after another in this process, each suite's evaluator prepared once."""

from __future__ import annotations

from typing import Callable

import torch

from mergebench.runner.executors import register_executor
from mergebench.runner.sweep import Evaluators, MethodSummary, Plan, SweepRequest, jobs, run_job
from mergebench.store.database import ResultStore


@register_executor("serial")
class SerialExecutor:
    def run(self, plan: Plan, request: SweepRequest, store: ResultStore, run_id: str, device: torch.device,
            report: Callable[[str], None]) -> list[MethodSummary]:
        evaluators = Evaluators(plan, request, device)
        summaries = []
        for job in jobs(plan, request.shard):
            summary = run_job(job, evaluators, store, run_id)
            if summary is not None:
                report(summary.line())
                summaries.append(summary)
        return summaries

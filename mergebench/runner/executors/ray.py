"""The jobs on the workers of a Ray cluster (``--executor ray``): one GPU per worker where there are GPUs.

The process that started the sweep (the driver) writes the store; it never evaluates. A worker holds the
evaluator of the suite and model it last served, runs a job against a scratch copy of that context's
rows (so it skips finished cells and its selections read the references), and sends the new rows back;
the driver adds them to the store in one transaction as each job finishes. A worker that dies is
restarted and its job run again (jobs are idempotent: a cell is stored once); a driver that dies
leaves the store with every finished job, and the same command resumes. ``--ray-address`` joins a
cluster (``ray://head:10001`` or ``auto``); without it a local one is started on this machine's CPUs
(and GPUs). Ray is an optional extra: ``pip install "mergebench[ray]"``.
"""

from __future__ import annotations

import tempfile
from typing import Callable

import torch

from mergebench.errors import MergebenchError
from mergebench.runner.executors import register_executor
from mergebench.runner.sweep import (
    Evaluators, MethodSummary, Plan, SweepJob, SweepRequest, checked, jobs, resolve_device, run_job,
)
from mergebench.store.database import ResultStore, StoredRows, export_rows, import_rows

RAY_INSTALL = 'pip install "mergebench[ray]"'


class SweepWorker:
    """One Ray worker: prepares evaluators on first use and runs jobs against scratch stores."""

    def __init__(self, request: SweepRequest, run_row: tuple):
        self.request = request
        self.run_row = run_row
        self.evaluators = Evaluators(checked(request), request, resolve_device(request.device))

    def run(self, job: SweepJob) -> tuple[StoredRows, MethodSummary | None]:
        evaluator, _ = self.evaluators.get(job.target)
        with tempfile.TemporaryDirectory() as folder:
            scratch = ResultStore(folder)
            import_rows(scratch, export_rows(ResultStore(self.request.out), evaluator.context_key), "the sweep's store")
            scratch.adopt_run(self.run_row)
            summary = run_job(job, self.evaluators, scratch, self.run_row[0])
            return export_rows(scratch, evaluator.context_key), summary


@register_executor("ray")
class RayExecutor:
    def run(self, plan: Plan, request: SweepRequest, store: ResultStore, run_id: str, device: torch.device,
            report: Callable[[str], None]) -> list[MethodSummary]:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise MergebenchError(f"--executor ray needs Ray: {RAY_INSTALL}") from None
        if not ray.is_initialized():
            try:
                ray.init(address=request.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except Exception as error:  # a cluster that cannot be reached is the user's to fix: one line
                raise MergebenchError(f"cannot start or join the Ray cluster {request.address or '(local)'}: {error}") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = gpus or max(1, int(resources.get("CPU", 1)))
        worker = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=-1, max_task_retries=-1)(SweepWorker)
        run_row = store.pending_run(run_id)
        pool = ActorPool([worker.remote(request, run_row) for _ in range(count)])
        summaries = []
        every = jobs(plan, request.shard)
        for phase in ([job for job in every if job.method is None], [job for job in every if job.method is not None]):
            for rows, summary in pool.map_unordered(lambda actor, job: actor.run.remote(job), phase):
                import_rows(store, rows, "a Ray worker")
                if summary is not None:
                    report(summary.line())
                    summaries.append(summary)
        return summaries

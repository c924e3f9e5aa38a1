"""PCB with exact scores for its candidates only against PCB scoring every entry (the dense kernels,
``kernels.PCB_MAX_TASKS = 0``), alternated in one process on the task vectors of ``merge_speed.py``
(ViT-B/32 layout). Each merge is timed against a ``torch.add`` over the same ``[T, N]`` bytes right
after it (after one untimed merge by each), and both merged vectors must be equal bit for bit.

    python benchmarks/pcb_candidates.py --params 16e6 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from merge_speed import cpu_stack_from_arguments

from mergebench.core import kernels
from mergebench.methods.registry import get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args, task_vectors = cpu_stack_from_arguments(parser)
    method = get_method("pcb")
    setting = method.defaults()
    paths = {"every score (dense)": 0, "candidates": kernels.PCB_MAX_TASKS}
    print(f"{args.tasks} task vectors × {task_vectors.vectors.shape[1] / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s)")
    for max_tasks in paths.values():  # compile (or load) the kernels of both paths before timing
        kernels.PCB_MAX_TASKS = max_tasks
        method.merge(task_vectors, setting, seed=0)
    for run in range(args.runs):
        merged = {}
        for name, max_tasks in paths.items():
            kernels.PCB_MAX_TASKS = max_tasks
            started = time.perf_counter()
            merged[name] = method.merge(task_vectors, setting, seed=0)
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            torch.add(task_vectors.vectors, 1.0)
            add = time.perf_counter() - started
            print(f"run {run + 1}  {name:<20} {seconds:6.2f} s  {seconds / add:4.1f}× torch.add")
        print(f"run {run + 1}  equal bit for bit: {torch.equal(*merged.values())}")


if __name__ == "__main__":
    main()

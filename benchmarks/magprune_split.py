"""Where DELLA's time goes on the CPU kernels: the magnitude ranks (with the ramp of drop
probabilities), MagPrune as a whole (ranks, draws, pruned stack written), TIES's election of the pruned
stack, and MagPrune fused with the election (what ``della`` runs), each against ``torch.add`` over the
same ``[T, N]`` bytes, on the task vectors of ``merge_speed.py`` (ViT-B/32 layout). CPU seconds, the
least of ``--repeats`` runs.

    python benchmarks/magprune_split.py --params 16e6 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch
from merge_speed import cpu_stack_from_arguments

from mergebench.core import kernels
from mergebench.methods.della import magprune, row_segments
from mergebench.methods.ties import elect_and_merge


@numba.njit(nogil=True)
def every_row_ranked(bits, starts, widths, p, epsilon):
    """The ranks and drop probabilities of every row, as :func:`kernels._magprune` computes them."""
    scratch = kernels._row_scratch(max(widths.max(), 1))
    keys, ranked_keys, order, before, counts, crowded, drop = scratch
    for t in range(bits.shape[0]):
        for segment in range(starts.shape[0] - 1):
            d = widths[segment]
            if d == 1:
                continue
            step = np.float32(2 * epsilon / (d - 1))
            for start in range(starts[segment], starts[segment + 1], d):
                kernels._magnitude_ramp(bits[t, start : start + d], np.float32(p + epsilon), step, keys, ranked_keys, order, before,
                                        counts, crowded, drop)


def least_cpu_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--epsilon", type=float, default=0.07)
    args, task_vectors = cpu_stack_from_arguments(parser)
    vectors = task_vectors.vectors
    starts, widths = row_segments(task_vectors)
    bits, starts_array, widths_array = vectors.view(torch.int32).numpy(), np.array(starts), np.array(widths)
    merged = torch.empty(vectors.shape[1])
    pruned = magprune(task_vectors, args.p, args.epsilon, seed=0)  # compiles the kernels
    parts = {
        "torch.add": lambda: torch.add(vectors, 1.0),
        "ranks and drop probabilities": lambda: every_row_ranked(bits, starts_array, widths_array, args.p, args.epsilon),
        "MagPrune (ranks, draws, pruned stack)": lambda: magprune(task_vectors, args.p, args.epsilon, seed=0),
        "election of the pruned stack": lambda: elect_and_merge(pruned, whole=task_vectors),
        "MagPrune and election fused": lambda: kernels.magprune_elect(vectors, starts, widths, args.p, args.epsilon, 0, merged),
    }
    parts["ranks and drop probabilities"]()
    parts["MagPrune and election fused"]()
    add = None
    print(f"{args.tasks} task vectors × {vectors.shape[1] / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s)")
    for name, function in parts.items():
        seconds = least_cpu_seconds(function, args.repeats)
        add = add or seconds
        print(f"{name:<40} {seconds:7.3f} s  {seconds / add:5.2f}× torch.add")


if __name__ == "__main__":
    main()

"""Merge time per method for T task vectors of ViT-B/32 size, as a ratio to a plain ``torch.add``.

Merging is memory-bound: one pass over the stacked task vectors should cost about the time of reading
them once. The reference is ``torch.add`` over the same ``[T, N]`` bytes (read once, written once),
timed right before and right after each method, so that a busy machine slows both alike; the ratio is
method / mean(add before, add after). TSV, Iso-C, Iso-CTS and OPCM are also given against their floor,
one SVD of every task matrix (``torch.linalg.svd`` of each layer's ``[T, m, n]`` stack), also timed
right before and right after each of them. Where a method
misses its goal (the issue's ratios), one profiled run names the operators that dominate, or, for a
method whose work is one compiled kernel (``PASSES``), its dominant pass is timed alone. Random
weights suffice. With ``--markdown PAGE`` the results also replace the table between the page's
``<!-- merge_speed.py table -->`` and ``<!-- end of merge_speed.py table -->`` lines, headed by the
command that made it (:func:`write_table`).

    python benchmarks/merge_speed.py                       # 8 × 88M parameters, every data-free method
    python benchmarks/merge_speed.py --params 20e6 --methods ties,dare --threads 1
    OMP_NUM_THREADS=1 python benchmarks/merge_speed.py --params 16e6 --threads 1 --markdown docs/merge-speed.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import SCALE, all_methods, get_method
from mergebench.methods.spectral import matrix_shape

VIT_B32_VISION_PARAMS = 87_849_216  # open_clip ViT-B-32 visual tower
ADD_GOALS = {"average": 1.0, "task_arithmetic": 1.0, "model_stock": 2.0}  # every other data-free method: 3×
SVD_METHODS = {"tsv", "iso_c", "iso_cts", "opcm"}  # SVD-based: against one SVD of every matrix
SVD_GOAL = 1.5
NO_GOAL = {"karcher"}  # iterative: reads the stack several times per iteration, and the issue sets it no goal


def magprune_ranks(task_vectors: TaskVectors, setting: dict) -> tuple[str, Callable[[], None]]:
    """DELLA's pass that no profiler sees inside its compiled kernel: the exact magnitude ranks of every row."""
    from magprune_split import every_row_ranked  # it imports this module

    from mergebench.methods.della import row_segments

    starts, widths = (np.array(part) for part in row_segments(task_vectors))
    bits = task_vectors.vectors.view(torch.int32).numpy()
    return "the exact magnitude rank of every entry in its row", lambda: every_row_ranked(bits, starts, widths, setting["p"], setting["epsilon"])


PASSES = {"della": magprune_ranks, "della_linear": magprune_ranks}
"""Where a method's time goes inside one compiled kernel: its dominant pass, timed on its own when the goal is missed."""


def random_task_vectors(num_tasks: int, num_params: int, device: torch.device) -> TaskVectors:
    """ViT-like layout: 12 blocks of 768×768 and 768×3072 matrices plus 1-D parameters."""
    shapes, total = [], 0
    block = [(2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,), (768, 3072), (768,), (768,), (768,)]
    while total < num_params:
        for shape in block:
            shapes.append(shape)
            total += torch.Size(shape).numel()
    state = {f"blocks.{i // len(block)}.p{i % len(block)}": torch.empty(shape, device="meta") for i, shape in enumerate(shapes)}
    layout = ParamLayout.of(state, list(state))
    generator = torch.Generator(device=device).manual_seed(0)
    vectors = torch.randn((num_tasks, layout.numel), generator=generator, device=device) * 1e-3
    pretrained = torch.randn(layout.numel, generator=generator, device=device) * 0.02
    return TaskVectors(pretrained, vectors, layout, tuple(f"task{t}" for t in range(num_tasks)))


def cpu_stack_from_arguments(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, TaskVectors]:
    """For the benchmarks that split one method's time: ``--tasks``, ``--params`` and ``--threads`` added
    to ``parser``, the arguments parsed, torch's CPU threads set, and the random task vectors built."""
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--params", type=float, default=16e6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args, random_task_vectors(args.tasks, int(args.params), torch.device("cpu"))


def timed(function, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def svd_floor(task_vectors: TaskVectors) -> None:
    """One SVD of every task matrix: the work TSV and Iso-CTS cannot avoid."""
    for slot, block in task_vectors.slices():
        shape = matrix_shape(slot.shape, "reshape")
        if shape is not None:
            torch.linalg.svd(block.reshape(-1, *shape), full_matrices=False)


def dominant_operators(function, device: torch.device, top: int = 3) -> str:
    """The operators with the largest self time in one profiled run, as ``name share%``."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profile:
        started = time.perf_counter()
        function()
        wall_us = (time.perf_counter() - started) * 1e6
    events = [e for e in profile.key_averages() if e.self_cpu_time_total > 0]
    shares = [(e.key, e.self_cpu_time_total) for e in events]
    shares.append(("compiled kernels and Python (outside PyTorch operators)", max(0.0, wall_us - sum(t for _, t in shares))))
    total = sum(t for _, t in shares) or 1
    shares.sort(key=lambda share: share[1], reverse=True)
    return ", ".join(f"{name} {100 * t / total:.0f}%" for name, t in shares[:top])


def table_markers(page: Path) -> tuple[str, str]:
    """The lines between which the running benchmark writes its table into ``page``; exits when the page
    lacks them (checked before the benchmark runs, and again before it writes)."""
    script = Path(sys.argv[0]).name
    start, end = f"<!-- {script} table -->", f"<!-- end of {script} table -->"
    text = page.read_text() if page.is_file() else ""
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no '{start}' … '{end}' lines to put the table between")
    return start, end


def write_table(page: Path, description: str, header: list[str], rows: list[list[str]]) -> None:
    """Replace the table between the ``<!-- SCRIPT table -->`` and ``<!-- end of SCRIPT table -->`` lines
    of ``page`` (SCRIPT: the running benchmark's file name) with ``rows``, headed by the command that
    made it and ``description``; columns of numbers are right-aligned."""
    script = Path(sys.argv[0]).name
    start, end = table_markers(page)
    text = page.read_text()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}python benchmarks/{script} {' '.join(sys.argv[1:])}".strip()
    numeric = [any(row[i] for row in rows) and all(row[i] == "" or row[i][0].isdigit() for row in rows) for i in range(len(header))]
    lines = [
        start,
        f"Written by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {description}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        end,
    ]
    before, rest = text.split(start, 1)
    page.write_text(before + "\n".join(lines) + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--params", type=float, default=VIT_B32_VISION_PARAMS)
    parser.add_argument("--methods", default="", help="comma-separated (default: every data-free method)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile methods that miss their goal")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as a table into this page")
    args = parser.parse_args()
    if args.markdown:
        table_markers(args.markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task_vectors = random_task_vectors(args.tasks, int(args.params), device)
    gib = task_vectors.vectors.numel() * task_vectors.vectors.element_size() / 2**30
    description = (f"{args.tasks} task vectors × {task_vectors.layout.numel / 1e6:.1f}M parameters = {gib:.2f} GiB on {device}, "
                   f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(description)

    def add():
        return timed(lambda: torch.add(task_vectors.vectors, 1.0), args.repeats, device)

    names = [n for n in args.methods.split(",") if n] or [n for n, m in all_methods().items() if m.data == "none"]

    def floor():
        return timed(lambda: svd_floor(task_vectors), 1, device)

    rows = []
    print(f"{'method':<18} {'seconds':>8} {'÷ add':>7} {'goal':>6}  setting / what dominates")
    for name in names:
        method = get_method(name)
        setting = method.defaults()
        merge = lambda: method.merge(task_vectors, setting, seed=0)  # noqa: E731
        try:  # compile (or load) the method's kernels before timing
            method.merge(random_task_vectors(args.tasks, 1, device), setting, seed=0)
        except (MergebenchError, torch.OutOfMemoryError):
            pass
        before, floor_before = add(), floor() if name in SVD_METHODS else None
        try:
            seconds = timed(merge, 1 if name in SVD_METHODS else args.repeats, device)
        except (MergebenchError, torch.OutOfMemoryError) as error:  # e.g. slerp needs exactly two models
            print(f"{name:<18} skipped: {error}")
            rows.append([name, "", "", "", "", f"skipped: {error}", ""])
            continue
        reference = (before + add()) / 2
        ratio = seconds / reference
        described = ", ".join(f"{k}={v}" for k, v in setting.items() if k != SCALE)
        if name in SVD_METHODS:
            svd_seconds = (floor_before + floor()) / 2
            over_floor = seconds / svd_seconds
            line = f"{name:<18} {seconds:8.3f} {ratio:6.1f}× {SVD_GOAL:5.1f}×  {over_floor:.2f}× one SVD of every matrix ({svd_seconds:.2f} s)"
            missed = over_floor > SVD_GOAL
            verdict = f"{'missed' if missed else 'met'}: {over_floor:.2f}× one SVD of every matrix ({svd_seconds:.1f} s)"
            goal = f"{SVD_GOAL}× SVD"
        elif name in NO_GOAL:
            line = f"{name:<18} {seconds:8.3f} {ratio:6.1f}×      —  ({described})"
            missed, verdict, goal = False, "no goal", "—"
        else:
            goal_ratio = ADD_GOALS.get(name, 3.0)
            line = f"{name:<18} {seconds:8.3f} {ratio:6.1f}× {goal_ratio:5.1f}×  ({described})"
            missed = ratio > goal_ratio
            verdict = f"{'missed' if missed else 'met'}: {ratio:.2f}× of {goal_ratio:g}×"
            goal = f"{goal_ratio:g}×"
        dominated = ""
        if missed and not args.no_profile and name in PASSES and device.type == "cpu":
            what, run_pass = PASSES[name](task_vectors, setting)
            run_pass()  # compiles it
            pass_seconds = timed(run_pass, args.repeats, device)
            dominated = f"{what}: {pass_seconds:.3f} s ({pass_seconds / reference:.2f}× `torch.add`, {pass_seconds / seconds:.0%} of the merge)"
        elif missed and not args.no_profile:
            dominated = dominant_operators(merge, device)
        if dominated:
            line += f"\n{'':<44}goal missed; dominated by {dominated}"
        print(line, flush=True)
        rows.append([name, described.replace("|", "\\|"), f"{seconds:.3f}", f"{ratio:.1f}×", goal,
                     verdict, dominated])
    if args.markdown:
        header = ["method", "setting", "seconds", "÷ `torch.add`", "goal", "against the goal", "what dominates (where missed)"]
        write_table(args.markdown, f"{description}, {platform.machine()} with {os.cpu_count()} cores", header, rows)


if __name__ == "__main__":
    main()

"""Merge time per method for T task vectors of ViT-B/32 size, next to a plain ``torch.add``.

Merging is memory-bound: one pass over the stacked task vectors should cost about the time of reading
them once. The reference is ``torch.add`` over the same ``[T, N]`` bytes. Random weights suffice.

    python benchmarks/merge_speed.py                       # 8 × 88M parameters, every method
    python benchmarks/merge_speed.py --params 20e6 --methods ties,dare --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods.registry import SCALE, all_methods, get_method

VIT_B32_VISION_PARAMS = 87_849_216  # open_clip ViT-B-32 visual tower


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--params", type=float, default=VIT_B32_VISION_PARAMS)
    parser.add_argument("--methods", default="", help="comma-separated (default: every data-free method)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    task_vectors = random_task_vectors(args.tasks, int(args.params), device)
    gib = task_vectors.vectors.numel() * task_vectors.vectors.element_size() / 2**30
    print(f"{args.tasks} task vectors × {task_vectors.layout.numel / 1e6:.1f}M parameters = {gib:.2f} GiB on {device}")
    reference = timed(lambda: torch.add(task_vectors.vectors, 1.0), args.repeats, device)
    print(f"{'torch.add (read + write once)':<32} {reference:8.3f} s   1.0×")
    names = [n for n in args.methods.split(",") if n] or [n for n, m in all_methods().items() if m.data == "none"]
    for name in names:
        method = get_method(name)
        setting = method.defaults()
        try:
            seconds = timed(lambda: method.merge(task_vectors, setting, seed=0), args.repeats, device)
        except (MergebenchError, torch.OutOfMemoryError) as error:  # e.g. slerp needs exactly two models
            print(f"{name:<32} skipped: {error}")
            continue
        print(f"{name:<32} {seconds:8.3f} s {seconds / reference:5.1f}×   ({', '.join(f'{k}={v}' for k, v in setting.items() if k != SCALE)})")


if __name__ == "__main__":
    main()

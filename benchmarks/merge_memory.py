"""Peak memory of streamed merges against the number of experts, on ViT-shaped random checkpoints.

The merge engine (:mod:`mergebench.core.streaming`) reads one tensor of every checkpoint at a time, so a
merge's memory should be flat in the number of tasks k and bounded by the largest tensor. This writes a
random base and k experts as safetensors files with the tensor shapes of open_clip's ViT-B/32 (or
ViT-L/14) vision tower, then runs each merge in a fresh process (``stream_merge`` into a folder, as the
LLM suites do) and reports that process's peak resident memory above its resident memory just before
the merge, the peak bytes of checkpoint tensors alive at once, and the wall time.

    python benchmarks/merge_memory.py                                   # TIES, k = 2, 4, 8, 16, 20, ViT-B/32
    python benchmarks/merge_memory.py --methods tsv --blocks 1          # TSV on the embeddings and one block
    python benchmarks/merge_memory.py --shape vit-l-14 --tasks 20 --dtype bf16   # ViT-L/14 × 20

Files are written under ``--folder`` (default: a temporary folder) and deleted at the end unless
``--keep``. Check ``df -h`` first: ViT-L/14 × 20 experts take 12.8 GB in bf16 (25.5 GB in float32).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # name: (width, layers, patch, grid, mlp, output dim)
    "vit-b-32": (768, 12, 32, 7, 3072, 512),
    "vit-l-14": (1024, 24, 14, 16, 4096, 768),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


def vit_shapes(shape: str, blocks: int | None) -> dict[str, tuple[int, ...]]:
    """open_clip's ``visual.*`` tensor shapes (``blocks`` transformer blocks, default all)."""
    width, layers, patch, grid, mlp, output = SHAPES[shape]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
    }
    for block in range(layers if blocks is None else blocks):
        prefix = f"visual.transformer.resblocks.{block}"
        shapes |= {
            f"{prefix}.ln_1.weight": (width,), f"{prefix}.ln_1.bias": (width,),
            f"{prefix}.attn.in_proj_weight": (3 * width, width), f"{prefix}.attn.in_proj_bias": (3 * width,),
            f"{prefix}.attn.out_proj.weight": (width, width), f"{prefix}.attn.out_proj.bias": (width,),
            f"{prefix}.ln_2.weight": (width,), f"{prefix}.ln_2.bias": (width,),
            f"{prefix}.mlp.c_fc.weight": (mlp, width), f"{prefix}.mlp.c_fc.bias": (mlp,),
            f"{prefix}.mlp.c_proj.weight": (width, mlp), f"{prefix}.mlp.c_proj.bias": (width,),
        }
    shapes |= {"visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,), "visual.proj": (width, output)}
    return shapes


def write_checkpoints(folder: Path, shapes: dict[str, tuple[int, ...]], tasks: int, dtype: torch.dtype, distinct: int | None = None) -> None:
    """``base.safetensors`` and ``expert{t}.safetensors``: θ₀ ~ N(0, 0.02²), τ_t a shifted copy of one
    N(0, 10⁻⁶) draw per tensor with a sign that alternates across tasks (cheap to write, all different).
    With ``distinct``, expert t ≥ distinct is a file copy of expert t mod distinct (faster to write)."""
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    noise = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}
    save_file({name: tensor.to(dtype) for name, tensor in base.items()}, str(folder / "base.safetensors"))
    for task in range(tasks):
        if distinct is not None and task >= distinct:
            shutil.copyfile(folder / f"expert{task % distinct}.safetensors", folder / f"expert{task}.safetensors")
            continue
        expert = {}
        for name, tensor in base.items():
            shifted = noise[name].reshape(-1).roll(task * 7919).reshape(tensor.shape)
            expert[name] = (tensor + (-1) ** task * (1 + 0.1 * task) * shifted).to(dtype)
        save_file(expert, str(folder / f"expert{task}.safetensors"))
        del expert


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def child(folder: Path, method_name: str, tasks: int, setting: dict, threads: int = 1) -> None:
    """One merge in this process; prints a JSON line of what it measured."""
    from mergebench.core.streaming import LiveTensorTracker, stream_merge
    from mergebench.methods import get_method

    torch.set_num_threads(threads)
    method = get_method(method_name)
    experts = {f"task{t}": folder / f"expert{t}.safetensors" for t in range(tasks)}
    tracker = LiveTensorTracker()
    out = folder / f"merged-{method_name}-{tasks}"
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = status_kib("VmRSS")
    started = time.perf_counter()
    report = stream_merge(folder / "base.safetensors", experts, method, out, setting, tracker=tracker, overwrite=True)
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    shutil.rmtree(out)
    print(json.dumps({
        "method": method_name, "tasks": tasks, "seconds": seconds, "passes": report.passes,
        "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "peak_above_mib": (peak - before) / 1024,
        "peak_tensor_mib": tracker.peak_bytes / MIB,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="vit-b-32")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks written (default: all)")
    parser.add_argument("--tasks", default="2,4,8,16,20", help="comma-separated numbers of experts k")
    parser.add_argument("--methods", default="ties", help="comma-separated data-free methods")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the checkpoints on disk")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--distinct", type=int, default=None, help="write this many distinct experts, the others as file copies of them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the merge (default 1: on a shared machine more threads wait on each other)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "METHOD", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]), {}, args.threads)
        return

    counts = sorted({int(k) for k in args.tasks.split(",")})
    shapes = vit_shapes(args.shape, args.blocks)
    params = sum(torch.Size(shape).numel() for shape in shapes.values())
    largest = max(shapes.values(), key=lambda shape: torch.Size(shape).numel())
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="merge-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{args.shape}{'' if args.blocks is None else f' ({args.blocks} blocks)'}: {params / 1e6:.1f}M parameters in "
          f"{len(shapes)} tensors, {args.dtype} ({params * element / 2**30:.2f} GiB per checkpoint); largest tensor "
          f"{list(largest)} = {torch.Size(largest).numel() * 4 / MIB:.1f} MiB in float32")
    started = time.perf_counter()
    written = folder / "written.json"
    description = {"shape": args.shape, "blocks": args.blocks, "tasks": max(counts), "dtype": args.dtype, "distinct": args.distinct}
    try:
        if written.is_file() and json.loads(written.read_text()) == description:
            print(f"reusing base + {max(counts)} experts in {folder}")
        else:
            write_checkpoints(folder, shapes, max(counts), DTYPES[args.dtype], args.distinct)
            written.write_text(json.dumps(description))
            copies = "" if args.distinct is None else f" ({args.distinct} distinct, the others file copies)"
            print(f"wrote base + {max(counts)} experts{copies} to {folder} in {time.perf_counter() - started:.0f} s")
        print(f"{'method':<8} {'k':>3} {'peak RSS above start':>21} {'peak RSS':>10} {'tensors alive':>14} {'passes':>7} {'seconds':>8}")
        for name in args.methods.split(","):
            for k in counts:
                result = subprocess.run([sys.executable, __file__, "--child", str(folder), name, str(k), "--threads", str(args.threads)],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{name:<8} {k:>3} failed: {result.stderr.strip().splitlines()[-1:]}")
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{name:<8} {k:>3} {row['peak_above_mib']:>17.0f} MiB {row['peak_rss_mib']:>6.0f} MiB "
                      f"{row['peak_tensor_mib']:>10.0f} MiB {row['passes']:>7} {row['seconds']:>8.1f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

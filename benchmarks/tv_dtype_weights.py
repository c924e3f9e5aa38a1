"""How far bf16 task vectors (``--tv-dtype bf16``) move a merge: the merged update λ·τ_m with each τ_t
rounded to bfloat16 against float32, on a suite's cached experts (no evaluation).

    python benchmarks/tv_dtype_weights.py ~/.cache/mergebench/checkpoints/mini-vision/efficientnet-lite0/<key>/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mergebench.core.streaming import StreamedTaskVectors, open_checkpoint
from mergebench.methods import get_method

SETTINGS = (("task_arithmetic", {"lam": 0.2}), ("ties", {"k": 20.0, "lam": 0.8, "scope": "global"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a trained suite's expert folder (pretrained.safetensors, <task>-<key>.safetensors)")
    args = parser.parse_args()
    base = open_checkpoint(args.folder / "pretrained.safetensors")
    experts = {
        path.name.split("-")[0]: open_checkpoint(path)
        for path in sorted(args.folder.glob("*.safetensors"))
        if not path.name.endswith(".head.safetensors") and path.name != "pretrained.safetensors"
    }
    # BatchNorm statistics are buffers, taken from the base, never merged
    names = [name for name in base if base.infos[name].torch_dtype.is_floating_point and "running_" not in name]
    for name, setting in SETTINGS:
        method = get_method(name)
        full = method.defaults() | setting
        merged = {
            dtype: full["lam"] * StreamedTaskVectors(base, experts, names, dtype=dtype).merged_vector(method, full)
            for dtype in (torch.float32, torch.bfloat16)
        }
        difference = merged[torch.bfloat16] - merged[torch.float32]
        print(f"{name} {setting}: {len(experts)} experts, {difference.numel():,} entries: "
              f"max |Δ| = {difference.abs().max():.3e}, relative L2 {difference.norm() / merged[torch.float32].norm():.3e}")


if __name__ == "__main__":
    main()

"""Streamed merges against mergekit on identical safetensors inputs, side by side, with their outputs compared.

A random Llama (float32, safetensors on local disk) and T experts whose task vectors have dense small
noise plus sparse large entries of random sign. For each method: mergebench's ``stream_merge`` (in this
process), mergekit's ``mergekit-yaml`` (in the peer environment: a separate process, so its time
includes starting Python and importing mergekit, reported on its own line), and, for task arithmetic,
a plain in-memory add over the same files (load every file, θ₀ + Σ_t (θ_t − θ₀), save). The merged
tensors are compared: max |difference| over all tensors, 0 when identical. mergebench runs with the
options that reproduce mergekit (TIES: ``scope=per_tensor``, ``tie_rule=descending_sort``,
``zero_sign=positive``); TIES is also run with mergebench's default exact-k tie rule (``lowest_index``,
no sort) and compared with the same mergekit output. Ratios to mergekit are given with its whole time
and without its start-up (measured once, before the merges).

With ``--markdown PAGE`` the results also replace the table between the page's
``<!-- peer_speed.py table -->`` and ``<!-- end of peer_speed.py table -->`` lines, under the command.

    MERGEBENCH_PEER_PYTHON=/path/to/peers-venv/bin/python python benchmarks/peer_speed.py
    python benchmarks/peer_speed.py --layers 2 --hidden 256 --experts 4 --peer-python /path/to/python
    OMP_NUM_THREADS=1 python benchmarks/peer_speed.py --layers 16 --markdown docs/peers.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from merge_speed import table_markers, write_table
from safetensors.torch import load_file, save_file

from mergebench.core.streaming import stream_merge
from mergebench.methods.registry import get_method

MERGEKIT_CONFIGS = {
    "task_arithmetic": ({}, {"normalize": False, "lambda": 1.0}),
    "ties": ({"density": 0.2}, {"normalize": True, "lambda": 1.0}),
}
MERGEBENCH_SETTINGS = {
    "task_arithmetic": {"lam": 1.0},
    "ties": {"k": 20.0, "scope": "per_tensor", "tie_rule": "descending_sort", "zero_sign": "positive", "lam": 1.0},
}


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (hidden, hidden), f"{prefix}.self_attn.k_proj.weight": (hidden, hidden),
            f"{prefix}.self_attn.v_proj.weight": (hidden, hidden), f"{prefix}.self_attn.o_proj.weight": (hidden, hidden),
            f"{prefix}.mlp.gate_proj.weight": (intermediate, hidden), f"{prefix}.mlp.up_proj.weight": (intermediate, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, intermediate),
            f"{prefix}.input_layernorm.weight": (hidden,), f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def write_checkpoints(root: Path, args) -> tuple[Path, dict[str, Path]]:
    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64, "vocab_size": args.vocab, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    folders = {"base": root / "base"} | {f"expert{t}": root / f"expert{t}" for t in range(args.experts)}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        if name == "base":
            state = base
        else:
            state = {}
            for key, tensor in base.items():
                spikes = (torch.rand(tensor.shape, generator=generator) < 0.01) * torch.randn(tensor.shape, generator=generator).sign() * 0.05
                state[key] = tensor + torch.randn(tensor.shape, generator=generator) * 1e-3 + spikes
        save_file(state, str(folder / "model.safetensors"))
    return folders["base"], {name: folder for name, folder in folders.items() if name != "base"}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    if set(ours) != set(theirs):
        return float("nan")
    return max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)


def run_mergekit(peer_python: str, method: str, base: Path, experts: dict[str, Path], out: Path) -> float:
    per_model, shared = MERGEKIT_CONFIGS[method]
    config = {
        "merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": shared,
        "models": [{"model": str(folder), "parameters": {"weight": 1.0} | per_model} for folder in experts.values()],
    }
    config_path = out.parent / f"{method}.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    mergekit_yaml = Path(peer_python).parent / "mergekit-yaml"
    started = time.perf_counter()
    subprocess.run([str(mergekit_yaml), str(config_path), str(out)], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def in_memory_add(base: Path, experts: dict[str, Path], out: Path) -> float:
    started = time.perf_counter()
    theta0 = load_folder(base)
    merged = {name: tensor.clone() for name, tensor in theta0.items()}
    for folder in experts.values():
        for name, tensor in load_folder(folder).items():
            merged[name] += tensor - theta0[name]
    out.mkdir()
    save_file(merged, str(out / "model.safetensors"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--peer-python", default=os.environ.get("MERGEBENCH_PEER_PYTHON", ""))
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as a table into this page")
    args = parser.parse_args()
    if args.markdown:
        table_markers(args.markdown)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        base, experts = write_checkpoints(root, args)
        params = sum(t.numel() for t in load_folder(base).values())
        description = f"random Llama: {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f}M parameters, {args.experts} experts, float32 safetensors"
        print(description)
        startup = 0.0
        if args.peer_python:
            started = time.perf_counter()
            subprocess.run([args.peer_python, "-c", "import mergekit.merge, mergekit.merge_methods"], check=True)
            startup = time.perf_counter() - started
            print(f"{'mergekit start-up (python + import)':<44} {startup:8.2f} s")
        for method in args.methods.split(","):
            ours_out = root / f"ours_{method}"
            merge_method = get_method(method)  # the registry is loaded (imported) before the clock starts
            started = time.perf_counter()
            stream_merge(base, {name: folder / "model.safetensors" for name, folder in experts.items()}, merge_method,
                         ours_out, MERGEBENCH_SETTINGS[method], copy_files=False)
            ours_seconds = time.perf_counter() - started
            ours = load_folder(ours_out)
            print(f"{'mergebench stream_merge ' + method:<44} {ours_seconds:8.2f} s")
            label = f"{method} ({', '.join(f'{k}={v}' for k, v in MERGEBENCH_SETTINGS[method].items())})"
            row = [label, f"{ours_seconds:.2f} s", "", "", ""]
            rows.append(row)
            if method == "task_arithmetic":
                plain_out = root / "plain_add"
                plain = in_memory_add(base, experts, plain_out)
                diff = max_difference(ours, load_folder(plain_out))
                print(f"{'plain in-memory add':<44} {plain:8.2f} s   mergebench ÷ plain = {ours_seconds / plain:.2f}   max|diff| = {diff:.3g}")
                rows.append(["plain in-memory add over the same files", f"{plain:.2f} s", "",
                             f"mergebench's task arithmetic ÷ plain = {ours_seconds / plain:.2f}", f"{diff:.3g} against mergebench"])
            if args.peer_python:
                theirs_out = root / f"mergekit_{method}"
                theirs_seconds = run_mergekit(args.peer_python, method, base, experts, theirs_out)
                theirs = load_folder(theirs_out)
                diff = max_difference(ours, theirs)
                print(f"{'mergekit-yaml ' + method:<44} {theirs_seconds:8.2f} s   mergekit ÷ mergebench = "
                      f"{theirs_seconds / ours_seconds:.2f} ({(theirs_seconds - startup) / ours_seconds:.2f} without start-up)"
                      f"   max|diff| = {diff:.3g}")
                row[2:] = [f"{theirs_seconds:.2f} s ({theirs_seconds - startup:.2f} s)",
                           f"{theirs_seconds / ours_seconds:.2f} ({(theirs_seconds - startup) / ours_seconds:.2f})", f"{diff:.3g}"]
                if method == "ties":
                    # mergebench's default exact-k rule (ties at the threshold kept lowest index first), no sort
                    default_out = root / "ours_ties_lowest_index"
                    setting = MERGEBENCH_SETTINGS[method] | {"tie_rule": "lowest_index"}
                    started = time.perf_counter()
                    stream_merge(base, {name: folder / "model.safetensors" for name, folder in experts.items()}, merge_method,
                                 default_out, setting, copy_files=False)
                    default_seconds = time.perf_counter() - started
                    diff = max_difference(load_folder(default_out), theirs)
                    print(f"{'mergebench stream_merge ties tie_rule=lowest_index':<44} {default_seconds:8.2f} s   mergekit ÷ mergebench = "
                          f"{theirs_seconds / default_seconds:.2f} ({(theirs_seconds - startup) / default_seconds:.2f} without start-up)"
                          f"   max|diff| vs mergekit = {diff:.3g}")
                    rows.append([f"ties, mergebench's default tie rule ({', '.join(f'{k}={v}' for k, v in setting.items())})",
                                 f"{default_seconds:.2f} s", "(the same mergekit run)",
                                 f"{theirs_seconds / default_seconds:.2f} ({(theirs_seconds - startup) / default_seconds:.2f})", f"{diff:.3g}"])
    if args.markdown:
        header = ["merge", "mergebench", "mergekit-yaml (without its start-up)", "mergekit ÷ mergebench (without start-up)", "max \\|diff\\| vs mergekit"]
        write_table(args.markdown, f"{description}; mergekit's start-up (python + import) {startup:.2f} s", header, rows)


if __name__ == "__main__":
    main()

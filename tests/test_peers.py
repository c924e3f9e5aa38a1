"""Cross-checks of mergebench's merging methods against peer implementations (mergekit, FusionBench).

The peers live in their own virtual environment, never in mergebench's dependencies: set
``MERGEBENCH_PEER_PYTHON`` to its python (e.g. ``.peers-venv/bin/python``). Each test writes identical
small random checkpoints as safetensors, runs ``tests/peers/peer_merge.py`` under the peer python and
mergebench here, and asserts the merged weights agree to float tolerance. Only pairs whose math is the
same are asserted; see ``NOT_COMPARABLE`` for the ones that differ by design.

    MERGEBENCH_PEER_PYTHON=.peers-venv/bin/python python -m pytest tests/test_peers.py -q -s
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebench.core.task_vectors import build_task_vectors, merged_state_dict
from mergebench.methods.breadcrumbs import row_view
from mergebench.methods.della import magprune_drop_probabilities
from mergebench.methods.registry import get_method

pytestmark = pytest.mark.peer

PEER_SCRIPT = Path(__file__).parent / "peers" / "peer_merge.py"
PEER_PYTHON = os.environ.get("MERGEBENCH_PEER_PYTHON", "")
SHAPES = {"enc.weight": (16, 8), "enc.bias": (8,), "conv.weight": (4, 4, 3, 3)}
NUM_TASKS = 3
TOLERANCE = 1e-5  # on max |difference| / max(1, max |peer value|)

# Methods a peer has, whose math differs from mergebench's by design (not asserted).
NOT_COMPARABLE = {
    "della / mergekit della": "random masks from a different RNG use, survivors rescaled to the tensor's L1 norm "
    "(mergebench: 1/(1-p_i)), 4-D tensors ranked along dim 1 (mergebench: last dim); only the keep "
    "probabilities of 1-D/2-D tensors are compared (test_della_keep_probabilities_mergekit)",
    "dare p>0": "random masks: mergebench draws one torch.Generator over the [T, N] stack; not bit-comparable",
    "dare_ties / FusionBench DareTiesMerging": "FusionBench applies a TIES top-k trim after the drop (mergebench: none, as mergekit)",
    "ties k / FusionBench ties_merging": "FusionBench's kthvalue keeps ⌊k·d⌋ + 1 entries; compared with mergebench k "
    "chosen so ⌊k·d⌋ matches FusionBench's count (test prints the mismatch at equal k)",
    "pcb, cabs, lines": "no implementation in mergekit 0.1.5 or fusion-bench 0.2.33",
    "breadcrumbs scope=per_row": "mergekit's magnitude_outliers is per tensor; only scope=per_tensor is compared",
}


@functools.cache
def _peer_available(module: str) -> str | None:
    """None if the peer python imports ``module``, else the reason to skip."""
    if not PEER_PYTHON:
        return "MERGEBENCH_PEER_PYTHON is not set (point it at a python with mergekit / fusion-bench installed)"
    try:
        done = subprocess.run([PEER_PYTHON, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    except OSError as error:
        return f"MERGEBENCH_PEER_PYTHON={PEER_PYTHON!r} cannot run: {error}"
    if done.returncode != 0:
        return f"{PEER_PYTHON} cannot import {module}: {done.stderr.strip().splitlines()[-1:]}"
    return None


def _require(peer: str) -> None:
    reason = _peer_available(peer)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Base + 3 fine-tuned state dicts, τ_t = 0.5·shared + noise (positively correlated task vectors)."""
    generator = torch.Generator().manual_seed(1234)
    base = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    shared = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    tasks = {
        f"task{t}": {name: base[name] + 0.1 * (0.5 * shared[name] + torch.randn(shape, generator=generator)) for name, shape in SHAPES.items()}
        for t in range(NUM_TASKS)
    }
    folder = tmp_path_factory.mktemp("peer_checkpoints")
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for task, state in tasks.items():
        save_file(state, str(folder / f"{task}.safetensors"))
        paths.append(str(folder / f"{task}.safetensors"))
    return {"base": base, "tasks": tasks, "base_path": str(folder / "base.safetensors"), "paths": paths, "folder": folder}


def run_peer(checkpoints, peer: str, method: str, params: dict, tasks: int = NUM_TASKS) -> dict[str, torch.Tensor]:
    _require(peer)
    folder = checkpoints["folder"]
    output = folder / f"out_{peer}_{method}.safetensors"
    request = {"peer": peer, "method": method, "params": params, "base": checkpoints["base_path"],
               "models": checkpoints["paths"][:tasks], "output": str(output)}
    request_path = folder / f"req_{peer}_{method}.json"
    request_path.write_text(json.dumps(request))
    done = subprocess.run([PEER_PYTHON, str(PEER_SCRIPT), str(request_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"peer {peer} {method} failed:\n{done.stderr[-4000:]}"
    return load_file(str(output))


def run_mergebench(checkpoints, method: str, overrides: dict, tasks: int = NUM_TASKS) -> dict[str, torch.Tensor]:
    finetuned = dict(list(checkpoints["tasks"].items())[:tasks])
    task_vectors = build_task_vectors(checkpoints["base"], finetuned)
    merge = get_method(method)
    (setting,) = merge.settings(overrides)
    flat = merge.merge(task_vectors, setting, seed=0)
    return merged_state_dict(checkpoints["base"], task_vectors.layout, flat)


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |difference|, max |peer value|) over all tensors."""
    assert set(ours) == set(theirs)
    diff = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)
    scale = max(float(theirs[k].abs().max()) for k in theirs)
    return diff, scale


def check(label: str, ours, theirs) -> float:
    diff, scale = max_difference(ours, theirs)
    verdict = "PASS" if diff <= TOLERANCE * max(1.0, scale) else "FAIL"
    print(f"\nPEER-CHECK {verdict} {label}: max|diff| = {diff:.3e} (max|peer| = {scale:.3g})")
    assert diff <= TOLERANCE * max(1.0, scale), f"{label}: max |difference| {diff:.3e}"
    return diff


# (label, mergebench method, mergebench overrides, peer, peer method, peer params, number of tasks)
CASES = [
    ("average ↔ mergekit linear", "average", {}, "mergekit", "linear", {}, 3),
    ("average ↔ FusionBench simple_average", "average", {}, "fusion_bench", "simple_average", {}, 3),
    ("task_arithmetic λ=0.3 ↔ mergekit task_arithmetic", "task_arithmetic", {"lam": 0.3}, "mergekit", "task_arithmetic", {"lambda": 0.3}, 3),
    ("task_arithmetic λ=0.3 ↔ FusionBench task_arithmetic", "task_arithmetic", {"lam": 0.3}, "fusion_bench", "task_arithmetic", {"scaling_factor": 0.3}, 3),
    ("ties per_tensor k=20 λ=0.8 ↔ mergekit ties density=0.2", "ties", {"k": 20.0, "scope": "per_tensor", "lam": 0.8},
     "mergekit", "ties", {"density": 0.2, "lambda": 0.8}, 3),
    ("ties global k=20.4 (57 of 280 kept) λ=0.8 ↔ FusionBench ties_merging threshold=20 (keeps 56+1)", "ties",
     {"k": 20.4, "scope": "global", "lam": 0.8}, "fusion_bench", "ties_merging", {"threshold": 20, "merge_func": "mean", "scaling_factor": 0.8}, 3),
    ("dare p=0 λ=0.5 ↔ mergekit dare_linear density=1", "dare", {"p": 0.0, "lam": 0.5}, "mergekit", "dare_linear", {"density": 1.0, "lambda": 0.5}, 3),
    ("dare_ties p=0 λ=1 ↔ mergekit dare_ties density=1 normalize=true", "dare_ties", {"p": 0.0, "lam": 1.0},
     "mergekit", "dare_ties", {"density": 1.0, "normalize": True, "lambda": 1.0}, 3),
    ("breadcrumbs per_tensor β=0.5 γ=0.1 ↔ mergekit breadcrumbs", "breadcrumbs", {"density": 0.5, "top_masked": 0.1, "scope": "per_tensor", "lam": 1.0},
     "mergekit", "breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": False, "normalize": False}, 3),
    ("breadcrumbs_ties per_tensor β=0.5 γ=0.1 ↔ mergekit breadcrumbs_ties normalize=true", "breadcrumbs_ties",
     {"density": 0.5, "top_masked": 0.1, "scope": "per_tensor", "lam": 1.0},
     "mergekit", "breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": False, "normalize": True}, 3),
    ("model_stock pairwise=cosine ↔ mergekit model_stock", "model_stock", {"pairwise": "cosine"}, "mergekit", "model_stock", {}, 3),
    ("model_stock pairwise=angle ↔ FusionBench ModelStock", "model_stock", {"pairwise": "angle"}, "fusion_bench", "model_stock", {}, 3),
    ("slerp weights t=0.3 ↔ mergekit slerp", "slerp", {"t": 0.3, "space": "weights"}, "mergekit", "slerp", {"t": 0.3}, 2),
    ("slerp weights t=0.3 ↔ FusionBench slerp", "slerp", {"t": 0.3, "space": "weights"}, "fusion_bench", "slerp", {"t": 0.3}, 2),
    ("slerp task_vectors t=0.3 ↔ mergekit nuslerp (base, flatten)", "slerp", {"t": 0.3, "space": "task_vectors"}, "mergekit", "nuslerp", {"t": 0.3}, 2),
    ("karcher ↔ mergekit karcher", "karcher", {}, "mergekit", "karcher", {}, 3),
    ("consensus_ta k=2 λ_t=0.4 λ=0.6 ↔ FusionBench TALL masks + Σ≥k", "consensus_ta", {"k": 2, "mask_lambda": 0.4, "lam": 0.6},
     "fusion_bench", "consensus_ta", {"k": 2, "mask_lambda": 0.4, "scaling_factor": 0.6}, 3),
    ("consensus_ties trim=20.4 k=2 ↔ FusionBench ties dis-sum (threshold 20) + TALL masks", "consensus_ties",
     {"k": 2, "mask_lambda": 0.4, "trim_percent": 20.4, "lam": 0.6},
     "fusion_bench", "consensus_ties", {"k": 2, "mask_lambda": 0.4, "threshold": 20, "scaling_factor": 0.6}, 3),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0].split(" ↔ ")[0] + " ↔ " + c[4] + "@" + c[3] for c in CASES])
def test_same_merge_as_peer(checkpoints, case):
    label, method, overrides, peer, peer_method, peer_params, tasks = case
    theirs = run_peer(checkpoints, peer, peer_method, peer_params, tasks)
    ours = run_mergebench(checkpoints, method, overrides, tasks)
    check(label, ours, theirs)


def test_ties_off_by_one_at_equal_k_fusion_bench(checkpoints):
    """Documents (does not assert) the difference at equal k: FusionBench keeps one more entry per task."""
    theirs = run_peer(checkpoints, "fusion_bench", "ties_merging", {"threshold": 20, "merge_func": "mean", "scaling_factor": 0.8})
    ours = run_mergebench(checkpoints, "ties", {"k": 20.0, "scope": "global", "lam": 0.8})
    diff, _ = max_difference(ours, theirs)
    print(f"\nPEER-NOTE ties global k=20 ↔ FusionBench threshold=20 (56 vs 57 kept per task): max|diff| = {diff:.3e} (expected > 0)")


def test_della_keep_probabilities_mergekit(checkpoints):
    """MagPrune's keep probabilities 1 − p_i vs mergekit della_magprune's (density = 1 − p), 1-D/2-D tensors."""
    p, epsilon = 0.3, 0.07
    theirs = run_peer(checkpoints, "mergekit", "della_keep_probabilities", {"density": 1 - p, "epsilon": epsilon})
    finetuned = checkpoints["tasks"]
    task_vectors = build_task_vectors(checkpoints["base"], finetuned)
    ours = {}
    for slot, block in task_vectors.slices():
        drop = magprune_drop_probabilities(row_view(block, slot, "per_row"), p, epsilon).reshape(block.shape)
        ours[slot.name] = (1 - drop).reshape(len(finetuned), *slot.shape)
    same_axis = [name for name, shape in SHAPES.items() if len(shape) <= 2]
    check("della keep probabilities (1-D/2-D tensors) ↔ mergekit della_magprune", {k: ours[k] for k in same_axis}, {k: theirs[k] for k in same_axis})
    conv = [name for name, shape in SHAPES.items() if len(shape) > 2]
    diff, _ = max_difference({k: ours[k] for k in conv}, {k: theirs[k] for k in conv})
    print(f"PEER-NOTE della 4-D tensors (mergekit ranks along dim 1, mergebench along the last dim): max|diff| = {diff:.3e}")


def test_not_comparable_documented():
    for pair, why in NOT_COMPARABLE.items():
        print(f"\nPEER-NOT-COMPARABLE {pair}: {why}")


# --- realistic shapes --------------------------------------------------------------------------------
# A small Llama (embeddings, two decoder layers, norms, untied head) and a ViT block (patch-embedding
# convolution, fused qkv, MLP, norms, biases); task vectors with dense small noise, a shared direction,
# and sparse large entries of random sign (1 %), so that experts conflict in sign; float32 and bfloat16
# checkpoints. In bfloat16 the task vectors are taken in bfloat16 as mergekit takes them.

HIDDEN, INTERMEDIATE, VOCAB, VIT = 128, 344, 512, 96
REALISTIC_SHAPES = {
    "model.embed_tokens.weight": (VOCAB, HIDDEN),
    **{
        f"model.layers.{i}.{name}": shape
        for i in range(2)
        for name, shape in {
            "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN // 4, HIDDEN),
            "self_attn.v_proj.weight": (HIDDEN // 4, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), "input_layernorm.weight": (HIDDEN,),
            "post_attention_layernorm.weight": (HIDDEN,),
        }.items()
    },
    "model.norm.weight": (HIDDEN,),
    "lm_head.weight": (VOCAB, HIDDEN),
    "vit.patch_embed.proj.weight": (VIT, 3, 16, 16), "vit.patch_embed.proj.bias": (VIT,),
    "vit.blocks.0.norm1.weight": (VIT,), "vit.blocks.0.norm1.bias": (VIT,),
    "vit.blocks.0.attn.qkv.weight": (3 * VIT, VIT), "vit.blocks.0.attn.qkv.bias": (3 * VIT,),
    "vit.blocks.0.attn.proj.weight": (VIT, VIT), "vit.blocks.0.attn.proj.bias": (VIT,),
    "vit.blocks.0.mlp.fc1.weight": (4 * VIT, VIT), "vit.blocks.0.mlp.fc2.weight": (VIT, 4 * VIT),
}
REALISTIC_TASKS = 4


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def realistic(request, tmp_path_factory):
    dtype = getattr(torch, request.param)
    generator = torch.Generator().manual_seed(2024)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in REALISTIC_SHAPES.items()}
    shared = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in REALISTIC_SHAPES.items()}
    tasks = {}
    for t in range(REALISTIC_TASKS):
        state = {}
        for name, shape in REALISTIC_SHAPES.items():
            noise = torch.randn(shape, generator=generator) * 1e-3
            spikes = (torch.rand(shape, generator=generator) < 0.01) * torch.randn(shape, generator=generator).sign() * 0.05
            state[name] = (base[name] + shared[name] + noise + spikes).to(dtype)
        tasks[f"task{t}"] = state
    base = {name: tensor.to(dtype) for name, tensor in base.items()}
    folder = tmp_path_factory.mktemp(f"peer_realistic_{request.param}")
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for task, state in tasks.items():
        save_file(state, str(folder / f"{task}.safetensors"))
        paths.append(str(folder / f"{task}.safetensors"))
    return {"base": base, "tasks": tasks, "base_path": str(folder / "base.safetensors"), "paths": paths, "folder": folder, "dtype": dtype}


def run_mergebench_in_dtype(checkpoints, method: str, overrides: dict) -> dict[str, torch.Tensor]:
    task_vectors = build_task_vectors(checkpoints["base"], checkpoints["tasks"], dtype=checkpoints["dtype"])
    merge = get_method(method)
    (setting,) = merge.settings(overrides)
    return merged_state_dict(checkpoints["base"], task_vectors.layout, merge.merge(task_vectors, setting, seed=0))


# (label, mergebench method, overrides with the peer's options, peer method, peer params): exact in both dtypes
REALISTIC_CASES = [
    ("task_arithmetic λ=1", "task_arithmetic", {"lam": 1.0}, "task_arithmetic", {"lambda": 1.0}),
    ("ties per_tensor k=20 tie_rule=descending_sort zero_sign=positive", "ties",
     {"k": 20.0, "scope": "per_tensor", "tie_rule": "descending_sort", "zero_sign": "positive", "lam": 1.0},
     "ties", {"density": 0.2, "lambda": 1.0}),
    ("dare_ties p=0 zero_sign=positive", "dare_ties", {"p": 0.0, "zero_sign": "positive", "lam": 1.0},
     "dare_ties", {"density": 1.0, "normalize": True, "lambda": 1.0}),
    ("breadcrumbs per_tensor β=0.1 γ=0.01 tie_rule=ascending_sort", "breadcrumbs",
     {"density": 0.1, "top_masked": 0.01, "scope": "per_tensor", "tie_rule": "ascending_sort", "lam": 1.0},
     "breadcrumbs", {"density": 0.1, "gamma": 0.01, "rescale": False, "normalize": False}),
    ("breadcrumbs_ties per_tensor tie_rule=ascending_sort zero_sign=positive", "breadcrumbs_ties",
     {"density": 0.1, "top_masked": 0.01, "scope": "per_tensor", "tie_rule": "ascending_sort", "zero_sign": "positive", "lam": 1.0},
     "breadcrumbs_ties", {"density": 0.1, "gamma": 0.01, "rescale": False, "normalize": True}),
]


@pytest.mark.parametrize("case", REALISTIC_CASES, ids=[c[0] for c in REALISTIC_CASES])
def test_realistic_shapes_match_mergekit_exactly(realistic, case):
    label, method, overrides, peer_method, peer_params = case
    theirs = run_peer(realistic, "mergekit", peer_method, peer_params, REALISTIC_TASKS)
    ours = run_mergebench_in_dtype(realistic, method, overrides)
    diff, scale = max_difference(ours, theirs)
    print(f"\nPEER-CHECK realistic {realistic['dtype']} {label} ↔ mergekit {peer_method}: max|diff| = {diff:.3e} (max|peer| = {scale:.3g})")
    assert diff == 0.0, f"{label}: max |difference| {diff:.3e}"


def test_realistic_model_stock_extrapolated_matches_mergekit(realistic):
    theirs = run_peer(realistic, "mergekit", "model_stock", {}, REALISTIC_TASKS)
    ours = run_mergebench_in_dtype(realistic, "model_stock", {"negative_cosine": "extrapolate"})
    diff, scale = max_difference(ours, theirs)
    print(f"\nPEER-CHECK realistic {realistic['dtype']} model_stock extrapolate ↔ mergekit: max|diff| = {diff:.3e}")
    ulp = 1e-6 if realistic["dtype"] == torch.float32 else 2.0 ** -8
    assert diff <= ulp * max(1.0, scale)

"""Run a peer implementation (mergekit or FusionBench) of a merging method on safetensors checkpoints.

Run with the PEER virtual environment's python (not mergebench's), e.g.::

    .peers-venv/bin/python tests/peers/peer_merge.py request.json

The request is JSON::

    {"peer": "mergekit" | "fusion_bench", "method": "<peer method>", "params": {...},
     "base": "base.safetensors", "models": ["ft0.safetensors", ...], "output": "merged.safetensors"}

The merged state dict is written to ``output``. Only the peers' own functions are called (their code is
not modified); the glue here is what their merge drivers do around those functions (looping over the
tensors of a state dict, subtracting / adding the base, flattening in FusionBench's sorted-key order).
mergebench is never imported here.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- mergekit


def _mergekit_gta(name: str, base: StateDict, models: list[StateDict], params: dict[str, Any]) -> StateDict:
    """mergekit's GeneralizedTaskArithmeticMerge (task_arithmetic, ties, dare_*, breadcrumbs*, della*)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(name)
    defaults = {p.name: p.default for p in method.spec.parameters}
    ids = list(range(1, len(models) + 1))
    shared = {key: params.get(key, defaults[key]) for key in ("int8_mask", "normalize", "rescale", "lambda")}
    per_model = {"weight": params.get("weight", 1.0), "density": params.get("density", 1.0)}
    for key in ("gamma", "epsilon"):
        if key in defaults:
            per_model[key] = params.get(key, defaults[key])
    kwargs = shared | {key: {i: value for i in ids} for key, value in per_model.items()}
    merged = {}
    for key, tensor in base.items():
        group = TensorGroup.from_tensors([tensor] + [m[key] for m in models], ids=[0] + ids, base_index=0)
        merged[key] = method.merge_group(group, **kwargs)
    return merged


def _mergekit_batched(name: str, tensors: list[torch.Tensor], **parameters: Any) -> torch.Tensor:
    """A mergekit BatchedMergeMethod on one logical tensor (batch axis of size 1), base at index 0."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorBatch

    batch = TensorBatch(tuple(t.unsqueeze(0) for t in tensors), base_index=0)
    return registry.get(name).merge_batch(batch, **parameters)[0]


def mergekit_merge(method: str, base: StateDict, models: list[StateDict], params: dict[str, Any]) -> StateDict:
    if method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        return _mergekit_gta(method, base, models, params)
    if method == "linear":
        # weight averaging of the fine-tuned models (base not among the inputs), normalize=True
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorBatch

        merged = {}
        for key in base:
            batch = TensorBatch(tuple(m[key].unsqueeze(0) for m in models))
            weight = torch.ones(1, len(models))
            merged[key] = registry.get("linear").merge_batch(batch, weight=weight, normalize=True)[0]
        return merged
    if method == "slerp":
        # mergekit slerp: base_model is v0 (t = 0), the other model v1
        (first, second) = models
        t = torch.tensor([float(params["t"])])
        return {key: _mergekit_batched("slerp", [first[key], second[key]], t=t) for key in base}
    if method == "nuslerp":
        # nuslerp with a base model: base + nuslerp(t, τ1, τ2, flatten=True); t = w2 / (w1 + w2)
        from mergekit.merge_methods.nuslerp import nuslerp

        (first, second) = models
        t = float(params["t"])
        return {key: base[key] + nuslerp(t, first[key] - base[key], second[key] - base[key], flatten=True) for key in base}
    if method == "model_stock":
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorGroup

        stock = registry.get("model_stock")
        return {
            key: stock.merge_group(TensorGroup.from_tensors([base[key]] + [m[key] for m in models], base_index=0), filter_wise=False)
            for key in base
        }
    if method == "karcher":
        from mergekit.merge_methods.karcher import karcher_merge_tensors

        alphas = [1.0 / len(models)] * len(models)
        return {
            key: karcher_merge_tensors([m[key] for m in models], alphas, max_iter=int(params.get("max_iter", 10)), tol=float(params.get("tol", 1e-5)))
            for key in base
        }
    if method == "della_keep_probabilities":
        # The expected DELLA mask: mergekit's della_magprune with torch.bernoulli replaced by its mean
        # (so the "mask" is the keep probability 1 - p_i) and no rescaling. Deterministic.
        from mergekit import sparsify

        density, epsilon = float(params["density"]), float(params["epsilon"])
        original = torch.bernoulli
        torch.bernoulli = lambda probs, *a, **k: probs.clone()
        try:
            out = {}
            for key in base:
                tau = torch.stack([m[key] - base[key] for m in models])
                probs = torch.stack([sparsify.della_magprune(tau[i], density, epsilon, None) / tau[i] for i in range(len(models))])
                out[key] = probs
            return out
        finally:
            torch.bernoulli = original
    raise SystemExit(f"unknown mergekit method {method!r}")


# -------------------------------------------------------------------------------------------- FusionBench


def fusion_bench_merge(method: str, base: StateDict, models: list[StateDict], params: dict[str, Any]) -> StateDict:
    if method == "simple_average":
        from fusion_bench.method.simple_average import simple_average

        return simple_average([dict(m) for m in models])
    if method == "task_arithmetic":
        # task_arithmetic_merge's body on state dicts (it only takes nn.Modules)
        from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

        task_vector = None
        for m in models:
            delta = state_dict_sub(m, base)
            task_vector = delta if task_vector is None else state_dict_add(task_vector, delta)
        return state_dict_add(base, state_dict_mul(task_vector, float(params["scaling_factor"])))
    if method in ("ties_merging", "consensus_ta", "consensus_ties"):
        from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, ties_merging, vector_to_state_dict

        # as TiesMergingAlgorithm.run: flatten (sorted keys), merge, add λ·τ_m to the base
        flat_ft = torch.vstack([state_dict_to_vector(m) for m in models])
        flat_ptm = state_dict_to_vector(base)
        tv_flat = flat_ft - flat_ptm
        if method == "ties_merging":
            merged_tv = ties_merging(tv_flat, reset_thresh=params["threshold"], merge_func=params.get("merge_func", "mean"))
        else:
            # Consensus merging: FusionBench ships the TALL masks (tall_mask.utils.generate_task_masks);
            # the consensus rule (entries in >= k masks) is the authors' one line on top of it.
            from fusion_bench.method.tall_mask.utils import generate_task_masks

            if method == "consensus_ta":
                multi = tv_flat.sum(0)
            else:
                multi = ties_merging(tv_flat, reset_thresh=params["threshold"], merge_func="dis-sum")
            masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=multi, tall_mask_lambda=float(params["mask_lambda"]))
            merged_tv = multi * (masks.sum(0) >= int(params["k"]))
        merged = flat_ptm + float(params["scaling_factor"]) * merged_tv
        return dict(vector_to_state_dict(merged, {k: v.clone() for k, v in base.items()}))
    if method == "model_stock":
        # ModelStock.run for N models: mean pairwise angle (degrees) per tensor, compute_ratio, interpolate
        from fusion_bench.method.model_stock.model_stock import compute_angle, compute_ratio

        n = len(models)
        sums: dict[str, float] = {}
        for i in range(n):
            for j in range(i + 1, n):
                for key, angle in compute_angle(models[i], models[j], base).items():
                    sums[key] = sums.get(key, 0.0) + angle
        pairs = n * (n - 1) // 2
        ratio = compute_ratio({key: s / pairs for key, s in sums.items()}, k=n)
        average = {key: sum(m[key] for m in models) / n for key in base}
        return {key: average[key] * ratio[key] + base[key] * (1.0 - ratio[key]) for key in base}
    if method == "slerp":
        from fusion_bench.method.slerp.slerp_utils import slerp

        (first, second) = models
        return {key: slerp(float(params["t"]), first[key], second[key]) for key in base}
    raise SystemExit(f"unknown FusionBench method {method!r}")


PEERS: dict[str, Callable[..., StateDict]] = {"mergekit": mergekit_merge, "fusion_bench": fusion_bench_merge}


def main(argv: list[str]) -> None:
    with open(argv[1]) as handle:
        request = json.load(handle)
    torch.manual_seed(0)
    base = load_file(request["base"])
    models = [load_file(path) for path in request["models"]]
    merged = PEERS[request["peer"]](request["method"], base, models, request.get("params", {}))
    save_file({key: value.detach().contiguous().to(torch.float32) for key, value in merged.items()}, request["output"])


if __name__ == "__main__":
    main(sys.argv)

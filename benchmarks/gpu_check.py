"""What only a GPU exercises: device placement of merges, bf16 autocast in evaluation, CUDA memory accounting.

    python benchmarks/gpu_check.py            # on a CUDA machine: a few minutes at most; prints what it measured
    python benchmarks/gpu_check.py --device cpu   # the same checks on the CPU (as the tests run them)

Without CUDA (and no ``--device``) it says so and exits 0. Each check prints its measurements and
``ok`` or ``FAILED``; the exit status is 1 if any failed.

1. ``--device auto`` resolves to the GPU.
2. Placement: a merge through the merge engine (:class:`~mergebench.core.streaming.StreamedTaskVectors`)
   with the task vectors on the device gives the CPU's result (TIES at scope=global: the exact global
   threshold is the same; the merged values within float32 rounding), and stays on the device.
3. Autocast: :func:`~mergebench.evaluation.classification.correct_examples` on a small random CLIP
   image encoder runs its matrix products in bfloat16 on the GPU (float32 on the CPU), agrees with the
   float32 CPU predictions on nearly every image, and reports images/s.
4. Memory accounting: :class:`~mergebench.core.memory.PeakMemory` reports a known allocation, and the
   peak memory of a streamed merge on the device is flat in the number of tasks.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from mergebench.core.memory import PeakMemory
from mergebench.core.streaming import StreamedTaskVectors
from mergebench.evaluation.classification import correct_examples
from mergebench.methods import get_method
from mergebench.runner.sweep import resolve_device

MIB = 2**20


def report(name: str, ok: bool, measured: str) -> bool:
    print(f"{'ok' if ok else 'FAILED':<7} {name}: {measured}", flush=True)
    return ok


def random_states(tasks: int, shapes: dict[str, tuple[int, ...]], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    experts = {
        f"task{t}": {name: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
        for t in range(tasks)
    }
    return base, experts


def check_placement(device: torch.device) -> bool:
    shapes = {"a.weight": (256, 128), "a.bias": (256,), "b.weight": (64, 256)}
    base, experts = random_states(4, shapes)
    method = get_method("ties")
    setting = method.defaults()
    on_cpu = StreamedTaskVectors(base, experts, list(shapes)).merged_vector(method, setting)
    on_device = StreamedTaskVectors(base, experts, list(shapes), device=device).merged_vector(method, setting)
    difference = float((on_device.cpu() - on_cpu).abs().max())
    return report("placement", on_device.device.type == device.type and difference <= 1e-6,
                  f"merged on {on_device.device}, max |device − cpu| = {difference:.2e}")


def tiny_clip_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from mergebench.models.clip import ClipImageEncoder

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=64)
    processor = {"do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    return ClipImageEncoder(CLIPVisionModelWithProjection(config), processor).eval()


def check_autocast(device: torch.device, images: int = 2048) -> bool:
    encoder = tiny_clip_encoder()
    head = nn.Linear(64, 10, bias=False)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    reference = correct_examples(encoder, head, inputs, labels, 256)
    seen: list[torch.dtype] = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    encoder.to(device)
    head.to(device)
    correct_examples(encoder, head, inputs[:32], labels[:32], 32)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    on_device = correct_examples(encoder, head, inputs, labels, 256)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    hook.remove()
    expected_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    agreement = float((on_device == reference).float().mean())
    return report("autocast", seen[-1] == expected_dtype and agreement >= 0.95,
                  f"head output {seen[-1]}, {agreement:.1%} of per-image outcomes as float32 on the CPU, "
                  f"{images / seconds:,.0f} images/s (32 px, batch 256)")


def check_memory(device: torch.device) -> bool:
    if device.type != "cuda":
        return report("memory", True, "CPU: PeakMemory reads the process's resident high-water mark (tested in tests/test_core.py)")
    with PeakMemory(device) as allocation:
        block = torch.empty(256 * MIB, dtype=torch.uint8, device=device)
        del block
    ok = 256 <= allocation.megabytes <= 258
    shapes = {f"layer{i}.weight": (1024, 1024) for i in range(8)}
    peaks = {}
    method = get_method("ties")
    for tasks in (2, 8):
        base, experts = random_states(tasks, shapes)
        streamed = StreamedTaskVectors(base, experts, list(shapes), device=device)
        with PeakMemory(device) as peak:
            streamed.merged_vector(method, method.defaults())
        peaks[tasks] = peak.megabytes
    # τ_m of the whole model (32 MiB) plus one tensor's [T, n] work: 8 tasks may add the work of 6 more rows
    flat = peaks[8] <= peaks[2] + 6 * 8 * 4 + 8
    return report("memory", ok and flat,
                  f"256 MiB allocation read as {allocation.megabytes:.1f} MiB; streamed TIES over 8 × 1024² tensors: "
                  f"peak {peaks[2]:.0f} MiB with 2 tasks, {peaks[8]:.0f} MiB with 8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("no GPU: CUDA is not available here, nothing to check (pass --device cpu to run the checks on the CPU)")
        return 0
    device = torch.device(args.device or "cuda")
    started = time.perf_counter()
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        results = [report("auto device", resolve_device("auto").type == "cuda", f"--device auto → {resolve_device('auto')}")]
    else:
        results = []
    results += [check_placement(device), check_autocast(device), check_memory(device)]
    print(f"{sum(results)}/{len(results)} checks passed in {time.perf_counter() - started:.0f} s")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Images per second of mergebench's CLIP evaluation next to FusionBench's CLIP task pool, side by side.

Both score the same tiny random CLIP (saved as a Hugging Face folder with a byte-level tokenizer and a
``preprocessor_config.json``) on the same on-disk dataset (a ``datasets`` folder of random PNG images
with 10 classes, named ``eurosat`` so that FusionBench finds class names and templates for it):

* mergebench, as ``kind: clip`` suites run it: the split is decoded, resized and cropped once into a
  ``uint8`` tensor (:func:`~mergebench.runner.kinds.clip.decode_images`, the cached form; its one-time
  cost is printed apart), then every evaluation of a merged model is batched forward passes over that
  tensor (:func:`~mergebench.evaluation.classification.correct_examples`: bf16 autocast on a GPU), the
  rescale and normalization folded into the patch embedding; the same evaluation with them as separate
  operations over each batch (the "unfolded" line) is timed interleaved with it;
* FusionBench 0.2's ``CLIPVisionModelTaskPool.evaluate`` in the test-only environment (``--peers``,
  default ``/work/peers-venv``), which decodes and preprocesses every image through ``CLIPProcessor``
  in its ``DataLoader`` at each evaluation.

Each side evaluates the model ``--repeats`` times (a sweep evaluates one model per setting); the
figure is images per second of the median evaluation, after one warm-up evaluation. FusionBench's line
also gives the part of that evaluation spent in its vision tower's forward passes (the rest: loading and
preprocessing the images, the text head, the metrics), the work that mergebench's evaluation is made of.

    python benchmarks/eval_speed.py                      # 2,000 images, 224 px inputs, batch 64, CPU
    python benchmarks/eval_speed.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CLASSES = 10
DATASET = "eurosat"  # a name FusionBench knows (10 classes), so it finds class names and templates


def build_world(folder: Path, images: int, image_size: int, crop: int) -> None:
    """A tiny random CLIP in ``folder/clip`` and ``images`` random images in ``folder/data`` (datasets on disk)."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.byte_level import byte_symbols

    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=128, bos_token_id=len(tokenizer) - 2,
                         eos_token_id=2, pad_token_id=1),
        vision_config=dict(common, image_size=crop, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}).save_pretrained(folder / "clip")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)) for _ in range(images)]
    labels = rng.integers(0, CLASSES, size=images).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=CLASSES)})
    datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features).save_to_disk(str(folder / "data"))


def mergebench_side(folder: Path, device: torch.device, batch_size: int, repeats: int) -> dict:
    import datasets
    from transformers import AutoTokenizer, CLIPModel

    from mergebench.evaluation.classification import correct_examples
    from mergebench.models.clip import ClipImageEncoder, make_resize_crop, read_image_processor_config, vision_encoder_of, zero_shot_head
    from mergebench.runner.kinds.clip import decode_images

    clip = CLIPModel.from_pretrained(folder / "clip").float().eval()
    processor = read_image_processor_config(folder / "clip")
    classnames = [f"class {c}" for c in range(CLASSES)]
    head = zero_shot_head(clip, AutoTokenizer.from_pretrained(folder / "clip"), classnames, ["a photo of {c}."], device)
    encoder = ClipImageEncoder(vision_encoder_of(clip), processor).to(device).eval()
    dataset = datasets.load_from_disk(str(folder / "data"))
    crop = (int(processor["crop_size"]["height"]), int(processor["crop_size"]["width"]))
    started = time.perf_counter()
    inputs = decode_images(dataset, "image", list(range(len(dataset))), make_resize_crop(processor), crop, "decode")
    decode_seconds = time.perf_counter() - started
    labels = torch.tensor(dataset["label"])

    explicit = ExplicitNormalization(encoder)

    def evaluate(backbone: torch.nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        correct_examples(backbone, head, inputs, labels, batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    evaluate(encoder), evaluate(explicit)
    runs = [(evaluate(encoder), evaluate(explicit)) for _ in range(repeats)]  # interleaved: the same load on both
    return {"images": len(inputs), "seconds": statistics.median(folded for folded, _ in runs),
            "explicit_seconds": statistics.median(unfolded for _, unfolded in runs), "decode_seconds": decode_seconds}


class ExplicitNormalization(torch.nn.Module):
    """The encoder with its rescale and normalization done as separate operations over each batch (not folded
    into the patch embedding): how mergebench evaluated before the fold, measured beside it."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.normalized(pixels))


def fusion_bench_side(folder: Path, device: str, batch_size: int, repeats: int) -> dict:
    """Run in the peers' environment: FusionBench's CLIP task pool on the same model and dataset."""
    import datasets
    from transformers import CLIPModel
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5 folded it into CLIPVisionModel
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel
    from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool

    dataset = datasets.load_from_disk(str(folder / "data"))
    pool = CLIPVisionModelTaskPool(
        {DATASET: dataset}, processor=str(folder / "clip"), clip_model=str(folder / "clip"),
        dataloader_kwargs={"batch_size": batch_size, "num_workers": 0, "shuffle": False},
    )
    pool.fabric  # noqa: B018 (starts Lightning Fabric on its default accelerator)
    model = CLIPModel.from_pretrained(folder / "clip").vision_model.to(device)
    in_tower = [0.0]  # seconds inside the vision tower's forward passes, the rest being data loading and preprocessing
    tower_forward = model.forward

    def timed_forward(*args, **kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        output = tower_forward(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        in_tower[0] += time.perf_counter() - began
        return output

    model.forward = timed_forward

    def evaluate() -> tuple[float, float]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        in_tower[0] = 0.0
        began = time.perf_counter()
        pool.evaluate(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began, in_tower[0]

    evaluate()
    runs = [evaluate() for _ in range(repeats)]
    return {"images": len(dataset), "seconds": statistics.median(total for total, _ in runs),
            "tower_seconds": statistics.median(tower for _, tower in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256, help="side of the images on disk (default 256)")
    parser.add_argument("--crop", type=int, default=224, help="model input side (default 224, as ViT-B/32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peers", type=Path, default=Path("/work/peers-venv"), help="environment with fusion_bench installed")
    parser.add_argument("--fusion-bench-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fusion_bench_child is not None:
        print(json.dumps(fusion_bench_side(args.fusion_bench_child, args.device, args.batch_size, args.repeats)))
        return

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as temporary:
        folder = Path(temporary)
        build_world(folder, args.images, args.image_size, args.crop)
        print(f"{args.images} random {args.image_size} px images → {args.crop} px, tiny random CLIP (2 layers, width 64), "
              f"batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads, median of {args.repeats} evaluations")
        ours = mergebench_side(folder, torch.device(args.device), args.batch_size, args.repeats)
        rate = ours["images"] / ours["seconds"]
        print(f"mergebench   {rate:10,.0f} images/s   ({ours['seconds']:.2f} s per evaluation; "
              f"decoding into the uint8 cache once: {ours['decode_seconds']:.2f} s)")
        print(f"  unfolded   {ours['images'] / ours['explicit_seconds']:10,.0f} images/s   ({ours['explicit_seconds']:.2f} s "
              "per evaluation, the rescale and normalization as separate operations, interleaved with the above)", flush=True)
        python = args.peers / "bin" / "python"
        if not python.is_file():
            print(f"FusionBench  not run: no environment at {args.peers}")
            return
        result = subprocess.run(
            [str(python), __file__, "--fusion-bench-child", str(folder), "--device", args.device,
             "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            print(f"FusionBench  failed: {result.stderr.strip().splitlines()[-1:]}")
            return
        theirs = json.loads(result.stdout.strip().splitlines()[-1])
        their_rate = theirs["images"] / theirs["seconds"]
        print(f"FusionBench  {their_rate:10,.0f} images/s   ({theirs['seconds']:.2f} s per evaluation, of which "
              f"{theirs['tower_seconds']:.2f} s in the vision tower's forward passes)")
        print(f"ratio        {rate / their_rate:10.1f}×")


if __name__ == "__main__":
    main()

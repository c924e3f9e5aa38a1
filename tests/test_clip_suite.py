"""The ``kind: clip`` preparer end to end, offline, on tiny random CLIP models laid out as the real ones.

A tiny ``CLIPModel`` with a byte-level CLIP tokenizer and a ``preprocessor_config.json`` is saved as the
Hub base folder ``clip-vit-base-patch32``; three fine-tuned vision encoders (``CLIPVisionModel``
folders, one with transformers-4 key names as FusionBench uploaded them) as
``clip-vit-base-patch32_{mnist,eurosat,dtd}``. The MNIST and DTD datasets are ``save_to_disk`` folders
under a data root; EuroSAT is a parquet folder that the suite file names as its ``dataset`` (read by
``datasets.load_dataset``). Every label is what its task's expert predicts through an independent path
(``load_hf_vision_encoder`` + ``make_preprocess`` + ``zero_shot_head``), so each expert scores exactly
100% only if mergebench loads, preprocesses, projects and heads it as the reference does.
"""

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel

from mergebench import cli
from mergebench.models.clip import (
    ClipImageEncoder,
    image_features,
    load_hf_vision_encoder,
    make_preprocess,
    make_resize_crop,
    vision_encoder_of,
    zero_shot_head,
)
from mergebench.runner.kinds import clip as clip_experts
from mergebench.store.database import ResultStore
from tests.byte_level import byte_symbols
from tall_masks_files import TINY_ARCHITECTURE, ImageEncoder, register_tiny_architecture, save_tall_masks, skip_without_open_clip
from test_clip import tiny_clip as tiny_reference_clip, to_open_clip

TASKS = {"MNIST": "mnist", "EuroSAT": "eurosat", "DTD": "dtd"}
CLASSES_FILE = Path(__file__).resolve().parents[1] / "tasks" / "_vit-classes.yaml"
CLASSES = yaml.safe_load(CLASSES_FILE.read_text())
BASE = "clip-vit-base-patch32"

SUITE = """
kind: clip
family: tinyclip
include: _vit-classes.yaml
default_model: ViT-B-32
eval_batch_size: 8
models:
  ViT-B-32: {{hf: openai/clip-vit-base-patch32, open_clip: tiny-ViT-8, finetuned_hub_prefix: tanganke/clip-vit-base-patch32}}
open_clip_checkpoints:
  finetuned: "{{root}}/{{model}}/{{task_val}}/nonlinear_finetuned.pt"
  zeroshot: "{{root}}/{{model}}/{{task_val}}/nonlinear_zeroshot.pt"
validation: {{fraction: 0.25, max_examples: 6, seed: 0}}
tasks:
  - {{name: MNIST, fusion_bench: mnist, dataset: ylecun/mnist, splits: {{train: train, test: test}}, columns: {{image: image, label: label}}}}
  - {{name: EuroSAT, fusion_bench: eurosat, dataset: "{eurosat}", splits: {{train: train, test: test}}, columns: {{image: image, label: label}}}}
  - {{name: DTD, fusion_bench: dtd, dataset: tanganke/dtd, splits: {{train: train, test: test}}, validation_split: validation, columns: {{image: image, label: label}}}}
suites:
  tinyclip-3: [MNIST, EuroSAT, DTD]
"""


def byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: every byte a token (``vocab.json``/``merges.txt`` of 514 entries)."""
    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # end of text: the largest id
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(vocab_size: int) -> CLIPModel:
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        # eos_token_id=2 is OpenAI's legacy config: pool at the largest id, <|endoftext|>
        text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def random_images(rng, count, gray=False):
    shapes = [(28, 28)] if gray else [(40, 36, 3), (36, 52, 3), (48, 48, 3)]
    return [Image.fromarray(rng.integers(0, 256, size=shapes[i % len(shapes)], dtype=np.uint8)) for i in range(count)]


def hub_cache_entry(folder, repo_id, cache_root):
    """Lay ``folder`` out in a Hugging Face cache as ``hf download`` does: blobs named by their sha256."""
    repo = cache_root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in folder.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints, datasets (labels = each expert's predictions) and the suite file, built once."""
    root = tmp_path_factory.mktemp("clipworld")
    checkpoints, data = root / "checkpoints", root / "data"
    tokenizer = byte_level_tokenizer()
    clip = tiny_clip(len(tokenizer))
    base = checkpoints / BASE
    clip.save_pretrained(base)
    tokenizer.save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    preprocess = make_preprocess(json.loads((base / "preprocessor_config.json").read_text()))

    import datasets

    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(1)
    towers = {}
    for task, slug in TASKS.items():
        vision = CLIPVisionModel(clip.config.vision_config)
        tower = getattr(vision, "vision_model", vision)
        tower.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in clip.vision_model.state_dict().items()})
        folder = checkpoints / f"{BASE}_{slug}"
        vision.save_pretrained(folder)
        if task == "DTD":  # FusionBench's uploads were written by transformers 4: keys under vision_model.
            weights = folder / "model.safetensors"
            save_file({("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
        towers[task] = tower.state_dict()
        encoder = load_hf_vision_encoder(folder, projection_source=base)
        classes = CLASSES["classnames"][task]
        head = zero_shot_head(clip, tokenizer, classes, CLASSES["templates"][task])
        splits = {"train": 16, "test": 8} if task != "DTD" else {"train": 8, "validation": 5, "test": 8}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))})
        parts = {}
        for split, count in splits.items():
            images, labels = [], []
            while len(images) < count:  # keep images whose prediction has a clear margin
                for image in random_images(rng, count, gray=task == "MNIST"):
                    with torch.no_grad():
                        logits = head(image_features(encoder, preprocess(np.asarray(image))[None]))[0]
                    top = logits.topk(2).values
                    if top[0] - top[1] > 1e-3 and len(images) < count:
                        images.append(image)
                        labels.append(int(logits.argmax()))
            parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        if task == "EuroSAT":
            (root / "eurosat" / "data").mkdir(parents=True)
            for split, part in parts.items():
                part.to_parquet(str(root / "eurosat" / "data" / f"{split}-00000-of-00001.parquet"))
        else:
            datasets.DatasetDict(parts).save_to_disk(str(data / task))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tinyclip.yaml").write_text(SUITE.format(eurosat=root / "eurosat"))
    shutil.copy(CLASSES_FILE, tasks / CLASSES_FILE.name)
    return {"root": root, "checkpoints": checkpoints, "data": data, "tasks": tasks, "clip": clip, "towers": towers}


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("MERGEBENCH_TASKS", str(world["tasks"]))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MERGEBENCH_DATA", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    counts = {"heads": 0, "decoded": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(clip_experts, "zero_shot_head", counting("heads", clip_experts.zero_shot_head))
    monkeypatch.setattr(clip_experts, "decode_images", counting("decoded", clip_experts.decode_images))
    return counts


def run(world, out, *extra, methods="task_arithmetic,ties"):
    argv = ["run", "--suite", "tinyclip-3", "--methods", methods, "--device", "cpu", "--out", str(out), *extra]
    return cli.main(argv)


def accuracies(out, method):
    rows = ResultStore(out).query("SELECT task, split, accuracy FROM results WHERE method=?", (method,))
    return {(r["task"], r["split"]): r["accuracy"] for r in rows}


def test_hub_style_folders_end_to_end_cached_and_resumed(world, env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    assert run(world, out, "--checkpoints", str(world["checkpoints"]), "--data", str(world["data"])) == 0
    printed = capsys.readouterr().out
    assert re.search(r"tinyclip-3\s+ties .* eval \d+ examples/s", printed)
    assert env == {"heads": 3, "decoded": 6}  # a head per task; validation and test of each task, once

    individual = accuracies(out, "individual")
    assert individual == {(task, split): 1.0 for task in TASKS for split in ("validation", "test")}
    assert min(accuracies(out, "pretrained").values()) < 1.0  # the experts differ from the pre-trained model
    assert {r["method"] for r in ResultStore(out).query("SELECT DISTINCT method FROM results")} >= {"task_arithmetic", "ties"}

    cache = tmp_path / "cache"
    assert len(list((cache / "heads" / "ViT-B-32").glob("*.safetensors"))) == 3
    cached = sorted(path.name.rsplit("-", 1)[0] for path in (cache / "data").glob("*/*.safetensors"))
    assert cached == sorted(f"{task}-{split}" for task in TASKS for split in ("test", "validation"))
    mnist_validation = load_file(next((cache / "data").glob("*/MNIST-validation-*.safetensors")))
    assert mnist_validation["inputs"].dtype == torch.uint8 and mnist_validation["inputs"].shape == (4, 3, 32, 32)

    # validation is carved from train as tall_masks does: torch random_split, Generator().manual_seed(0)
    import datasets

    train = datasets.load_from_disk(str(world["data"] / "MNIST"))["train"]
    carved = torch.utils.data.random_split(range(16), [12, 4], generator=torch.Generator().manual_seed(0))[1].indices
    crop = make_resize_crop(json.loads((world["checkpoints"] / BASE / "preprocessor_config.json").read_text()))
    assert torch.equal(mnist_validation["inputs"], torch.stack([crop(train[i]["image"]) for i in carved]))

    record = ResultStore(out).query("SELECT checkpoints FROM results WHERE method='ties' LIMIT 1")[0]
    hashes = json.loads(record["checkpoints"])
    weights = lambda name: hashlib.sha256((world["checkpoints"] / name / "model.safetensors").read_bytes()).hexdigest()
    assert hashes["pretrained"] == weights(BASE) and hashes["DTD"] == weights(f"{BASE}_dtd")
    assert {"MNIST.head", "EuroSAT.test.data"} <= set(hashes)

    # a second run, data root from the environment: nothing decoded, no head rebuilt, no cell re-evaluated
    before = ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"]
    monkeypatch.setenv("MERGEBENCH_DATA", str(world["data"]))
    assert run(world, out, "--checkpoints", str(world["checkpoints"])) == 0
    assert env == {"heads": 3, "decoded": 6}
    assert ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"] == before


def test_hub_cache_route_and_training_data(world, env, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub_cache_entry(world["checkpoints"] / BASE, "openai/clip-vit-base-patch32", hub)
    for slug in TASKS.values():
        hub_cache_entry(world["checkpoints"] / f"{BASE}_{slug}", f"tanganke/{BASE}_{slug}", hub)
    folders, from_hub = tmp_path / "folders", tmp_path / "hub-results"
    assert run(world, folders, "--checkpoints", str(world["checkpoints"]), "--data", str(world["data"]), methods="task_arithmetic") == 0
    assert run(world, from_hub, "--data", str(world["data"]), "--examples", "5", methods="task_arithmetic,regmean") == 0
    for method in ("pretrained", "individual", "task_arithmetic"):
        assert accuracies(from_hub, method) == accuracies(folders, method)
    assert ResultStore(from_hub).query("SELECT DISTINCT data_access FROM results WHERE method='regmean'")[0]["data_access"] == "train-samples:5"
    assert env["decoded"] == 6 + 3  # regmean decoded 5 training images of each task, nothing else was decoded again
    capsys.readouterr()
    assert cli.main(["suites", "--data", str(world["data"])]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"pretrained\s+openai/clip-vit-base-patch32\s+ready \(Hugging Face cache", listing)
    assert re.search(r"DTD\s+\S+DTD\s+encoder ready \(Hugging Face cache\); data cached", listing)


def test_tall_masks_layout_through_open_clip_needs_the_pickle_opt_in(world, env, tiny_references, tmp_path, capsys):
    """The tiny experts as tall_masks files (MNIST's as ``ImageEncoder.save`` writes it, the others and the
    pre-trained model as whole pickled modules) score exactly as the Hub-style folders do."""
    skip_without_open_clip()
    register_tiny_architecture(tmp_path)
    root = tmp_path / "tall_masks"
    shutil.copytree(world["checkpoints"] / BASE, root / BASE)
    clip = world["clip"]

    def tall_masks_encoder(model):
        encoder = ImageEncoder(TINY_ARCHITECTURE)
        weights = {key[len("model.visual."):]: value for key, value in to_open_clip(model).items() if key.startswith("model.visual.")}
        encoder.model.visual.load_state_dict(weights)
        return encoder

    for task in TASKS:
        folder = root / TINY_ARCHITECTURE / f"{task}Val"
        save_tall_masks(tall_masks_encoder(clip), folder / "nonlinear_zeroshot.pt", whole_module=True)
        expert = CLIPModel(clip.config)
        expert.load_state_dict(clip.state_dict())
        expert.vision_model.load_state_dict(world["towers"][task])  # the pre-trained projection, as the Hub route scores
        save_tall_masks(tall_masks_encoder(expert), folder / "nonlinear_finetuned.pt", whole_module=task != "MNIST")

    args = ("--checkpoints", str(root), "--data", str(world["data"]))
    assert run(world, tmp_path / "refused", *args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--allow-pickle" in error and "EuroSATVal" in error
    assert not list(root.glob(f"{TINY_ARCHITECTURE}/*/*.safetensors"))

    assert run(world, tmp_path / "open_clip", *args, "--allow-pickle", methods="task_arithmetic") == 0
    assert sorted(p.parent.name + "/" + p.name for p in root.glob(f"{TINY_ARCHITECTURE}/*/*.safetensors")) == [
        "DTDVal/nonlinear_finetuned.safetensors", "EuroSATVal/nonlinear_finetuned.safetensors",
        "MNISTVal/nonlinear_zeroshot.safetensors",  # the pre-trained model: the first task's; MNIST's expert is a plain state dict
    ]
    reference = tmp_path / "folders"
    assert run(world, reference, "--checkpoints", str(world["checkpoints"]), "--data", str(world["data"]), methods="task_arithmetic") == 0
    for method in ("pretrained", "individual", "task_arithmetic"):
        assert accuracies(tmp_path / "open_clip", method) == accuracies(reference, method)
    assert env == {"heads": 3, "decoded": 6}  # both routes share the heads (same text encoder) and the data
    stored = ResultStore(tmp_path / "open_clip").query("SELECT checkpoints, config FROM results LIMIT 1")[0]
    converted = root / TINY_ARCHITECTURE / "EuroSATVal" / "nonlinear_finetuned.safetensors"
    assert json.loads(stored["checkpoints"])["EuroSAT"] == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert json.loads(stored["config"])["checkpoint_family"] == "tall_masks"

    # reproducing a table of the tall_masks family from these files compares; one of FusionBench's does not
    capsys.readouterr()
    reproduce = ("--checkpoints", str(root), "--data", str(world["data"]), "--device", "cpu", "--out", str(tmp_path / "open_clip"))
    assert cli.main(["reproduce", "tiny/tall_masks", *reproduce]) == 0
    rows = verdict_lines(capsys.readouterr().out)
    assert len(rows) == 1 and "| 100.0 | 100.0 | +0.0 | within |" in rows[0]
    assert cli.main(["reproduce", "tiny/fusion_bench", *reproduce]) == 0
    rows = verdict_lines(capsys.readouterr().out)
    assert len(rows) == 1 and "not comparable: checkpoints are tall_masks, the table's fusion_bench" in rows[0]
    # with both families in one store, each table compares the latest results of its own family
    assert cli.main(["reproduce", "tiny/fusion_bench", *reproduce[2:], "--checkpoints", str(world["checkpoints"])]) == 0
    assert "| within |" in verdict_lines(capsys.readouterr().out)[0]
    assert cli.main(["reproduce", "tiny/tall_masks", *reproduce, "--no-run"]) == 0
    assert "| within |" in verdict_lines(capsys.readouterr().out)[0]


def test_tall_masks_layout_without_open_clip_names_the_extra(world, env, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an environment without open_clip_torch imports
    root = tmp_path / "tall_masks"
    (root / TINY_ARCHITECTURE / "MNISTVal").mkdir(parents=True)
    (root / BASE).symlink_to(world["checkpoints"] / BASE)
    assert cli.main(["suites", "--checkpoints", str(root)]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^    open_clip\s+{TINY_ARCHITECTURE}\s+missing: reads the tall_masks checkpoints$", listing, re.MULTILINE)
    assert "  pip install 'mergebench[clip]'" in listing.split("to get what is missing:")[1].splitlines()
    assert run(world, tmp_path / "results", "--checkpoints", str(root), "--data", str(world["data"])) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mergebench: error: tall_masks checkpoints are open_clip models and need open_clip_torch: "
                            "pip install 'mergebench[clip]' (ModuleNotFoundError") and "\n" not in error


def test_missing_checkpoint_is_one_line_naming_the_download(world, env, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in (BASE, f"{BASE}_mnist", f"{BASE}_eurosat"):
        (partial / name).symlink_to(world["checkpoints"] / name)
    out = tmp_path / "results"
    assert run(world, out, "--checkpoints", str(partial), "--data", str(world["data"])) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mergebench: error:") and "\n" not in error
    assert f"hf download tanganke/{BASE}_dtd --local-dir {partial / (BASE + '_dtd')}" in error
    assert not (out / "mergebench.sqlite").exists() or ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 0
    assert run(world, out, "--data", str(world["data"])) == 2  # the Hub route, offline with an empty cache
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "hf download openai/clip-vit-base-patch32" in error


def test_suites_lists_availability_and_trained_suites_reject_clip_options(world, env, tmp_path, capsys, monkeypatch):
    assert cli.main(["suites", "--checkpoints", str(world["checkpoints"])]) == 0
    listing = capsys.readouterr().out
    assert "tinyclip-3" in listing and re.search(r"EuroSAT\s+\S+eurosat\s+encoder ready \(.*\); data local", listing)
    assert re.search(r"MNIST\s+ylecun/mnist\s+encoder ready \(.*\); data missing$", listing, re.MULTILINE)
    hints = listing.split("to get what is missing:")[1]
    assert "hf download --repo-type dataset ylecun/mnist, or a DatasetDict.save_to_disk folder at $MERGEBENCH_DATA/MNIST" in hints

    monkeypatch.delenv("MERGEBENCH_TASKS")  # the real suite files, offline with an empty Hugging Face cache
    assert cli.main(["suites"]) == 0
    listing = capsys.readouterr().out
    for suite in ("vit-8", "vit-14", "vit-20", "mini-vision-8"):
        assert re.search(rf"^  {suite}\s+\d+ tasks: ", listing, re.MULTILINE)
    # each task once (vit-8/14/20 share their tasks), each download hint once
    assert len(re.findall(r"^    Cars\s", listing, re.MULTILINE)) == 1
    assert re.search(r"^    pretrained\s+openai/clip-vit-base-patch32\s+missing$", listing, re.MULTILINE)
    assert re.search(r"^    Cars\s+tanganke/stanford_cars\s+encoder missing; data missing$", listing, re.MULTILINE)
    hints = listing.split("to get what is missing:")[1].splitlines()
    assert len(hints) == len(set(hints))
    assert sum(hint.strip().startswith("hf download openai/clip-vit-base-patch32 ") for hint in hints) == 1
    assert any("hf download tanganke/clip-vit-base-patch32_stanford-cars" in hint for hint in hints)
    assert any("hf download --repo-type dataset tanganke/dtd" in hint for hint in hints)
    assert cli.main(["run", "--suite", "mini-vision-4", "--methods", "ties", "--checkpoints", "hub", "--out", str(tmp_path)]) == 2
    assert "--checkpoints does not apply to suite mini-vision-4" in capsys.readouterr().err


def test_backbone_normalizes_uint8_crops_as_the_image_processor_does():
    clip = tiny_reference_clip()
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).to_dict()
    encoder = vision_encoder_of(clip)
    backbone = ClipImageEncoder(encoder, processor)
    images = [np.random.default_rng(i).integers(0, 256, size=(40 + 7 * i, 45, 3), dtype=np.uint8) for i in range(3)]
    crops = torch.stack([make_resize_crop(processor)(image) for image in images])
    pixels = torch.stack([make_preprocess(processor)(image) for image in images])
    with torch.no_grad():
        expected = image_features(encoder, pixels)
        torch.testing.assert_close(backbone(crops), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(backbone(pixels), expected, rtol=1e-5, atol=1e-6)  # float input: already normalized
    assert set(backbone.state_dict()) == set(encoder.state_dict())


ONE_FILE_TASK = """
kind: clip
family: mine
models:
  ViT-B-32: {hf: openai/clip-vit-base-patch32, open_clip: ViT-B-32, finetuned_hub_prefix: tanganke/clip-vit-base-patch32}
open_clip_checkpoints: {finetuned: "{root}/{model}/{task_val}/f.pt", zeroshot: "{root}/{model}/{task_val}/z.pt"}
validation: {fraction: 0.25, max_examples: 6, seed: 0}
eval_batch_size: 8
tasks:
  - name: Digits
    fusion_bench: mnist
    dataset: ylecun/mnist
    splits: {train: train, test: test}
    columns: {image: image, label: label}
    classnames: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    templates: ['a photo of the number: "{c}".']
suites:
  mine-1: [Digits]
"""


def test_a_new_clip_task_is_one_file(world, env, tmp_path, capsys):
    """A user's own suite file, its class names and templates inline, runs on the published experts."""
    folder = tmp_path / "my-suites"
    folder.mkdir()
    (folder / "mine.yaml").write_text(ONE_FILE_TASK)
    data = tmp_path / "data"
    data.mkdir()
    (data / "Digits").symlink_to(world["data"] / "MNIST")
    out = tmp_path / "results"
    argv = ["run", "--tasks", str(folder), "--suite", "mine-1", "--methods", "task_arithmetic", "--device", "cpu",
            "--checkpoints", str(world["checkpoints"]), "--data", str(data), "--out", str(out)]
    assert cli.main(argv) == 0
    scores = accuracies(out, "individual")
    assert scores[("Digits", "test")] == 1.0  # the MNIST expert, scored with the same head, on its own predictions
    assert {row["task"] for row in ResultStore(out).query("SELECT DISTINCT task FROM results")} == {"Digits"}
    assert "mine-1" in capsys.readouterr().out


def tiny_reference(checkpoint_family: str) -> str:
    """A published-table file for the tiny suite: each expert scores 100% on the labels it predicted (by construction)."""
    return f"""
title: "tiny CLIP experts on their own predictions"
source: "tests/test_clip_suite.py (labels are each expert's predictions)"
checkpoint_family: {checkpoint_family}
split: test
tolerance: 0.5
hyperparameters: validation
methods: {{Fine-tuned: individual}}
traps: []
cells:
  - {{row: Fine-tuned, suite: tinyclip-3, model: ViT-B-32, metric: accuracy, absolute: 100.0}}
"""


def verdict_lines(printed):
    return [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| Row")]


@pytest.fixture
def tiny_references(world, tmp_path, monkeypatch):
    """The tiny suite's files plus ``tiny/fusion_bench`` and ``tiny/tall_masks``, the same table for each family."""
    tasks = tmp_path / "tasks-with-references"
    shutil.copytree(world["tasks"], tasks)
    (tasks / "references" / "tiny").mkdir(parents=True)
    for family in ("fusion_bench", "tall_masks"):
        (tasks / "references" / "tiny" / f"{family}.yaml").write_text(tiny_reference(family))
    monkeypatch.setenv("MERGEBENCH_TASKS", str(tasks))


def test_reproduce_compares_only_the_checkpoint_family_of_the_table(world, env, tiny_references, tmp_path, capsys):
    """iso/table1 (tall_masks) on the tiny FusionBench-style folders: every cell not comparable, nothing run."""
    out = tmp_path / "results"
    args = ("--data", str(world["data"]), "--device", "cpu", "--out", str(out))

    assert cli.main(["reproduce", "iso/table1", "--checkpoints", str(world["checkpoints"]), *args]) == 0
    printed = capsys.readouterr().out
    rows = verdict_lines(printed)
    assert len(rows) == 81
    assert all("| not comparable: checkpoints are fusion_bench, the table's tall_masks |" in row for row in rows)
    assert "Cells: 81 not comparable." in printed
    assert not (out / "mergebench.sqlite").exists() or ResultStore(out).query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 0

    assert cli.main(["reproduce", "iso/table1", "--checkpoints", str(tmp_path / "absent"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"mergebench: error: --checkpoints {tmp_path / 'absent'}: no such folder (or pass --checkpoints hub)"

    # the table of the folders' own family runs (the reference rows only) and compares
    assert cli.main(["reproduce", "tiny/fusion_bench", "--checkpoints", str(world["checkpoints"]), *args]) == 0
    rows = verdict_lines(capsys.readouterr().out)
    assert len(rows) == 1 and "| 100.0 | 100.0 | +0.0 | within |" in rows[0]
    families = ResultStore(out).query("SELECT DISTINCT json_extract(config, '$.checkpoint_family') AS f FROM results")
    assert [row["f"] for row in families] == ["fusion_bench"]

    # a tall_masks layout asked for, but the stored results are the folders': not compared
    tall_masks = tmp_path / "tall_masks"
    (tall_masks / TINY_ARCHITECTURE).mkdir(parents=True)
    assert cli.main(["reproduce", "tiny/tall_masks", "--checkpoints", str(tall_masks), "--no-run", *args]) == 0
    rows = verdict_lines(capsys.readouterr().out)
    assert len(rows) == 1 and "not comparable: stored results are of fusion_bench checkpoints, the table's tall_masks" in rows[0]

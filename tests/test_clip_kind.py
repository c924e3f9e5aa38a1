"""tasks/vit.yaml (kind: clip): tall_masks task order, FusionBench ids, class names, and clear errors on bad files."""

import shutil
from pathlib import Path

import pytest
import yaml

from mergebench.errors import MergebenchError
from mergebench.runner.catalog import suites_in

TASKS = Path(__file__).resolve().parents[1] / "tasks"
SUITE_FILE = TASKS / "vit.yaml"
TALL_MASKS_ORDER = (  # tall_masks src/utils/variables_and_paths.py ALL_DATASETS
    "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397", "STL10", "OxfordIIITPet",
    "Flowers102", "CIFAR100", "PCAM", "FER2013", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST",
)


def test_suites_are_prefixes_of_tall_masks_order():
    suites = suites_in(SUITE_FILE)
    assert set(suites) == {"vit-8", "vit-14", "vit-20"}
    for size in (8, 14, 20):
        assert suites[f"vit-{size}"].task_names == TALL_MASKS_ORDER[:size]


def test_ids_paths_and_validation():
    suite = suites_in(SUITE_FILE)["vit-20"]
    task = {t.name: t for t in suite.tasks}
    assert suite.finetuned_hub_id("ViT-B-32", task["Cars"]) == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert suite.finetuned_hub_id("ViT-L-14", task["Flowers102"]) == "tanganke/clip-vit-large-patch14_oxford_flowers102"
    with pytest.raises(MergebenchError, match="no fine-tuned encoder for task EMNIST"):
        suite.finetuned_hub_id("ViT-B-32", task["EMNIST"])
    with pytest.raises(MergebenchError, match="no model 'ViT-H-14'"):
        suite.model("ViT-H-14")
    finetuned, zeroshot = suite.open_clip_paths("/ckpt", "ViT-B-16", task["DTD"])
    assert finetuned == Path("/ckpt/ViT-B-16/DTDVal/nonlinear_finetuned.pt")
    assert zeroshot == Path("/ckpt/ViT-B-16/DTDVal/nonlinear_zeroshot.pt")
    assert task["Food101"].test_split == "validation" and task["SVHN"].config == "cropped_digits"
    assert suite.models["ViT-B-32"].hf == "openai/clip-vit-base-patch32"
    assert suite.validation.size(60000) == 5000 and suite.validation.size(3760) == 376
    assert all(t.validation == "train_fraction" for t in suite.tasks)


def test_every_task_has_templates_and_classnames():
    counts = {"Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "RESISC45": 45, "SUN397": 397, "CIFAR100": 100, "Flowers102": 102, "OxfordIIITPet": 37}
    tasks = {t.name: t for t in suites_in(SUITE_FILE)["vit-20"].tasks}
    for task in tasks.values():
        assert task.templates and all(template.count("{c}") == 1 for template in task.templates)
        assert len(set(task.classnames)) == len(task.classnames)
    for name, count in counts.items():
        assert len(tasks[name].classnames) == count
    assert tasks["MNIST"].templates == ('a photo of the number: "{c}".',) and tasks["MNIST"].classnames == tuple("0123456789")
    assert tasks["CIFAR10"].templates == tasks["CIFAR100"].templates  # shared by a YAML anchor


def broken(tmp_path, edit):
    raw = yaml.safe_load(SUITE_FILE.read_text())
    edit(raw)
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(raw))
    shutil.copy(TASKS / "_vit-classes.yaml", tmp_path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.update(kind="nope"), "unknown suite kind 'nope'"),
        (lambda raw: raw["suites"]["vit-8"].append("ImageNet"), r"suites.vit-8: unknown task 'ImageNet'"),
        (lambda raw: raw["tasks"][0].pop("dataset"), r"tasks\[0\] \(Cars\): missing key 'dataset'"),
        (lambda raw: raw["tasks"].append(dict(raw["tasks"][0])), "task 'Cars' defined twice"),
        (lambda raw: raw["validation"].update(fraction=1.5), r"validation.fraction must be a number in \[0.0, 1.0\]"),
        (lambda raw: raw["models"]["ViT-B-32"].pop("hf"), "models.ViT-B-32: missing key 'hf'"),
        (lambda raw: raw["tasks"][1]["splits"].update(test=""), r"\(DTD\).splits.test: expected a non-empty string"),
        (lambda raw: raw["tasks"][1].update(valdation_split="val"), r"\(DTD\).valdation_split: unknown key"),
        (lambda raw: raw.update(image_size=48), "image_size: unknown key"),
        (lambda raw: raw.update(include="_absent.yaml"), "include '_absent.yaml': no such file"),
        (lambda raw: raw["tasks"][2].update(templates=["a photo"]), r"template 'a photo' has no \{c\} placeholder"),
        (lambda raw: raw.update(classnames={}), r"tasks\[0\] \(Cars\): no classnames"),
    ],
)
def test_malformed_file_errors_name_the_file_and_entry(tmp_path, edit, message):
    with pytest.raises(MergebenchError, match=message) as error:
        suites_in(broken(tmp_path, edit))
    assert str(tmp_path / "vit.yaml") in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(MergebenchError, match="cannot read suite file"):
        suites_in(tmp_path / "absent.yaml")

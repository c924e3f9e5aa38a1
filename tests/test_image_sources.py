"""Tests for the offline image sources of the mini-vision suite."""

from pathlib import Path

import numpy as np
import pytest

from mergebench.suites import image_sources
from mergebench.suites.image_sources import (
    SOURCE_DESCRIPTIONS,
    SOURCES,
    SPLITS,
    DataSourceError,
    ImageDataset,
    load_images,
)

SIZE = 32
FINITE_POOLS = {
    "fashion_mnist": image_sources._fashion_mnist_pools,
    "mnist": image_sources._mnist_pools,
    "digits": image_sources._digits_pools,
}


def _fashion_mnist_available() -> bool:
    try:
        image_sources._fashion_mnist_dir()
    except DataSourceError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST files not installed")
ALL_SOURCES = [
    pytest.param(name, marks=needs_fashion_mnist) if name == "fashion_mnist" else name for name in SOURCES
]


def _hashes(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def _load(source: str, split: str = "train", n: int = 0, seed: int = 0) -> ImageDataset:
    classes = len(load_images(source, "test", 1, size=8, seed=0).classes)
    return load_images(source, split, n or 2 * classes, size=SIZE, seed=seed)


def test_every_source_is_described():
    assert set(SOURCE_DESCRIPTIONS) == set(SOURCES)
    assert all(description and "\n" not in description for description in SOURCE_DESCRIPTIONS.values())


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize("split", SPLITS)
def test_shapes_dtypes_and_class_coverage(source, split):
    dataset = _load(source, split)
    n = 2 * len(dataset.classes)
    assert dataset.images.shape == (n, SIZE, SIZE, 3)
    assert dataset.images.dtype == np.uint8
    assert dataset.labels.shape == (n,) and dataset.labels.dtype == np.int64
    assert set(dataset.labels.tolist()) == set(range(len(dataset.classes)))
    assert np.bincount(dataset.labels).min() == 2  # class-balanced
    spread = dataset.images.reshape(n, -1).max(axis=1).astype(int) - dataset.images.reshape(n, -1).min(axis=1)
    assert (spread > 60).all(), "every image should show some contrast"


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_same_arguments_give_identical_data_and_other_seeds_differ(source):
    first, again, other = _load(source, seed=3), _load(source, seed=3), _load(source, seed=4)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)


@pytest.mark.parametrize("source", [name for name in SOURCES if name not in FINITE_POOLS])
def test_generated_splits_share_no_image(source):
    hashes = [_hashes(_load(source, split, n=60).images) for split in SPLITS]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


@pytest.mark.parametrize("source", [pytest.param(name, marks=needs_fashion_mnist) if name == "fashion_mnist"
                                    else name for name in FINITE_POOLS])
def test_finite_partitions_are_disjoint(source):
    pools = FINITE_POOLS[source]()
    hashes = {split: _hashes(pool.images) for split, pool in pools.items()}
    assert all(len(hashes[split]) == len(pools[split].labels) for split in SPLITS)
    assert not (hashes["train"] & hashes["validation"])
    assert not (hashes["train"] & hashes["test"])
    assert not (hashes["validation"] & hashes["test"])


def test_finite_test_split_does_not_depend_on_seed():
    first = load_images("digits", "test", 497, size=SIZE, seed=0)
    second = load_images("digits", "test", 497, size=SIZE, seed=1)
    assert _hashes(first.images) == _hashes(second.images)
    train = load_images("digits", "train", 1000, size=SIZE, seed=0)
    assert not (_hashes(train.images) & _hashes(first.images))


def test_letter_splits_use_different_fonts():
    fonts = {split: set(sheets) for split, sheets in image_sources._letter_fonts().items()}
    assert all(fonts.values())
    assert not (fonts["train"] & fonts["test"])
    assert not (fonts["train"] & fonts["validation"])
    assert not (fonts["validation"] & fonts["test"])
    assert not any(name.startswith(("cmsy", "cmex", "STIXSiz")) for names in fonts.values() for name in names)


def test_unknown_source_lists_valid_names():
    with pytest.raises(DataSourceError, match="unknown image source 'cifar'.*shapes"):
        load_images("cifar", "train", 10, size=SIZE, seed=0)


def test_unknown_split_lists_valid_names():
    with pytest.raises(DataSourceError, match="unknown split 'dev'.*validation"):
        load_images("shapes", "dev", 10, size=SIZE, seed=0)


@pytest.mark.parametrize(("source", "split", "available"), [("mnist", "test", 1500), ("digits", "train", 1000)])
def test_too_many_examples_from_a_finite_source(source, split, available):
    with pytest.raises(DataSourceError, match=f"only {available} '{split}' examples"):
        load_images(source, split, available + 1, size=SIZE, seed=0)
    assert len(load_images(source, split, available, size=SIZE, seed=0).labels) == available


def test_missing_fashion_mnist_explains_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(image_sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(image_sources, "FASHION_MNIST_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MERGEBENCH_DATA", str(tmp_path / "data"))

    def offline(directory: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(image_sources, "_download_fashion_mnist", offline)
    with pytest.raises(DataSourceError) as raised:
        load_images("fashion_mnist", "train", 10, size=SIZE, seed=0)
    message = str(raised.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "$MERGEBENCH_DATA/fashion-mnist" in message
    assert "go online" in message


def test_fashion_mnist_found_under_mergebench_data(tmp_path: Path, monkeypatch):
    source_dir = tmp_path / "data" / "fashion-mnist"
    source_dir.mkdir(parents=True)
    images = np.arange(20 * 28 * 28, dtype=np.uint64).reshape(20, 28, 28).astype(np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    for prefix, count in (("train", 20), ("t10k", 20)):
        _write_idx(source_dir / f"{prefix}-images-idx3-ubyte", images[:count])
        _write_idx(source_dir / f"{prefix}-labels-idx1-ubyte", labels[:count])
    monkeypatch.setattr(image_sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(image_sources, "FASHION_MNIST_VALIDATION", 10)
    monkeypatch.setenv("MERGEBENCH_DATA", str(tmp_path / "data"))
    dataset = load_images("fashion_mnist", "test", 20, size=SIZE, seed=0)
    with pytest.raises(DataSourceError, match="only 10 'train' examples"):
        load_images("fashion_mnist", "train", 11, size=SIZE, seed=0)
    assert sorted(dataset.labels.tolist()) == sorted(labels.tolist())


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.tobytes())

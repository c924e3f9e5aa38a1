"""Kinds of suites, registered by name: the one place that knows which kinds exist.

A kind says how to read the kind-specific fields of a suite file (:mod:`mergebench.suites.schema` reads
the common ones), which command-line options its suites take, whether each task's data and experts
are on this machine, how to build experts where it builds them, what it refuses to run, and how to
make an :class:`~mergebench.runner.evaluators.Evaluator` that merges and scores models for the sweep.
Nothing outside this package switches on a suite's kind: the runner and the command line ask the
kind registered under ``suite.kind``.

A kind is one module of this package (found on import, like the methods) or of another distribution,
registered through the ``mergebench.kinds`` entry-point group::

    @register_kind
    class MyKind(Kind):
        name = "my-kind"
        ...
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from mergebench.errors import MergebenchError
from mergebench.suites.schema import SuiteBase, SuiteDocument

if TYPE_CHECKING:
    import torch

    from mergebench.methods.registry import MergeMethod
    from mergebench.runner.evaluators import Evaluator

ENTRY_POINT_GROUP = "mergebench.kinds"


@dataclass(frozen=True)
class KindOption:
    """A command-line option that some kinds take (``--checkpoints``); the same object wherever it is shared."""

    name: str
    """Keyword name (``allow_pickle``); the flag is ``--allow-pickle``."""
    help: str
    argparse: dict = field(default_factory=dict)
    """Keyword arguments of ``add_argument`` besides the help (``type``, ``action``, ``metavar``)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TaskStatus:
    """One line of ``mergebench suites``: a task (or the base model) and what of it is on this machine."""

    task: str
    source: str
    status: str
    hint: str | None = None
    """How to get what is missing (a download command), printed once per distinct hint."""


class Kind:
    """Base class of a kind of suite; subclasses set ``name`` and implement what they support."""

    name: ClassVar[str]
    settings: ClassVar[frozenset[str]] = frozenset()
    """Top-level keys of a suite file that this kind reads beside the common ones."""
    options: ClassVar[tuple[KindOption, ...]] = ()
    continual: ClassVar[bool] = True
    """Whether ``mergebench continual`` can run its suites (merges of any subset of the experts)."""

    def suites(self, document: SuiteDocument) -> list[SuiteBase]:
        """The suites of a checked suite file; kind-specific fields are checked here, naming file and key."""
        raise NotImplementedError

    def status(self, suite: SuiteBase, model: str, cache: Path, **options: Any) -> list[TaskStatus]:
        """Per task (and base model): whether data and experts are on this machine. Never downloads."""
        raise NotImplementedError

    def checkpoint_family(self, suite: SuiteBase, model: str, **options: Any) -> str:
        """Who trained the experts that ``options`` select (``tall_masks``, ``fusion_bench``, ``mergebench`` for
        experts built here…): published numbers compare only within one family. Reads no weights. A kind that
        does not say is ``unspecified``, comparable with no published table."""
        return "unspecified"

    def build(self, suite: SuiteBase, model: str, cache: Path, device: torch.device, **options: Any) -> str:
        """Build or fetch the experts of ``suite`` on ``model``; returns where they are."""
        raise MergebenchError(f"suite {suite.name} is of kind {self.name!r}, whose experts are published checkpoints: "
                              "there is nothing to build (`mergebench suites` shows what is on this machine)")

    def check(self, suite: SuiteBase, methods: Sequence["MergeMethod"], options: dict[str, Any]) -> None:
        """Refuse, in one line and before any work, what this kind cannot run."""

    def check_checkpoints(self, suite: SuiteBase, model: str, cache: Path, **options: Any) -> None:
        """Before any work: the headers (tensor names, shapes, dtypes) of the experts already on this machine
        against the pretrained model's, without reading weights. Values are checked as they are loaded."""

    def evaluator(self, suite: SuiteBase, model: str, device: torch.device, cache: Path, **options: Any) -> "Evaluator":
        """Experts, heads and data made ready for merging and scoring ``suite`` on ``model``."""
        raise NotImplementedError

    def accepted(self, options: dict[str, Any], suite: SuiteBase, *, strict: bool = True) -> dict[str, Any]:
        """The given options (not None or False) that this kind takes; with ``strict``, another is an error."""
        given = {name: value for name, value in options.items() if value is not None and value is not False}
        mine = {option.name for option in self.options}
        unused = sorted(set(given) - mine)
        if strict and unused:
            flag = "--" + unused[0].replace("_", "-")
            raise MergebenchError(f"{flag} does not apply to suite {suite.name}: it is of kind {self.name!r}")
        return {name: value for name, value in given.items() if name in mine}


TV_DTYPE = KindOption(
    "tv_dtype", "storage of task vectors: fp32 (default) or bf16 (each τ rounded to bfloat16; stored apart from fp32 results)",
    {"choices": ("fp32", "bf16")},
)
"""Taken by every kind whose merges go through the merge engine (:mod:`mergebench.core.streaming`)."""


def positive_int(text: str) -> int:
    """A command-line value that must be a positive integer."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


KINDS: dict[str, Kind] = {}


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Register a :class:`Kind` subclass under its ``name``."""
    if cls.name in KINDS:
        raise ValueError(f"suite kind {cls.name!r} registered twice")
    KINDS[cls.name] = cls()
    return cls


_loaded = False


def load_kinds() -> None:
    """Import every module of this package (each registers its kind), then the plugins' entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plugin is named in one line, not a traceback
            raise MergebenchError(f"suite-kind plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error}") from error


def all_kinds() -> dict[str, Kind]:
    load_kinds()
    return dict(KINDS)


def kind_of(suite: SuiteBase) -> Kind:
    """The kind that reads, prepares and evaluates ``suite``."""
    load_kinds()
    return KINDS[suite.kind]


def all_options() -> dict[str, tuple[KindOption, tuple[str, ...]]]:
    """Every kind option by name, with the kinds that take it (in registration order)."""
    options: dict[str, tuple[KindOption, tuple[str, ...]]] = {}
    for kind in all_kinds().values():
        for option in kind.options:
            known, kinds = options.get(option.name, (option, ()))
            if known != option:
                raise ValueError(f"option {option.flag} is declared differently by kinds {kinds[0]!r} and {kind.name!r}")
            options[option.name] = (option, (*kinds, kind.name))
    return options

"""The one suite schema, shared by every kind of suite.

A suite file (``tasks/*.yaml``, or a user's folder given by ``MERGEBENCH_TASKS`` / ``--tasks``) describes
a *family* of suites with the same top-level keys whatever its kind::

    kind: clip                  # which kind reads the kind-specific fields (mergebench.runner.kinds)
    family: vit                 # suites of one family share experts and form the task-count axis
    include: _shared.yaml       # optional: files (relative to this one) whose keys this file extends
    models: {ViT-B-32: {...}}   # model choices: name → kind-specific fields (or a plain list of names)
    default_model: ViT-B-32     # optional: the first model otherwise
    tasks:                      # ordered; the order is the suites' column order
      - {name: Cars, ...}       # a name and kind-specific fields
    suites:                     # suite name → its tasks; nested lists form the task-count axis
      vit-8: [Cars, DTD, ...]
    validation: {...}           # how hyperparameters are chosen: see below; a task may override it
    eval_batch_size: 256

and any further top-level keys the kind declares (a recipe, an image size, …). ``include`` is read
first and the including file's keys replace the included file's (top-level keys, as in
lm-evaluation-harness); files whose names start with ``_`` are only included, never read as suites.

``validation`` takes one of three forms:

* ``{fraction: 0.1, max_examples: 5000, seed: 0}`` — carved from the training split
  (:class:`ValidationPolicy`);
* ``{examples: 300}`` — drawn from the task's source (:class:`SampledValidation`);
* ``none`` — the suite has no validation split and methods run at their default hyperparameters.

Every check here and in the kinds names the file and the key (``tasks/vit.yaml: tasks[3] (DTD).splits``)
in a one-line :class:`~mergebench.errors.MergebenchError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from mergebench.errors import MergebenchError

COMMON_KEYS = ("kind", "family", "include", "models", "default_model", "tasks", "suites", "validation", "eval_batch_size")
NO_VALIDATION = "none"


class Fields:
    """A YAML mapping read key by key; every problem is a one-line error naming the file and the key."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise MergebenchError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if not self.where.endswith(".yaml") else f"{self.where}: {key}"

    def require(self, key: str) -> Any:
        if key not in self.data:
            raise MergebenchError(f"{self.where}: missing key {key!r}")
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def string(self, key: str, default: Any = ...) -> str:
        value = self.require(key) if default is ... else self.data.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or not value:
            raise MergebenchError(f"{self.at(key)}: expected a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, default: Any = ..., minimum: int = 1) -> int:
        value = self.require(key) if default is ... else self.data.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MergebenchError(f"{self.at(key)} must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: Any = ..., minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.require(key) if default is ... else self.data.get(key, default)
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not valid or value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise MergebenchError(f"{self.at(key)} must be a number {bound}, got {value!r}")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.require(key) if default is ... else self.data.get(key, default)
        if value not in choices:
            raise MergebenchError(f"{self.at(key)} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def fields(self, key: str, default: Any = ...) -> "Fields":
        value = self.require(key) if default is ... else self.data.get(key, default)
        return Fields(value, self.at(key))

    def listing(self, key: str, default: Any = ...) -> list:
        value = self.require(key) if default is ... else self.data.get(key, default)
        if not isinstance(value, list):
            raise MergebenchError(f"{self.at(key)}: expected a list, got {type(value).__name__}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        values = self.listing(key, default)
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise MergebenchError(f"{self.at(key)}[{index}]: expected a non-empty string, got {value!r}")
        return tuple(values)

    def only(self, *allowed: str) -> "Fields":
        """Refuse keys other than ``allowed`` (a misspelt key is an error, not silently ignored)."""
        unknown = [key for key in self.data if key not in allowed]
        if unknown:
            raise MergebenchError(f"{self.at(unknown[0])}: unknown key; keys here are {', '.join(allowed)}")
        return self


@dataclass(frozen=True)
class ValidationPolicy:
    """Validation carved from train: ``min(int(fraction·n), max_examples)`` examples, seeded split."""

    fraction: float
    max_examples: int
    seed: int

    def size(self, train_examples: int) -> int:
        return min(int(train_examples * self.fraction), self.max_examples)


@dataclass(frozen=True)
class SampledValidation:
    """Validation drawn from the task's own source: ``examples`` examples, never used for training or testing."""

    examples: int


def validation_policy(value: Any, where: str) -> ValidationPolicy | SampledValidation | None:
    """A ``validation`` value in one of its three forms (module docstring); ``None`` for ``none``."""
    if value == NO_VALIDATION or value is None:
        return None
    spec = Fields(value, where)
    if "examples" in spec:
        return SampledValidation(spec.only("examples").integer("examples"))
    spec.only("fraction", "max_examples", "seed")
    fraction = spec.number("fraction", maximum=1.0)
    if not 0 < fraction < 1:
        raise MergebenchError(f"{spec.at('fraction')} must be a number in (0, 1), got {fraction!r}")
    return ValidationPolicy(fraction, spec.integer("max_examples", minimum=0), spec.integer("seed", minimum=0))


@dataclass(frozen=True)
class SuiteDocument:
    """The common part of a suite file, checked; kind-specific fields are left to the kind."""

    path: Path
    kind: str
    family: str
    models: dict[str, Fields]
    default_model: str
    tasks: tuple[Fields, ...]
    """One entry per task, in file order, each with a ``name``."""
    suites: dict[str, tuple[str, ...]]
    validation: Any
    """The raw ``validation`` value (:func:`validation_policy` reads it); absent: ``None``."""
    eval_batch_size: int | None
    settings: Fields
    """The kind-specific top-level keys."""

    @property
    def where(self) -> str:
        return str(self.path)

    def task_names(self) -> tuple[str, ...]:
        return tuple(task.data["name"] for task in self.tasks)

    def validation_of(self, task: Fields) -> ValidationPolicy | SampledValidation | None:
        """A task's own ``validation`` if it has one, else the file's."""
        if "validation" in task:
            return validation_policy(task.get("validation"), task.at("validation"))
        return validation_policy(self.validation, f"{self.where}: validation")


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it (the same documents, several times faster)."""


def read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except OSError as error:
        raise MergebenchError(f"cannot read suite file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MergebenchError(f"broken YAML in {path}{line}: {problem}") from None


def read_suite_file(path: Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A suite file's top-level mapping with its ``include`` files read first (theirs, then its own keys)."""
    path = Path(path)
    if path.resolve() in _including:
        raise MergebenchError(f"{_including[-1]}: include cycle through {path}")
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise MergebenchError(f"{path}: expected a mapping at the top level")
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(name, str) and name for name in includes):
        raise MergebenchError(f"{path}: include must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for name in includes:
        included = path.parent / name
        if not included.is_file():
            raise MergebenchError(f"{path}: include {name!r}: no such file {included}")
        merged.update(read_suite_file(included, (*_including, path.resolve())))
    merged.update({key: value for key, value in data.items() if key != "include"})
    return merged


def suite_files(folder: Path) -> Iterator[Path]:
    """The suite files of a folder: ``*.yaml`` whose names do not start with ``_`` (those are only included)."""
    for path in sorted(folder.glob("*.yaml")):
        if not path.name.startswith("_"):
            yield path


def read_document(path: Path, kind_keys: Mapping[str, frozenset[str]]) -> SuiteDocument:
    """Read and check the common keys of a suite file; ``kind_keys`` maps each known kind to the extra
    top-level keys it reads."""
    where = str(path)
    top = Fields(read_suite_file(path), where)
    kind = top.string("kind")
    if kind not in kind_keys:
        raise MergebenchError(f"{where}: unknown suite kind {kind!r}; kinds are {', '.join(sorted(kind_keys))}")
    top.only(*COMMON_KEYS, *sorted(kind_keys[kind]))
    models = _models(top)
    default = top.string("default_model", next(iter(models)))
    if default not in models:
        raise MergebenchError(f"{top.at('default_model')}: {default!r} is not one of models ({', '.join(models)})")
    tasks = _tasks(top)
    names = tuple(task.data["name"] for task in tasks)
    suites = {}
    for suite, entry in top.fields("suites").data.items():
        members = Fields({"tasks": entry}, f"{top.at('suites')}.{suite}").strings("tasks")
        unknown = [name for name in members if name not in names]
        if unknown:
            raise MergebenchError(f"{top.at('suites')}.{suite}: unknown task {unknown[0]!r} (tasks: {', '.join(names)})")
        if len(set(members)) != len(members):
            raise MergebenchError(f"{top.at('suites')}.{suite}: lists a task twice")
        if not members:
            raise MergebenchError(f"{top.at('suites')}.{suite}: lists no task")
        suites[suite] = members
    if not suites:
        raise MergebenchError(f"{top.at('suites')}: defines no suite")
    validation_policy(top.get("validation"), top.at("validation"))  # checked even where no task uses it
    settings = Fields({key: value for key, value in top.data.items() if key not in COMMON_KEYS}, where)
    return SuiteDocument(
        path, kind, top.string("family"), models, default, tasks, suites, top.get("validation"),
        top.integer("eval_batch_size", None), settings,
    )


def _models(top: Fields) -> dict[str, Fields]:
    raw = top.require("models")
    if isinstance(raw, list):
        raw = {name: {} for name in Fields({"models": raw}, top.where).strings("models")}
    models = {str(name): Fields(spec or {}, f"{top.at('models')}.{name}") for name, spec in Fields(raw, top.at("models")).data.items()}
    if not models:
        raise MergebenchError(f"{top.at('models')}: lists no model")
    return models


def _tasks(top: Fields) -> tuple[Fields, ...]:
    tasks, seen = [], set()
    for index, entry in enumerate(top.listing("tasks")):
        task = Fields(entry, f"{top.at('tasks')}[{index}]")
        name = task.string("name")
        if name in seen:
            raise MergebenchError(f"{top.at('tasks')}: task {name!r} defined twice")
        seen.add(name)
        tasks.append(Fields(task.data, f"{top.at('tasks')}[{index}] ({name})"))
    if not tasks:
        raise MergebenchError(f"{top.at('tasks')}: lists no task")
    return tuple(tasks)


class SuiteBase:
    """What every kind's suite dataclass shares: fields ``name``, ``family``, ``kind``, ``tasks`` (specs with
    ``.name``), ``models`` (name → spec), ``model_default``, ``eval_batch_size`` and ``source_file``."""

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def model(self, name: str) -> Any:
        if name not in self.models:
            raise MergebenchError(f"suite {self.name} has no model {name!r}; choose from {', '.join(self.models)}")
        return self.models[name]

    def resolve_model(self, model: str | None) -> str:
        """``model`` if the suite offers it, the suite's default when ``None``."""
        self.model(model or self.model_default)
        return model or self.model_default

    def resolve_models(self, requested: tuple[str, ...] | None) -> tuple[str, ...]:
        """The models a sweep runs: the default (``None``), every model (``("all",)``), or the ones named."""
        if not requested:
            return (self.model_default,)
        if tuple(requested) == ("all",):
            return self.model_names
        return tuple(self.resolve_model(model) for model in requested)

"""What suites over published checkpoints share: named tasks, named model families, a default family,
a validation split carved from train, and the checks their YAML files are read with (one-line errors
that name the file and the key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mergebench.errors import MergebenchError


class PublishedSuite:
    """Mixin for a suite dataclass with ``name``, ``tasks`` (specs with ``.name``), ``models`` (name → spec
    with ``.name``), ``model_default`` and ``validation`` (how its validation split is drawn)."""

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
        return self.model(model or self.model_default).name

    def context(self) -> tuple:
        """What evaluation data and heads depend on, besides tasks, model and checkpoints."""
        return (self.validation,)


@dataclass(frozen=True)
class ValidationPolicy:
    """Validation carved from train: ``min(int(fraction·n), max_examples)`` examples, seeded split."""

    fraction: float
    max_examples: int
    seed: int

    def size(self, train_examples: int) -> int:
        return min(int(train_examples * self.fraction), self.max_examples)


def validation_policy(spec: Mapping[str, Any], where: str) -> ValidationPolicy:
    fraction = require(spec, "fraction", where)
    max_examples = require(spec, "max_examples", where)
    seed = require(spec, "seed", where)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise MergebenchError(f"{where}.fraction must be a number in (0, 1), got {fraction!r}")
    for key, value in (("max_examples", max_examples), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MergebenchError(f"{where}.{key} must be a non-negative integer, got {value!r}")
    return ValidationPolicy(fraction=float(fraction), max_examples=max_examples, seed=seed)


def require(spec: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in spec:
        raise MergebenchError(f"{where}: missing key {key!r}")
    return spec[key]


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MergebenchError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def listed(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise MergebenchError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MergebenchError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def keyed_tasks(entries: Any, parse: Callable[[Mapping[str, Any], str], Any], where: str) -> dict[str, Any]:
    """``{name: spec}`` of a file's task list, each entry read by ``parse(entry, where)``; a name used twice is an error."""
    tasks: dict[str, Any] = {}
    for index, entry in enumerate(listed(entries, f"{where}: tasks")):
        task = parse(mapping(entry, f"{where}: tasks[{index}]"), f"{where}: tasks[{index}]")
        if task.name in tasks:
            raise MergebenchError(f"{where}: task {task.name!r} defined twice")
        tasks[task.name] = task
    return tasks


def suite_tasks(names: Any, tasks: Mapping[str, Any], suite_name: str, where: str) -> tuple:
    """The specs of the tasks suite ``suite_name`` lists, each known and listed once."""
    names = listed(names, f"{where}: suites.{suite_name}")
    unknown = [name for name in names if name not in tasks]
    if unknown:
        raise MergebenchError(f"{where}: suite {suite_name} names unknown tasks {unknown}")
    if len(set(names)) != len(names):
        raise MergebenchError(f"{where}: suite {suite_name} lists a task twice")
    return tuple(tasks[name] for name in names)


def default_model(spec: Mapping[str, Any], models: Mapping[str, Any], where: str) -> str:
    """``default_model`` of ``spec`` (the first model if absent), one of a non-empty ``models``."""
    if not models:
        raise MergebenchError(f"{where}: 'models' is empty")
    default = spec.get("default_model", next(iter(models)))
    if default not in models:
        raise MergebenchError(f"{where}: default_model {default!r} is not one of models")
    return default


def eval_batch_size(spec: Mapping[str, Any], default: int, where: str) -> int:
    value = spec.get("eval_batch_size", default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MergebenchError(f"{where}: eval_batch_size must be a positive integer, got {value!r}")
    return value

"""What suites over published checkpoints share: named tasks, named model families, a default family,
a validation split carved from train, and the checks their YAML files are read with (one-line errors
that name the file and the key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

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

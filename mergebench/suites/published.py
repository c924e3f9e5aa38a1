"""What suites over published checkpoints share: named tasks, named model families, a default family."""

from __future__ import annotations

from typing import Any

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

"""The method registry: a merging method is a pure function over task vectors, registered by name.

A registered function receives the stacked :class:`~mergebench.core.task_vectors.TaskVectors` and its
hyperparameters as keyword arguments and returns the merged task vector τ_m (``[N]``); the merged model
is θ = θ₀ + λ·τ_m. A method registered with ``returns_model=True`` (one that upscales the model, as
WEMoE does) returns the whole merged backbone as an ``nn.Module`` instead, evaluated as it is.

The scaling coefficient λ is the common *post-scaler* of the literature: a method
declares its default and sweep grid under the name ``lam`` and the registry applies it, so a sweep
computes τ_m once for every setting of the other hyperparameters and only rescales it across λ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from mergebench.core.data_access import DATA_ACCESS, ModelAccess
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError

SCALE = "lam"


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default, the values a sweep tries, and what values are legal."""

    default: Any
    grid: tuple = ()
    doc: str = ""
    low: float | None = None
    high: float | None = None
    high_inclusive: bool = True
    choices: tuple | None = None

    def sweep_values(self) -> tuple:
        return self.grid or (self.default,)

    def parse(self, method: str, name: str, raw: Any) -> Any:
        """Convert a command-line value to the default's type and check it is in range."""
        value = raw
        if isinstance(raw, str) and not isinstance(self.default, str):
            try:
                value = type(self.default)(float(raw)) if isinstance(self.default, int) else type(self.default)(raw)
            except ValueError:
                raise MergebenchError(f"hyperparameter {name}={raw!r} of {method}: not a number") from None
        if self.choices is not None and value not in self.choices:
            raise MergebenchError(f"hyperparameter {name}={value!r} of {method}: must be one of {', '.join(map(str, self.choices))}")
        too_low = self.low is not None and value < self.low
        too_high = self.high is not None and (value > self.high if self.high_inclusive else value >= self.high)
        if too_low or too_high:
            bracket = "]" if self.high_inclusive else ")"
            raise MergebenchError(f"hyperparameter {name}={value!r} of {method}: must be in [{self.low}, {self.high}{bracket}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging method."""

    name: str
    function: Callable[..., torch.Tensor]
    hparams: Mapping[str, HParam]
    citation: str
    data: str = "none"
    randomized: bool = False
    summary: str = field(default="")
    examples: int = 0
    returns_model: bool = False
    """The function returns the merged backbone (``nn.Module``), larger than the base model, not τ_m."""
    post_scaled: bool = False
    """λ is replaced by a post-scaler, which reads the whole merged task vector (LiNeS's layer depths)."""

    @property
    def tensorwise(self) -> bool:
        """Whether each tensor merges from the same tensor of every checkpoint alone (streamable): no data,
        no post-scaler over the whole vector, no upscaled model."""
        return not (self.uses_data or self.post_scaled or self.returns_model)

    @property
    def uses_data(self) -> bool:
        return self.data != "none"

    def defaults(self) -> dict[str, Any]:
        """Every hyperparameter at its declared default."""
        return {name: hparam.default for name, hparam in self.hparams.items()}

    def settings(self, overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every hyperparameter setting of the sweep, λ varying fastest; overrides fix values."""
        overrides = self.check_overrides(overrides or {})
        names = list(self.hparams)
        values = [(overrides[n],) if n in overrides else self.hparams[n].sweep_values() for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def check_overrides(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = [name for name in overrides if name not in self.hparams]
        if unknown:
            known = ", ".join(self.hparams) or "none"
            raise MergebenchError(f"method {self.name} has no hyperparameter {unknown[0]!r} (it has: {known})")
        return {name: self.hparams[name].parse(self.name, name, raw) for name, raw in overrides.items()}

    def merged_vector(
        self, task_vectors: TaskVectors, setting: Mapping[str, Any], *, seed: int = 0, model: ModelAccess | None = None
    ) -> torch.Tensor | nn.Module:
        """τ_m for ``setting`` without the λ post-scaling (or the merged backbone of a ``returns_model``
        method); data-using methods also get ``model``."""
        kwargs = {name: value for name, value in setting.items() if name != SCALE}
        if self.randomized:
            kwargs["seed"] = seed
        if self.uses_data:
            if model is None or model.access != self.data:
                raise MergebenchError(f"method {self.name} needs {self.data} data access, which this run does not grant")
            kwargs["model"] = model
        return self.function(task_vectors, **kwargs)

    def merge(
        self, task_vectors: TaskVectors, setting: Mapping[str, Any], *, seed: int = 0, model: ModelAccess | None = None
    ) -> torch.Tensor | nn.Module:
        """Merged flat weights θ₀ + λ·τ_m, or the merged backbone of a ``returns_model`` method."""
        merged_vector = self.merged_vector(task_vectors, setting, seed=seed, model=model)
        return merged_vector if self.returns_model else scale_onto(task_vectors.pretrained, merged_vector, setting)

    def sweep(
        self, task_vectors: TaskVectors, settings: list[dict[str, Any]], *, seed: int = 0, model: ModelAccess | None = None
    ) -> Iterator[tuple[dict, torch.Tensor | nn.Module]]:
        """Yield ``(setting, merged flat weights)`` for ``settings``, computing τ_m once per non-λ setting
        (``(setting, merged backbone)`` for a ``returns_model`` method)."""
        cached_key, cached_vector = None, None
        for setting in settings:
            key = tuple((n, v) for n, v in setting.items() if n != SCALE)
            if key != cached_key:
                cached_key, cached_vector = key, self.merged_vector(task_vectors, setting, seed=seed, model=model)
            yield setting, cached_vector if self.returns_model else scale_onto(task_vectors.pretrained, cached_vector, setting)


def scale_onto(pretrained: torch.Tensor, merged_vector: torch.Tensor, setting: Mapping[str, Any]) -> torch.Tensor:
    """θ = θ₀ + λ·τ_m (λ = 1 for methods without a scaling coefficient)."""
    return torch.add(pretrained, merged_vector, alpha=float(setting.get(SCALE, 1.0)))


METHODS: dict[str, MergeMethod] = {}
POST_SCALERS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    citation: str,
    hparams: Mapping[str, HParam] | None = None,
    data: str = "none",
    examples: int = 0,
    randomized: bool = False,
    returns_model: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``function`` as merging method ``name`` with its hyperparameters declared once.

    ``data`` is the access the method needs (see :mod:`mergebench.core.data_access`); ``examples`` is
    how many examples per task it takes under ``train-samples`` (its paper's default);
    ``returns_model`` says the function returns the merged backbone rather than τ_m.
    """
    if data not in DATA_ACCESS:
        raise ValueError(f"unknown data access {data!r}")

    def decorate(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        METHODS[name] = MergeMethod(
            name, function, dict(hparams or {}), citation, data, randomized, summary, examples, returns_model
        )
        return function

    return decorate


def register_post_scaler(
    name: str, *, citation: str, hparams: Mapping[str, HParam]
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``function(task_vectors, merged_vector, **hparams) -> merged_vector``.

    A post-scaler replaces the single λ of the method it follows: ``get_method("ties+lines")`` is TIES
    whose merged task vector is rescaled by LiNeS instead of by λ. Used alone (``lines``) it follows
    Task Arithmetic's sum of task vectors.
    """

    def decorate(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        POST_SCALERS[name] = MergeMethod(name, function, dict(hparams), citation, "none", False, summary)
        return function

    return decorate


def compose(base: MergeMethod, scaler: MergeMethod) -> MergeMethod:
    """``base`` without its λ, followed by the post-scaler ``scaler``."""
    if base.returns_model:
        raise MergebenchError(f"cannot compose {base.name} and {scaler.name}: {base.name} returns a model, not a task vector")
    clash = [n for n in scaler.hparams if n in base.hparams and n != SCALE]
    if clash:
        raise MergebenchError(f"cannot compose {base.name} and {scaler.name}: both have hyperparameter {clash[0]!r}")
    base_names = [n for n in base.hparams if n != SCALE]

    def composed(task_vectors: TaskVectors, **kwargs: Any) -> torch.Tensor:
        passed_through = [n for n in ("seed", "model") if n in kwargs]
        base_kwargs = {n: kwargs[n] for n in [*base_names, *passed_through]}
        merged_vector = base.function(task_vectors, **base_kwargs)
        return scaler.function(task_vectors, merged_vector, **{n: kwargs[n] for n in scaler.hparams})

    hparams = {n: base.hparams[n] for n in base_names} | dict(scaler.hparams)
    return MergeMethod(
        f"{base.name}+{scaler.name}", composed, hparams, f"{base.citation}; {scaler.citation}",
        base.data, base.randomized, f"{base.summary} Then {scaler.summary[:1].lower()}{scaler.summary[1:]}",
        base.examples, post_scaled=True,
    )


def get_method(name: str) -> MergeMethod:
    """A registered method, a post-scaler alone, or ``method+post_scaler``."""
    _load_builtin_methods()
    base_name, plus, scaler_name = name.partition("+")
    if plus:
        if scaler_name not in POST_SCALERS:
            raise MergebenchError(f"unknown post-scaler {scaler_name!r} in {name!r}; known: {', '.join(sorted(POST_SCALERS)) or 'none'}")
        return compose(get_method(base_name), POST_SCALERS[scaler_name])
    if name in POST_SCALERS and name not in METHODS:
        return replace(compose(METHODS["task_arithmetic"], POST_SCALERS[name]), name=name)
    if name not in METHODS:
        known = sorted(METHODS) + [f"<method>+{scaler}" for scaler in sorted(POST_SCALERS)]
        raise MergebenchError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return METHODS[name]


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method, and every post-scaler applied to Task Arithmetic under its own name."""
    _load_builtin_methods()
    return dict(METHODS) | {name: get_method(name) for name in POST_SCALERS if name not in METHODS}


def _load_builtin_methods() -> None:
    import mergebench.methods.builtin  # noqa: F401  (registers on import)


def lam_grid(default: float, values: tuple[float, ...]) -> HParam:
    """The scaling coefficient λ of θ = θ₀ + λ·τ_m."""
    return HParam(default, values, "scaling coefficient λ of the merged task vector", low=0.0)


LAMBDA_TENTHS = tuple(round(0.1 * i, 1) for i in range(1, 11))

"""The method registry: a merging method is a pure function over task vectors, registered by name.

A registered function receives the stacked :class:`~mergebench.core.task_vectors.TaskVectors` and its
hyperparameters as keyword arguments and returns the merged task vector τ_m (``[N]``); the merged model
is θ = θ₀ + λ·τ_m. A method registered with ``returns_model=True`` (one that upscales the model, as
WEMoE does) returns the whole merged backbone as an ``nn.Module`` instead, evaluated as it is.

The function's signature is the one declaration of its hyperparameters: every keyword-only argument is
a hyperparameter, annotated ``Annotated[type, HParam(...)]`` (its doc, sweep grid and legal values)
and given its default, as in mergekit's ``@merge_method``. Two keyword-only names are not
hyperparameters but what the runner hands in: ``seed`` (the method is randomized) and ``model`` (the
data access the method declares with ``data=``). Registration fails when a keyword-only argument is
neither, or when a default lies outside its declared range.

The scaling coefficient λ is the common *post-scaler* of the literature: a method declares its default
and sweep grid with ``lam=lam_grid(...)`` and the registry applies it, so a sweep computes τ_m once for
every setting of the other hyperparameters and only rescales it across λ.

Methods are found without a hand-kept list: every module of this package registers its methods on
import, and other packages add theirs through the ``mergebench.methods`` entry-point group (each entry
point names a module or a callable that registers on import/call); ``mergebench methods`` marks them
as plugins.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import pkgutil
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from mergebench.core.data_access import DATA_ACCESS, ModelAccess
from mergebench.core.task_vectors import TaskVectors
from mergebench.errors import MergebenchError

SCALE = "lam"
INJECTED = ("seed", "model")
"""Keyword-only arguments the runner hands in; every other keyword-only argument is a hyperparameter."""
ENTRY_POINT_GROUP = "mergebench.methods"
BUILTIN = "builtin"

_MISSING = object()


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: what it means, the values a sweep tries, and what values are legal.

    Declared in a method's signature as ``Annotated[type, HParam(...)]``; its ``default`` is the
    argument's default, filled in at registration.
    """

    doc: str = ""
    grid: tuple = ()
    low: float | None = None
    high: float | None = None
    high_inclusive: bool = True
    choices: tuple | None = None
    default: Any = _MISSING

    def sweep_values(self) -> tuple:
        return self.grid or (self.default,)

    def parse(self, method: str, name: str, raw: Any) -> Any:
        """Convert a command-line value to the default's type and check it is in range."""
        value = raw
        numeric = isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
        if isinstance(raw, str) and numeric:
            try:
                number = float(raw)
            except ValueError:
                raise MergebenchError(f"hyperparameter {name}={raw!r} of {method}: not a number") from None
            if not math.isfinite(number):
                raise MergebenchError(f"hyperparameter {name}={raw!r} of {method}: must be a finite number")
            if isinstance(self.default, int) and not number.is_integer():
                raise MergebenchError(f"hyperparameter {name}={raw!r} of {method}: must be an integer")
            value = type(self.default)(number)
        elif isinstance(raw, float) and not math.isfinite(raw):
            raise MergebenchError(f"hyperparameter {name}={raw!r} of {method}: must be a finite number")
        if self.choices is not None and value not in self.choices:
            raise MergebenchError(f"hyperparameter {name}={value!r} of {method}: must be one of {', '.join(map(str, self.choices))}")
        too_low = self.low is not None and value < self.low
        too_high = self.high is not None and (value > self.high if self.high_inclusive else value >= self.high)
        if too_low or too_high:
            raise MergebenchError(f"hyperparameter {name}={value!r} of {method}: must be {self.bounds()}")
        return value

    def bounds(self) -> str:
        """The legal range in words: ``in [0.0, 1.0)``, ``≥ 0.0`` or ``≤ 1.0``."""
        if self.high is None:
            return f">= {self.low}"
        bracket = "]" if self.high_inclusive else ")"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {self.high}"
        return f"in [{self.low}, {self.high}{bracket}"


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
    origin: str = BUILTIN
    """``builtin``, or the distribution (or module) of a plugin that registered the method."""
    entrywise: bool | Callable[[Mapping[str, Any]], bool] = False
    """Whether τ_m at an entry depends only on that entry's task values and on the whole-vector
    statistics the method asks of its task vectors (``order_statistics``, ``total``, ``running_totals``,
    ``top_k``), always or at a setting (a predicate over it): a streamed merge may then hand it a
    tensor in column blocks (:meth:`merges_entrywise`)."""

    @property
    def tensorwise(self) -> bool:
        """Whether each tensor merges from the same tensor of every checkpoint alone (streamable): no data,
        no post-scaler over the whole vector, no upscaled model."""
        return not (self.uses_data or self.post_scaled or self.returns_model)

    def merges_entrywise(self, setting: Mapping[str, Any]) -> bool:
        """Whether a streamed merge at ``setting`` may hand the method column blocks of a tensor."""
        if not self.tensorwise:
            return False
        return bool(self.entrywise(self.defaults() | dict(setting)) if callable(self.entrywise) else self.entrywise)

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


def declared_hparams(function: Callable, name: str, positional: int) -> tuple[dict[str, HParam], set[str]]:
    """``({name: HParam with its default}, injected names)`` read from ``function``'s signature.

    The first ``positional`` parameters are the inputs (task vectors, merged vector); everything after
    them must be keyword-only: a hyperparameter (annotated with an :class:`HParam` and given a default)
    or one of :data:`INJECTED`.
    """
    where = f"method {name!r} ({function.__module__}.{function.__qualname__})"
    parameters = list(inspect.signature(function).parameters.values())
    inputs, rest = parameters[:positional], parameters[positional:]
    if len(inputs) < positional or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in inputs):
        raise ValueError(f"{where}: expected {positional} positional input(s) before the keyword-only hyperparameters")
    hparams: dict[str, HParam] = {}
    injected: set[str] = set()
    for parameter in rest:
        if parameter.kind != parameter.KEYWORD_ONLY:
            raise ValueError(f"{where}: argument {parameter.name!r} must be keyword-only (after '*')")
        if parameter.name in INJECTED:
            injected.add(parameter.name)
            continue
        annotation = parameter.annotation
        if isinstance(annotation, str):  # postponed annotations: evaluated in the function's module
            annotation = eval(annotation, function.__globals__)  # noqa: S307 (source code, not input)
        declared = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, HParam)]
        if len(declared) != 1:
            raise ValueError(f"{where}: hyperparameter {parameter.name!r} needs one Annotated[..., HParam(...)] declaration")
        if parameter.default is parameter.empty:
            raise ValueError(f"{where}: hyperparameter {parameter.name!r} has no default")
        hparam = replace(declared[0], default=parameter.default)
        _check_default(hparam, name, parameter.name)
        hparams[parameter.name] = hparam
    return hparams, injected


def _check_default(hparam: HParam, method: str, name: str) -> None:
    """A declared default, and every value of the sweep grid, must be legal."""
    for value in (hparam.default, *hparam.grid):
        try:
            hparam.parse(method, name, value)
        except MergebenchError as error:
            raise ValueError(f"method {method!r}: declared {error}") from None


_loading_plugin: str | None = None
"""The distribution whose entry point is being loaded, while it registers its methods."""


def _origin(function: Callable) -> str:
    module = function.__module__ or ""
    if _loading_plugin is not None:
        return _loading_plugin
    return BUILTIN if module == __package__ or module.startswith(f"{__package__}.") else module


def _summary(function: Callable) -> str:
    return (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""


def register(
    name: str,
    *,
    citation: str,
    lam: HParam | None = None,
    data: str = "none",
    examples: int = 0,
    returns_model: bool = False,
    entrywise: bool | Callable[[Mapping[str, Any]], bool] = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``function`` as merging method ``name``; its signature declares its hyperparameters.

    ``lam`` is the post-scaling λ's default and grid (:func:`lam_grid`), for methods whose τ_m is
    scaled onto θ₀; ``data`` is the access the method needs (see :mod:`mergebench.core.data_access`),
    received as the keyword-only ``model``; ``examples`` is how many examples per task it takes under
    ``train-samples`` (its paper's default); ``returns_model`` says the function returns the merged
    backbone rather than τ_m; ``entrywise`` (a bool, or a predicate over a setting) says each entry of
    τ_m depends only on that entry and on whole-vector statistics asked of the task vectors
    (:attr:`MergeMethod.entrywise`).
    """
    if data not in DATA_ACCESS:
        raise ValueError(f"unknown data access {data!r}")

    def decorate(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        hparams, injected = declared_hparams(function, name, positional=1)
        if entrywise and "seed" in injected:
            raise ValueError(f"method {name!r}: a randomized method draws its masks per tensor, so it cannot be entrywise")
        if ("model" in injected) != (data != "none"):
            raise ValueError(f"method {name!r}: takes 'model' exactly when it declares data access (data={data!r})")
        if lam is not None:
            if SCALE in hparams:
                raise ValueError(f"method {name!r}: {SCALE!r} is the post-scaler, declared by register(lam=...), not an argument")
            _check_default(lam, name, SCALE)
            hparams[SCALE] = lam
        METHODS[name] = MergeMethod(
            name, function, hparams, citation, data, "seed" in injected, _summary(function), examples, returns_model,
            origin=_origin(function), entrywise=entrywise,
        )
        return function

    return decorate


def register_post_scaler(name: str, *, citation: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``function(task_vectors, merged_vector, *, **hparams) -> merged_vector``.

    A post-scaler replaces the single λ of the method it follows: ``get_method("ties+lines")`` is TIES
    whose merged task vector is rescaled by LiNeS instead of by λ. Used alone (``lines``) it follows
    Task Arithmetic's sum of task vectors.
    """

    def decorate(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        hparams, injected = declared_hparams(function, name, positional=2)
        if injected:
            raise ValueError(f"post-scaler {name!r}: takes no {', '.join(sorted(injected))}")
        POST_SCALERS[name] = MergeMethod(name, function, hparams, citation, "none", False, _summary(function), origin=_origin(function))
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
        passed_through = [n for n in INJECTED if n in kwargs]
        base_kwargs = {n: kwargs[n] for n in [*base_names, *passed_through] if n in kwargs}
        merged_vector = base.function(task_vectors, **base_kwargs)
        return scaler.function(task_vectors, merged_vector, **{n: kwargs[n] for n in scaler.hparams if n in kwargs})

    hparams = {n: base.hparams[n] for n in base_names} | dict(scaler.hparams)
    origin = base.origin if base.origin != BUILTIN else scaler.origin
    return MergeMethod(
        f"{base.name}+{scaler.name}", composed, hparams, f"{base.citation}; {scaler.citation}",
        base.data, base.randomized, f"{base.summary} Then {scaler.summary[:1].lower()}{scaler.summary[1:]}",
        base.examples, post_scaled=True, origin=origin,
    )


def get_method(name: str) -> MergeMethod:
    """A registered method, a post-scaler alone, or ``method+post_scaler``."""
    load_methods()
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
    load_methods()
    return dict(METHODS) | {name: get_method(name) for name in POST_SCALERS if name not in METHODS}


_loaded = False


def load_methods() -> None:
    """Import every module of this package (each registers its methods), then the plugins' entry points."""
    global _loaded, _loading_plugin
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "registry":
            importlib.import_module(f"{__package__}.{module.name}")
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _loading_plugin = entry_point.dist.name if entry_point.dist is not None else entry_point.value
        try:
            loaded = entry_point.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as error:  # a broken plugin is named in one line, not a traceback
            raise MergebenchError(f"method plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error}") from error
        finally:
            _loading_plugin = None


def lam_grid(default: float, values: tuple[float, ...]) -> HParam:
    """The scaling coefficient λ of θ = θ₀ + λ·τ_m."""
    return HParam("scaling coefficient λ of the merged task vector", values, low=0.0, default=default)


LAMBDA_TENTHS = tuple(round(0.1 * i, 1) for i in range(1, 11))

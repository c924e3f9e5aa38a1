"""The LLM suites (``llm-math-code``, ``mini-llm``): ``kind: llm`` files such as ``tasks/llm.yaml``.

A suite names, per model, a base causal LM and one expert per expert task (math, code…); each expert
task lists the lm-eval tasks that measure it (the columns of the result table). A model source is an
embedded base name, a local Hugging Face folder or a Hub id (:mod:`mergebench.models.llm`). A suite
whose models list no experts carries a fine-tuning ``recipe`` and per-task training data, and its
experts are built by :mod:`mergebench.runner.llm_experts`. An expert task with a ``validation`` size
has a validation split (the local math task); hyperparameters are chosen on it over ``lam_grid``.
Suites without one run each method at its defaults. A math task's ``sources`` (reasoning-gym generators,
:func:`mergebench.suites.llm_sources.math_examples`) feed all of its splits, so its expert is scored on
held-out questions of the distribution it is trained on.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from mergebench.errors import MergebenchError
from mergebench.suites.llm_sources import MATH_SOURCES, MINI_MATH_TASK
from mergebench.suites.published import PublishedSuite, default_model, listed, mapping, require, string

TRAIN_SOURCES = ("math", "code")
TRAIN_KEYS = ("source", "examples")


@dataclass(frozen=True)
class LlmRecipe:
    """Supervised fine-tuning of one expert (:func:`mergebench.models.llm.finetune_causal_lm`)."""

    steps: int
    batch_size: int
    lr: float
    max_length: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class LlmTask:
    """One expert task: the lm-eval tasks that score it and, for built experts, its training data."""

    name: str
    eval: tuple[str, ...]
    train: Mapping[str, Any] | None = None
    """``{"source": "math"|"code", "examples": N}``."""
    sources: tuple[str, ...] | None = None
    """reasoning-gym source specs of the math splits (train, validation, test); None: the default mix."""
    recipe: LlmRecipe | None = None
    validation: int | None = None
    test: int | None = None
    max_gen_toks: int | None = None

    @property
    def math_sources(self) -> tuple[str, ...]:
        """The reasoning-gym generators every math split draws from (:data:`MATH_SOURCES` unless given)."""
        return self.sources or MATH_SOURCES


@dataclass(frozen=True)
class LlmModel:
    """A base model source and its experts' sources (empty when the suite builds them)."""

    name: str
    base: str
    experts: Mapping[str, str]


@dataclass(frozen=True)
class LlmSuite(PublishedSuite):
    """An LLM suite; model lookup as for the other suites over published checkpoints."""

    name: str
    family: str
    tasks: tuple[LlmTask, ...]
    models: Mapping[str, LlmModel]
    model_default: str
    data_seed: int
    lam_grid: tuple[float, ...] | None
    eval_batch_size: int
    source_file: Path
    kind: str = "llm"

    @property
    def task_names(self) -> tuple[str, ...]:
        """The lm-eval tasks of every expert, in order: the columns of the result table."""
        return tuple(name for task in self.tasks for name in task.eval)

    @property
    def validated(self) -> tuple[LlmTask, ...]:
        """The expert tasks that have a validation split."""
        return tuple(task for task in self.tasks if task.validation)

    def describe(self) -> dict[str, Any]:
        """The suite's settings as recorded with every result."""
        return {
            "tasks_by_expert": {t.name: list(t.eval) for t in self.tasks},
            "splits": {t.name: {"validation": t.validation, "test": t.test} for t in self.tasks},
            "max_gen_toks": {t.name: t.max_gen_toks for t in self.tasks},
            "recipes": {t.name: t.recipe.__dict__ for t in self.tasks if t.recipe},
            "train": {t.name: dict(t.train) for t in self.tasks if t.train},
            "sources": {t.name: list(t.sources) for t in self.tasks if t.sources},
            "data_seed": self.data_seed, "lam_grid": self.lam_grid, "suite_file": self.source_file.name,
        }


def llm_suites_from(raw: Any, path: Path) -> dict[str, LlmSuite]:
    """The suites of an already parsed ``kind: llm`` file; every error names the file and the entry."""
    where = str(path)
    raw = mapping(raw, where)
    family = string(require(raw, "family", where), f"{where}: family")
    suites = {}
    for name, spec in mapping(require(raw, "suites", where), f"{where}: suites").items():
        suites[name] = _suite(name, family, mapping(spec, f"{where}: suites.{name}"), path, f"{where}: suites.{name}")
    return suites


def _suite(name: str, family: str, spec: Mapping[str, Any], path: Path, where: str) -> LlmSuite:
    recipe = spec.get("recipe")
    models = {}
    for model, entry in mapping(require(spec, "models", where), f"{where}.models").items():
        entry = mapping(entry, f"{where}.models.{model}")
        experts = {task: string(source, f"{where}.models.{model}.experts.{task}")
                   for task, source in mapping(entry.get("experts", {}), f"{where}.models.{model}.experts").items()}
        models[model] = LlmModel(model, string(require(entry, "base", f"{where}.models.{model}"), f"{where}.models.{model}.base"), experts)
    default = default_model(spec, models, where)
    tasks = tuple(
        _task(task, mapping(entry, f"{where}.tasks.{task}"), recipe, f"{where}.tasks.{task}")
        for task, entry in mapping(require(spec, "tasks", where), f"{where}.tasks").items()
    )
    if not tasks:
        raise MergebenchError(f"{where}: 'tasks' is empty")
    for model in models.values():
        if model.experts and set(model.experts) != {task.name for task in tasks}:
            raise MergebenchError(f"{where}.models.{model.name}: experts {sorted(model.experts)} do not match tasks {[t.name for t in tasks]}")
        if not model.experts and any(task.recipe is None for task in tasks):
            raise MergebenchError(f"{where}.models.{model.name}: no experts listed and no recipe to build them")
    lam_grid = spec.get("lam_grid")
    if lam_grid is not None:
        lam_grid = tuple(_number(value, f"{where}.lam_grid") for value in listed(lam_grid, f"{where}.lam_grid"))
    return LlmSuite(
        name=name, family=family, tasks=tasks, models=models, model_default=default,
        data_seed=_count(spec.get("data_seed", 0), f"{where}.data_seed", minimum=0), lam_grid=lam_grid,
        eval_batch_size=_count(spec.get("eval_batch_size", 1), f"{where}.eval_batch_size"), source_file=path,
    )


def _task(name: str, spec: Mapping[str, Any], recipe: Any, where: str) -> LlmTask:
    evals = tuple(string(task, f"{where}.eval") for task in listed(require(spec, "eval", where), f"{where}.eval"))
    train = spec.get("train")
    task_recipe = None
    if train is not None:
        train = dict(mapping(train, f"{where}.train"))
        if train.get("source") not in TRAIN_SOURCES:
            raise MergebenchError(f"{where}.train.source must be one of {', '.join(TRAIN_SOURCES)}, got {train.get('source')!r}")
        _count(require(train, "examples", f"{where}.train"), f"{where}.train.examples")
        unknown = sorted(set(train) - set(TRAIN_KEYS))
        if unknown:
            raise MergebenchError(f"{where}.train: unknown key {unknown[0]!r}; keys are {', '.join(TRAIN_KEYS)} "
                                  "(a math task's sources belong to the task)")
        if recipe is None:
            raise MergebenchError(f"{where}: training data given but the suite has no 'recipe'")
        task_recipe = _recipe({**mapping(recipe, f"{where}: recipe"), **mapping(spec.get("recipe", {}), f"{where}.recipe")}, where)
    optional = {key: None if spec.get(key) is None else _count(spec[key], f"{where}.{key}") for key in ("validation", "test", "max_gen_toks")}
    return LlmTask(name, evals, train, recipe=task_recipe, sources=_sources(spec, evals, train, where), **optional)


def _sources(spec: Mapping[str, Any], evals: tuple[str, ...], train: Mapping[str, Any] | None, where: str) -> tuple[str, ...] | None:
    """A math task's reasoning-gym source specs, or None when it gives none."""
    if spec.get("sources") is None:
        return None
    if MINI_MATH_TASK not in evals and (train or {}).get("source") != "math":
        raise MergebenchError(f"{where}.sources: only a math task (trained on math or scored on {MINI_MATH_TASK}) has sources")
    sources = tuple(string(source, f"{where}.sources") for source in listed(spec["sources"], f"{where}.sources"))
    if not sources:
        raise MergebenchError(f"{where}.sources is empty")
    return sources


def _recipe(spec: Mapping[str, Any], where: str) -> LlmRecipe:
    known = {f.name for f in fields(LlmRecipe)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise MergebenchError(f"{where}: unknown recipe key {unknown[0]!r}; keys are {', '.join(sorted(known))}")
    missing = [f.name for f in fields(LlmRecipe) if f.name not in spec and f.default is MISSING]
    if missing:
        raise MergebenchError(f"{where}: recipe lacks {missing[0]!r}")
    recipe = LlmRecipe(**spec)
    for key in ("steps", "batch_size", "max_length"):
        _count(getattr(recipe, key), f"{where}: recipe.{key}")
    return replace(recipe, lr=_number(recipe.lr, f"{where}: recipe.lr"), weight_decay=_number(recipe.weight_decay, f"{where}: recipe.weight_decay"))


def _count(value: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MergebenchError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise MergebenchError(f"{where} must be a non-negative number, got {value!r}")
    return float(value)

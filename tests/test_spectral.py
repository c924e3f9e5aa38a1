"""TSV-Merge, Iso-C and Iso-CTS on hand-checkable layers and against a numpy re-derivation."""

import numpy as np
import pytest
import torch

import mergebench.methods.spectral  # noqa: F401  (registers tsv, iso_c, iso_cts)
from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.errors import MergebenchError
from mergebench.methods import get_method
from mergebench.methods.spectral import iso_cts_sizes
from method_helpers import merge

METHODS = ("tsv", "iso_c", "iso_cts")


def stack(params, pretrained=None):
    """``params``: list over parameters of ``[T, *shape]`` tensors → TaskVectors in that order."""
    state = {f"p{i}": torch.zeros(p.shape[1:]) for i, p in enumerate(params)}
    layout = ParamLayout.of(state, list(state))
    vectors = torch.cat([p.reshape(p.shape[0], -1) for p in params], dim=1).float()
    theta0 = torch.zeros(vectors.shape[1]) if pretrained is None else pretrained
    return TaskVectors(theta0, vectors, layout, tuple(f"t{i}" for i in range(vectors.shape[0])))




# --- independent numpy re-derivations of the authors' code ---------------------------------------

def np_polar(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def np_tsv(deltas):
    """Authors' layout: task i's top r components placed in columns i·r … (i+1)·r of a zero matrix."""
    t, m, n = deltas.shape
    k = min(m, n)
    r = max(1, k // t)
    width = max(k, t * r)
    su, ss, sv = np.zeros((m, width)), np.zeros(width), np.zeros((width, n))
    for i, d in enumerate(deltas):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        su[:, i * r:(i + 1) * r], ss[i * r:(i + 1) * r], sv[i * r:(i + 1) * r] = u[:, :r], s[:r], vt[:r]
    return np_polar(su) @ np.diag(ss) @ np_polar(sv)


def np_iso_c(deltas):
    u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vt


def np_iso_cts(deltas, fraction):
    t, m, n = deltas.shape
    k = min(m, n)
    c = int(k * fraction)
    c = k - round((k - c) / t) * t
    p = (k - c) // t
    u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
    cu, cs, cv = np.zeros((m, k)), np.zeros(k), np.zeros((k, n))
    for i, d in enumerate(deltas):
        w = d - u[:, :c] @ u[:, :c].T @ d
        ut, st, vtt = np.linalg.svd(w, full_matrices=False)
        cu[:, i * p:(i + 1) * p], cs[i * p:(i + 1) * p], cv[i * p:(i + 1) * p] = ut[:, :p], st[:p], vtt[:p]
    cu[:, t * p:], cs[t * p:], cv[t * p:] = u[:, :c], s[:c], vt[:c]
    return np_polar(cu) @ np.diag(np.full(k, cs.mean())) @ np_polar(cv)


@pytest.fixture
def random_layer():
    return torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(
    "name, setting, reference",
    [
        ("tsv", {}, np_tsv),
        ("iso_c", {}, np_iso_c),
        ("iso_cts", {"common_fraction": 0.4}, lambda d: np_iso_cts(d, 0.4)),  # c = 2, p = 1
        ("iso_cts", {"common_fraction": 0.8}, lambda d: np_iso_cts(d, 0.8)),  # c = 5, p = 0
    ],
)
@pytest.mark.parametrize("shape", [(6, 5), (5, 6), (6, 6)], ids=["tall", "wide", "square"])
def test_matches_numpy_rederivation_on_random_three_task_layer(name, setting, reference, shape):
    """Tall, wide and square: Iso-CTS decomposes the task-specific parts of the last two in the complement
    of the common subspace, and must give the authors' result all the same."""
    layer = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.from_numpy(reference(layer.numpy())).float()
    merged = merge(name, stack([layer]), lam=1.0, **setting).view(shape)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)


# --- Iso-C -------------------------------------------------------------------------------------

def test_iso_c_flattens_diagonal_spectrum_to_its_mean():
    deltas = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # Σ Δ = diag(3, 1) → σ̄ = 2 → diag(2, 2), times λ = 0.5 → identity
    assert torch.allclose(merge("iso_c", stack([deltas]), lam=0.5), torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_iso_c_of_rank_one_sum():
    u, v = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([1.0, 0.0])
    deltas = torch.stack([2 * torch.outer(u, v), 4 * torch.outer(u, v)])  # sum = 6·u vᵀ, k = 2
    merged = merge("iso_c", stack([deltas]), lam=1.0).view(3, 2)
    # every singular value becomes (6 + 0)/2 = 3, and the top direction is kept
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(u @ merged @ v, torch.tensor(3.0))
    # a 1×n sum has a single singular value: unchanged
    row = torch.tensor([[[1.0, 4.0]], [[2.0, 0.0]]])
    torch.testing.assert_close(merge("iso_c", stack([row]), lam=1.0), torch.tensor([3.0, 4.0]))


# --- Iso-CTS -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "k, tasks, fraction, expected",
    [
        (768, 8, 0.8, (616, 19)),  # c = 614, p = round(154/8) = 19 → c = 768 − 152
        (5, 3, 0.4, (2, 1)),
        (9, 8, 0.8, (9, 0)),  # p = round(0.25) = 0: Iso-C on this layer
        (6, 4, 0.5, (2, 1)),  # c = 3, p = round(0.75) = 1 → c = 6 − 4
        (3, 4, 0.1, (3, 0)),  # p = round(0.75) = 1 would need 4 > 3 directions → ⌊3/4⌋ = 0
    ],
)
def test_iso_cts_subspace_sizes(k, tasks, fraction, expected):
    assert iso_cts_sizes(k, tasks, fraction) == expected


def test_iso_cts_with_whole_common_space_is_iso_c(random_layer):
    tv = stack([random_layer])
    torch.testing.assert_close(merge("iso_cts", tv, common_fraction=1.0), merge("iso_c", tv), atol=1e-5, rtol=1e-4)


# --- TSV ---------------------------------------------------------------------------------------

def orthogonal(size, seed):
    return torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)))[0]


def test_tsv_reconstructs_sum_of_tasks_with_orthogonal_supports():
    # T = 3 tasks on a 7×6 layer: k = 6, kept rank r = 2; task t lives on left/right directions 2t, 2t+1
    left, right = orthogonal(7, 1), orthogonal(6, 2)
    spectra = torch.tensor([[3.0, 1.0], [5.0, 0.5], [2.0, 2.0]])
    deltas = torch.stack(
        [left[:, 2 * t:2 * t + 2] @ torch.diag(spectra[t]) @ right[:, 2 * t:2 * t + 2].T for t in range(3)]
    )
    merged = merge("tsv", stack([deltas]), lam=1.0).view(7, 6)
    torch.testing.assert_close(merged, deltas.sum(0), atol=1e-5, rtol=1e-5)


def test_tsv_single_task_returns_its_task_matrix():
    delta = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(3))
    pretrained = torch.arange(12.0)
    merged = merge("tsv", stack([delta], pretrained=pretrained), lam=1.0)
    torch.testing.assert_close(merged, pretrained + delta.reshape(-1), atol=1e-5, rtol=1e-5)


def test_tsv_rank_below_task_count_keeps_one_direction_per_task():
    # k = 2 < T = 3: each task keeps its top component (the authors' int(k/T) = 0 would zero the layer)
    deltas = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    merged = merge("tsv", stack([deltas]), lam=1.0).view(2, 4)
    torch.testing.assert_close(merged, torch.from_numpy(np_tsv(deltas.numpy())).float(), atol=1e-5, rtol=1e-4)
    assert merged.abs().sum() > 0


# --- shared rules: which parameters are matrices -----------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_one_dimensional_parameters_are_averaged(name):
    matrix = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(5))
    bias = torch.tensor([[1.0, -2.0, 0.0], [3.0, 4.0, 1.0]])
    merged = merge(name, stack([matrix, bias]), lam=0.5)
    # λ scales the averaged bias too, as in the authors' code: 0.5 · (2, 1, 0.5)
    assert torch.allclose(merged[9:], torch.tensor([1.0, 0.5, 0.25]))


@pytest.mark.parametrize("name", METHODS)
def test_conv_kernels_merge_as_out_by_rest_matrices(name):
    kernels = torch.randn(3, 4, 2, 3, 3, generator=torch.Generator().manual_seed(6))  # [T, out, in, kh, kw]
    as_conv = merge(name, stack([kernels]), lam=1.0)
    as_matrix = merge(name, stack([kernels.reshape(3, 4, 18)]), lam=1.0)
    assert torch.equal(as_conv, as_matrix)
    averaged = merge(name, stack([kernels]), lam=1.0, conv="average")
    torch.testing.assert_close(averaged, kernels.reshape(3, -1).mean(0))


def test_conv_kernel_round_trips_through_single_task_tsv():
    kernel = torch.randn(1, 3, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(merge("tsv", stack([kernel]), lam=1.0), kernel.reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_all_zero_task_vectors_merge_to_zero(name):
    tv = stack([torch.zeros(2, 3, 4), torch.zeros(2, 3)])
    assert torch.equal(merge(name, tv), torch.zeros(15))


@pytest.mark.parametrize(
    "name, overrides, message",
    [("tsv", {"conv": "nope"}, "must be one of"), ("iso_cts", {"common_fraction": "1.5"}, r"must be in \[0.0, 1.0\]")],
)
def test_bad_hyperparameters_are_rejected(name, overrides, message):
    with pytest.raises(MergebenchError, match=message):
        get_method(name).check_overrides(overrides)


def test_defaults_and_small_grids():
    for name in METHODS:
        method = get_method(name)
        assert method.hparams["lam"].default == 1.0
        assert len(method.settings()) <= 12
    assert get_method("iso_cts").hparams["common_fraction"].default == 0.8

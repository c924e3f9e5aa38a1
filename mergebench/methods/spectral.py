"""SVD-based per-layer merging: TSV-Merge, Iso-C and Iso-CTS.

Each method treats every weight *matrix* of the network separately: the task matrices Δ_t ∈ ℝ^{m×n}
of one layer (the ``[T, m·n]`` block of the task vectors, reshaped) are merged through their
singular value decompositions; k = min(m, n).

* **TSV-Merge** — Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
  Model Merging" (code: github.com/AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``).
  Δ_t = U_t Σ_t V_tᵀ; keep each task's top r = ⌊k/T⌋ components (at least 1), concatenate
  U = [U_1,r … U_T,r] ∈ ℝ^{m×Tr}, Σ = diag(Σ_1,r … Σ_T,r), V = [V_1,r … V_T,r] ∈ ℝ^{n×Tr};
  decorrelate with the orthogonal Procrustes solution U⊥ = P Qᵀ where U = P S Qᵀ (same for V), and
  M = U⊥ Σ V⊥ᵀ. θ = θ₀ + α·M with α = 1 in the paper ("TSV-M rank 1/T per task, α = 1.0").
* **Iso-C** — Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces" (code: github.com/danielm1405/iso-merging, ``src/utils/iso.py``).
  Σ_t Δ_t = U S Vᵀ, M = σ̄ U Vᵀ with σ̄ = (1/k) Σ_i S_ii (the spectrum flattened to its mean),
  θ = θ₀ + α·M, α chosen on validation in (0, 3].
* **Iso-CTS** (same paper and code). Common subspace: the top c components U_c, V_c of Σ_t Δ_t, with
  c = ⌊f·k⌋ (f = 0.8) adjusted so that the remaining k − c directions split evenly into p per task.
  Task-specific subspaces: the top p components of each Δ_t − U_c U_cᵀ Δ_t. All bases are
  concatenated, U = [U_1,p … U_T,p U_c] (likewise V and the singular values S), orthogonalized as in
  TSV (U⊥ = P Qᵀ), and the spectrum is made isotropic: M = mean(S) · U⊥ V⊥ᵀ.

Choices, following the authors' code unless said otherwise:

* **Which parameters are matrices.** The authors' code decomposes parameters with exactly two
  dimensions (except the frozen CLIP ``text_projection``; the positional embedding, being 2-D, is
  decomposed) and *averages* every other parameter, τ_m = (1/T) Σ_t τ_t — biases, norm scales and the
  ViT's only convolution, the patch embedding. The same mean is then scaled by α with the rest of the
  merged vector, as here. For convolutional networks, where almost every weight is a kernel, that
  rule would reduce the methods to weight averaging, so by default (``conv="reshape"``) a kernel
  [out, in, kh, kw] is merged as the [out, in·kh·kw] matrix its convolution applies and reshaped back.
  ``conv="average"`` is the authors' literal rule (also FusionBench's): only 2-D parameters are
  decomposed. 1-D and 0-D parameters are averaged in both cases.
* **TSV rank per task.** The authors take ``int(k · (1/T))``, which is 0 for layers with k < T (the
  layer's merged update is then zero); we take max(1, ⌊k/T⌋) so every task keeps at least its top
  direction. When T·r > k the concatenated bases have more columns than rows and P Qᵀ is the nearest
  matrix with orthonormal rows. The authors zero-pad the concatenation to k columns; the padding
  columns carry zero singular values and leave U⊥ Σ V⊥ᵀ unchanged, so we concatenate only the kept
  components.
* **Iso-C spectrum.** σ̄ is the mean over all k singular values of Σ_t Δ_t, zeros included.
* **Iso-CTS sizes.** As the authors: c = ⌊f·k⌋, p = round((k − c)/T) with Python's round-half-to-even,
  then c = k − T·p, so the combined spectrum has exactly k entries. When p·T would exceed k (tiny k,
  small f) we take p = ⌊k/T⌋. When p = 0 (small layers, or f = 1) Iso-CTS equals Iso-C on that layer.
  The projection removes the common subspace from the left (output) side only, as the authors do.
  Where m ≤ n the projected parts have rank ≤ k − c and are decomposed through their (k − c) × n
  coordinates in the complement of the common subspace (:func:`specific_svd`): the same components.
* SVDs run in the task vectors' dtype and device (``torch.linalg.svd(full_matrices=False)``), batched
  over tasks.
"""

from __future__ import annotations

from typing import Annotated, Callable

import torch

from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, lam_grid, register

# TSV: α = 1.0 in the paper; the authors' code sweeps (0, 3] — a small grid around 1.0.
TSV_LAMBDAS = (0.6, 0.8, 1.0, 1.2, 1.4)
# Iso-C / Iso-CTS: α chosen on validation in (0, 3] (authors' code: linspace(0, 3, 31)[1:]).
ISO_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
CONV_RULES = ("reshape", "average")

MatrixMerge = Callable[[torch.Tensor], torch.Tensor]


ConvRule = Annotated[
    str, HParam("conv kernels merged as [out, in·kh·kw] matrices (reshape) or averaged like the authors' code (average)", choices=CONV_RULES)
]


def matrix_shape(shape: tuple[int, ...], conv: str) -> tuple[int, int] | None:
    """The [out, rest] matrix a parameter is merged as, or None where it is averaged."""
    if len(shape) == 2 or (len(shape) > 2 and conv == "reshape"):
        return shape[0], int(torch.Size(shape[1:]).numel())
    return None


def merge_per_layer(task_vectors: TaskVectors, merge_matrix: MatrixMerge, conv: str) -> torch.Tensor:
    """τ_m with every matrix merged by ``merge_matrix([T, m, n]) -> [m, n]``, other parameters averaged."""
    merged = task_vectors.vectors.mean(dim=0)
    for slot, block in task_vectors.slices():
        shape = matrix_shape(slot.shape, conv)
        if shape is not None and block.shape[1] > 0:
            merged[slot.start : slot.stop] = merge_matrix(block.reshape(-1, *shape)).reshape(-1)
    return merged


def orthogonalize(basis: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wider than tall): P Qᵀ from basis = P S Qᵀ."""
    left, _, right = torch.linalg.svd(basis, full_matrices=False)
    return left @ right


def concat_components(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """Each task's top ``rank`` components of a batched SVD, concatenated task after task."""
    tasks, m, _ = u.shape
    return (
        u[:, :, :rank].permute(1, 0, 2).reshape(m, tasks * rank),
        s[:, :rank].reshape(tasks * rank),
        vh[:, :rank, :].reshape(tasks * rank, vh.shape[-1]),
    )


def tsv_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-Merge of one layer's task matrices ``[T, m, n]``: U⊥ Σ V⊥ᵀ of the top-⌊k/T⌋ components."""
    tasks, m, n = deltas.shape
    rank = max(1, min(m, n) // tasks)
    u, s, vh = concat_components(*torch.linalg.svd(deltas, full_matrices=False), rank)
    return orthogonalize(u) @ torch.diag(s) @ orthogonalize(vh)


def iso_c_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C of one layer: σ̄ U Vᵀ from the SVD of Σ_t Δ_t."""
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_sizes(k: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common dimensions c, dimensions per task p) with c + T·p = k, as the authors' code."""
    common = int(k * common_fraction)
    per_task = round((k - common) / tasks)
    if per_task * tasks > k:
        per_task = k // tasks
    return k - per_task * tasks, per_task


def specific_svd(deltas: torch.Tensor, u: torch.Tensor, common: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVDs of the task-specific parts Δ_t − U_c U_cᵀ Δ_t, U_c = ``u[:, :common]``, batched over tasks.

    When m ≤ n, U is square and orthogonal, so I − U_c U_cᵀ = U_r U_rᵀ with U_r = ``u[:, common:]``: each
    part is U_r B_t with B_t = U_rᵀ Δ_t of only k − c rows, and its SVD is (U_r P_t) S_t Q_tᵀ from
    B_t = P_t S_t Q_tᵀ, the same factors at a fraction of the cost of decomposing the m × n parts."""
    if u.shape[0] == u.shape[1]:
        remaining = u[:, common:]
        p, s, qh = torch.linalg.svd(remaining.T @ deltas, full_matrices=False)
        return remaining @ p, s, qh
    u_c = u[:, :common]
    return torch.linalg.svd(deltas - u_c @ (u_c.T @ deltas), full_matrices=False)


def iso_cts_matrix(deltas: torch.Tensor, common_fraction: float) -> torch.Tensor:
    """Iso-CTS of one layer: common plus task-specific subspaces, orthogonalized, isotropic spectrum."""
    tasks, m, n = deltas.shape
    common, per_task = iso_cts_sizes(min(m, n), tasks, common_fraction)
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    u_t, s_t, vh_t = concat_components(*specific_svd(deltas, u, common), per_task)
    u_all = orthogonalize(torch.cat([u_t, u_c], dim=1))
    vh_all = orthogonalize(torch.cat([vh_t, vh_c], dim=0))
    return torch.cat([s_t, s_c]).mean() * (u_all @ vh_all)


@register(
    "tsv",
    citation="Gargiulo et al., CVPR 2025 (Task Singular Vectors: Reducing Task Interference in Model Merging)",
    lam=lam_grid(1.0, TSV_LAMBDAS),
)
def tsv(task_vectors: TaskVectors, *, conv: ConvRule = "reshape") -> torch.Tensor:
    """TSV-Merge: per layer, each task's top 1/T singular components, decorrelated bases, summed."""
    return merge_per_layer(task_vectors, tsv_matrix, conv)


@register(
    "iso_c",
    citation="Marczak et al., ICML 2025 (No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces)",
    lam=lam_grid(1.0, ISO_LAMBDAS),
)
def iso_c(task_vectors: TaskVectors, *, conv: ConvRule = "reshape") -> torch.Tensor:
    """Iso-C: per layer, the summed task matrix with its singular values replaced by their mean."""
    return merge_per_layer(task_vectors, iso_c_matrix, conv)


@register(
    "iso_cts",
    citation="Marczak et al., ICML 2025 (No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces)",
    lam=lam_grid(1.0, ISO_LAMBDAS),
)
def iso_cts(
    task_vectors: TaskVectors,
    *,
    # 0.8 in the paper and the authors' README for every setting.
    common_fraction: Annotated[float, HParam("fraction f of each layer's rank given to the common subspace", low=0.0, high=1.0)] = 0.8,
    conv: ConvRule = "reshape",
) -> torch.Tensor:
    """Iso-CTS: common subspace of the sum plus task-specific subspaces, isotropic spectrum."""
    return merge_per_layer(task_vectors, lambda deltas: iso_cts_matrix(deltas, common_fraction), conv)

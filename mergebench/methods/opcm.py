"""OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", arXiv:2501.09522): continual merging by orthogonal projection.

The models arrive one at a time, τ_1, τ_2, …, and only the current merged task vector is kept. The
first model is taken as it is (τ_m^(1) = τ_1, λ_1 = 1). When τ_t arrives (t ≥ 2):

1. **Projection** (every weight matrix separately). With the SVD of the current merged update of the
   layer, M = τ_m^(t−1) = U Σ Vᵀ (σ_1 ≥ σ_2 ≥ …, k = min(m, n)), write the new update in that basis,
   P = Uᵀ τ_t V, and delete (a) its diagonal, P_ii = 0 — the component of τ_t along each rank-one
   direction u_i v_iᵀ of M — and (b) the whole top-left r × r block, P_ij = 0 for i, j ≤ r, where the
   split rank r is the number of leading singular values whose cumulative share stays within α:

       r = #{ i : (σ_1 + … + σ_i) / Σ_j σ_j ≤ α }.

   The projected update is τ̃_t = U P Vᵀ. Parameters that are not matrices (biases, norm scales) are
   not projected: τ̃_t = τ_t there.
2. **Accumulation and adaptive scaling.** With S_(t−1) = λ_(t−1) τ_m^(t−1) the running unscaled sum,
   S_t = S_(t−1) + τ̃_t, and the merged update is rescaled to the mean norm of the task vectors seen,

       λ_t = ‖S_t‖ / n̄_t,   τ_m^(t) = S_t / λ_t,   n̄_t = (1/t) Σ_(i≤t) ‖τ_i‖,

   (norms over all mergeable parameters at once), so ‖τ_m^(t)‖ = n̄_t at every step: the merged model
   stays at the typical distance of a fine-tuned model from θ₀ however many models were merged.

The merged model after the last arrival is θ = θ₀ + τ_m^(T); OPCM has no extra scaling coefficient.
:class:`OPCMStream` is the continual API: it holds τ_m (one ``[N]`` vector) and three numbers
(λ_t, Σ‖τ_i‖ and t), whatever the number of models merged; the SVD bases are recomputed from τ_m at
each arrival, one layer at a time.

Choices, from the authors' code (FusionBench ``fusion_bench/method/opcm/opcm.py``, ``OPCMForCLIP``
and ``OPCM``; ``config/method/opcm/opcm.yaml``):

* α = 0.5 is their default (``alpha: 0.5``); the validation grid {0.3, 0.5, 0.7} spans the range
  FusionBench's documentation calls typical (0.3–0.7).
* The split rank is their ``(s.cumsum(0) / s.sum() > alpha).float().argmax()``, the 0-based index of
  the first singular value whose cumulative share exceeds α: that singular value is *not* in the
  removed block (their documentation writes r as the 1-based index of the same value, one more).
* The order of arrival: FusionBench shuffles the models (``shuffle_order: true``, Python's ``random``,
  seeded when ``seed`` is set). Here ``order="given"`` (default) merges in the suite's task order and
  ``order="shuffled"`` in a permutation drawn from the run's seed (a different permutation from
  FusionBench's for the same seed).
* Which parameters are matrices: the authors project ``nn.Linear`` weights and add every other
  parameter unprojected (for the CLIP ViTs: biases, LayerNorms, embeddings and the patch-embedding
  convolution). A convolutional network has almost no ``nn.Linear`` weights, so by default
  (``conv="reshape"``) a kernel ``[out, in, kh, kw]`` is projected as the ``[out, in·kh·kw]`` matrix
  its convolution applies, as the spectral methods here do; ``conv="plain"`` projects only 2-D
  parameters. 0-D and 1-D parameters are always added unprojected.
* Degenerate layers: the authors zero the diagonal of P for all k singular directions, including
  those with σ_i = 0, whose vectors the SVD picks arbitrarily; here only the directions with σ_i > 0
  (numerically: σ_i > max(m, n)·ε·σ_1) are removed, and a layer whose merged update is zero is not
  projected at all. This is identical whenever M has full rank, as the merged updates of fine-tuned
  layers do; it keeps an update that is orthogonal to M on both sides unchanged instead of deleting
  an arbitrary part of it.
* If every task vector seen so far is zero, n̄_t = 0 and the merged update stays zero (the authors'
  division would give NaN).
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.methods.registry import HParam, register
from mergebench.methods.spectral import matrix_shape

OPCM_ALPHA = 0.5  # FusionBench config/method/opcm/opcm.yaml
OPCM_ALPHAS = (0.3, 0.5, 0.7)  # FusionBench docs/algorithms/opcm.md: "typical values: 0.3-0.7"
ORDERS = ("given", "shuffled")
CONV_RULES = ("reshape", "plain")


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """r: the number of leading singular values whose cumulative share of Σσ does not exceed α."""
    total = singular_values.sum()
    if total <= 0:
        return 0
    exceeds = singular_values.cumsum(dim=0) / total > alpha
    return int(exceeds.to(torch.int8).argmax()) if bool(exceeds.any()) else 0


def project_update(merged: torch.Tensor, update: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ̃ = U P Vᵀ with P = Uᵀ τ V stripped of its diagonal and its top-left r×r block (M = U Σ Vᵀ)."""
    if not bool(merged.any()):
        return update.clone()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    coefficients = u.T @ update @ vh.T  # [k, k]: the part of P that the SVD of M determines
    removed = torch.zeros_like(coefficients)
    rank = int((s > max(merged.shape) * torch.finfo(s.dtype).eps * s[0]).sum())
    diagonal = torch.arange(rank, device=s.device)
    removed[diagonal, diagonal] = coefficients[diagonal, diagonal]
    r = split_rank(s, alpha)
    removed[:r, :r] = coefficients[:r, :r]
    return update - u @ removed @ vh


class OPCMStream:
    """Continual OPCM: :meth:`add` one task vector at a time; :attr:`merged` is τ_m after the latest.

    The state is the merged task vector ``[N]`` and three numbers (λ_t, Σ‖τ_i‖, t): its size does not
    depend on how many models have been merged.
    """

    def __init__(self, layout: ParamLayout, *, alpha: float = OPCM_ALPHA, conv: str = "reshape"):
        if conv not in CONV_RULES:
            raise ValueError(f"conv must be one of {', '.join(CONV_RULES)}, not {conv!r}")
        self.layout = layout
        self.alpha = alpha
        self.conv = conv
        self.merged: torch.Tensor | None = None
        self.scale = 1.0  # λ_t: the merged update is S_t / λ_t
        self.norm_total = 0.0  # Σ_i ‖τ_i‖
        self.count = 0  # t, models merged so far

    @property
    def mean_norm(self) -> float:
        """n̄_t, the mean norm of the task vectors merged so far."""
        return self.norm_total / self.count if self.count else 0.0

    def add(self, task_vector: torch.Tensor) -> torch.Tensor:
        """Merge one more task vector ``[N]``; returns the new τ_m."""
        self.norm_total += float(torch.linalg.vector_norm(task_vector))
        self.count += 1
        if self.merged is None:
            self.merged = task_vector.clone()
            return self.merged
        total = self.merged * self.scale  # S_(t−1)
        for slot in self.layout.slots:
            previous = self.merged[slot.start : slot.stop]
            update = task_vector[slot.start : slot.stop]
            shape = matrix_shape(slot.shape, self.conv)
            if shape is not None:
                update = project_update(previous.reshape(shape), update.reshape(shape), self.alpha).reshape(-1)
            total[slot.start : slot.stop] += update
        norm = float(torch.linalg.vector_norm(total))
        if norm > 0 and self.mean_norm > 0:
            self.scale = norm / self.mean_norm
            total /= self.scale
        else:
            self.scale = 1.0
        self.merged = total
        return self.merged


@register(
    "opcm",
    citation="Tang et al., 2025 (Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging)",
)
def opcm(
    task_vectors: TaskVectors,
    *,
    alpha: Annotated[float, HParam(
        "share α of the merged update's singular values whose block is projected out (authors: 0.5)", OPCM_ALPHAS,
        low=0.0, high=1.0, high_inclusive=False,
    )] = OPCM_ALPHA,
    conv: Annotated[str, HParam(
        "conv kernels projected as [out, in·kh·kw] matrices (reshape) or added unprojected like the authors' non-Linear parameters (plain)",
        choices=CONV_RULES,
    )] = "reshape",
    order: Annotated[str, HParam("order of arrival: the suite's task order, or a permutation drawn from the run's seed", choices=ORDERS)] = "given",
    seed: int,
) -> torch.Tensor:
    """Continual merging: each arriving task vector projected off the merged update's dominant SVD directions."""
    rows = range(task_vectors.num_tasks)
    if order == "shuffled":
        rows = torch.randperm(task_vectors.num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
    stream = OPCMStream(task_vectors.layout, alpha=alpha, conv=conv)
    for row in rows:
        stream.add(task_vectors.vectors[row])
    return stream.merged

"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging").

Each entry of each task vector gets a balancing score from its competition within its own task
(intra) and with the other tasks (inter); the lowest scores are dropped and the task vectors are
averaged with the remaining scores as weights. In the paper's notation, with Norm the min–max
normalization over a task's d entries and T tasks,

    β_intra,i = Softmax(T · Norm(τ_i ⊙ τ_i)),      β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j)),
    β_i = β_intra,i ⊙ β_inter,i,      β̂_i = m_i ⊙ β_i with m_i keeping the top r of β_i,
    τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i,      θ = θ₀ + λ·τ_m.

The authors' code (github.com/duguodong7/pcb-merging) computes it as follows, and so does this module:

1. Clip each task's magnitudes to their own quantiles, |τ̃_i| = clamp(|τ_i|, s[⌊c·d⌋], s[⌊(1−c)·d⌋ − 1])
   with s the sorted magnitudes, τ̃_i = sgn(τ_i)|τ̃_i|; the clipped τ̃_i are what gets merged.
2. Intra: exp(T · Norm(|τ̃_i|)²) (the softmax numerator; its denominator is a per-task constant that
   step 4's normalization removes).
3. Inter: tanh(τ_i · Σ_j u_j), the softmax replaced by tanh on the unclipped τ_i (their
   ``act``), with u_j = τ_j (``variant="reference"``, ``pcb-merging.py``, c = 0.0001) or
   u_j = sgn(τ_j)·Norm(|τ̃_j|) (``variant="vision"``, ``vision_source_code/pcb.py``, c = 0.01, the
   script of the paper's ViT experiments).
4. Drop and weight: with t_i = s_i[⌊(1 − r)·d⌋] the score threshold, the weight is
   Norm(max(β_i, t_i)) = (max(β_i, t_i) − t_i)/(max β_i − t_i): the top fraction r of scores survive,
   weighted by how far they exceed the threshold (the threshold entry itself gets 0).
5. τ_m = Σ_i w_i τ̃_i / max(Σ_i w_i, 10⁻¹²), entries no task keeps are 0.

Everything is taken over the whole flattened task vector (all parameters at once), as the authors
flatten the model. Where a min–max range is zero (a constant or all-zero task vector) the authors'
code divides 0/0; here Norm gives 0 there. r ∈ (0, 1] is the fraction of entries *kept*.
Defaults: r = 0.05 and λ = 1.2 from ``vision_source_code/pcb.py``; the r grid {0.05, 0.1, 0.2} is
the authors' ``run_merging.sh``, λ within their evolutionary-search bounds [0.8, 1.3] and slightly beyond.
"""

from __future__ import annotations

from typing import Annotated

import torch

from mergebench.core import kernels
from mergebench.core.kernels import task_sum
from mergebench.core.selection import column_chunks
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, lam_grid, register

CLIP_RATIOS = {"reference": 0.0001, "vision": 0.01}


def within(rank: int, d: int) -> int:
    """A rank kept inside 0..d−1 (the authors index sorted arrays with it)."""
    return min(max(rank, 0), d - 1)


def min_max(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(rows − low) / (high − low), and 0 where high = low."""
    span = high - low
    return torch.where(span > 0, (rows - low) / torch.where(span > 0, span, 1.0), 0.0)


def normalized_clipped(magnitudes: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|τ̃| = clamp(|τ|, low, high), Norm(|τ̃|)) of a block, with the task's clip bounds, which are also
    the minimum and maximum of the clamped magnitudes (both are entries of the task vector)."""
    clipped = torch.clamp(magnitudes, low, high)
    return clipped, min_max(clipped, low, high)


def balancing_scores(vectors: torch.Tensor, partners: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """β_t = exp(T · Norm(|τ̃_t|)²) ⊙ tanh(τ_t ⊙ Σ_j u_j) of every task, ``[T, n]`` (steps 2–3)."""
    scores = torch.empty_like(vectors)
    if kernels.available(vectors, partners):
        kernels.pcb_scores(vectors, partners, low, high, scores)
        return scores
    num_tasks = vectors.shape[0]
    for task, row in enumerate(vectors):
        for columns in column_chunks(0, vectors.shape[1], 1):
            values = row[columns]
            intra = torch.exp(num_tasks * normalized_clipped(values.abs(), low[task], high[task])[1] ** 2)
            torch.mul(intra, torch.tanh(values * partners[columns]), out=scores[task, columns])
    return scores


def pcb_merge(task_vectors: TaskVectors, variant: str, ratio: float) -> torch.Tensor:
    """τ_m = Σ_i w_i τ̃_i / max(Σ_i w_i, 10⁻¹²), holding one ``[T, N]`` temporary at a time.

    Quantiles, minima and maxima are taken over each task's whole task vector
    (:meth:`~mergebench.core.task_vectors.TaskVectors.order_statistics`), also when ``task_vectors``
    holds one tensor of a streamed merge. Passes: the clip bounds of every task (over |τ|); the partner
    sum Σ_j u_j (column chunks); every task's scores, row by row; their thresholds and maxima; each
    task's weighted contribution, row by row. When the whole task vectors are held (not one tensor of a
    streamed merge) and r ≤ 1/4, the CPU kernels compute exact scores only for the entries whose
    estimated score could reach the threshold (:func:`~mergebench.core.kernels.pcb_candidate_merge`,
    which holds at most r·T·N weighted entries, 16 bytes each, in place of the ``[T, N]`` scores); the
    result is the same bit for bit."""
    vectors = task_vectors.vectors
    num_tasks, held, d = vectors.shape[0], vectors.shape[1], task_vectors.entries
    clip = CLIP_RATIOS[variant]
    low, high = task_vectors.order_statistics(vectors, [within(int(d * clip), d), within(int(d * (1 - clip)) - 1, d)], magnitude=True)
    if variant == "reference":
        partners = vectors.sum(dim=0)
    elif kernels.available(vectors):
        partners = kernels.pcb_partners(vectors, low, high)
    else:
        partners = torch.empty_like(vectors[0])
        for columns in column_chunks(0, held, num_tasks):
            block = vectors[:, columns]
            partners[columns] = task_sum(torch.sign(block) * normalized_clipped(block.abs(), low, high)[1])
    kept = d - within(int(d * (1 - ratio)), d)
    if held == d and kept <= d // 4 and kernels.available(vectors, partners) and num_tasks <= kernels.PCB_MAX_TASKS:
        return kernels.pcb_candidate_merge(vectors, partners, low, high, kept)
    scores = balancing_scores(vectors, partners, low, high)
    threshold, top = task_vectors.order_statistics(scores, [d - kept, d - 1])
    numerator, denominator = torch.zeros_like(partners), torch.zeros_like(partners)
    if kernels.available(vectors, scores):
        kernels.pcb_weighted_sum(vectors, scores, low, high, threshold, top, numerator, denominator)
        return numerator / denominator.clamp(min=1e-12)
    for task, row in enumerate(vectors):
        for columns in column_chunks(0, held, 1):
            values = row[columns]
            weights = min_max(torch.maximum(scores[task, columns], threshold[task]), threshold[task], top[task])
            clipped = torch.sign(values) * normalized_clipped(values.abs(), low[task], high[task])[0]
            numerator[columns] += clipped * weights
            denominator[columns] += weights
    return numerator / denominator.clamp(min=1e-12)


@register(
    "pcb",
    citation="Du et al., 2024 (PCB-Merging)",
    lam=lam_grid(1.2, (0.8, 1.0, 1.2, 1.4)),
    entrywise=True,
)
def pcb(
    task_vectors: TaskVectors,
    *,
    ratio: Annotated[float, HParam("fraction r of each task's entries kept by balancing score", (0.05, 0.1, 0.2), low=0.0, high=1.0)] = 0.05,
    variant: Annotated[str, HParam("the authors' vision script or their reference pcb-merging.py", choices=tuple(CLIP_RATIOS))] = "vision",
) -> torch.Tensor:
    """Score entries by intra- and inter-task competition, drop low scores, score-weighted mean."""
    return pcb_merge(task_vectors, variant, ratio)

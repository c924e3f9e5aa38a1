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

from mergebench.core.selection import column_chunks, kth_smallest
from mergebench.core.task_vectors import TaskVectors
from mergebench.methods.registry import HParam, lam_grid, register

CLIP_RATIOS = {"reference": 0.0001, "vision": 0.01}


def sorted_value(row: torch.Tensor, index: int) -> torch.Tensor:
    """``sort(row)[index]`` of a 1-D tensor, with ``index`` kept inside the row (a radix select, no sort)."""
    index = min(max(index, 0), row.numel() - 1)
    return kth_smallest(row, index + 1, signed=True)


def min_max(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(x − low)/(high − low) per row, 0 where the range is zero."""
    span = high - low
    return torch.where(span > 0, (rows - low) / torch.where(span > 0, span, 1.0), 0.0)


def clip_range(magnitudes: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ⌊c·d⌋-th and (⌊(1−c)·d⌋ − 1)-th smallest magnitude of one task: the clamp bounds of |τ|,
    which are also the min and max of the clamped magnitudes (both are entries of the row)."""
    d = magnitudes.numel()
    return sorted_value(magnitudes, int(d * ratio)), sorted_value(magnitudes, int(d * (1 - ratio)) - 1)


def normalized_clipped(magnitudes: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|τ̃| = clamp(|τ|, low, high), Norm(|τ̃|)) of a block, with the task's bounds."""
    clipped = torch.clamp(magnitudes, low, high)
    return clipped, min_max(clipped, low, high)


def pcb_merge(vectors: torch.Tensor, variant: str, ratio: float) -> torch.Tensor:
    """τ_m = Σ_i w_i τ̃_i / max(Σ_i w_i, 10⁻¹²), task by task, holding ``[N]`` rows, never ``[T, N]``.

    Passes: the clip bounds of each task (radix selects); the partner sum Σ_j u_j (column chunks);
    each task's scores (one ``[N]`` row), its score threshold (a radix select) and its weighted
    contribution."""
    num_tasks, d = vectors.shape
    ratio_clip = CLIP_RATIOS[variant]
    bounds = [clip_range(row.abs(), ratio_clip) for row in vectors]
    low = torch.stack([b[0] for b in bounds]).reshape(-1, 1)
    high = torch.stack([b[1] for b in bounds]).reshape(-1, 1)
    if variant == "reference":
        partners = vectors.sum(dim=0)
    else:
        partners = torch.empty_like(vectors[0])
        for columns in column_chunks(0, d, num_tasks):
            block = vectors[:, columns]
            partners[columns] = (torch.sign(block) * normalized_clipped(block.abs(), low, high)[1]).sum(dim=0)
    numerator, denominator = torch.zeros_like(partners), torch.zeros_like(partners)
    scores = torch.empty_like(partners)
    for task, row in enumerate(vectors):
        for columns in column_chunks(0, d, 1):
            values = row[columns]
            normalized = normalized_clipped(values.abs(), low[task], high[task])[1]
            intra = torch.exp(num_tasks * normalized**2)
            torch.mul(intra, torch.tanh(values * partners[columns]), out=scores[columns])
        threshold = sorted_value(scores, int(d * (1 - ratio)))
        top = scores.amax()
        for columns in column_chunks(0, d, 1):
            values = row[columns]
            weights = min_max(torch.maximum(scores[columns], threshold), threshold, top)
            clipped = torch.sign(values) * normalized_clipped(values.abs(), low[task], high[task])[0]
            numerator[columns] += clipped * weights
            denominator[columns] += weights
    return numerator / denominator.clamp(min=1e-12)


@register(
    "pcb",
    citation="Du et al., 2024 (PCB-Merging)",
    lam=lam_grid(1.2, (0.8, 1.0, 1.2, 1.4)),
)
def pcb(
    task_vectors: TaskVectors,
    *,
    ratio: Annotated[float, HParam("fraction r of each task's entries kept by balancing score", (0.05, 0.1, 0.2), low=0.0, high=1.0)] = 0.05,
    variant: Annotated[str, HParam("the authors' vision script or their reference pcb-merging.py", choices=tuple(CLIP_RATIOS))] = "vision",
) -> torch.Tensor:
    """Score entries by intra- and inter-task competition, drop low scores, score-weighted mean."""
    return pcb_merge(task_vectors.vectors, variant, ratio)

"""Seeded fine-tuning of a backbone and a per-task linear head, trained jointly.

The head starts at zero and learns with its own, larger learning rate while the backbone moves with
a small one (AdamW, cosine schedule), so the expert's knowledge sits in the backbone as in the CLIP
fine-tuning protocol of the task-vector papers, and the pretrained backbone with the expert's head
stays clearly below the expert. BatchNorm layers stay in evaluation mode: running statistics keep their
pretrained values and only weights move, so the task vector holds everything fine-tuning changed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mergebench.core.recipe import Recipe


def finetune(
    backbone: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    recipe: Recipe,
    on_step: Callable[[float], None] = lambda loss: None,
) -> nn.Linear:
    """Fine-tune ``backbone`` in place on one task; returns the trained head."""
    torch.manual_seed(recipe.seed)
    device = next(backbone.parameters()).device
    backbone.eval()  # BatchNorm statistics frozen; gradients still flow to all weights
    with torch.no_grad():
        feature_dim = backbone(inputs[:1].to(device)).shape[1]
    head = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    groups = [{"params": backbone.parameters(), "lr": recipe.lr}, {"params": head.parameters(), "lr": recipe.head_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.steps):
        batch = torch.randint(len(inputs), (recipe.batch_size,), generator=generator)
        loss = F.cross_entropy(head(backbone(inputs[batch].to(device))), labels[batch].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        on_step(loss.item())
    return head

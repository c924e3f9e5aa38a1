"""Seeded fine-tuning of a backbone and a per-task linear head (LP-FT).

First a linear probe fits the head on frozen pretrained features (Kumar et al., 2022, "Fine-Tuning
can Distort Pretrained Features"), then backbone and head are trained jointly with AdamW. BatchNorm
layers stay in evaluation mode, so running statistics keep their pretrained values and only weights
move: the task vector then holds everything fine-tuning changed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mergebench.core.recipe import Recipe


@torch.no_grad()
def extract_features(backbone: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, recipe: Recipe) -> nn.Linear:
    """Full-batch multinomial logistic regression on frozen features."""
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=recipe.probe_lr)
    for _ in range(recipe.probe_steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


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
    head = linear_probe(extract_features(backbone, inputs), labels, num_classes, recipe)
    backbone.eval()  # BatchNorm statistics frozen; gradients still flow to all weights
    parameters = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.steps):
        batch = torch.randint(len(inputs), (recipe.batch_size,), generator=generator)
        loss = F.cross_entropy(head(backbone(inputs[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        on_step(loss.item())
    return head

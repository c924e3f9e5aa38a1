"""Accuracy (or the raw outputs) of a backbone with a task's head, and BatchNorm re-estimation for merged models."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
from torch import nn


def _autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def correct_examples(backbone: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per example (bool ``[N]``, on the CPU), whether the arg-max prediction equals the label."""
    backbone.eval()
    device = next(backbone.parameters()).device
    correct = torch.empty(len(inputs), dtype=torch.bool, device=device)
    with _autocast(device):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device, non_blocking=True)
            logits = head(backbone(batch))
            correct[start : start + len(batch)] = logits.argmax(dim=1) == labels[start : start + batch_size].to(device)
    return correct.cpu()


@torch.inference_mode()
def head_outputs(backbone: nn.Module, head: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The head's outputs ``[N, outputs]`` on every input, in float32 on the CPU (for metrics other than accuracy)."""
    backbone.eval()
    device = next(backbone.parameters()).device
    outputs = []
    with _autocast(device):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device, non_blocking=True)
            outputs.append(head(backbone(batch)).float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics as a cumulative average over ``batches``."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved_momentum = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    device = next(backbone.parameters()).device
    backbone.train()
    for batch in batches:
        backbone(batch.to(device))
    backbone.eval()
    for m, momentum in zip(norms, saved_momentum):
        m.momentum = momentum

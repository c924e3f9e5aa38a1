"""Small classifiers trained from random initializations: the models that alignment methods merge.

Three architectures, each with a width multiplier (the scale axis of the model re-basin papers: wider
networks are easier to align):

* ``mlp``: ``layers.{i}`` Linear + ReLU, then ``head`` (fast tests);
* ``vgg``: VGG-style 3×3 convolutions without normalization (as in Git Re-Basin and REPAIR), ReLU,
  max-pooling between stages, global average pooling, linear ``head``;
* ``resnet20``: the CIFAR ResNet-20 of He et al. (2016): a 3×3 stem and three stages of three basic
  blocks with BatchNorm, 16/32/64 channels times the width, a 1×1 projection where a stage starts.

Every model ends in one linear ``head`` over all classes of the suite: a model trained on a subset of
the classes sees only those labels, so merged models keep one output layer (the joint-accuracy setting
of ZipIt! and CCA Merge). The parameter names are what :mod:`mergebench.alignment.spec` reads.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

ARCHITECTURES = ("mlp", "vgg", "resnet20")
VGG_STAGES = ((16,), (32,), (64, 64))
"""Channels of each VGG stage at width 1; a 2×2 max-pool follows every stage."""
RESNET_CHANNELS = (16, 32, 64)
RESNET_BLOCKS = 3
MLP_HIDDEN = (64, 64)


class MLP(nn.Module):
    def __init__(self, inputs: int, classes: int, width: int = 1):
        super().__init__()
        sizes = (inputs, *(h * width for h in MLP_HIDDEN))
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in self.layers)
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.head(x)


class ConvBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        return F.max_pool2d(x, 2) if self.pool else x


class VGG(nn.Module):
    def __init__(self, channels: int, classes: int, width: int = 1):
        super().__init__()
        blocks, inputs = [], channels
        for stage in VGG_STAGES:
            for position, outputs in enumerate(stage):
                blocks.append(ConvBlock(inputs, outputs * width, pool=position == len(stage) - 1))
                inputs = outputs * width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.projects = stride != 1 or inputs != outputs
        if self.projects:
            self.skip_conv = nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False)
            self.skip_bn = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        skip = self.skip_bn(self.skip_conv(x)) if self.projects else x
        return F.relu(out + skip)


class Stem(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResNet20(nn.Module):
    def __init__(self, channels: int, classes: int, width: int = 1):
        super().__init__()
        widths = [c * width for c in RESNET_CHANNELS]
        self.stem = Stem(channels, widths[0])
        stages, inputs = [], widths[0]
        for index, outputs in enumerate(widths):
            blocks = [BasicBlock(inputs if b == 0 else outputs, outputs, 2 if index and b == 0 else 1) for b in range(RESNET_BLOCKS)]
            stages.append(nn.Sequential(*blocks))
            inputs = outputs
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


def build_model(architecture: str, width: int, classes: int, *, channels: int = 3, image_size: int = 28) -> nn.Module:
    """A freshly initialized classifier (the caller seeds torch's generator)."""
    if architecture == "mlp":
        return MLP(channels * image_size * image_size, classes, width)
    if architecture == "vgg":
        return VGG(channels, classes, width)
    if architecture == "resnet20":
        return ResNet20(channels, classes, width)
    raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def train_from_scratch(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
    weight_decay: float, seed: int, on_step: Callable[[float], None] = lambda loss: None,
) -> nn.Module:
    """Train ``model`` in place: AdamW, one-cycle schedule, batches drawn by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.25)
    device = next(model.parameters()).device
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(inputs[batch].to(device)), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        on_step(loss.item())
    return model.eval()

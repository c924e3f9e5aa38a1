"""Activation statistics of several models on the same inputs, per unit group.

The activation-based methods compare what units compute: every model sees the same batches, the outputs
of the modules that carry a group (:attr:`PermutationSpec.features`) are read with forward hooks, each
spatial position of a convolutional feature map counting as one sample, and the features of all T models
are concatenated (model 0's units first) into first and second moments ``[Σ n_t]`` and ``[Σ n_t, Σ n_t]``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from mergebench.alignment.spec import PermutationSpec
from mergebench.evaluation.classification import recalibrate_batchnorm


@dataclass
class Moments:
    """First and second moments of the concatenated units of every model, and each model's unit count."""

    sizes: list[int]
    count: int = 0
    total: torch.Tensor | None = None
    products: torch.Tensor | None = None

    def add(self, samples: torch.Tensor) -> None:
        samples = samples.double()
        self.count += samples.shape[0]
        total, products = samples.sum(dim=0), samples.T @ samples
        self.total = total if self.total is None else self.total + total
        self.products = products if self.products is None else self.products + products

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        return self.products / self.count

    @property
    def covariance(self) -> torch.Tensor:
        return self.second_moment - torch.outer(self.mean, self.mean)

    def correlation(self, epsilon: float = 1e-8) -> torch.Tensor:
        std = self.covariance.diagonal().clamp(min=0).sqrt() + epsilon
        return self.covariance / torch.outer(std, std)

    def block(self, matrix: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The ``[n_a, n_b]`` block of model a's units against model b's."""
        starts = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return matrix[starts[a] : starts[a + 1], starts[b] : starts[b + 1]]


def channels_last(output: torch.Tensor) -> torch.Tensor:
    """``[samples, units]`` from a module output with units on dimension 1."""
    return output.movedim(1, -1).reshape(-1, output.shape[1])


@contextmanager
def recording(model: nn.Module, modules: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, each forward pass appends the output of every named module, as ``[samples, units]``."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    named = dict(model.named_modules())
    handles = [
        named[name].register_forward_hook(lambda module, args, output, name=name: outputs[name].append(channels_last(output.detach())))
        for name in outputs
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def feature_moments(spec: PermutationSpec, models: Sequence[nn.Module], batches: Iterable[torch.Tensor]) -> dict[str, Moments]:
    """Per group, the moments of every model's units (concatenated in model order) over ``batches``."""
    modules = [name for group in spec.groups for name in spec.features[group]]
    moments: dict[str, Moments] = {}
    for batch in batches:
        per_model = []
        for model in models:
            with recording(model, modules) as outputs:
                model.eval()(batch)
            per_model.append(outputs)
        for group in spec.groups:
            for name in spec.features[group]:
                samples = torch.cat([outputs[name][0] for outputs in per_model], dim=1)
                if group not in moments:
                    moments[group] = Moments([outputs[name][0].shape[1] for outputs in per_model])
                moments[group].add(samples)
    return moments


def calibrated(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``batches`` (RESET), in eval mode."""
    copied = copy.deepcopy(model)
    reset_statistics(copied, batches)
    return copied.eval()


def reset_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate ``model``'s BatchNorm statistics on ``batches`` in place (no-op without BatchNorm)."""
    with torch.no_grad():
        recalibrate_batchnorm(model, batches)

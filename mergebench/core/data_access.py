"""What a data-using merging method may see: the access it declared, and nothing more.

Data access is part of the protocol, because it is where benchmarks cheat without saying so:

* ``none`` — data-free; the method sees only the checkpoints.
* ``unlabeled-test`` — test-time adaptation (AdaMerging, WEMoE): test inputs of every task, no labels.
* ``train-samples`` — N training examples per task with their labels (Fisher, RegMean); N is declared
  by the method (its paper's default) and may be changed per run.
* ``validation`` — only for choosing hyperparameters, which the runner does for every method; no
  method function ever receives validation data.

The runner hands a method a :class:`ModelAccess` bound to its declared access. Statistics the method
gathers (Fisher diagonals, Gram matrices) go through :meth:`ModelAccess.cached`, keyed by content
(the checkpoints' hashes, the data slice, the statistic's name and options), so a hyperparameter
sweep computes them once.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Protocol

import torch
from torch import nn

DATA_ACCESS = ("none", "unlabeled-test", "train-samples")


class ModelAccess(Protocol):
    """The model and the data slice granted to one method, on the run's device."""

    access: str
    examples_per_task: int
    device: torch.device
    tasks: tuple[str, ...]

    def backbone(self, flat_weights: torch.Tensor) -> nn.Module:
        """The backbone with its mergeable parameters set from ``flat_weights`` (eval mode)."""

    def head(self, task: str) -> nn.Module:
        """Task ``task``'s own classification head (frozen)."""

    def functional_features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Backbone features with mergeable parameters replaced by ``params`` (differentiable)."""

    def batches(self, task: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(inputs, labels)`` of the granted slice; labels are ``None`` for unlabeled access."""

    def cached(self, name: str, key: Mapping, compute: Callable[[], object]) -> object:
        """``compute()`` once per content key within a sweep."""

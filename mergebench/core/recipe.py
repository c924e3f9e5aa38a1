"""The seeded fine-tuning recipe that a suite declares for building its experts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning hyperparameters, read from the suite's YAML."""

    steps: int
    batch_size: int
    lr: float
    head_lr: float
    weight_decay: float = 0.0
    seed: int = 0

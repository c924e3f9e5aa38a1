"""Tiny task vectors built by hand, and a merge at a method's defaults, for the method tests."""

import torch

from mergebench.core.task_vectors import ParamLayout, TaskVectors
from mergebench.methods import get_method


def stack(rows, pretrained=None, shapes=None, names=None, dtype=torch.float32):
    """TaskVectors with one row per task; ``shapes``/``names`` split the columns into parameters."""
    vectors = torch.tensor(rows, dtype=dtype)
    n = vectors.shape[1]
    shapes = shapes or [(n,)]
    names = names or [f"p{i}" for i in range(len(shapes))]
    state = {name: torch.zeros(shape) for name, shape in zip(names, shapes)}
    layout = ParamLayout.of(state, names)
    theta0 = torch.zeros(n, dtype=dtype) if pretrained is None else torch.tensor(pretrained, dtype=dtype)
    return TaskVectors(theta0, vectors, layout, tuple(f"t{i}" for i in range(len(rows))))


def merge(name, task_vectors, seed=0, model=None, **setting):
    """Merged weights of method ``name`` at its defaults, overridden by ``setting``."""
    method = get_method(name)
    return method.merge(task_vectors, method.defaults() | setting, seed=seed, model=model)

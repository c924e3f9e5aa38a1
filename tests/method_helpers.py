"""Tiny task vectors built by hand, a merge at a method's defaults, and a fake data access, for the method tests."""

import torch
from torch.func import functional_call

from mergebench.core.task_vectors import ParamLayout, TaskVectors, build_task_vectors, merged_state_dict
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


class FakeAccess:
    """ModelAccess around a small backbone, one frozen head and a few examples per task."""

    def __init__(self, backbone, heads, data, access="train-samples"):
        self.net, self.heads, self.data, self.access = backbone, heads, data, access
        self.pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
        self.layout = None
        self.examples_per_task = len(next(iter(data.values()))[0])
        self.device = torch.device("cpu")
        self.tasks = tuple(data)
        self.store, self.computed = {}, []

    def backbone(self, flat):
        self.net.load_state_dict(merged_state_dict(self.pretrained, self.layout, flat))
        return self.net.eval()

    def head(self, task):
        return self.heads[task]

    def functional_features(self, params, inputs):
        return functional_call(self.net.eval(), dict(params), (inputs,), strict=False)

    def batches(self, task, batch_size):
        inputs, labels = self.data[task]
        for start in range(0, len(inputs), batch_size):
            stop = start + batch_size
            yield inputs[start:stop], None if self.access == "unlabeled-test" else labels[start:stop]

    def cached(self, name, key, compute):
        full = (name, tuple(sorted(key.items())))
        if full not in self.store:
            self.computed.append(full)
            self.store[full] = compute()
        return self.store[full]


def setup(backbone, finetuned_states, heads, data, access="train-samples"):
    """Task vectors of ``finetuned_states`` over ``backbone``'s state and a FakeAccess bound to them."""
    model = FakeAccess(backbone, heads, data, access)
    tv = build_task_vectors(model.pretrained, dict(zip(data, finetuned_states)))
    model.layout = tv.layout
    return tv, model

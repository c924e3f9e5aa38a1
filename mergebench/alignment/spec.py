"""Permutation specs: which axes of which weights index the same units, per architecture, as data.

As in Git Re-Basin's code (``permutation_spec_from_axes_to_perm``), a spec maps every tensor of a
state dict to one entry per axis: the name of the unit group that axis is indexed by, or ``None``.
Permuting group ``g`` by π permutes every axis labelled ``g`` by π, and leaves the network's function
unchanged. Axis 0 of a tensor carries the units it *produces* (a layer's output channels, a bias, a
BatchNorm's scale); the other labelled axes carry the units it *consumes* (a layer's input channels).

A spec also says where each group's units can be observed (``features``: modules whose outputs carry
the group on dimension 1, post-activation, for the activation-based methods) and which modules'
outputs REPAIR renormalizes (``renormalized``, in forward order).

Specs are read from a model's tensor names (:func:`spec_for`): each architecture of
:mod:`mergebench.models.scratch` is one builder here, so adding an architecture is one function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from mergebench.errors import MergebenchError

Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class PermutationSpec:
    axes: Mapping[str, Axes]
    """Tensor name → unit group of each axis (``None``: not permuted)."""
    features: Mapping[str, tuple[str, ...]]
    """Group → modules whose outputs carry its units on dimension 1; the groups in forward order."""
    renormalized: tuple[str, ...]
    """Modules whose output channels REPAIR renormalizes, in forward order; each has ``weight`` and ``bias``."""

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.features)

    def members(self, group: str) -> list[tuple[str, int]]:
        """``(tensor, axis)`` of every axis labelled ``group``."""
        return [(name, axis) for name, labels in self.axes.items() for axis, label in enumerate(labels) if label == group]

    def size(self, group: str, state: Mapping) -> int:
        """The number of units of ``group`` in ``state``."""
        name, axis = next((n, a) for n, a in self.members(group) if n in state)
        return state[name].shape[axis]


def _layer(names: set[str], prefix: str, produced: str, consumed: str | None, *, weight_dims: int, bias: bool = True,
           norm: bool = False) -> dict[str, Axes]:
    """Axes of one layer named ``prefix``: its weight (and bias, or BatchNorm tensors) produce ``produced``."""
    if norm:
        axes = {f"{prefix}.{t}": (produced,) for t in ("weight", "bias", "running_mean", "running_var")}
        axes[f"{prefix}.num_batches_tracked"] = ()
    else:
        axes = {f"{prefix}.weight": (produced, consumed) + (None,) * (weight_dims - 2)}
        if bias:
            axes[f"{prefix}.bias"] = (produced,)
    return {name: labels for name, labels in axes.items() if name in names}


def _indices(names: set[str], pattern: str) -> list[tuple[int, ...]]:
    found = {tuple(int(g) for g in match.groups()) for name in names if (match := re.fullmatch(pattern, name))}
    return sorted(found)


def _head(names: set[str], last: str) -> dict[str, Axes]:
    return {name: labels for name, labels in {"head.weight": (None, last), "head.bias": (None,)}.items() if name in names}


def mlp_spec(names: set[str]) -> PermutationSpec:
    """``layers.{i}`` Linear + ``acts.{i}`` ReLU, then ``head``: one group per hidden layer."""
    depth = len(_indices(names, r"layers\.(\d+)\.weight"))
    axes, features = {}, {}
    for i in range(depth):
        axes |= _layer(names, f"layers.{i}", f"hidden{i}", f"hidden{i - 1}" if i else None, weight_dims=2)
        features[f"hidden{i}"] = (f"acts.{i}",)
    axes |= _head(names, f"hidden{depth - 1}")
    return PermutationSpec(axes, features, tuple(f"layers.{i}" for i in range(depth)))


def vgg_spec(names: set[str]) -> PermutationSpec:
    """``blocks.{i}.conv`` 3×3 convolutions (``blocks.{i}.act`` ReLU), then ``head``: one group per convolution."""
    depth = len(_indices(names, r"blocks\.(\d+)\.conv\.weight"))
    axes, features = {}, {}
    for i in range(depth):
        axes |= _layer(names, f"blocks.{i}.conv", f"conv{i}", f"conv{i - 1}" if i else None, weight_dims=4)
        features[f"conv{i}"] = (f"blocks.{i}.act",)
    axes |= _head(names, f"conv{depth - 1}")
    return PermutationSpec(axes, features, tuple(f"blocks.{i}.conv" for i in range(depth)))


def resnet_spec(names: set[str]) -> PermutationSpec:
    """ResNet-20: one group per stage for the residual stream (stem, block outputs, projections), one per
    block for its inner channels (``conv1``/``bn1``)."""
    blocks = _indices(names, r"stages\.(\d+)\.(\d+)\.conv1\.weight")
    stages = sorted({s for s, _ in blocks})
    axes = _layer(names, "stem.conv", "stream0", None, weight_dims=4, bias=False) | _layer(names, "stem.bn", "stream0", None, weight_dims=1, norm=True)
    features: dict[str, tuple[str, ...]] = {}
    renormalized = ["stem.bn"]
    for s in stages:
        stream, before = f"stream{s}", f"stream{s - 1 if s else 0}"
        features[stream] = (("stem",) if s == 0 else ()) + tuple(f"stages.{s}.{b}" for t, b in blocks if t == s)
        for t, b in blocks:
            if t != s:
                continue
            block, inner, consumed = f"stages.{s}.{b}", f"inner{s}.{b}", before if b == 0 else stream
            axes |= _layer(names, f"{block}.conv1", inner, consumed, weight_dims=4, bias=False)
            axes |= _layer(names, f"{block}.bn1", inner, None, weight_dims=1, norm=True)
            axes |= _layer(names, f"{block}.conv2", stream, inner, weight_dims=4, bias=False)
            axes |= _layer(names, f"{block}.bn2", stream, None, weight_dims=1, norm=True)
            axes |= _layer(names, f"{block}.skip_conv", stream, consumed, weight_dims=4, bias=False)
            axes |= _layer(names, f"{block}.skip_bn", stream, None, weight_dims=1, norm=True)
            features[inner] = (f"{block}.relu1",)
            renormalized += [f"{block}.bn1", f"{block}.bn2"] + ([f"{block}.skip_bn"] if f"{block}.skip_bn.weight" in names else [])
    axes |= _head(names, f"stream{stages[-1]}")
    ordered = {group: features[group] for group in sorted(features, key=lambda g: min(_position(m) for m in features[g]))}
    return PermutationSpec(axes, ordered, tuple(renormalized))


def _position(module: str) -> tuple[int, ...]:
    """Forward order of a ResNet module: the stem first, then by stage and block, a block's inner units first."""
    if module == "stem":
        return (-1,)
    numbers = tuple(int(n) for n in re.findall(r"\d+", module))
    return numbers + ((0,) if module.endswith("relu1") else (1,))


ARCHITECTURE_SPECS: dict[str, tuple[str, Callable[[set[str]], PermutationSpec]]] = {
    "mlp": ("layers.0.weight", mlp_spec),
    "vgg": ("blocks.0.conv.weight", vgg_spec),
    "resnet20": ("stem.conv.weight", resnet_spec),
}
"""Architecture → (a tensor name only it has, the builder of its spec)."""


def spec_for(names: Iterable[str]) -> PermutationSpec:
    """The permutation spec of the model whose tensors are ``names``."""
    names = set(names)
    for marker, build in ARCHITECTURE_SPECS.values():
        if marker in names:
            return build(names)
    raise MergebenchError(
        f"no permutation spec for a model with tensors {', '.join(sorted(names)[:3])}…: alignment methods merge the "
        f"architectures {', '.join(ARCHITECTURE_SPECS)} (mergebench.alignment.spec)"
    )

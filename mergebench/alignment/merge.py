"""Applying an alignment: every model's weights mapped into one space of units, then averaged.

An :class:`Alignment` holds, per unit group g and per model t, a matrix ``to_merged`` A_t^g (merged
units × model t's units) and ``from_merged`` B_t^g (model t's units × merged units). A tensor W of model
t is aligned by A on the axis of units it produces (axis 0) and by B on every axis of units it consumes:
for a layer, ``W̃_t = A_t^{out} W_t B_t^{in}``. The merged model is the mean of the aligned models,

    W_merged = (1/T) Σ_t A_t^{out} W_t B_t^{in}.

A permutation π_t is ``A_t = P_t`` and ``B_t = P_tᵀ`` (so W̃_t = P_t W_t P_tᵀ, Git Re-Basin's
``apply_permutation``); ZipIt!'s merge/unmerge matrices, CCA Merge's linear maps and optimal-transport
maps are the same two matrices with other contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from mergebench.alignment.spec import PermutationSpec

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Alignment:
    to_merged: Mapping[str, Sequence[torch.Tensor]]
    """Group → per model, A_t (merged units × the model's units)."""
    from_merged: Mapping[str, Sequence[torch.Tensor]]
    """Group → per model, B_t (the model's units × merged units)."""

    @classmethod
    def of_permutations(cls, permutations: Mapping[str, Sequence[torch.Tensor]]) -> "Alignment":
        """From index permutations: merged unit i is unit ``perm[i]`` of each model."""
        matrices = {group: [permutation_matrix(p) for p in perms] for group, perms in permutations.items()}
        return cls(matrices, {group: [p.T for p in mats] for group, mats in matrices.items()})


def permutation_matrix(permutation: torch.Tensor) -> torch.Tensor:
    """P with ``(P x)[i] = x[permutation[i]]``."""
    n = len(permutation)
    matrix = torch.zeros(n, n)
    matrix[torch.arange(n), permutation] = 1.0
    return matrix


def along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` applied along ``axis``: result[..., i, ...] = Σ_f matrix[i, f] · tensor[..., f, ...]."""
    moved = tensor.movedim(axis, 0)
    mapped = (matrix.to(tensor) @ moved.reshape(moved.shape[0], -1)).reshape(matrix.shape[0], *moved.shape[1:])
    return mapped.movedim(0, axis)


def align_state(spec: PermutationSpec, alignment: Alignment, state: StateDict, model: int) -> dict[str, torch.Tensor]:
    """Model ``model``'s tensors in the merged units: A on produced axes (0), Bᵀ's rows on consumed axes."""
    aligned = {}
    for name, tensor in state.items():
        result = tensor
        for axis, group in enumerate(spec.axes.get(name, ())):
            if group is None or group not in alignment.to_merged:
                continue
            matrix = alignment.to_merged[group][model] if axis == 0 else alignment.from_merged[group][model].T
            result = along(result, axis, matrix)
        aligned[name] = result
    return aligned


def merge_states(spec: PermutationSpec, alignment: Alignment, states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """(1/T) Σ_t of each aligned model's floating-point tensors (others are taken from the first model)."""
    aligned = [align_state(spec, alignment, state, t) for t, state in enumerate(states)]
    return {
        name: torch.stack([a[name] for a in aligned]).mean(dim=0) if tensor.is_floating_point() else tensor
        for name, tensor in states[0].items()
    }


def permute_state(spec: PermutationSpec, permutations: Mapping[str, torch.Tensor], state: StateDict) -> dict[str, torch.Tensor]:
    """``state`` with group g's units reordered by ``permutations[g]`` on every axis labelled g (same function)."""
    return align_state(spec, Alignment.of_permutations({g: [p] for g, p in permutations.items()}), state, 0)


def partially_merged_states(spec: PermutationSpec, alignment: Alignment, states: Sequence[StateDict],
                            zipped: set[str]) -> tuple[list[dict[str, torch.Tensor]], set[str]]:
    """ZipIt!'s partial zipping: only the groups in ``zipped`` are merged; every model keeps the rest.

    Per model t, a tensor is mapped by A_t on its produced axis and by B_t on its consumed axes where
    those carry a zipped group. A tensor all of whose labelled axes are zipped is *shared*: the mean of
    the models' mapped tensors (the merged trunk); every other tensor stays model t's own (its head,
    and later layers reading the merged features through B_t). Returns each model's state and the
    names of the shared tensors.
    """
    partial = Alignment(
        {g: m for g, m in alignment.to_merged.items() if g in zipped}, {g: m for g, m in alignment.from_merged.items() if g in zipped}
    )
    mapped = [align_state(spec, partial, state, t) for t, state in enumerate(states)]
    everything = zipped >= set(spec.groups)
    shared = {
        name for name, labels in spec.axes.items()
        if name in states[0] and labels and states[0][name].is_floating_point()
        and all(label is None or label in zipped for label in labels) and (labels[0] is not None or everything)
    }
    for name in shared:
        mean = torch.stack([m[name] for m in mapped]).mean(dim=0)
        for m in mapped:
            m[name] = mean
    return mapped, shared

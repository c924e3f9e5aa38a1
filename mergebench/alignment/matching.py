"""Finding the alignment of T models: model 0 is the reference every other model is mapped onto.

* :func:`weight_matching` — Git Re-Basin (Ainsworth et al., 2023), Algorithm 1: coordinate descent over
  the groups; for group g, with every other group's permutation fixed, the permutation π_g maximizing
  Σ ⟨W_ref, W̃_t⟩ over the tensors that carry g is a linear assignment problem

      π_g = argmax_π Σ_{(W, axis) ∋ g} tr(W_ref^{(g)} · (W_t^{(g)} with its other axes permuted)ᵀ P_πᵀ),

  solved by SciPy's ``linear_sum_assignment``; repeated until no group's objective improves.
* :func:`activation_matching` — Git Re-Basin §3.1: π_g = argmax_π Σ_i corr(z_ref,i, z_t,π(i)), the
  correlation of unit activations on the same inputs.
* :func:`zipit` — ZipIt! (Stoica et al., 2024): the Σ_t n_t units of all models are merged greedily,
  most correlated pair first, *within* a model as well as across, until n remain; merged unit c is the
  mean of its members (merge matrix M, ``M[c, f] = 1/|c|``), and each model's next layer reads it
  through the unmerge matrix U (``U[f, c] = 1`` for f ∈ c). A merged unit holds at most T members.
* :func:`cca_merge` — CCA Merge (Horoi et al., 2024): canonical correlation analysis of the reference's
  and model t's units, Σ̃_rr^{-1/2} Σ_rt Σ̃_tt^{-1/2} = U S Vᵀ with Σ̃ = Σ + γ·mean(diag Σ)·I, maps model t
  into the reference's basis by the linear map A_t = Σ̃_rr^{1/2} U Vᵀ Σ̃_tt^{-1/2} (B_t = A_t^{-1}).
* :func:`ot_fusion` — OT fusion (Singh & Jaggi, 2020), activation-based: the transport plan Γ between the
  reference's and model t's units with uniform marginals and ground cost ``C_ij = E‖z_ref,i − z_t,j‖²``
  (POT's exact ``ot.emd``, or Sinkhorn with entropic regularization), A_t = n·Γ and B_t = A_tᵀ.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from mergebench.alignment.features import Moments
from mergebench.alignment.merge import Alignment
from mergebench.alignment.spec import PermutationSpec

StateDict = Mapping[str, torch.Tensor]


def assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation π maximizing Σ_i similarity[i, π(i)]."""
    from scipy.optimize import linear_sum_assignment  # imported when matching, not with every method

    _, columns = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long)


def _with_reference(per_model: Mapping[str, Sequence[torch.Tensor]], sizes: Mapping[str, int]) -> dict[str, list[torch.Tensor]]:
    """Prepend the reference's identity permutation to each group's list."""
    return {group: [torch.arange(sizes[group]), *perms] for group, perms in per_model.items()}


def _permuted_other_axes(spec: PermutationSpec, state: StateDict, name: str, axis: int, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Tensor ``name`` of ``state`` with every labelled axis except ``axis`` permuted by ``perms``."""
    tensor = state[name]
    for other, group in enumerate(spec.axes[name]):
        if other != axis and group is not None:
            tensor = tensor.index_select(other, perms[group])
    return tensor


def match_weights(spec: PermutationSpec, reference: StateDict, other: StateDict, *, generator: torch.Generator,
                  max_iterations: int = 100) -> dict[str, torch.Tensor]:
    """Git Re-Basin Algorithm 1 for one pair: permutations of ``other``'s units onto ``reference``'s."""
    members = {g: [(n, a) for n, a in spec.members(g) if n in reference and reference[n].is_floating_point()] for g in spec.groups}
    perms = {g: torch.arange(spec.size(g, reference)) for g in spec.groups}
    for _ in range(max_iterations):
        improved = False
        for index in torch.randperm(len(spec.groups), generator=generator).tolist():
            group = spec.groups[index]
            n = len(perms[group])
            similarity = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in members[group]:
                ours = reference[name].movedim(axis, 0).reshape(n, -1).double()
                theirs = _permuted_other_axes(spec, other, name, axis, perms).movedim(axis, 0).reshape(n, -1).double()
                similarity += ours @ theirs.T
            best = assignment(similarity)
            old = similarity[torch.arange(n), perms[group]].sum()
            new = similarity[torch.arange(n), best].sum()
            if new > old + 1e-12 * max(1.0, abs(float(old))):
                perms[group], improved = best, True
        if not improved:
            break
    return perms


def weight_matching(spec: PermutationSpec, states: Sequence[StateDict], *, seed: int = 0) -> Alignment:
    """Every model's units permuted onto model 0's by :func:`match_weights`."""
    generator = torch.Generator().manual_seed(seed)
    matched = [match_weights(spec, states[0], state, generator=generator) for state in states[1:]]
    sizes = {g: spec.size(g, states[0]) for g in spec.groups}
    return Alignment.of_permutations(_with_reference({g: [m[g] for m in matched] for g in spec.groups}, sizes))


def activation_matching(moments: Mapping[str, Moments]) -> Alignment:
    """Every model's units permuted onto model 0's by maximal total activation correlation."""
    permutations = {}
    for group, stats in moments.items():
        correlation = stats.correlation()
        permutations[group] = [torch.arange(stats.sizes[0])] + [
            assignment(stats.block(correlation, 0, t)) for t in range(1, len(stats.sizes))
        ]
    return Alignment.of_permutations(permutations)


def zip_units(correlation: torch.Tensor, sizes: Sequence[int]) -> list[list[int]]:
    """ZipIt!'s greedy matching: clusters of the Σ n_t units (indices into ``correlation``), n_0 of them.

    Repeatedly merges the two clusters with the highest mean pairwise correlation whose union holds at
    most T units (past that cap only when no two clusters fit under it, which greedy merging of T > 2
    models can leave); units of one model may merge with each other.
    """
    models = len(sizes)
    clusters = [[unit] for unit in range(correlation.shape[0])]
    score = correlation.double().clone()
    score.fill_diagonal_(-torch.inf)
    alive = torch.ones(len(clusters), dtype=torch.bool)
    while int(alive.sum()) > sizes[0]:
        size = torch.tensor([len(c) for c in clusters], dtype=torch.float64)
        allowed = (size[:, None] + size[None, :] <= models) & alive[:, None] & alive[None, :]
        allowed.fill_diagonal_(False)
        if not allowed.any():  # the clusters left cannot fill up to T members each: merge past the cap
            allowed = alive[:, None] & alive[None, :]
            allowed.fill_diagonal_(False)
        masked = torch.where(allowed, score, torch.tensor(-torch.inf, dtype=torch.float64))
        a, b = divmod(int(masked.argmax()), masked.shape[1])
        assert allowed[a, b], "zipping picked a pair it may not merge"
        weight_a, weight_b = len(clusters[a]), len(clusters[b])
        merged_row = (weight_a * score[a] + weight_b * score[b]) / (weight_a + weight_b)  # mean linkage
        score[a], score[:, a] = merged_row, merged_row
        score[a, a] = -torch.inf
        clusters[a] = clusters[a] + clusters[b]
        alive[b] = False
        score[b], score[:, b] = -torch.inf, -torch.inf
    return [sorted(c) for c, keep in zip(clusters, alive.tolist()) if keep]


def zipit(moments: Mapping[str, Moments]) -> Alignment:
    """ZipIt! merge (M) and unmerge (U) matrices per group, split per model: A_t = T·M[:, t], B_t = U[t, :]."""
    to_merged, from_merged = {}, {}
    for group, stats in moments.items():
        clusters = zip_units(stats.correlation(), stats.sizes)
        total, models = sum(stats.sizes), len(stats.sizes)
        merge, unmerge = torch.zeros(len(clusters), total), torch.zeros(total, len(clusters))
        for c, members in enumerate(clusters):
            merge[c, members] = 1.0 / len(members)
            unmerge[members, c] = 1.0
        starts = [0, *np.cumsum(stats.sizes).tolist()]
        to_merged[group] = [models * merge[:, starts[t] : starts[t + 1]] for t in range(models)]
        from_merged[group] = [unmerge[starts[t] : starts[t + 1]] for t in range(models)]
    return Alignment(to_merged, from_merged)


def _symmetric_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=1e-12).pow(power)) @ vectors.T


def cca_merge(moments: Mapping[str, Moments], *, regularization: float) -> Alignment:
    """CCA Merge's linear maps of every model onto model 0's units."""
    to_merged, from_merged = {}, {}
    for group, stats in moments.items():
        covariance = stats.covariance
        n = stats.sizes[0]
        to_merged[group], from_merged[group] = [torch.eye(n)], [torch.eye(n)]
        ridge = lambda c: c + regularization * c.diagonal().mean().clamp(min=1e-12) * torch.eye(c.shape[0], dtype=c.dtype)  # noqa: E731
        reference = ridge(stats.block(covariance, 0, 0))
        for t in range(1, len(stats.sizes)):
            other = ridge(stats.block(covariance, t, t))
            u, _, vh = torch.linalg.svd(_symmetric_power(reference, -0.5) @ stats.block(covariance, 0, t) @ _symmetric_power(other, -0.5))
            rotation = u @ vh
            to_merged[group].append((_symmetric_power(reference, 0.5) @ rotation @ _symmetric_power(other, -0.5)).float())
            from_merged[group].append((_symmetric_power(other, 0.5) @ rotation.T @ _symmetric_power(reference, -0.5)).float())
    return Alignment(to_merged, from_merged)


def ot_fusion(moments: Mapping[str, Moments], *, entropic: float = 0.0) -> Alignment:
    """OT fusion's transport maps of every model onto model 0's units (uniform marginals)."""
    import ot  # POT takes seconds to import (it loads scikit-learn): only OT fusion pays for it

    to_merged, from_merged = {}, {}
    for group, stats in moments.items():
        second = stats.second_moment
        n = stats.sizes[0]
        to_merged[group], from_merged[group] = [torch.eye(n)], [torch.eye(n)]
        reference_norms = stats.block(second, 0, 0).diagonal()
        for t in range(1, len(stats.sizes)):
            cost = reference_norms[:, None] + stats.block(second, t, t).diagonal()[None, :] - 2 * stats.block(second, 0, t)
            marginal = np.full(n, 1.0 / n)
            cost_array = cost.clamp(min=0).numpy()
            if entropic > 0:
                plan = ot.sinkhorn(marginal, marginal, cost_array / cost_array.max(), entropic)
            else:
                plan = ot.emd(marginal, marginal, cost_array)
            transport = torch.as_tensor(n * plan, dtype=torch.float32)
            to_merged[group].append(transport)
            from_merged[group].append(transport.T.contiguous())
    return Alignment(to_merged, from_merged)

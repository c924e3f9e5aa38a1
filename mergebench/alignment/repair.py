"""REPAIR (Jordan et al., 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging aligned networks shrinks the variance of their hidden units ("variance collapse"), and the
collapse compounds with depth. REPAIR restores, for every renormalized module (a convolution's or a
BatchNorm's output channels), the statistics the merged units should have: the mean over the T aligned
endpoints of each unit's mean and standard deviation,

    μ*_c = (1/T) Σ_t (A_t μ_t)_c,      σ*_c = (1/T) Σ_t sqrt((A_t Σ_t A_tᵀ)_cc),

where A_t maps model t's units into the merged ones (a permutation: unit π_t(c)'s own statistics). The
correction is folded into the module's weight and bias, layer by layer in forward order (each
measurement sees the earlier layers already corrected):

    w_c ← w_c · σ*_c / σ_c,      b_c ← (b_c − μ_c) · σ*_c / σ_c + μ*_c.

For a BatchNorm this is exact once its statistics are re-estimated on the same data (RESET), which
``reset`` does before every measurement and once at the end.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from mergebench.alignment.features import Moments, recording
from mergebench.alignment.merge import Alignment
from mergebench.alignment.spec import PermutationSpec

EPSILON = 1e-6


@torch.no_grad()
def output_moments(model: nn.Module, modules: Iterable[str], batches: Sequence[torch.Tensor]) -> dict[str, Moments]:
    """Moments of the output channels of each named module of one model over ``batches``."""
    modules = list(modules)
    moments: dict[str, Moments] = {}
    for batch in batches:
        with recording(model, modules) as outputs:
            model.eval()(batch)
        for name in modules:
            samples = outputs[name][0]
            moments.setdefault(name, Moments([samples.shape[1]])).add(samples)
    return moments


def repair_targets(spec: PermutationSpec, alignment: Alignment, endpoints: Sequence[nn.Module],
                   batches: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per renormalized module, the target mean and standard deviation μ*, σ* of its merged channels."""
    measured = [output_moments(endpoint, spec.renormalized, batches) for endpoint in endpoints]
    targets = {}
    for name in spec.renormalized:
        group = spec.axes[f"{name}.weight"][0]
        means, stds = [], []
        for t, stats in enumerate(measured):
            to_merged = alignment.to_merged[group][t].double()
            means.append(to_merged @ stats[name].mean)
            stds.append((to_merged @ stats[name].covariance @ to_merged.T).diagonal().clamp(min=0).sqrt())
        targets[name] = torch.stack(means).mean(dim=0), torch.stack(stds).mean(dim=0)
    return targets


@torch.no_grad()
def renormalize(merged: nn.Module, spec: PermutationSpec, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
           batches: Sequence[torch.Tensor], reset: Callable[[nn.Module], None]) -> None:
    """Renormalize ``merged`` in place to ``targets`` (:func:`repair_targets`), module by module."""
    modules = dict(merged.named_modules())
    for name in spec.renormalized:
        reset(merged)
        stats = output_moments(merged, [name], batches)[name]
        mean, std = stats.mean, stats.covariance.diagonal().clamp(min=0).sqrt()
        target_mean, target_std = targets[name]
        scale = target_std / (std + EPSILON)
        module = modules[name]
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(scale.to(module.weight.dtype).view(shape))
        module.bias.copy_(((module.bias.double() - mean) * scale + target_mean).to(module.bias.dtype))
    reset(merged)

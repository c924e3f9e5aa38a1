"""Loss and accuracy along the linear path between two models of a scratch suite, before and after alignment.

    python benchmarks/alignment_barrier.py --suite scratch-2 --model vgg-x1 --cache CACHE --out docs/

For each alignment (none, weight matching, activation matching, ZipIt!, CCA Merge, OT fusion) the path
runs from the first model's aligned weights to the second's, (1 − α)·W̃_0 + α·W̃_1 (for a permutation W̃_0
is the first model itself and W̃_1 the second with its units reordered); at each α the merged weights'
BatchNorm statistics are re-estimated, as the suite does for merged models, and the test loss and
accuracy over every task's test images are measured. Prints the barriers and writes one plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from mergebench.alignment import matching  # noqa: E402
from mergebench.alignment.barrier import barrier, interpolation_curve  # noqa: E402
from mergebench.alignment.features import calibrated, feature_moments, reset_statistics  # noqa: E402
from mergebench.alignment.merge import Alignment, align_state  # noqa: E402
from mergebench.alignment.spec import spec_for  # noqa: E402
from mergebench.core.checkpoints import cache_directory  # noqa: E402
from mergebench.runner.catalog import get_suite  # noqa: E402
from mergebench.runner.kinds.scratch import prepare  # noqa: E402

ALPHAS = [i / 10 for i in range(11)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="scratch-2")
    parser.add_argument("--model", default="vgg-x1")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--examples", type=int, default=256, help="training examples per model for matching and BatchNorm")
    args = parser.parse_args()
    started = time.perf_counter()
    suite = get_suite(args.suite)
    prepared = prepare(suite, args.model, torch.device("cpu"), cache_directory(args.cache))
    names = suite.task_names[:2]
    parameters = dict(prepared.backbone.named_parameters())
    states = [{k: v for k, v in prepared.finetuned[name].items() if k in parameters} for name in names]
    batches = [prepared.train_data(name).inputs[start : start + 128] for name in names for start in range(0, args.examples, 128)]
    test_inputs = torch.cat([prepared.data["test"][name].inputs for name in dict.fromkeys(names)])
    test_labels = torch.cat([prepared.data["test"][name].labels for name in dict.fromkeys(names)])
    spec = spec_for(states[0])

    def endpoint(state):
        prepared.backbone.load_state_dict({**prepared.pretrained, **state})
        return calibrated(prepared.backbone, batches)

    endpoints = [endpoint(state) for state in states]
    moments = feature_moments(spec, endpoints, batches)
    identity = Alignment.of_permutations({g: [torch.arange(spec.size(g, states[0]))] * 2 for g in spec.groups})
    alignments = {
        "none (plain average)": identity,
        "weight matching": matching.weight_matching(spec, states),
        "activation matching": matching.activation_matching(moments),
        "ZipIt!": matching.zipit(moments),
        "CCA Merge": matching.cca_merge(moments, regularization=1e-2),
        "OT fusion": matching.ot_fusion(moments),
    }

    @torch.no_grad()
    def evaluate(state) -> tuple[float, float]:
        prepared.backbone.load_state_dict({**prepared.pretrained, **state})
        reset_statistics(prepared.backbone, batches)
        logits = prepared.backbone.eval()(test_inputs)
        return F.cross_entropy(logits, test_labels).item(), (logits.argmax(1) == test_labels).float().mean().item()

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    print(f"{'alignment':<22} {'loss barrier':>12} {'accuracy barrier':>17} {'accuracy at α=0.5':>18}")
    for label, alignment in alignments.items():
        aligned = [align_state(spec, alignment, state, t) for t, state in enumerate(states)]
        curve = interpolation_curve(aligned[0], aligned[1], evaluate, ALPHAS)
        losses, accuracies = [c[1] for c in curve], [c[2] for c in curve]
        print(f"{label:<22} {barrier(losses, ALPHAS):12.3f} {100 * barrier(accuracies, ALPHAS, higher_is_worse=False):16.1f}% "
              f"{100 * accuracies[5]:17.1f}%")
        loss_axes.plot(ALPHAS, losses, marker="o", label=label)
        accuracy_axes.plot(ALPHAS, [100 * a for a in accuracies], marker="o", label=label)
    loss_axes.set(xlabel="α (0: first model, 1: second)", ylabel="test loss", title=f"{args.suite}, {args.model}")
    accuracy_axes.set(xlabel="α (0: first model, 1: second)", ylabel="test accuracy (%)")
    accuracy_axes.legend(fontsize=8)
    figure.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"alignment-barrier-{args.suite}-{args.model}.png"
    figure.savefig(path, dpi=110)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Alignment methods on small models: known permutations recovered, identities kept, statistics restored."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergebench.alignment import matching
from mergebench.alignment.barrier import barrier, interpolate
from mergebench.alignment.features import feature_moments
from mergebench.alignment.merge import Alignment, merge_states, permute_state
from mergebench.alignment.repair import output_moments, renormalize, repair_targets
from mergebench.alignment.spec import spec_for
from mergebench.errors import MergebenchError
from mergebench.models.scratch import ARCHITECTURES, build_model

SIZE = 8


def model(architecture: str, seed: int, width: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_model(architecture, width, 10, image_size=SIZE)
    if architecture == "resnet20":  # BatchNorm statistics away from their initial 0 / 1
        network.train()
        with torch.no_grad():
            network(torch.randn(32, 3, SIZE, SIZE) * 2 + 0.5)
    return network.eval()


def random_permutations(spec, state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {group: torch.randperm(spec.size(group, state), generator=generator) for group in spec.groups}


def inputs(seed: int, count: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_states_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_permuted_copy_computes_the_same_function(architecture):
    original = model(architecture, 0)
    state = original.state_dict()
    spec = spec_for(state)
    permuted = model(architecture, 1)
    permuted.load_state_dict(permute_state(spec, random_permutations(spec, state, 3), state))
    changed = [name for name in state if state[name].dim() and not torch.equal(state[name], permuted.state_dict()[name])]
    assert changed, "the permutation must move some weights"
    x = inputs(0)
    torch.testing.assert_close(permuted(x), original(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_weight_matching_recovers_a_random_permutation(architecture):
    state = model(architecture, 0).state_dict()
    spec = spec_for(state)
    permutations = random_permutations(spec, state, 5)
    permuted = permute_state(spec, permutations, state)
    alignment = matching.weight_matching(spec, [state, permuted])
    for group, permutation in permutations.items():
        # merged unit i is unit found[i] of the permuted copy, which is unit permutation[found[i]] of the original
        found = alignment.to_merged[group][1].argmax(dim=1)
        assert torch.equal(permutation[found], torch.arange(len(permutation))), group
    assert_states_equal(merge_states(spec, alignment, [state, permuted]), state)


def test_activation_matching_finds_a_known_hidden_unit_permutation():
    original = model("mlp", 0)
    state = original.state_dict()
    spec = spec_for(state)
    permutations = random_permutations(spec, state, 7)
    permuted = model("mlp", 1)
    permuted.load_state_dict(permute_state(spec, permutations, state))
    moments = feature_moments(spec, [original, permuted], [inputs(1, 256), inputs(2, 256)])
    alignment = matching.activation_matching(moments)
    inverse = {group: torch.argsort(p) for group, p in permutations.items()}
    for group in spec.groups:
        assert torch.equal(alignment.to_merged[group][1].argmax(dim=1), inverse[group]), group
    assert_states_equal(merge_states(spec, alignment, [state, permuted.state_dict()]), state, atol=1e-6)


def test_cca_merge_of_identical_models_is_the_identity():
    original = model("mlp", 0)
    state = original.state_dict()
    spec = spec_for(state)
    moments = feature_moments(spec, [original, original], [inputs(1, 256), inputs(2, 256)])
    alignment = matching.cca_merge(moments, regularization=1e-2)
    for group in spec.groups:
        torch.testing.assert_close(alignment.to_merged[group][1], torch.eye(64), atol=1e-4, rtol=0)
    assert_states_equal(merge_states(spec, alignment, [state, state]), state, atol=1e-4)


def test_ot_fusion_with_uniform_marginals_is_averaging_after_the_optimal_assignment():
    a, b = model("mlp", 0), model("mlp", 1)
    spec = spec_for(a.state_dict())
    moments = feature_moments(spec, [a, b], [inputs(1, 256)])
    alignment = matching.ot_fusion(moments)
    permutations = {}
    for group, stats in moments.items():
        # peer: the assignment minimizing Σ_i E‖z_a,i − z_b,π(i)‖², solved by SciPy on the same cost
        second = stats.second_moment
        cost = second.diagonal()[:64, None] + second.diagonal()[None, 64:] - 2 * second[:64, 64:]
        permutations[group] = torch.as_tensor(linear_sum_assignment(cost.numpy())[1])
        assert torch.equal(alignment.to_merged[group][1].argmax(dim=1), permutations[group]), group
    aligned_b = permute_state(spec, permutations, b.state_dict())
    averaged = {name: (a.state_dict()[name] + aligned_b[name]) / 2 for name in aligned_b}
    assert_states_equal(merge_states(spec, alignment, [a.state_dict(), b.state_dict()]), averaged, atol=1e-6)


def test_zipit_of_identical_models_returns_the_model():
    original = model("mlp", 0)
    state = original.state_dict()
    spec = spec_for(state)
    moments = feature_moments(spec, [original, original], [inputs(1)])
    alive = {g: s.covariance.diagonal()[: s.sizes[0]] > 0 for g, s in moments.items()}
    if not all(a.all() for a in alive.values()):
        pytest.skip("a unit never fires on these inputs: its zipping partner is ambiguous")
    assert_states_equal(merge_states(spec, matching.zipit(moments), [state, state]), state, atol=1e-6)


def test_zipit_merges_within_a_model_when_those_units_correlate_most():
    # units 0, 1 of model A and 2, 3 of model B; A's two units are near copies of each other
    correlation = torch.tensor([
        [1.0, 0.95, 0.5, 0.1],
        [0.95, 1.0, 0.4, 0.2],
        [0.5, 0.4, 1.0, 0.3],
        [0.1, 0.2, 0.3, 1.0],
    ])
    assert matching.zip_units(correlation, [2, 2]) == [[0, 1], [2, 3]]
    correlation[0, 1] = correlation[1, 0] = 0.0
    assert matching.zip_units(correlation, [2, 2]) == [[0, 2], [1, 3]]


def test_repair_restores_the_mean_of_the_endpoints_channel_statistics():
    a, b = model("mlp", 0), model("mlp", 1)
    spec = spec_for(a.state_dict())
    batches = [inputs(4, 256)]
    identity = Alignment.of_permutations({g: [torch.arange(64)] * 2 for g in spec.groups})
    merged = model("mlp", 2)
    merged.load_state_dict(merge_states(spec, identity, [a.state_dict(), b.state_dict()]))
    renormalize(merged, spec, repair_targets(spec, identity, [a, b], batches), batches, reset=lambda module: None)
    x = batches[0].flatten(1)
    for index, name in enumerate(spec.renormalized):
        # peer: the endpoints' pre-activations computed by hand, layer by layer
        def pre_activations(network):
            h = x
            for layer in network.layers[: index + 1]:
                z = h @ layer.weight.T + layer.bias
                h = torch.relu(z)
            return z
        expected_mean = (pre_activations(a).mean(0) + pre_activations(b).mean(0)) / 2
        expected_std = (pre_activations(a).std(0, unbiased=False) + pre_activations(b).std(0, unbiased=False)) / 2
        got = pre_activations(merged)
        torch.testing.assert_close(got.mean(0), expected_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.std(0, unbiased=False), expected_std, atol=1e-4, rtol=1e-4)
    plain = model("mlp", 2)
    plain.load_state_dict(merge_states(spec, identity, [a.state_dict(), b.state_dict()]))
    collapsed = output_moments(plain, [spec.renormalized[-1]], batches)[spec.renormalized[-1]].covariance.diagonal().sqrt()
    assert collapsed.mean() < expected_std.mean(), "averaging unaligned models shrinks the variance REPAIR restores"


def test_repair_on_batchnorm_models_holds_after_the_statistics_are_reset():
    from mergebench.alignment.features import reset_statistics

    a, b = model("resnet20", 0), model("resnet20", 1)
    spec = spec_for(a.state_dict())
    batches = [inputs(4, 32)]
    states = [{k: v for k, v in m.state_dict().items() if k in dict(m.named_parameters())} for m in (a, b)]
    alignment = matching.weight_matching(spec, states)
    merged = model("resnet20", 2)
    merged.load_state_dict(merge_states(spec, alignment, states), strict=False)
    targets = repair_targets(spec, alignment, [a, b], batches)
    renormalize(merged, spec, targets, batches, reset=lambda module: reset_statistics(module, batches))
    measured = output_moments(merged, spec.renormalized, batches)
    for name in spec.renormalized:
        torch.testing.assert_close(measured[name].mean, targets[name][0], atol=2e-3, rtol=0)
        torch.testing.assert_close(measured[name].covariance.diagonal().sqrt(), targets[name][1], atol=2e-3, rtol=2e-3)


def test_barrier_is_the_largest_rise_above_the_straight_line():
    assert barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0]) == pytest.approx(1.5)
    assert barrier([0.9, 0.5, 0.7], [0.0, 0.5, 1.0], higher_is_worse=False) == pytest.approx(0.3)
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2) * 4}
    assert torch.equal(interpolate(a, b, 0.25)["w"], torch.ones(2))


def test_an_unknown_architecture_is_refused_in_one_line():
    with pytest.raises(MergebenchError, match="no permutation spec"):
        spec_for(["encoder.weight"])


def test_partial_zipping_shares_the_zipped_trunk_and_keeps_each_models_later_layers():
    from mergebench.alignment.merge import partially_merged_states

    a, b = model("mlp", 0), model("mlp", 1)
    spec = spec_for(a.state_dict())
    states = [a.state_dict(), b.state_dict()]
    alignment = matching.zipit(feature_moments(spec, [a, b], [inputs(1, 256)]))
    everything, shared = partially_merged_states(spec, alignment, states, set(spec.groups))
    assert shared == set(states[0])
    assert_states_equal(everything[0], merge_states(spec, alignment, states), atol=1e-6)
    first, shared = partially_merged_states(spec, alignment, states, {"hidden0"})
    assert shared == {"layers.0.weight", "layers.0.bias"}
    torch.testing.assert_close(first[0]["layers.0.weight"], everything[0]["layers.0.weight"])
    assert torch.equal(first[1]["head.weight"], states[1]["head.weight"])  # later layers: the model's own
    # the second layer reads the zipped units through model b's unmerge matrix B_b
    torch.testing.assert_close(first[1]["layers.1.weight"], states[1]["layers.1.weight"] @ alignment.from_merged["hidden0"][1])
    # with identical models, a partially zipped model computes what the model computes
    same, _ = partially_merged_states(spec, matching.zipit(feature_moments(spec, [a, a], [inputs(1, 256)])), [states[0]] * 2, {"hidden0"})
    copy = model("mlp", 3)
    copy.load_state_dict(same[1])
    torch.testing.assert_close(copy(inputs(2)), a(inputs(2)), atol=1e-5, rtol=1e-5)


def test_zipping_four_models_always_ends_with_the_width_of_one():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 4 * 6, generator=generator)
    correlation = torch.corrcoef(features.T)
    clusters = matching.zip_units(correlation, [6, 6, 6, 6])
    assert len(clusters) == 6 and sorted(u for c in clusters for u in c) == list(range(24))


class GrantedBatches:
    """The slice of ModelAccess that NP Merge reads: labelled batches and a module to load weights into."""

    access = "train-samples"

    def __init__(self, network, inputs, labels):
        self.network, self.inputs, self.labels, self.tasks = network, inputs, labels, ("task",)

    def batches(self, task, batch_size):
        for start in range(0, len(self.inputs), batch_size):
            yield self.inputs[start : start + batch_size], self.labels[start : start + batch_size]

    def backbone(self, flat):
        return self.network


def test_np_merge_weights_stay_between_the_aligned_endpoints_and_lower_the_loss_of_the_average():
    from mergebench.methods.alignment import learn_parameter_weights
    from mergebench.core.task_vectors import ParamLayout

    a, b = model("mlp", 0), model("mlp", 1)
    layout = ParamLayout.of(a.state_dict(), [name for name, _ in a.named_parameters()])
    aligned = torch.stack([layout.flatten(a.state_dict()), layout.flatten(b.state_dict())])
    x = inputs(5, 128)
    labels = a(x).argmax(dim=1)  # the first model's predictions: the learned weights should lean towards it
    access = GrantedBatches(model("mlp", 2), x, labels)
    merged = learn_parameter_weights(access.network, aligned, layout, access, steps=30, lr=0.05, seed=0)
    low, high = aligned.min(dim=0).values, aligned.max(dim=0).values
    assert torch.all(merged >= low - 1e-6) and torch.all(merged <= high + 1e-6)

    def loss(flat):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(access.network, layout.views(flat), (x,)), labels)

    with torch.no_grad():
        assert loss(merged) < loss(aligned.mean(dim=0))

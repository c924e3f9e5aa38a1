"""Accuracy counting, normalized accuracy and BatchNorm re-estimation."""

import pytest
import torch
from torch import nn

from mergebench.evaluation.classification import correct_examples, recalibrate_batchnorm
from mergebench.evaluation.metrics import mean_accuracy, normalized_accuracy


def test_normalized_accuracy_is_mean_of_per_task_ratios():
    merged = {"a": 0.45, "b": 0.8}
    finetuned = {"a": 0.9, "b": 0.8}
    # (0.5 + 1.0) / 2, not (0.45 + 0.8) / (0.9 + 0.8)
    assert normalized_accuracy(merged, finetuned) == pytest.approx(0.75)
    assert mean_accuracy(merged) == pytest.approx(0.625)


def test_normalized_accuracy_needs_positive_reference():
    with pytest.raises(ValueError, match="task 'a'"):
        normalized_accuracy({"a": 0.5}, {"a": 0.0})


def test_correct_examples_against_hand_labels():
    backbone = nn.Identity()
    backbone.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # gives the module a device
    head = nn.Linear(2, 2, bias=False)
    head.weight.data = torch.eye(2)
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # predictions 0, 1, 0, 1, 0 → 4 correct
    correct = correct_examples(backbone, head, inputs, labels, batch_size=2)
    assert correct.tolist() == [True, True, False, True, True]


def test_recalibrate_batchnorm_sets_statistics_of_the_given_batches():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    nn.init.eye_(net[0].weight)
    nn.init.zeros_(net[0].bias)
    batches = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[2.0, 8.0, 2.0], [2.0, 0.0, 2.0]])]
    recalibrate_batchnorm(net, batches)
    # cumulative average of the two batch means: ((2,2,2) + (2,4,2)) / 2
    assert torch.allclose(net[1].running_mean, torch.tensor([2.0, 3.0, 2.0]))
    assert net[1].momentum == 0.1 and not net.training


def test_finetuning_leaves_batchnorm_statistics_at_pretrained_values():
    from mergebench.core.recipe import Recipe
    from mergebench.core.task_vectors import buffer_names
    from mergebench.models.efficientnet import EfficientNetBackbone, pretrained_backbone_state
    from mergebench.models.finetune import finetune

    pretrained = pretrained_backbone_state("efficientnet-lite0")
    backbone = EfficientNetBackbone("efficientnet-lite0", 32)
    backbone.load_state_dict(pretrained)
    inputs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    head = finetune(backbone, inputs, labels, 3, Recipe(steps=2, batch_size=4, lr=1e-3, head_lr=1e-2))
    state = backbone.state_dict()
    assert all(torch.equal(state[name], pretrained[name]) for name in buffer_names(backbone))
    assert not torch.equal(state["net._conv_stem.weight"], pretrained["net._conv_stem.weight"])
    assert head.weight.shape == (3, 1280) and head.weight.abs().sum() > 0

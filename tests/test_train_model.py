"""The NIC CNN: architecture, shapes, parameter count, input standardisation, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nic_fast.train.model import L2_PENALTY, ModelConfig, NICNet, TrainedModel, parameter_groups


def _expected_parameters(channels: int, outputs: int, filters: int = 128, dense: int = 128) -> int:
    """The paper's appendix, counted by hand: 8 separable convs (no bias, BN after), dense + BN, output."""
    first = channels * 9 + channels * filters + 2 * filters
    others = 7 * (filters * 9 + filters * filters + 2 * filters)
    return first + others + filters * dense + 2 * dense + dense * outputs + outputs


@pytest.mark.parametrize(("channels", "outputs"), [(3, 1), (128, 1), (16, 4)])
def test_parameter_count_matches_the_paper_architecture(channels: int, outputs: int) -> None:
    network = NICNet(ModelConfig(in_channels=channels, outputs=outputs))
    assert sum(p.numel() for p in network.parameters()) == _expected_parameters(channels, outputs)


def test_layers_strides_and_regularisation() -> None:
    network = NICNet(ModelConfig(in_channels=3, outputs=1))
    strides = [block.depthwise.stride[0] for block in network.features]
    assert strides == [2, 2, 2, 2, 2, 2, 1, 1]
    assert all(block.depthwise.groups == block.depthwise.in_channels for block in network.features)
    assert all(block.pointwise.out_channels == 128 for block in network.features)
    assert all(isinstance(block.dropout, nn.Dropout2d) and block.dropout.p == 0.2 for block in network.features)
    decayed, free = parameter_groups(network)
    assert decayed["weight_decay"] == 2 * L2_PENALTY and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])


@pytest.mark.parametrize("side", [1, 24, 33, 400])
def test_any_grid_size_gives_one_prediction_per_input(side: int) -> None:
    network = NICNet(ModelConfig(in_channels=5, outputs=3)).eval()
    assert network(torch.randn(2, 5, side, side)).shape == (2, 3)


def test_inputs_are_standardised_with_the_training_statistics() -> None:
    torch.manual_seed(0)
    network = NICNet(ModelConfig(in_channels=2, outputs=1)).eval()
    x = torch.randn(2, 2, 16, 16)
    mean, std = torch.tensor([0.8, -3.0]), torch.tensor([0.05, 2.0])
    reference = network(x).detach()
    network.set_input_statistics(mean, std)
    shifted = network(x * std.view(1, 2, 1, 1) + mean.view(1, 2, 1, 1))
    torch.testing.assert_close(shifted, reference, rtol=1e-4, atol=1e-5)


def test_losses_and_predictions_per_task() -> None:
    outputs = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    binary = TrainedModel(NICNet(ModelConfig(2, 1)), "binary")
    torch.testing.assert_close(binary.predictions(outputs[:, :1]), torch.sigmoid(outputs[:, 0]))
    multiclass = TrainedModel(NICNet(ModelConfig(2, 2)), "multiclass")
    torch.testing.assert_close(multiclass.predictions(outputs).sum(dim=1), torch.ones(2))
    torch.testing.assert_close(multiclass.loss(outputs, torch.tensor([1.0, 0.0])),
                               nn.functional.cross_entropy(outputs, torch.tensor([1, 0])))
    regression = TrainedModel(NICNet(ModelConfig(2, 1)), "regression", target_mean=50.0, target_std=10.0)
    torch.testing.assert_close(regression.predictions(torch.tensor([[1.5]])), torch.tensor([65.0]))
    assert regression.loss(torch.tensor([[1.5]]), torch.tensor([65.0])).item() == 0.0


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TrainedModel(NICNet(ModelConfig(3, 1)), "regression", target_mean=2.0, target_std=3.0)
    model.network.set_input_statistics(torch.tensor([0.9, 0.6, 0.8]), torch.tensor([0.02, 0.08, 0.05]))
    model.network.eval()
    model.save(tmp_path / "m.pt", epoch=4)
    loaded = TrainedModel.load(tmp_path / "m.pt")
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(loaded.predictions(loaded.network(x)), model.predictions(model.network(x)))
    assert (loaded.task, loaded.target_mean, loaded.target_std) == ("regression", 2.0, 3.0)
    assert not loaded.network.training

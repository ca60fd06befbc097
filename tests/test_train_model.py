"""The NIC CNN: architecture, configurable depth, shapes, parameter count, input standardisation, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nic_fast.train.model import L2_PENALTY, PAPER_STRIDES, ModelConfig, NICNet, TrainedModel, parameter_groups


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


def test_strides_set_the_depth_and_the_feature_map_sizes() -> None:
    network = NICNet(ModelConfig(in_channels=4, outputs=3, strides=(1, 1, 2), dropout=0.0)).eval()
    assert [block.depthwise.stride[0] for block in network.features] == [1, 1, 2]
    assert all(block.dropout.p == 0.0 for block in network.features)
    x = torch.randn(2, 4, 30, 30)
    assert network(x).shape == (2, 3)
    sides = []
    for block in network.features:
        x = block(x)
        sides.append(tuple(x.shape[2:]))
    assert sides == [(30, 30), (30, 30), (15, 15)]


def test_the_paper_network_is_the_default() -> None:
    assert ModelConfig(3, 1).strides == PAPER_STRIDES == (2, 2, 2, 2, 2, 2, 1, 1)
    side = 60  # six stride-2 layers leave a 60-cell canvas one cell wide
    x = torch.randn(2, 3, side, side)
    for block in NICNet(ModelConfig(3, 1)).eval().features:
        x = block(x)
    assert x.shape[2:] == (1, 1)


@pytest.mark.parametrize(("strides", "dropout", "message"),
                         [((), 0.2, "at least one"), ((3,), 0.2, "1 or 2"), ((2, 0), 0.2, "1 or 2"),
                          ((1, 2), 1.0, "dropout"), ((1, 2), -0.1, "dropout")])
def test_model_config_rejects_impossible_networks(strides: tuple[int, ...], dropout: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(3, 1, dropout=dropout, strides=strides)


def test_checkpoint_keeps_strides_and_dropout(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = TrainedModel(NICNet(ModelConfig(3, 2, dropout=0.1, strides=(1, 2, 2))), "multiclass")
    model.network.eval()
    model.save(tmp_path / "m.pt")
    loaded = TrainedModel.load(tmp_path / "m.pt")
    assert loaded.network.config == model.network.config
    assert loaded.network.config.strides == (1, 2, 2) and loaded.network.config.dropout == 0.1
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(loaded.network(x), model.network(x))


def test_a_checkpoint_from_before_strides_loads_as_the_paper_network(tmp_path: Path) -> None:
    TrainedModel(NICNet(ModelConfig(3, 1)), "binary").save(tmp_path / "m.pt")
    checkpoint = torch.load(tmp_path / "m.pt", weights_only=True)
    del checkpoint["config"]["strides"]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = TrainedModel.load(tmp_path / "old.pt")
    assert loaded.network.config.strides == PAPER_STRIDES and len(loaded.network.features) == 8

"""The NIC CNN: a small network that reads a compressed grid (C channels) and predicts one label.

Eight depthwise-separable 3×3 convolutions with 128 filters, each followed by batch
normalisation, LeakyReLU and 20 % feature-wise (channel) dropout; stride 2 except in
layers 7 and 8; then dense 128 + BN + LeakyReLU and the output layer (the paper's
appendix). The paper's L2 penalty of 1e-5 on the kernels is applied by the optimiser
(:func:`parameter_groups`).

That network is the default (:data:`PAPER_STRIDES`, dropout 0.2); both are settings of
:class:`ModelConfig` because the paper's depth suits whole-slide grids of thousands of
cells, not small ones. Six stride-2 layers shrink a 60×60-cell canvas to 1×1 by
layer 6, so the last blocks see one cell. Measured on the synthetic MNIST benchmark's
perfect per-cell digit maps at 540-px canvases: the paper's network with 20 % dropout
stayed at chance (test accuracy 0.12-0.15 after 5 epochs over 1,500 canvases), while 3
blocks with strides (1, 1, 2) and no dropout reached 0.45 after 6 epochs over 1,000
canvases; with 20 % dropout the 3-block network also stayed near chance (0.15 after 8
epochs) on encoder codes. For small grids, choose fewer stride-2 layers (and try less
dropout).

The last feature map becomes a vector by global max pooling rather than by flattening
a map of fixed size: the network then takes grids of any size (test crops, whole-slide
Grad-CAM) and answers "is there evidence anywhere in the crop", the question a
slide-level label asks. Inputs are standardised first (see :class:`NICNet`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["L2_PENALTY", "PAPER_STRIDES", "ModelConfig", "NICNet", "TrainedModel", "checked_dropout",
           "checked_strides", "parameter_groups"]

L2_PENALTY = 1e-5  # Keras-style λ: the loss gains λ·‖w‖² for every kernel w
PAPER_STRIDES = (2, 2, 2, 2, 2, 2, 1, 1)  # one per separable block: stride 2 except in layers 7 and 8


def checked_strides(strides: Iterable[int]) -> tuple[int, ...]:
    """``strides`` as a tuple (JSON gives a list), or ValueError unless it is one 1 or 2 per block."""
    strides = tuple(strides)
    if not strides:
        raise ValueError("strides must name at least one separable block")
    if any(stride not in (1, 2) for stride in strides):
        raise ValueError(f"strides must be 1 or 2 for every block, got {strides}")
    return tuple(int(stride) for stride in strides)


def checked_dropout(dropout: float) -> float:
    """``dropout``, or ValueError unless 0 <= dropout < 1 (at 1 every channel would be dropped)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained network from its checkpoint."""

    in_channels: int  # the stores' code size C
    outputs: int  # 1 (binary logit or regression value) or K (class logits)
    filters: int = 128
    dense: int = 128
    dropout: float = 0.2
    strides: tuple[int, ...] = PAPER_STRIDES  # one per separable block, 1 or 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", checked_strides(self.strides))
        checked_dropout(self.dropout)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SeparableBlock(nn.Module):
    """Depthwise 3×3 + pointwise 1×1 convolution, BN, LeakyReLU, channel dropout."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        # Biases would be cancelled by the batch normalisation that follows.
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels,
                                   bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.LeakyReLU(0.01)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.norm(self.pointwise(self.depthwise(x)))))


class NICNet(nn.Module):
    """(N, C, H, W) grids → (N, outputs) logits or values, for any H, W ≥ 1.

    Inputs are first standardised per channel with the training stores' tissue
    statistics (buffers ``input_mean``/``input_std``, saved with the weights and set by
    :meth:`set_input_statistics`). Raw codes sit far from zero (mean-RGB tissue is ~0.8,
    background 1.0), so the convolutions' zero padding at crop borders makes edges
    that swamp the faint tissue differences a label depends on; on the synthetic
    lesion slides, raw inputs left training at chance for 600+ steps in 3 of 4 seeds,
    standardised inputs took off within 300 steps in 3 of 3.

    ``features[0]`` is the first conv layer: Grad-CAM reads its activations (after
    LeakyReLU, before dropout) to localise the evidence at near-grid resolution.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.zeros(config.in_channels))
        self.register_buffer("input_std", torch.ones(config.in_channels))
        blocks = []
        channels = config.in_channels
        for stride in config.strides:
            blocks.append(SeparableBlock(channels, config.filters, stride, config.dropout))
            channels = config.filters
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dense = nn.Sequential(nn.Linear(config.filters, config.dense, bias=False), nn.BatchNorm1d(config.dense),
                                   nn.LeakyReLU(0.01))
        self.head = nn.Linear(config.dense, config.outputs)

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of the training codes (std floored at 1e-6)."""
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean.view(1, -1, 1, 1)) / self.input_std.view(1, -1, 1, 1)
        return self.head(self.dense(self.pool(self.features(x)).flatten(1)))


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Optimiser groups: kernels with the paper's L2 penalty, BN and biases without.

    Keras adds λ·‖w‖² to the loss, whose gradient is 2λw: that is Adam's
    ``weight_decay`` of 2λ (coupled, as in Keras, not AdamW's decoupled decay).
    """
    kernels = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": kernels, "weight_decay": 2 * L2_PENALTY}, {"params": others, "weight_decay": 0.0}]


@dataclass
class TrainedModel:
    """A network with what turns its raw outputs into predictions, saved as one checkpoint.

    Regression targets are standardised for training (MSE at the paper's learning rate
    diverges on labels in the hundreds), so predictions undo it with the training set's
    ``target_mean`` and ``target_std``.
    """

    network: NICNet
    task: str
    target_mean: float = 0.0
    target_std: float = 1.0

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE on the logit, cross-entropy on the class logits, or MSE on the standardised value."""
        if self.task == "binary":
            return nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], labels.float())
        if self.task == "multiclass":
            return nn.functional.cross_entropy(outputs, labels.long())
        return nn.functional.mse_loss(outputs[:, 0], (labels.float() - self.target_mean) / self.target_std)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """P(label = 1) (N,), class probabilities (N, K), or values in label units (N,)."""
        if self.task == "binary":
            return torch.sigmoid(outputs[:, 0])
        if self.task == "multiclass":
            return torch.softmax(outputs, dim=1)
        return outputs[:, 0] * self.target_std + self.target_mean

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write weights, architecture and output mapping (plus ``extra`` metadata) to ``path``."""
        torch.save({"config": self.network.config.to_json(), "state": self.network.state_dict(), "task": self.task,
                    "target_mean": self.target_mean, "target_std": self.target_std, **extra}, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
        """A checkpoint written by :meth:`save`, in eval mode on ``device``.

        Checkpoints from before ``strides`` was a setting lack the key and get the
        paper's network, which is what they hold.
        """
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        network = NICNet(ModelConfig(**checkpoint["config"]))
        network.load_state_dict(checkpoint["state"])
        return cls(network.to(device).eval(), checkpoint["task"], checkpoint["target_mean"], checkpoint["target_std"])

"""The encoders of the NIC paper's appendix and the networks that train them.

Every network takes patches normalised to [-1, 1] (``x / 255 * 2 - 1``, the encoder
spec's mean = std = 0.5), so generators and decoders end in ``tanh`` and compare with
their inputs directly. Sizes follow the patch: a convolution of stride 2 and padding 1
maps a side ``s`` to ``ceil(s / 2)``, and decoders upsample to exactly the sizes their
encoder went through, so the same code builds the paper's 128-px RGB networks (C = 128)
and the 9-px grayscale ones of the synthetic task (C = 16).

* :class:`PatchEncoder` — strided 3×3 convs (32, 64, … up to 512) + BN + LeakyReLU,
  dense 512 + BN + LeakyReLU, linear dense C. Shared by the VAE (C = μ), the Siamese
  network and the supervised baseline; it is what gets exported.
* :class:`VAE` — adds the log σ² head and a decoder (dense → smallest map, nearest
  upsample + 3×3 conv stages, 3×3 conv, tanh).
* :class:`Siamese` — one encoder on both patches, codes concatenated, dense 256 + BN +
  LeakyReLU, one logit ("same location").
* :class:`BiGAN` — encoder with its own 2× average pool, generator and joint
  discriminator over (x, z).
* :class:`SupervisedNet` — encoder + dense 256 + BN + LeakyReLU + one logit (2 classes)
  or K logits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LEAK = 0.2  # LeakyReLU slope, as in the paper's Keras models
MAX_CONVS = 5
MIN_MAP_PX = 4  # encoders stop downsampling once the map is this small (128 px → 4 px after 5 convs)
FIRST_FILTERS = 32
DENSE_UNITS = 512
HEAD_UNITS = 256  # Siamese and supervised heads
BIGAN_CONVS = 4
BIGAN_FILTERS = 128
BIGAN_GENERATOR_FILTERS = 64
BIGAN_DISCRIMINATOR_UNITS = 1024
BIGAN_DROPOUT = 0.5

__all__ = [
    "BiGAN",
    "BiGANEncoder",
    "EncoderArch",
    "PatchEncoder",
    "Siamese",
    "SupervisedNet",
    "VAE",
    "bigan_downsample",
    "conv_sizes",
]


def conv_sizes(patch_px: int, n_convs: int) -> list[int]:
    """Map sides through ``n_convs`` stride-2, padding-1 3×3 convs: [patch_px, ceil(patch_px/2), …]."""
    sizes = [patch_px]
    for _ in range(n_convs):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _n_convs(patch_px: int) -> int:
    """Strided convs until the map is ≤ 4 px, at most 5: 128 px → 5 (the paper), 9 px → 2."""
    n = 0
    while n < MAX_CONVS and conv_sizes(patch_px, n)[-1] > MIN_MAP_PX:
        n += 1
    return max(n, 1)


@dataclass(frozen=True)
class EncoderArch:
    """Input and code of an encoder; the layer widths follow from the patch size."""

    patch_px: int
    channels: int
    code_size: int

    def __post_init__(self) -> None:
        if self.patch_px < 4:
            raise ValueError(f"patch_px must be at least 4, got {self.patch_px}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.code_size < 1:
            raise ValueError(f"code_size must be positive, got {self.code_size}")

    @property
    def filters(self) -> tuple[int, ...]:
        """Conv widths: 32, 64, … doubling, one per strided conv (32…512 at 128 px)."""
        return tuple(FIRST_FILTERS * 2**k for k in range(_n_convs(self.patch_px)))

    @property
    def sizes(self) -> list[int]:
        """Map side before each conv and after the last."""
        return conv_sizes(self.patch_px, len(self.filters))


def _conv_block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(LEAK),
    ]


def _dense_block(in_features: int, out_features: int) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.LeakyReLU(LEAK)]


class PatchEncoder(nn.Module):
    """Patch (N, channels, P, P) in [-1, 1] → code (N, C): the encoder every method exports."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = arch.channels
        for filters in arch.filters:
            layers += _conv_block(in_channels, filters, stride=2)
            in_channels = filters
        flat = in_channels * arch.sizes[-1] ** 2
        self.features = nn.Sequential(*layers, nn.Flatten(), *_dense_block(flat, DENSE_UNITS))
        # Not "code": torch.export's GraphModule already has a `code` attribute (its source).
        self.head = nn.Linear(DENSE_UNITS, arch.code_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Decoder(nn.Module):
    """Code → patch in [-1, 1], mirroring an encoder's map sizes (the paper's VAE decoder)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        sizes, filters = arch.sizes, arch.filters
        self.start_channels, self.start_px = filters[-1], sizes[-1]
        self.dense = nn.Sequential(nn.Linear(arch.code_size, self.start_channels * self.start_px**2),
                                   nn.LeakyReLU(LEAK))
        layers: list[nn.Module] = []
        in_channels = self.start_channels
        # Stage k upsamples to the encoder's size at that depth with half the encoder's width
        # there: 512 → 256, 128, 64, 32, 16 at 128 px, as in the appendix.
        for size, width in zip(reversed(sizes[:-1]), reversed(filters)):
            out_channels = width // 2
            layers += [nn.Upsample(size=(size, size), mode="nearest"), *_conv_block(in_channels, out_channels, 1)]
            in_channels = out_channels
        layers += [nn.Conv2d(in_channels, arch.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dense(z).view(-1, self.start_channels, self.start_px, self.start_px)
        return self.body(h)


class VAE(nn.Module):
    """Variational auto-encoder; ``encoder`` maps to μ, which is the exported code."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.encoder = PatchEncoder(arch)
        self.log_var = nn.Linear(DENSE_UNITS, arch.code_size)
        self.decoder = _Decoder(arch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction of a sampled z, μ and log σ²."""
        h = self.encoder.features(x)
        mu, log_var = self.encoder.head(h), self.log_var(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        return self.decoder(z), mu, log_var

    @staticmethod
    def loss(x: torch.Tensor, reconstruction: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
             kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, MSE, KL): MSE averaged over pixels, KL summed over the code and averaged over the batch."""
        mse = torch.mean((reconstruction - x) ** 2)
        kl = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
        return mse + kl_weight * kl, mse, kl


class Siamese(nn.Module):
    """Two patches → logit that they show the same location (shared encoder)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.encoder = PatchEncoder(arch)
        self.head = nn.Sequential(*_dense_block(2 * arch.code_size, HEAD_UNITS), nn.Linear(HEAD_UNITS, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        codes = self.encoder(torch.cat([a, b]))
        code_a, code_b = codes.chunk(2)  # one encoder pass keeps BN statistics over both halves
        return self.head(torch.cat([code_a, code_b], dim=1)).squeeze(1)


class SupervisedNet(nn.Module):
    """Encoder + dense 256 head; one logit for two classes (sigmoid), else one per class (softmax)."""

    def __init__(self, arch: EncoderArch, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a supervised encoder needs at least 2 classes, got {n_classes}")
        self.n_classes = n_classes
        outputs = 1 if n_classes == 2 else n_classes
        self.encoder = PatchEncoder(arch)
        self.head = nn.Sequential(*_dense_block(arch.code_size, HEAD_UNITS), nn.Linear(HEAD_UNITS, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.n_classes == 2:
            return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), labels.float())
        return nn.functional.cross_entropy(logits, labels)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class index per row of logits."""
        if self.n_classes == 2:
            return (logits.squeeze(1) > 0).long()
        return logits.argmax(dim=1)


def bigan_downsample(patch_px: int) -> int:
    """The BiGAN's input pooling: 2× as in the paper for pathology patches (≥ 32 px), none
    for the 9-px digits, which a 2× pool would shrink to an unreadable 4 px."""
    return 2 if patch_px >= 32 else 1


def _bigan_trunk(channels: int, n_convs: int) -> nn.Sequential:
    """4 strided 3×3 convs of 128, each LeakyReLU then BN, the order of the paper's released BiGAN encoder."""
    layers: list[nn.Module] = []
    in_channels = channels
    for _ in range(n_convs):
        layers += [nn.Conv2d(in_channels, BIGAN_FILTERS, 3, stride=2, padding=1), nn.LeakyReLU(LEAK),
                   nn.BatchNorm2d(BIGAN_FILTERS)]
        in_channels = BIGAN_FILTERS
    return nn.Sequential(*layers, nn.Flatten())


class BiGANEncoder(nn.Module):
    """BiGAN encoder on full-size patches: its own average pool, 4 convs of 128, dense C."""

    def __init__(self, arch: EncoderArch, downsample: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity()
        inner_px = arch.patch_px // downsample
        self.features = _bigan_trunk(arch.channels, BIGAN_CONVS)
        self.head = nn.Linear(BIGAN_FILTERS * conv_sizes(inner_px, BIGAN_CONVS)[-1] ** 2, arch.code_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.pool(x)))


class _Generator(nn.Module):
    """z → pooled-size patch: dense to the smallest map × 64, 4 × (upsample + conv 128), conv, tanh."""

    def __init__(self, arch: EncoderArch, inner_px: int) -> None:
        super().__init__()
        sizes = conv_sizes(inner_px, BIGAN_CONVS)
        self.start_px = sizes[-1]
        self.dense = nn.Sequential(nn.Linear(arch.code_size, BIGAN_GENERATOR_FILTERS * self.start_px**2),
                                   nn.BatchNorm1d(BIGAN_GENERATOR_FILTERS * self.start_px**2), nn.LeakyReLU(LEAK))
        layers: list[nn.Module] = []
        in_channels = BIGAN_GENERATOR_FILTERS
        for size in reversed(sizes[:-1]):
            layers += [nn.Upsample(size=(size, size), mode="nearest"), *_conv_block(in_channels, BIGAN_FILTERS, 1)]
            in_channels = BIGAN_FILTERS
        layers += [nn.Conv2d(in_channels, arch.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dense(z).view(-1, BIGAN_GENERATOR_FILTERS, self.start_px, self.start_px)
        return self.body(h)


class _Discriminator(nn.Module):
    """(x, z) → logit that the pair is real: an encoder-shaped image branch, the latent, 2 × dense 1024."""

    def __init__(self, arch: EncoderArch, inner_px: int) -> None:
        super().__init__()
        flat = BIGAN_FILTERS * conv_sizes(inner_px, BIGAN_CONVS)[-1] ** 2
        self.image = nn.Sequential(_bigan_trunk(arch.channels, BIGAN_CONVS), nn.Linear(flat, arch.code_size))
        units = BIGAN_DISCRIMINATOR_UNITS
        self.joint = nn.Sequential(
            nn.Linear(2 * arch.code_size, units), nn.LeakyReLU(LEAK), nn.Dropout(BIGAN_DROPOUT),
            nn.Linear(units, units), nn.LeakyReLU(LEAK), nn.Dropout(BIGAN_DROPOUT),
            nn.Linear(units, 1),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.image(x), z], dim=1)).squeeze(1)


class BiGAN(nn.Module):
    """Encoder, generator and joint discriminator; images inside are at the pooled size."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.arch = arch
        self.downsample = bigan_downsample(arch.patch_px)
        inner_px = arch.patch_px // self.downsample
        self.encoder = BiGANEncoder(arch, self.downsample)
        self.generator = _Generator(arch, inner_px)
        self.discriminator = _Discriminator(arch, inner_px)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Full-size patches at the resolution the generator and discriminator work at."""
        return self.encoder.pool(x)

    def sample_latent(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randn(n, self.arch.code_size, device=device)


def parameter_groups(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """All parameters of several modules, for one optimiser over them."""
    return [p for module in modules for p in module.parameters()]

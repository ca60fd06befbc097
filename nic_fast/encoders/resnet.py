"""ResNet-50 cut after its third stage and average-pooled: the CLAM / TRIDENT baseline encoder.

CLAM (Lu et al., Nature BME 2021; https://github.com/mahmoodlab/CLAM, ``models/resnet_custom.py``)
and TRIDENT (``ResNet50InferenceEncoder``: timm ``resnet50.tv_in1k``, ``out_indices=[3]``, then
``AdaptiveAvgPool2d(1)``) embed patches with ImageNet ResNet-50 weights up to ``layer3``:
1024 channels, pooled. Parameter names are torchvision's, which timm's ResNet shares, so
either library's ImageNet checkpoint loads; its ``layer4`` and ``fc`` are not used.
"""
from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3×3 conv)."""

    expansion = 4

    def __init__(self, in_dim: int, width: int, stride: int) -> None:
        super().__init__()
        out_dim = width * self.expansion
        self.conv1 = nn.Conv2d(in_dim, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(out_dim))
                           if stride != 1 or in_dim != out_dim else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _stage(in_dim: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_dim, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50Trunk(nn.Module):
    """(N, 3, H, W) → (N, 1024): stem, layer1–layer3, global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 3, 1)
        self.layer2 = _stage(256, 128, 4, 2)
        self.layer3 = _stage(512, 256, 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

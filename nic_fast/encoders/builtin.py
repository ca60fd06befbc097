"""Encoders defined in code, so the paper's baselines need no file to run."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nic_fast.encoders.spec import EncoderSpec, weights_sha256


class MeanRGB(nn.Module):
    """The paper's mean-RGB baseline: each channel's mean over the patch (C = channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _mean_rgb() -> tuple[nn.Module, EncoderSpec]:
    module = MeanRGB().eval()
    spec = EncoderSpec(
        name="mean-rgb",
        input_px=128,
        mpp=0.5,
        channels=3,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        code_size=3,
        sha256=weights_sha256(module.state_dict()),
        description="paper baseline: mean of each RGB channel over the patch, in [0, 1]",
    )
    return module, spec


_BUILDERS: dict[str, Callable[[], tuple[nn.Module, EncoderSpec]]] = {"mean-rgb": _mean_rgb}


def builtin_encoders() -> dict[str, EncoderSpec]:
    """Specs of the built-in encoders, by name."""
    return {name: build()[1] for name, build in _BUILDERS.items()}


def build_builtin(name: str) -> tuple[nn.Module, EncoderSpec]:
    """A fresh (module, spec) for a built-in encoder; KeyError for an unknown name."""
    return _BUILDERS[name]()

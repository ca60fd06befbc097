"""Trained encoders out as encoder files that ``nic-fast compress --encoder FILE`` uses as they are.

The spec written with the weights says everything compress needs: the patch side the
module takes (a BiGAN's 2× pool is inside the module, so that is the full patch size),
the µm/px it was trained at (None for pixel-unit sets such as digits), the channels,
the normalisation the training used (x / 255 scaled to [-1, 1]: mean = std = 0.5) and
the code size. The VAE's module outputs μ.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch import nn

from nic_fast.encoder_training.fit import FitResult
from nic_fast.encoder_training.models import bigan_downsample
from nic_fast.encoders import EncoderSpec, save_encoder, weights_sha256
from nic_fast.encoders.builtin import MeanRGB

TRAINING_MEAN = 0.5  # training inputs are x / 255 * 2 - 1
TRAINING_STD = 0.5

__all__ = ["export_encoder", "mean_pixel_encoder", "trained_spec"]


def trained_spec(result: FitResult, *, name: str, mpp: float | None) -> EncoderSpec:
    """The spec of a trained encoder, with the hash of its kept weights."""
    arch = result.arch
    last = result.history[-1]["epoch"] if result.history else 0
    description = (f"nic-fast {result.method} encoder, kept epoch {result.kept_epoch} of {last}; "
                   f"input x / 255 scaled to [-1, 1]")
    if result.method == "vae":
        description += "; outputs the posterior mean μ"
    pool = bigan_downsample(arch.patch_px)
    if result.method == "bigan" and pool > 1:
        description += f"; average-pools its input {pool}×{pool} inside the module, as the paper's BiGAN"
    spec = EncoderSpec(name=name, input_px=arch.patch_px, mpp=mpp, channels=arch.channels,
                       mean=(TRAINING_MEAN,) * arch.channels, std=(TRAINING_STD,) * arch.channels,
                       code_size=arch.code_size, sha256="", description=description)
    return replace(spec, sha256=weights_sha256(result.encoder.state_dict()))


def export_encoder(result: FitResult, path: str | os.PathLike[str], *, name: str | None = None,
                   mpp: float | None) -> EncoderSpec:
    """Write the kept encoder of ``result`` to ``path`` (.pt or .pt2); returns the spec written.

    ``name`` defaults to the file stem; ``mpp`` is the µm/px the patches were sampled at,
    or None for patch sets in plain pixels.
    """
    path = Path(path)
    spec = trained_spec(result, name=name or path.stem, mpp=mpp)
    save_encoder(result.encoder, spec, path)
    return spec


def mean_pixel_encoder(patch_px: int, channels: int, mpp: float | None) -> tuple[nn.Module, EncoderSpec]:
    """The paper's mean baseline for any patch size: each channel's mean in [0, 1] (C = channels).

    The built-in ``mean-rgb`` is fixed to 128-px RGB patches; the digit benchmark needs the
    same baseline on 9-px grayscale ones.
    """
    module = MeanRGB().eval()
    spec = EncoderSpec(name=f"mean-pixel-{patch_px}px", input_px=patch_px, mpp=mpp, channels=channels,
                       mean=(0.0,) * channels, std=(1.0,) * channels, code_size=channels,
                       sha256=weights_sha256(module.state_dict()),
                       description="baseline: mean of each channel over the patch, in [0, 1]")
    return module, spec

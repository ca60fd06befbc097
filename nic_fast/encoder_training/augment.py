"""Batch augmentations on (N, C, P, P) float patches in [0, 1], before normalisation.

The contrastive task only teaches something if "same location" survives everything a
scanner and a stain can do to a patch, so its two views go through the paper's heavy
list: rotation (any angle and the 8 dihedral turns), zoom, elastic deformation, colour
(HSV) jitter, brightness, contrast and Gaussian noise — kornia's batched GPU/CPU
implementations, each sample drawing its own parameters. VAE, BiGAN and the supervised
baseline see the dihedral turns only: they must model the tissue as it is.

Tissue has no preferred orientation; digits do (a turned 6 is a 9), so *upright* patch
sets get small tilts instead of turns and mirrors.

Randomness comes from torch's global generator, which the training loop seeds per
epoch, so a run (and a resumed run) replays the same augmentations.

kornia is imported where the contrastive augmentation is built: it takes about a second
to import, and nothing else (compress, the other encoders) needs it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import kornia.augmentation as K

# Strengths in the units kornia takes: factors for brightness/contrast/saturation, a
# fraction of the half-turn for hue, [0, 1] intensity for noise, a relative zoom range.
BRIGHTNESS = 0.2
CONTRAST = 0.3
SATURATION = 0.3
HUE = 0.05
NOISE_STD = 0.04
ZOOM = (0.85, 1.15)
ELASTIC_ALPHA = 0.5  # displacement scale in normalised coordinates, before smoothing
ELASTIC_SIGMA_FRACTION = 0.12  # smoothing σ as a fraction of the patch side
UPRIGHT_TILT_DEGREES = 10.0  # rotation range of upright patches (any angle otherwise)

__all__ = ["HeavyAugment", "random_dihedral"]


def random_dihedral(x: torch.Tensor) -> torch.Tensor:
    """Each square patch under one of the 8 rotations/mirrors, drawn uniformly and independently.

    A random transpose, vertical flip and horizontal flip compose to each of the 8
    elements of the dihedral group exactly once, so three ``where`` passes replace a
    per-sample loop. Exact pixel permutations (no interpolation): no artefacts, and
    patches of tissue or digits have no preferred orientation.
    """
    draws = torch.randint(0, 2, (3, x.shape[0], 1, 1, 1), dtype=torch.bool).to(x.device)
    x = torch.where(draws[0], x.transpose(-2, -1), x)
    x = torch.where(draws[1], x.flip(-2), x)
    return torch.where(draws[2], x.flip(-1), x)


def _elastic(patch_px: int) -> K.RandomElasticTransform:
    import kornia.augmentation as K

    sigma = max(1.0, ELASTIC_SIGMA_FRACTION * patch_px)
    kernel = 2 * int(2 * sigma) + 1  # ±2σ covers the Gaussian
    return K.RandomElasticTransform(kernel_size=(kernel, kernel), sigma=(sigma, sigma),
                                    alpha=(ELASTIC_ALPHA, ELASTIC_ALPHA), padding_mode="reflection", p=0.5)


class HeavyAugment(nn.Module):
    """The contrastive task's augmentation: geometry, elastic, colour, noise; clamped to [0, 1].

    Grayscale patches get brightness and contrast but no hue or saturation jitter, which
    have no meaning for one channel. ``upright`` patches are tilted by at most 10° and
    never turned or mirrored.
    """

    def __init__(self, patch_px: int, channels: int, *, upright: bool = False) -> None:
        import kornia.augmentation as K

        super().__init__()
        self.upright = upright
        colour = (
            K.ColorJiggle(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE, p=1.0)
            if channels == 3
            else K.ColorJiggle(brightness=BRIGHTNESS, contrast=CONTRAST, p=1.0)
        )
        self.pipeline = nn.Sequential(
            K.RandomAffine(degrees=UPRIGHT_TILT_DEGREES if upright else 180.0, scale=ZOOM, padding_mode="reflection",
                           p=1.0),
            _elastic(patch_px),
            colour,
            K.RandomGaussianNoise(std=NOISE_STD, p=0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(x if self.upright else random_dihedral(x)).clamp_(0.0, 1.0)

"""Training patch encoders for nic-fast: VAE, contrastive (Siamese) and BiGAN without labels,
a supervised baseline, export to encoder files, and the patch-level probe.

The pieces follow the data: :mod:`~.patches` samples tissue patches from slides the way
``compress`` reads them (with adjacent patches for the contrastive task) and
:mod:`~.patch_files` caches them or reads labelled sets; :mod:`~.mnist` makes the
synthetic task's 9-px digit glyphs; :mod:`~.augment` and :mod:`~.models` hold the
paper's augmentations and networks; :mod:`~.methods` and :mod:`~.fit` train them with
the paper's protocol, resumably; :mod:`~.export` writes encoder files ``compress``
uses as they are; :mod:`~.probe` measures what a frozen code knows about labels.
"""
from __future__ import annotations

from nic_fast.encoder_training.export import export_encoder, mean_pixel_encoder
from nic_fast.encoder_training.fit import FitResult, TrainConfig, TrainingError, fit
from nic_fast.encoder_training.methods import METHODS
from nic_fast.encoder_training.mnist import binarised_mnist_patches, load_mnist_npz
from nic_fast.encoder_training.patch_files import load_patch_set, save_patch_cache
from nic_fast.encoder_training.patches import PatchSet, SlideSampling, sample_labelled_points, sample_slide_patches
from nic_fast.encoder_training.probe import ProbeConfig, ProbeReport, probe

__all__ = [
    "METHODS",
    "FitResult",
    "PatchSet",
    "ProbeConfig",
    "ProbeReport",
    "SlideSampling",
    "TrainConfig",
    "TrainingError",
    "binarised_mnist_patches",
    "export_encoder",
    "fit",
    "load_mnist_npz",
    "load_patch_set",
    "mean_pixel_encoder",
    "probe",
    "sample_labelled_points",
    "sample_slide_patches",
    "save_patch_cache",
]

"""Patch encoders: map normalised (N, C_in, P, P) patches to (N, code_size) embeddings.

An encoder is a module plus an :class:`EncoderSpec` (patch size, µm/px, normalisation,
code size, weights hash). Built-ins are defined in code; others live in .pt (TorchScript)
or .pt2 (torch.export) files that carry their spec, made by :func:`save_encoder` (any
module), by :func:`import_preset` (a pathology foundation model from :data:`PRESETS` and the
user's weights file) or converted from the NIC paper's Keras files by
:func:`nic_fast.encoders.keras.import_keras`. :func:`suggest_batch_size` sizes batches from memory.
"""
from __future__ import annotations

from nic_fast.encoders.builtin import builtin_encoders
from nic_fast.encoders.files import load_encoder, save_encoder
from nic_fast.encoders.importer import import_preset
from nic_fast.encoders.memory import suggest_batch_size
from nic_fast.encoders.presets import PRESETS, Preset
from nic_fast.encoders.spec import Encoder, EncoderError, EncoderSpec, weights_sha256

__all__ = [
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "PRESETS",
    "Preset",
    "builtin_encoders",
    "import_preset",
    "load_encoder",
    "save_encoder",
    "suggest_batch_size",
    "weights_sha256",
]

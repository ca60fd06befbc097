"""`encoders import`: a preset's architecture + the user's weights file → a nic-fast encoder file.

The file is checked against the architecture built on the meta device first (every key and
shape, nothing allocated), so a wrong file fails in a second whatever the model's size and is
never half-loaded. Only then are the tensors loaded (memory-mapped where the format allows)
straight into the meta-built module (``load_state_dict(assign=True)``): one copy of the
weights in memory, not two.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nic_fast.encoders.checkpoints import Weights, file_sha256, read_weights
from nic_fast.encoders.files import check_encoder_suffix, write_encoder
from nic_fast.encoders.presets import Preset, build_on_meta, get_preset
from nic_fast.encoders.spec import EncoderError, EncoderSpec

_LISTED = 4  # keys named in an error message


@dataclass(frozen=True)
class ImportResult:
    spec: EncoderSpec
    preset: Preset
    path: Path
    weights_file_sha256: str
    parameters: int


def import_preset(preset_name: str, weights_path: str | os.PathLike[str], output: str | os.PathLike[str],
                  name: str | None = None) -> ImportResult:
    """Build ``preset_name``, load ``weights_path`` into it, write the encoder file ``output`` (.pt or .pt2)."""
    preset = get_preset(preset_name)
    output = Path(output)
    check_encoder_suffix(output)  # before reading gigabytes of weights
    weights = read_weights(Path(weights_path))
    module = load_weights(preset, weights)
    file_hash = file_sha256(weights.path)
    description = (f"{preset.title}: {preset.architecture}, {preset.readout}; weights {weights.path.name} "
                   f"(sha256 {file_hash}); licence: {preset.licence}; {preset.card}")
    spec = preset.spec(description)
    if name:
        spec = EncoderSpec(**{**spec.__dict__, "name": name})
    written = write_encoder(module, spec, output)
    return ImportResult(written, preset, output, file_hash, sum(p.numel() for p in module.parameters()))


def check_weights(preset: Preset, weights: Weights) -> None:
    """Raise a one-line :class:`EncoderError` unless ``weights`` has exactly the preset's keys and shapes."""
    expected = {key: tuple(t.shape) for key, t in build_on_meta(preset).state_dict().items()}
    on_meta = {key: torch.empty(shape, device="meta") for key, shape in weights.shapes().items()}
    try:
        given = {key: tuple(t.shape) for key, t in preset.convert(on_meta).items()}
    except RuntimeError as exc:  # e.g. q, k, v of different widths cannot be concatenated
        raise EncoderError(f"{weights.path} does not fit preset {preset.name!r}: {exc}") from exc
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    wrong = [f"{key} is {given[key]}, {preset.name} has {expected[key]}" for key in expected
             if key in given and given[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({_first(wrong)})")
    if problems:
        raise EncoderError(f"{weights.path} does not fit preset {preset.name!r} ({preset.architecture}): "
                           f"{'; '.join(problems)}; is it the {preset.weights_file} from {preset.card}?")


def load_weights(preset: Preset, weights: Weights) -> nn.Module:
    """The preset's module holding ``weights`` (float32, eval mode), after :func:`check_weights`."""
    check_weights(preset, weights)
    module = build_on_meta(preset)
    state = {key: t.float() if t.is_floating_point() else t for key, t in preset.convert(weights).items()}
    module.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:  # a module that creates tensors outside its state dict must create them on the CPU
        raise RuntimeError(f"preset {preset.name!r} left {left_on_meta[:_LISTED]} on the meta device")
    return module.eval()


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (", …" if len(items) > _LISTED else "")

"""The encoder contract: what a patch encoder takes and returns, and the loaded encoder that enforces it.

The spec travels inside every encoder file and into every compressed-slide store, so a
store always says which weights made it and how its patches were normalised.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

SPEC_FORMAT_VERSION = 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class EncoderError(ValueError):
    """An encoder name, file or spec that nic-fast cannot use; the message says what to do."""


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder expects and produces.

    Patches reach the encoder as (N, channels, input_px, input_px) float tensors already
    normalised per channel as ``(x / 255 - mean[c]) / std[c]``; it returns (N, code_size).
    ``sha256`` identifies the weights (see :func:`weights_sha256`); an empty string means
    "not computed yet" and is filled in by ``save_encoder``.
    """

    name: str
    input_px: int
    mpp: float | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    code_size: int
    sha256: str
    description: str = ""

    def __post_init__(self) -> None:
        # Normalise lists (from JSON or callers) to tuples so specs stay hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if _is_number(self.mpp):
            object.__setattr__(self, "mpp", float(self.mpp))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if not self.name or not isinstance(self.name, str):
            problems.append("name must be a non-empty string")
        if not _is_int(self.input_px) or self.input_px <= 0:
            problems.append(f"input_px must be a positive integer, got {self.input_px!r}")
        if self.mpp is not None and (not _is_number(self.mpp) or not self.mpp > 0):
            problems.append(f"mpp must be a positive number of µm/px or null, got {self.mpp!r}")
        if not _is_int(self.channels) or self.channels not in (1, 3):
            problems.append(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if len(values) != self.channels or not all(math.isfinite(v) for v in values):
                problems.append(f"{field_name} must hold {self.channels} finite numbers, got {values!r}")
        if any(v <= 0 for v in self.std):
            problems.append(f"std must be positive, got {self.std!r}")
        if not _is_int(self.code_size) or self.code_size <= 0:
            problems.append(f"code_size must be a positive integer, got {self.code_size!r}")
        if not isinstance(self.sha256, str) or (self.sha256 and not _SHA256_RE.fullmatch(self.sha256)):
            problems.append(f"sha256 must be 64 lowercase hex digits or empty, got {self.sha256!r}")
        if not isinstance(self.description, str):
            problems.append("description must be a string")
        if problems:
            raise EncoderError(f"invalid encoder spec {self.name!r}: " + "; ".join(problems))

    def scale_offset(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (scale, offset) with ``input = x_uint8 * scale[c] + offset[c]``.

        The patchify kernel applies normalisation as one fused multiply-add per pixel.
        """
        scale = tuple(1.0 / (255.0 * s) for s in self.std)
        offset = tuple(-m / s for m, s in zip(self.mean, self.std))
        return scale, offset

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict, with a format version so future readers can migrate old files."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return {"format_version": SPEC_FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncoderSpec:
        """Parse and validate a dict written by :meth:`to_json`; raises :class:`EncoderError`."""
        if not isinstance(data, Mapping):
            raise EncoderError(f"encoder spec must be a JSON object, got {type(data).__name__}")
        fields = dict(data)
        version = fields.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise EncoderError(
                f"encoder spec format_version {version!r} is not supported (this nic-fast reads "
                f"{SPEC_FORMAT_VERSION}); upgrade nic-fast"
            )
        known = set(cls.__dataclass_fields__)
        required = known - {"description"}
        missing, unknown = sorted(required - fields.keys()), sorted(fields.keys() - known)
        if missing or unknown:
            raise EncoderError(f"invalid encoder spec: missing fields {missing}, unknown fields {unknown}")
        for field_name in ("mean", "std"):
            if not isinstance(fields[field_name], (list, tuple)) or not all(_is_number(v) for v in fields[field_name]):
                raise EncoderError(f"invalid encoder spec: {field_name} must be a list of numbers")
        return cls(**fields)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: keys in sorted order, each with its dtype, shape and raw bytes.

    Independent of the file format and device, so a .pt and a .pt2 of the same weights
    (and the module before saving) hash alike.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Encoder:
    """A loaded encoder: its spec, the module that runs it, and where it came from.

    Calling it runs inference without autograd and checks the input against the spec,
    so a mismatched patch size or channel count fails here rather than deep inside a conv.
    """

    def __init__(self, spec: EncoderSpec, module: Callable[[torch.Tensor], torch.Tensor], source: str) -> None:
        self.spec = spec
        self.module = module
        self.source = source
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def __repr__(self) -> str:
        return f"Encoder({self.spec.name!r}, source={self.source!r}, device={self.device}, dtype={self.dtype})"

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Encoder:
        """Move to ``device`` (and ``dtype``), in place; returns self.

        Weights go channels-last: a no-op for modules without 4-D weights, and the layout
        oneDNN (CPU) and cuDNN with fp16/bf16 (GPU) run convolutions fastest in.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = self.dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise EncoderError(f"encoder dtype must be floating point, got {dtype}")
        if isinstance(self.module, torch.nn.Module):
            self.module = self.module.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
        self.device, self.dtype = device, dtype
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised patches (N, channels, input_px, input_px) → (N, code_size).

        ``x`` must already be on the encoder's device (a silent host-device copy would hide
        a pipeline bug); it is cast to the encoder's dtype and channels-last layout.
        """
        spec = self.spec
        expected = (spec.channels, spec.input_px, spec.input_px)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise EncoderError(
                f"encoder {spec.name!r} takes (N, {', '.join(map(str, expected))}) patches, got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise EncoderError(f"encoder {spec.name!r} is on {self.device}, input is on {x.device}; move one of them")
        x = x.to(dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            # Row-major out, whatever the module returns: a ViT's class token is a strided view
            # of its token sequence, and the engine's kernels read rows of C contiguous values.
            return self.module(x).contiguous()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

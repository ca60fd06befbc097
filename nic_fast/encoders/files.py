"""Encoder files: a TorchScript (.pt) or torch.export (.pt2) module with its spec inside.

The spec is stored as the extra file ``nic_fast.json`` in the archive, so one file is
all a user needs to hand to ``nic-fast compress``, and no file can lose its metadata.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from nic_fast.encoders.builtin import build_builtin, builtin_encoders
from nic_fast.encoders.spec import Encoder, EncoderError, EncoderSpec, weights_sha256

METADATA_NAME = "nic_fast.json"
SUFFIXES = (".pt", ".pt2")
_HOW_TO_MAKE = (
    "make an encoder file with nic_fast.encoders.save_encoder(module, spec, path), "
    "or convert a Keras .h5 with `nic-fast encoders import-keras FILE.h5 -o FILE.pt`"
)


@contextlib.contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Hide torch's own deprecation notices (torch.jit is deprecated upstream): users cannot act on them."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")
            warnings.filterwarnings("ignore", category=category, message=r".*torch\.jit")
        yield


def save_encoder(module: nn.Module, spec: EncoderSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``module`` with ``spec`` to ``path`` (.pt → TorchScript, .pt2 → torch.export).

    The module is copied to the CPU in eval mode (the caller's module is left as it was)
    and run once on a blank batch to check it maps the spec's input to (N, code_size).
    The spec's sha256 is computed from the weights when empty, and must match them when set.
    Returns the path written.
    """
    path = Path(path)
    check_encoder_suffix(path)
    write_encoder(copy.deepcopy(module), spec, path)
    return path


def write_encoder(module: nn.Module, spec: EncoderSpec, path: str | os.PathLike[str]) -> EncoderSpec:
    """:func:`save_encoder` without the defensive copy: ``module`` is moved to the CPU and put in
    eval mode in place (a multi-GB foundation model is not worth holding twice). Returns the
    spec as written, its sha256 filled in."""
    path = Path(path)
    check_encoder_suffix(path)
    module = module.to("cpu").eval()
    spec = _spec_for_weights(spec, module)
    example = torch.zeros(2, spec.channels, spec.input_px, spec.input_px)
    _check_output(module, spec, example)
    metadata = json.dumps(spec.to_json(), indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_torch_deprecations():
        if path.suffix == ".pt":
            torch.jit.save(_to_torchscript(module, example), str(path), _extra_files={METADATA_NAME: metadata})
        else:
            batch = torch.export.Dim("batch")
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, path, extra_files={METADATA_NAME: metadata})
    return spec


def check_encoder_suffix(path: Path) -> None:
    """Refuse a path that is neither .pt nor .pt2 (callers check before any expensive work)."""
    if path.suffix not in SUFFIXES:
        raise EncoderError(f"encoder files end in .pt (TorchScript) or .pt2 (torch.export), got {path.name!r}")


def load_encoder(name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Encoder:
    """A built-in encoder by name, or an encoder file (.pt or .pt2) written by :func:`save_encoder`."""
    builtins = builtin_encoders()
    if isinstance(name_or_path, str) and name_or_path in builtins:
        module, spec = build_builtin(name_or_path)
        return Encoder(spec, module, f"builtin:{name_or_path}").to(device)
    path = Path(name_or_path)
    if not path.is_file():
        raise EncoderError(
            f"unknown encoder {str(name_or_path)!r}: not a built-in ({', '.join(sorted(builtins))}) "
            "and no such file"
        )
    if path.suffix == ".h5":
        raise EncoderError(
            f"{path} is a Keras file; convert it first with `nic-fast encoders import-keras {path} -o FILE.pt`"
        )
    if path.suffix not in SUFFIXES:
        raise EncoderError(f"{path}: encoder files end in .pt (TorchScript) or .pt2 (torch.export); {_HOW_TO_MAKE}")
    module, metadata = _load_pt(path) if path.suffix == ".pt" else _load_pt2(path)
    if not metadata:
        raise EncoderError(f"{path} has no nic-fast metadata ({METADATA_NAME}); {_HOW_TO_MAKE}")
    try:
        spec = EncoderSpec.from_json(json.loads(metadata))
    except json.JSONDecodeError as exc:
        raise EncoderError(f"{path}: {METADATA_NAME} is not valid JSON ({exc})") from exc
    return Encoder(spec, module, str(path)).to(device)


def _spec_for_weights(spec: EncoderSpec, module: nn.Module) -> EncoderSpec:
    """The spec with the module's weights hash; a stale hash would mislabel every store made with it."""
    sha256 = weights_sha256(module.state_dict())
    if spec.sha256 and spec.sha256 != sha256:
        raise EncoderError(
            f"spec {spec.name!r} says sha256 {spec.sha256[:12]}… but the module's weights hash to "
            f"{sha256[:12]}…; clear spec.sha256 to have it recomputed"
        )
    return replace(spec, sha256=sha256)


def _check_output(module: nn.Module, spec: EncoderSpec, example: torch.Tensor) -> None:
    with torch.inference_mode():
        out = module(example)
    expected = (example.shape[0], spec.code_size)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"module for {spec.name!r} maps {tuple(example.shape)} to {got}, spec says {expected}")


def _to_torchscript(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Script when the code allows it (keeps control flow), else trace on the example batch."""
    try:
        return torch.jit.script(module)
    except Exception:  # noqa: BLE001 - TorchScript raises many types for unscriptable Python
        return torch.jit.trace(module, example)


def _load_pt(path: Path) -> tuple[nn.Module, str]:
    extra_files = {METADATA_NAME: ""}
    try:
        with quiet_torch_deprecations():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except RuntimeError as exc:
        raise EncoderError(f"{path} is not a TorchScript file ({_first_line(exc)}); {_HOW_TO_MAKE}") from exc
    return module.eval(), _as_text(extra_files[METADATA_NAME])


def _load_pt2(path: Path) -> tuple[nn.Module, str]:
    extra_files = {METADATA_NAME: ""}
    try:
        with quiet_torch_deprecations():
            program = torch.export.load(path, extra_files=extra_files)
    except Exception as exc:  # noqa: BLE001 - torch.export raises several types for foreign files
        raise EncoderError(f"{path} is not a torch.export file ({_first_line(exc)}); {_HOW_TO_MAKE}") from exc
    # An exported program is already in inference form (saved from an eval() module).
    return program.module(), _as_text(extra_files[METADATA_NAME])


def _as_text(content: str | bytes) -> str:
    return content.decode() if isinstance(content, bytes) else content


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

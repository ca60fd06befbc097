"""Reading a published weights file into a flat ``{name: tensor}`` without holding it in memory twice.

``.safetensors`` files are read through ``safetensors`` (the ``nic-fast[foundation]`` extra):
their header gives every shape before any tensor is read. Pickled ``torch.save`` files (``.bin``,
``.pth``, ``.pt``, ``.torch``, ``.ckpt``) are memory-mapped (``mmap=True``), so checking a
4 GB ViT-g checkpoint against its preset reads only the archive's index, and are always
loaded with ``weights_only=True``: a file from the internet never runs code.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from nic_fast.encoders.spec import EncoderError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".torch", ".ckpt")
# Containers that training code wraps a state dict in (CTransPath: "model"; Lightning: "state_dict").
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher")


class Weights(Mapping[str, torch.Tensor]):
    """A weights file's tensors by name; :meth:`shapes` needs no tensor data."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor]) -> None:
        self.path = path
        self._shapes = shapes
        self._get = get

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def read_weights(path: Path) -> Weights:
    """The state dict in ``path``, unwrapped from ``{"model": ...}``-style containers and a DDP ``module.`` prefix."""
    if not path.is_file():
        raise EncoderError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise EncoderError(f"{path}: not a weights file nic-fast reads (suffix {path.suffix or 'none'!r}); give the "
                       f"checkpoint as published: {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of the file's bytes: what a model card or `sha256sum` lists for the download."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _read_safetensors(path: Path) -> Weights:
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise EncoderError(f"{path}: reading .safetensors needs the safetensors package; "
                           "install it with `pip install 'nic-fast[foundation]'`") from exc
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for foreign bytes
        raise EncoderError(f"{path} is not a safetensors file ({_first_line(exc)}); give the checkpoint as "
                           "downloaded from the model card") from exc
    prefix = _common_prefix(shapes)
    return Weights(path, {k[len(prefix):]: v for k, v in shapes.items()},
                   lambda key: handle.get_tensor(prefix + key))


def _read_torch(path: Path) -> Weights:
    try:
        # Memory-mapped where the file is a zip archive (torch >= 1.6 saves); older pickles load whole.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(exc)):
            raise EncoderError(f"{path} holds Python objects besides tensors ({found.group(1)}), which nic-fast "
                               "does not unpickle; load it yourself and re-save its state dict with "
                               "torch.save(state_dict, 'weights.pth')") from exc
        raise EncoderError(f"{path} is not a PyTorch weights file (it does not unpickle as one); give the "
                           "checkpoint as downloaded from the model card") from exc
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for files that are not its own
        raise EncoderError(f"{path} is not a PyTorch weights file ({_first_line(exc)}); give the checkpoint as "
                           "downloaded from the model card") from exc
    state = _unwrap(loaded, path)
    prefix = _common_prefix(state)
    state = {k[len(prefix):]: v for k, v in state.items()}
    return Weights(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(loaded):
        return dict(loaded)  # type: ignore[call-overload]
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(loaded.get(key)):
                return dict(loaded[key])
        top = ", ".join(repr(k) for k in list(loaded)[:8])
        raise EncoderError(f"{path} holds no state dict of tensors (top-level keys: {top}); give the encoder's "
                           "weights as published")
    raise EncoderError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors; give the encoder's "
                       "weights as published")


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _common_prefix(keys: Mapping[str, object]) -> str:
    """``module.`` when every key has it (a model saved from DistributedDataParallel), else ''."""
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

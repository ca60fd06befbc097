"""Torch device names as every command takes them: ``cpu``, ``cuda`` or ``cuda:N``.

One parser for all commands, so ``--device`` means the same everywhere and a device this
machine does not have fails before any work starts, with the fix, rather than as a
CUDA traceback halfway through a run. torch is imported only to check a CUDA name.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path

__all__ = ["DEVICE_CHOICES", "DeviceError", "check_device", "cpu_matrix_flags", "cpu_model"]

DEVICE_CHOICES = "cpu|cuda|cuda:N"
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


class DeviceError(ValueError):
    """A device name that is malformed or names a device this machine does not have."""


def check_device(name: object) -> str:
    """``name`` as a canonical torch device string, checked against this machine.

    ``cpu`` is always there; ``cuda`` is the current CUDA device and ``cuda:N`` device N,
    both refused when PyTorch sees no such device.
    """
    text = str(name).strip().lower()
    match = _DEVICE.fullmatch(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise DeviceError(f"device {name!r} is not one of {DEVICE_CHOICES} (e.g. cpu, cuda, cuda:1)")
    if match.group(1) == "cpu":
        return "cpu"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {text!r}: PyTorch sees no CUDA device here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use cpu, or install a CUDA build of torch")
    index = match.group(2)
    if index is not None and int(index) >= count:
        raise DeviceError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return "cuda" if index is None else f"cuda:{int(index)}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on most Linux)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_matrix_flags() -> list[str]:
    """The CPU's reduced-precision matrix flags (AMX, avx512_bf16, avx512_fp16, avx_vnni): what
    makes bf16 fast or slow here. Quoted beside benchmark figures; the engine itself measures."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16", "avx_vnni"))
    return []


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []

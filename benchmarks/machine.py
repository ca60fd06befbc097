"""What machine a benchmark ran on, printed beside its figures (these machines are shared,
so every figure is quoted with the hardware and software that produced it)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or what platform reports elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """One line: CPU, cores, torch threads, OS and torch version."""
    return (f"{cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"{platform.system()} {platform.release()}, torch {torch.__version__}")

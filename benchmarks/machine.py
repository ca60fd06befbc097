"""What machine a benchmark ran on, printed beside its figures (these machines are shared,
so every figure is quoted with the hardware and software that produced it)."""
from __future__ import annotations

import os
import platform

import torch

from nic_fast.devices import cpu_matrix_flags, cpu_model


def describe() -> str:
    """One line: CPU, its bf16/AMX flags, cores, torch threads, OS and torch version."""
    flags = ", ".join(cpu_matrix_flags()) or "no AMX/avx512_bf16"
    return (f"{cpu_model()} ({flags}), {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"{platform.system()} {platform.release()}, torch {torch.__version__}")

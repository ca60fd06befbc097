"""How many patches an encoder can take at once in a given memory, measured by trial forward passes.

A ViT-g at 224 px needs ~100× the activation memory per patch of the paper's 128-px CNN, so a
fixed ``--batch-size`` is either wasteful or fatal. The engine asks
:func:`suggest_batch_size` instead: two small trial batches are run under a dispatch mode that
records every tensor the forward allocates and frees (the same on the CPU, where PyTorch keeps
no allocator statistics, and on a GPU), which gives the fixed and the per-patch part of the
peak; the batch is what fits the budget with headroom for allocator slack.
"""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nic_fast.encoders.spec import Encoder

TRIAL_BATCHES = (1, 2)


class _PeakTracker(TorchDispatchMode):
    """Live bytes of the tensors created inside the mode, and their peak.

    Storages are counted once however many views share them, and outputs that alias an
    input (in-place ops, views of the weights or of the input batch) are not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address → live tracked tensors on it
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        address = tensor.untyped_storage().data_ptr()
        if address == 0 or (address in inputs and address not in self.refs):
            return
        if address not in self.refs:
            self.refs[address] = 0
            self.sizes[address] = tensor.untyped_storage().nbytes()
            self.current += self.sizes[address]
            self.peak = max(self.peak, self.current)
        self.refs[address] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        self.refs[address] -= 1
        if self.refs[address] == 0:
            del self.refs[address]
            self.current -= self.sizes.pop(address)


def forward_peak_bytes(encoder: Encoder, batch: int) -> int:
    """Peak bytes the encoder's forward allocates for ``batch`` patches (weights and input excluded)."""
    spec = encoder.spec
    x = torch.zeros(batch, spec.channels, spec.input_px, spec.input_px, device=encoder.device, dtype=encoder.dtype)
    tracker = _PeakTracker()
    with tracker:
        out = encoder(x)
    del out
    return tracker.peak


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free bytes, or the host's unused RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def suggest_batch_size(encoder: Encoder, device: str | torch.device | None = None, memory_bytes: int | None = None,
                       *, headroom: float = 0.7, max_batch: int = 1024) -> int:
    """The largest batch whose forward fits ``headroom × memory_bytes`` (default: the device's free memory).

    ``memory_bytes`` is memory for activations: the encoder's weights are already in place.
    The result is a multiple of 8 from 8 up (tensor-core friendly), at least 1 and at most
    ``max_batch``; 1 also when even one patch does not fit, which the caller's first batch
    will then report.
    """
    if device is not None and torch.device(device) != encoder.device:
        encoder.to(device)
    memory_bytes = available_memory_bytes(encoder.device) if memory_bytes is None else memory_bytes
    small, large = (forward_peak_bytes(encoder, b) for b in TRIAL_BATCHES)
    per_patch = large - small if large > small else max(large // TRIAL_BATCHES[1], 1)
    fixed = max(small - per_patch, 0)
    batch = int((headroom * memory_bytes - fixed) // per_patch)
    batch = min(max(batch, 1), max_batch)
    return batch - batch % 8 if batch >= 8 else batch

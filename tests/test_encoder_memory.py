"""suggest_batch_size: a batch chosen from the memory a trial forward pass is measured to need."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nic_fast.encoders import Encoder, EncoderSpec
from nic_fast.encoders.memory import forward_peak_bytes, suggest_batch_size
from nic_fast.encoders.presets import PRESETS

FLOAT = 4


class Widen(nn.Module):
    """Known activations: a (N, 3·copies, P, P) float tensor per forward, then its channel means."""

    def __init__(self, copies: int) -> None:
        super().__init__()
        self.copies = copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.cat([x] * self.copies, dim=1)
        return (wide * 2.0).mean(dim=(2, 3))


def _encoder(module: nn.Module, px: int, code_size: int) -> Encoder:
    spec = EncoderSpec("widen", px, None, 3, (0.0,) * 3, (1.0,) * 3, code_size, "")
    return Encoder(spec, module, "test")


def test_peak_is_the_largest_set_of_live_tensors() -> None:
    encoder = _encoder(Widen(copies=10), px=32, code_size=30)
    per_wide = 3 * 10 * 32 * 32 * FLOAT
    for batch in (1, 4):
        # wide and wide * 2 are alive together; the mean and the channels-last copy are small beside them
        peak = forward_peak_bytes(encoder, batch)
        assert 2 * batch * per_wide <= peak <= 2 * batch * per_wide + batch * 3 * 32 * 32 * FLOAT + 4096


def test_batch_fits_the_budget_and_scales_with_it() -> None:
    encoder = _encoder(Widen(copies=10), px=32, code_size=30)
    per_patch = 2 * 3 * 10 * 32 * 32 * FLOAT  # 245,760 bytes
    budget = 100 * per_patch
    batch = suggest_batch_size(encoder, memory_bytes=budget, headroom=1.0)
    assert 88 <= batch <= 100 and batch % 8 == 0
    assert forward_peak_bytes(encoder, batch) <= budget
    assert suggest_batch_size(encoder, memory_bytes=budget, headroom=0.5) == pytest.approx(batch / 2, abs=8)
    assert suggest_batch_size(encoder, memory_bytes=5 * per_patch, headroom=1.0) == 4  # below 8: not rounded
    assert suggest_batch_size(encoder, memory_bytes=per_patch // 10) == 1
    assert suggest_batch_size(encoder, memory_bytes=10**15, max_batch=256) == 256


def test_vit_batch_from_a_trial_forward(one_torch_thread: None) -> None:
    """A ViT-S/16's activations grow with the batch: 4× the memory gives 4× the batch."""
    preset = PRESETS["kaiko-vits16"]
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; encoder files still use it
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(preset.build().eval())
    encoder = Encoder(preset.spec(), module, "test")
    per_patch = forward_peak_bytes(encoder, 2) - forward_peak_bytes(encoder, 1)
    assert 1_000_000 < per_patch < 20_000_000  # 197 tokens × 384 wide, a few live at once, in float32
    small = suggest_batch_size(encoder, "cpu", memory_bytes=1 << 30)
    large = suggest_batch_size(encoder, "cpu", memory_bytes=4 << 30)
    assert small >= 8 and abs(large - 4 * small) <= 40


def test_compress_batch_size_auto_is_what_fits_memory_capped(tmp_path, monkeypatch):
    """--batch-size auto (the default): the cap where memory is plenty, less where it is not."""
    from nic_fast.compress import Compressor
    from nic_fast.encoders import save_encoder
    from nic_fast.job import AUTO_BATCH_CAP, CompressOptions

    spec = EncoderSpec("widen", 224, None, 3, (0.0,) * 3, (1.0,) * 3, 3 * 16, "")  # 224 px: measured
    path = save_encoder(Widen(16), spec, tmp_path / "widen.pt")
    assert Compressor(CompressOptions(encoder=str(path), mpp=None)).batch_size == AUTO_BATCH_CAP["cpu"]
    per_patch = 3 * 16 * 224 * 224 * FLOAT * 2  # the widened tensor and its doubled copy
    monkeypatch.setattr("nic_fast.encoders.memory.available_memory_bytes", lambda device: 40 * per_patch)
    small = Compressor(CompressOptions(encoder=str(path), mpp=None)).batch_size
    assert 8 <= small <= 40 and small % 8 == 0
    assert Compressor(CompressOptions(encoder=str(path), mpp=None, batch_size=5)).batch_size == 5
    monkeypatch.setattr("nic_fast.encoders.memory.suggest_batch_size", lambda *a, **k: pytest.fail("measured"))
    assert Compressor(CompressOptions(encoder="mean-rgb")).batch_size == AUTO_BATCH_CAP["cpu"]  # small: no trial

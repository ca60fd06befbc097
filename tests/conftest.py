"""Shared fixtures: the read-only reference data beside the checkout, skipped cleanly when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("NIC_FAST_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture
def cmu_svs() -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs (0.499 µm/px, 2220×2967)."""
    return _shared("slides/CMU-1-Small-Region.svs")


@pytest.fixture
def paper_encoders() -> Path:
    """Folder with the NIC paper's Keras encoders and example_128.jpg."""
    return _shared("nic-paper-encoders")


@pytest.fixture
def mnist_npz() -> Path:
    return _shared("mnist/mnist-10k.npz")


@pytest.fixture
def one_torch_thread():
    """One CPU thread: small networks gain nothing from two, and a busy machine slows them badly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fail_region_reads_at_origin(monkeypatch):
    """Make every reader fail region reads that start at (0, 0) and are shorter than
    ``max_height_px`` (tile reads, not the thumbnail), as a JPEG decode error would."""
    from nic_fast.slides.base import SlideReader

    def install(max_height_px: int) -> None:
        original = SlideReader.read_region  # every backend inherits it (they implement _read_inside)

        def failing(self, level, y, x, height, width):
            if y == 0 and x == 0 and height < max_height_px:
                raise OSError("JPEG decode error")
            return original(self, level, y, x, height, width)

        monkeypatch.setattr(SlideReader, "read_region", failing)

    return install

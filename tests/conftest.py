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

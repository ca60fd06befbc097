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
    """Make every reader's decode fail for reads that start at (0, 0) and are shorter than
    ``max_height_px`` (tile reads, not the thumbnail), as a JPEG decode error would. The
    checked read then retries tile by tile, so only the tile at the origin is lost."""
    import importlib

    from nic_fast.slides.base import SlideError, SlideReader

    for module in ("cucim_reader", "openslide_reader", "tiff_reader", "image_reader"):
        try:
            importlib.import_module(f"nic_fast.slides.{module}")
        except ImportError:  # a backend that is not installed here is never used either
            pass

    def install(max_height_px: int) -> None:
        def subclasses(cls: type) -> list[type]:
            return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

        for cls in subclasses(SlideReader):
            original = cls._read_inside

            def failing(self, level, y, x, height, width, _original=original):
                if y == 0 and x == 0 and height < max_height_px:
                    raise SlideError(f"{self.path}: JPEG decode error")  # what the backends raise
                return _original(self, level, y, x, height, width)

            monkeypatch.setattr(cls, "_read_inside", failing)

    return install


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """The fast path's compile ledger and inductor cache in a folder of the test session's,
    never the user's ~/.cache (child processes inherit it through the environment)."""
    import os

    cache = tmp_path_factory.mktemp("nic-fast-cache")
    saved = {name: os.environ.get(name) for name in ("NIC_FAST_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["NIC_FAST_CACHE_DIR"] = str(cache)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _pickling_registrations_stay_in_their_test():
    """Undo what a test registered with copyreg. Importing Dask distributed (xarray computing
    on dask arrays does) makes every exception pickle through tblib, process-wide; the DALI
    loader's forked workers then send exceptions their parent refuses to unpickle."""
    import copyreg

    before = dict(copyreg.dispatch_table)
    yield
    copyreg.dispatch_table.clear()
    copyreg.dispatch_table.update(before)

"""Corrupt, absent and undecodable tiles: the checks flag exactly them, read_region_checked
loses exactly them, and every other pixel is what a clean read gives, on every backend."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nic_fast.slides import SlideError, open_slide
from nic_fast.slides.base import SlideReader
from nic_fast.slides.tiles import TiffTiles, tiles_of

BACKENDS = ["cucim", "openslide", "tifffile"]
CMU_HW = (2967, 2220)
TILE = (4, 3)  # row, col of the damaged tile: 240 px tiles, 10 per row
TILE_RECT = (960, 720, 1200, 960)


def _tile_index(path: Path) -> tuple[int, int]:
    page = tifffile.TiffFile(path).pages[0]
    index = TILE[0] * 10 + TILE[1]
    return page.dataoffsets[index], page.databytecounts[index]


def _damage(source: Path, target: Path, kind: str) -> Path:
    """A copy of ``source`` with tile TILE zeroed, filled with 0xFF, overwritten mid-scan
    with random bytes (fixed seed), given an empty byte count, or pointed past the file's end."""
    shutil.copy(source, target)
    offset, count = _tile_index(source)
    with open(target, "r+b") as f:
        if kind == "zeroed":
            f.seek(offset)
            f.write(b"\0" * 64)
        elif kind == "ff":
            f.seek(offset)
            f.write(b"\xff" * count)
        elif kind == "mid-scan":
            f.seek(offset + count // 2)
            f.write(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
        else:
            page = tifffile.TiffFile(source).pages[0]
            tag = page.tags["TileByteCounts" if kind == "empty" else "TileOffsets"]
            fmt = {3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)]
            f.seek(tag.valueoffset + (TILE[0] * 10 + TILE[1]) * struct.calcsize(fmt))
            f.write(struct.pack(fmt, 0 if kind == "empty" else source.stat().st_size - 100))
    return target


_CLEAN_LEVELS: dict[str, np.ndarray] = {}


@pytest.fixture
def clean_levels(cmu_svs: Path) -> dict[str, np.ndarray]:
    """The clean slide's whole level per backend (read once for the module)."""
    for backend in BACKENDS:
        if backend not in _CLEAN_LEVELS:
            with open_slide(cmu_svs, backend=backend) as slide:
                _CLEAN_LEVELS[backend] = slide.read_region(0, 0, 0, *CMU_HW)
    return _CLEAN_LEVELS


def _lost(rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros(CMU_HW, bool)
    for y0, x0, y1, x1, *_ in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def test_clean_slide_has_no_bad_tiles(cmu_svs: Path, clean_levels: dict[str, np.ndarray]) -> None:
    for backend in BACKENDS:
        with open_slide(cmu_svs, backend=backend) as slide:
            result = slide.read_region_checked(0, -50, -50, CMU_HW[0] + 100, CMU_HW[1] + 100)
        assert result.bad == [] and result.absent == []
        np.testing.assert_array_equal(result.pixels[50:-50, 50:-50], clean_levels[backend])
        assert (result.pixels[:50] == 255).all()


@pytest.mark.parametrize("kind", ["zeroed", "ff", "mid-scan"])
def test_checker_flags_exactly_the_damaged_tile(cmu_svs: Path, tmp_path: Path, kind: str) -> None:
    damaged = _damage(cmu_svs, tmp_path / "damaged.svs", kind)
    tiles = TiffTiles(damaged, [CMU_HW])
    grid = tiles.grid(0)
    report = grid.inspect(tiles.fd, tiles.file_size, list(tiles_of(grid, 0, 0, *CMU_HW)), verify_deflate=True)
    tiles.close()
    assert set(report.bad) == {TILE} and not report.absent


@pytest.mark.parametrize("kind", ["zeroed", "ff", "mid-scan", "outside"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_checked_loses_only_the_damaged_tile(
    cmu_svs: Path, tmp_path: Path, clean_levels: dict[str, np.ndarray], backend: str, kind: str
) -> None:
    if kind == "outside" and backend == "openslide":
        pytest.skip("OpenSlide hashes a one-level slide's tiles when opening it, so it refuses the whole file")
    damaged = _damage(cmu_svs, tmp_path / "damaged.svs", kind)
    with open_slide(damaged, backend=backend) as slide:
        result = slide.read_region_checked(0, 0, 0, *CMU_HW)
        again = slide.read_region_checked(0, 0, 0, 512, 512)  # the handle still works afterwards
    assert [bad[:4] for bad in result.bad] == [TILE_RECT]
    assert result.bad[0].reason.startswith(f"corrupt JPEG tile (row {TILE[0]}, col {TILE[1]}): ")
    if kind == "outside":
        assert "outside the file" in result.bad[0].reason
    lost = _lost(result.bad)
    assert (result.pixels[lost] == 255).all()
    np.testing.assert_array_equal(result.pixels[~lost], clean_levels[backend][~lost])
    np.testing.assert_array_equal(again.pixels, clean_levels[backend][:512, :512])


def test_check_region_finds_the_tiles_without_decoding(cmu_svs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """For decoders elsewhere (cuCIM on a GPU): the same verdicts, no backend read."""
    damaged = _damage(cmu_svs, tmp_path / "damaged.svs", "mid-scan")
    with open_slide(damaged, backend="cucim") as slide:
        monkeypatch.setattr(type(slide), "_read_inside", lambda *args: pytest.fail("check_region decoded"))
        check = slide.check_region(0, 1000, 900, 500, 500)
        assert check.checked and check.absent == []
        assert [bad[:4] for bad in check.bad] == [(1000, 900, 1200, 960)]  # clipped to the region
        assert slide.check_region(0, 0, 0, 500, 500).bad == []
        monkeypatch.setattr(type(slide), "_tile_access", lambda self: None)
        assert not slide.check_region(0, 0, 0, 500, 500).checked


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_tile_is_absent_and_white(
    cmu_svs: Path, tmp_path: Path, clean_levels: dict[str, np.ndarray], backend: str
) -> None:
    damaged = _damage(cmu_svs, tmp_path / "sparse.svs", "empty")
    with open_slide(damaged, backend=backend) as slide:
        result = slide.read_region_checked(0, 0, 0, *CMU_HW)
    assert result.bad == [] and result.absent == [TILE_RECT]
    lost = _lost(result.absent)
    assert (result.pixels[lost] == 255).all()
    np.testing.assert_array_equal(result.pixels[~lost], clean_levels[backend][~lost])


def _failing_reads(monkeypatch: pytest.MonkeyPatch, cls: type[SlideReader], rect: tuple[int, int, int, int]) -> None:
    """Make ``cls`` raise, as a decoder does, on every read that touches ``rect``."""
    original = cls._read_inside

    def read(self: SlideReader, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        if y < rect[2] and y + height > rect[0] and x < rect[3] and x + width > rect[1]:
            raise SlideError(f"{self.path}: cannot decode (simulated)")
        return original(self, level, y, x, height, width)

    monkeypatch.setattr(cls, "_read_inside", read)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_region_whose_read_raises_costs_only_its_failing_tile(
    cmu_svs: Path, clean_levels: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    with open_slide(cmu_svs, backend=backend) as slide:
        _failing_reads(monkeypatch, type(slide), (1000, 800, 1001, 801))  # inside tile (4, 3)
        result = slide.read_region_checked(0, 100, 100, 2048, 2048)
    assert [(bad[:4], bad.reason.split(":")[0]) for bad in result.bad] == [(TILE_RECT, "decode error")]
    lost = _lost(result.bad)[100:2148, 100:2148]
    np.testing.assert_array_equal(result.pixels[~lost], clean_levels[backend][100:2148, 100:2148][~lost])


def test_without_a_tile_grid_a_failed_read_costs_its_256_px_blocks(
    cmu_svs: Path, clean_levels: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(cmu_svs, backend="openslide") as slide:
        _failing_reads(monkeypatch, type(slide), (700, 900, 701, 1030))
        monkeypatch.setattr(type(slide), "_tile_access", lambda self: None)  # as for MRXS or NDPI
        result = slide.read_region_checked(0, 600, 600, 1000, 1000)
    assert [bad[:4] for bad in result.bad] == [(600, 768, 768, 1024), (600, 1024, 768, 1280)]
    lost = _lost(result.bad)[600:1600, 600:1600]
    np.testing.assert_array_equal(result.pixels[~lost], clean_levels["openslide"][600:1600, 600:1600][~lost])


def _deflate_slide(path: Path, predictor: bool) -> np.ndarray:
    rng = np.random.default_rng(5)
    rgb = np.clip(np.linspace(0, 255, 300)[None, :, None] + rng.integers(-20, 20, (200, 300, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, rgb, tile=(64, 64), compression="adobe_deflate", predictor=predictor, photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return rgb


_AUTO_OPEN = """
import sys, numpy as np
from nic_fast.slides import open_slide
with open_slide(sys.argv[1]) as slide:
    print(slide.backend, slide.mpp)
    np.save(sys.argv[2], slide.read_region_checked(0, 0, 0, *slide.level_dims[0]).pixels)
"""


def test_deflate_with_predictor_opens_in_auto_mode_without_crashing(tmp_path: Path) -> None:
    """cuCIM segfaults on this file: auto mode must route it away (run in a subprocess, so
    that a regression fails this test instead of killing pytest)."""
    path = tmp_path / "deflate-predictor.tiff"
    rgb = _deflate_slide(path, predictor=True)
    out = tmp_path / "pixels.npy"
    run = subprocess.run([sys.executable, "-c", _AUTO_OPEN, str(path), str(out)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, f"auto open died (rc {run.returncode}): {run.stderr[-2000:]}"
    backend, mpp = run.stdout.split()
    assert backend == "tifffile" and float(mpp) == pytest.approx(0.5)
    np.testing.assert_array_equal(np.load(out), rgb)
    np.testing.assert_array_equal(rgb, tifffile.imread(path))


def test_forced_cucim_refuses_what_it_crashes_on(tmp_path: Path) -> None:
    pytest.importorskip("cucim")
    path = tmp_path / "deflate-predictor.tiff"
    _deflate_slide(path, predictor=True)
    code = ("import sys\nfrom nic_fast.slides import SlideError, open_slide\ntry:\n    open_slide(sys.argv[1], backend='cucim')\n"
            "except SlideError as exc:\n    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "crashes (SIGSEGV) on Deflate tiles with a predictor" in run.stdout and "tifffile backend" in run.stdout


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_corrupt_deflate_tile_fails_its_checksum(tmp_path: Path, backend: str) -> None:
    """The tifffile backend's zlib decode and OpenSlide's pre-check (inflating the tile)
    both catch a damaged Deflate tile by its Adler-32; OpenSlide alone would not say."""
    path = tmp_path / "deflate.tiff"
    rgb = _deflate_slide(path, predictor=False)
    page = tifffile.TiffFile(path).pages[0]
    index = 1 * 5 + 2  # row 1, col 2 of 64-px tiles, 5 per row
    with open(path, "r+b") as f:
        f.seek(page.dataoffsets[index] + page.databytecounts[index] // 2)
        f.write(bytes(16))
    with open_slide(path, backend=backend) as slide:
        result = slide.read_region_checked(0, 0, 0, 200, 300)
    assert [bad[:4] for bad in result.bad] == [(64, 128, 128, 192)]
    lost = np.zeros((200, 300), bool)
    lost[64:128, 128:192] = True
    np.testing.assert_array_equal(result.pixels[~lost], rgb[~lost])

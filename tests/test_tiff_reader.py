"""The tifffile backend: pixels as tifffile decodes them (RGB as cuCIM/OpenSlide give it),
levels numbered as cuCIM and OpenSlide number them, and auto mode's routing by TIFF tags."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nic_fast.slides import SlideError, open_slide
from nic_fast.slides.tiff_reader import TiffReader
from nic_fast.slides.tiff_support import auto_backends

H, W = 200, 300
RES = {"resolution": (20000, 20000), "resolutionunit": "CENTIMETER"}  # 0.5 µm/px


def _rgb(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([xx * 255 // W, yy * 255 // H, (xx + yy) * 3 % 256], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


RGB = _rgb()
CMAP = (np.stack([np.arange(256)[::-1], np.arange(256), np.arange(256) * 7 % 256]) * 257).astype(np.uint16)
CMYK = np.concatenate([255 - RGB, np.full((H, W, 1), 40, np.uint8)], -1)
# name: (data, tifffile.imwrite keywords, the RGB every backend should show)
VARIANTS = {
    "deflate-predictor-tiled": (RGB, dict(tile=(64, 64), compression="adobe_deflate", predictor=True), RGB),
    "zstd-predictor-strips": (RGB, dict(rowsperstrip=32, compression="zstd", predictor=True), RGB),
    "lzw-planar-separate": (np.moveaxis(RGB, -1, 0).copy(), dict(tile=(64, 64), compression="lzw",
                                                                planarconfig="separate"), RGB),
    "webp-tiled": (RGB, dict(tile=(64, 64), compression="webp", compressionargs={"lossless": True}), RGB),
    "uncompressed-one-strip": (RGB, dict(rowsperstrip=H), RGB),
    "rgb16-big-endian": ((RGB.astype(np.uint16) * 257), dict(tile=(64, 64), byteorder=">"), RGB),
    "gray16": (RGB[..., 0].astype(np.uint16) * 257, dict(tile=(64, 64), photometric="minisblack"),
               _gray_to_rgb(RGB[..., 0])),
    "miniswhite": (RGB[..., 1].copy(), dict(tile=(64, 64), photometric="miniswhite"), _gray_to_rgb(255 - RGB[..., 1])),
    "palette": (RGB[..., 2].copy(), dict(tile=(64, 64), photometric="palette", colormap=CMAP),
                (CMAP >> 8).astype(np.uint8)[:, RGB[..., 2]].transpose(1, 2, 0)),
    "cmyk": (CMYK, dict(tile=(64, 64), photometric="separated"),
             ((255 - CMYK[..., :3].astype(np.uint16)) * (255 - 40) // 255).astype(np.uint8)),
    "rgba-unassociated": (np.concatenate([RGB, np.full((H, W, 1), 255, np.uint8)], -1),
                          dict(tile=(64, 64), extrasamples=["unassalpha"]), RGB),
    "bilevel": (RGB[..., 0] > 128, dict(tile=(64, 64), photometric="minisblack"),
                _gray_to_rgb((RGB[..., 0] > 128).astype(np.uint8) * 255)),
}


def _write(path: Path, name: str) -> np.ndarray:
    data, kwargs, expected = VARIANTS[name]
    kwargs = {"photometric": "rgb", **kwargs}
    tifffile.imwrite(path, data, **kwargs, **RES)
    return expected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pixels_are_tifffiles_as_rgb(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.tiff"
    expected = _write(path, name)
    with open_slide(path, backend="tifffile") as slide:
        assert slide.backend == "tifffile" and slide.mpp == pytest.approx(0.5)
        assert slide.level_dims == [(H, W)] and slide.level_downsamples == [1.0]
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, H, W), expected)
        # any window, overhanging the edges: the same pixels, white outside
        region = slide.read_region(0, 150, -30, 90, 120)
        assert (region[50:] == 255).all() and (region[:, :30] == 255).all()
        np.testing.assert_array_equal(region[:50, 30:], expected[150:, :90])
        checked = slide.read_region_checked(0, 37, 61, 101, 203)
        assert checked.bad == []
        np.testing.assert_array_equal(checked.pixels, expected[37:138, 61:264])


def test_uncompressed_strip_reads_only_the_rows_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-strip image is never decoded whole: only the rows of the region are read."""
    import os

    path = tmp_path / "one-strip.tiff"
    expected = _write(path, "uncompressed-one-strip")
    sizes: list[int] = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: sizes.append(n) or pread(fd, n, offset))
    with open_slide(path, backend="tifffile") as slide:
        np.testing.assert_array_equal(slide.read_region(0, 10, 20, 5, 7), expected[10:15, 20:27])
    assert sizes == [5 * W * 3]


def test_huge_compressed_strips_are_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nic_fast.slides import tiff_reader

    path = tmp_path / "strips.tiff"
    _write(path, "zstd-predictor-strips")
    monkeypatch.setattr(tiff_reader, "MAX_SEGMENT_BYTES", 1000)
    with pytest.raises(SlideError, match=r"strips\.tiff: level 0 is stored in strips .* save it tiled"):
        TiffReader(path)


def test_unsupported_files_are_refused_with_a_one_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    tifffile.imwrite(path, np.zeros((64, 64), np.float32), tile=(32, 32), photometric="minisblack")
    with pytest.raises(SlideError, match=r"float\.tiff: the tifffile reader cannot decode level 0: 32-bit samples"):
        open_slide(path, backend="tifffile", slide_mpp=0.5)
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(b"II*\0garbage" * 10)
    with pytest.raises(SlideError, match=r"damaged\.tif: a TIFF header but no readable image"):
        open_slide(damaged, backend="tifffile")
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff" * 10)
    with pytest.raises(SlideError, match=r"garbage\.tif: tifffile cannot open it as a TIFF"):
        open_slide(garbage, backend="tifffile")


def _pyramid(path: Path, *, subifds: bool = False, aperio: bool = False, thumbnail: bool = False) -> None:
    """A 3-level JPEG pyramid: reduced levels as pages (marked reduced) or as SubIFDs; or
    laid out as Aperio SVS does (thumbnail strip as page 1, levels unmarked, label, macro)."""
    base = np.random.default_rng(1).integers(0, 255, (1001, 1537, 3), np.uint8)
    levels = [base, base[::4, ::4][:250, :384].copy(), base[::16, ::16][:62, :96].copy()]
    jpeg = dict(photometric="rgb", compression="jpeg", metadata=None)
    aperio_text = "Aperio Image Library v12.0.0\r\n1537x1001 (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990"
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), subifds=2 if subifds else 0,
                  description=aperio_text if aperio else None, **RES, **jpeg)
        if aperio or thumbnail:
            tif.write(base[::8, ::8].copy(), description="Aperio Image Library v12.0.0\r\nthumbnail" if aperio else None,
                      **jpeg)
        for level in levels[1:]:
            tif.write(level, tile=(64, 64), subfiletype=0 if aperio else 1, **jpeg)
        if aperio:
            tif.write(base[:100, :100].copy(), subfiletype=1, description="Aperio\r\nlabel 100x100", **jpeg)
            tif.write(base[:100, :300].copy(), subfiletype=9, description="Aperio\r\nmacro 300x100", **jpeg)


@pytest.mark.parametrize("layout", ["pages", "subifds", "aperio", "thumbnail"])
def test_levels_agree_with_cucim_and_openslide(tmp_path: Path, layout: str) -> None:
    path = tmp_path / ("slide.svs" if layout == "aperio" else "slide.tiff")
    _pyramid(path, subifds=layout == "subifds", aperio=layout == "aperio", thumbnail=layout == "thumbnail")
    others = ["openslide"] if layout == "thumbnail" else ["cucim", "openslide"]  # cuCIM refuses two full-size pages
    with open_slide(path, backend="tifffile", slide_mpp=0.5) as ours:
        expected_levels = 1 if layout == "subifds" else 3  # neither reader uses SubIFDs as levels
        assert ours.level_count == expected_levels
        for backend in others:
            with open_slide(path, backend=backend, slide_mpp=0.5) as theirs:
                assert theirs.level_dims == ours.level_dims
                np.testing.assert_allclose(theirs.level_downsamples, ours.level_downsamples, rtol=1e-6)
                for level in range(ours.level_count):
                    h, w = (min(d, 128) for d in ours.level_dims[level])
                    diff = np.abs(theirs.read_region(level, 0, 0, h, w).astype(int) - ours.read_region(level, 0, 0, h, w))
                    assert diff.max() <= 2, f"{backend} level {level} shows other pixels"


def test_aperio_mpp_comes_from_the_description(tmp_path: Path) -> None:
    path = tmp_path / "slide.svs"
    _pyramid(path, aperio=True)
    with open_slide(path, backend="tifffile") as slide:
        assert slide.mpp == pytest.approx(0.499)


def test_auto_routes_by_tiff_tags(tmp_path: Path, cmu_svs: Path) -> None:
    def order(name: str) -> list[str]:
        path = tmp_path / f"{name}.tiff"
        _write(path, name)
        return auto_backends(path)[0]

    assert order("deflate-predictor-tiled") == ["tifffile", "openslide"]  # cuCIM crashes
    assert order("gray16") == ["tifffile", "openslide"]  # cuCIM and OpenSlide decode it wrongly
    assert order("zstd-predictor-strips") == ["tifffile", "openslide"]
    assert auto_backends(cmu_svs)[0] == ["cucim", "openslide", "tifffile"]  # JPEG tiles: cuCIM's fast path
    ycbcr = tmp_path / "ycbcr.tiff"
    tifffile.imwrite(ycbcr, RGB, tile=(64, 64), photometric="ycbcr", subsampling=(1, 1))
    assert auto_backends(ycbcr)[0] == ["openslide"]  # cuCIM returns YCbCr as RGB; tifffile does not convert
    garbage = tmp_path / "garbage.tiff"
    garbage.write_bytes(b"not a tiff" * 20)
    assert auto_backends(garbage)[0] == ["openslide"]


def test_auto_opens_each_file_with_the_routed_backend(tmp_path: Path) -> None:
    path = tmp_path / "gray16.tiff"
    expected = _write(path, "gray16")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, H, W), expected)
    with pytest.raises(SlideError, match="OpenSlide decodes the right-edge tiles of 16-bit grayscale wrongly"):
        open_slide(path, backend="openslide")

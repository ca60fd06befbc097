"""JPEG tiles as stand-alone streams (tables spliced in, Aperio's RGB coding marked) decode
to exactly the pixels tifffile gives; the nvImageCodec tile reader through its CPU backend;
and, on a GPU, against cuCIM's pixels on the real SVS."""
from __future__ import annotations

import io
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nic_fast.slides import open_slide
from nic_fast.slides.jpeg_tiles import ADOBE_NO_TRANSFORM, EOI, SOI, JpegLevel, JpegStreamError, jpeg_problem, place, splice
from nic_fast.slides.tiles import TiffTiles
from nic_fast.synthetic import write_pyramid_tiff

REGIONS = [(0, 0, 240, 240), (100, 130, 500, 410), (2800, 2000, 300, 400), (-30, -40, 100, 90)]


def pillow_decode(streams: list[bytes]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(s)).convert("RGB")) for s in streams]


def region_from_tiles(level: JpegLevel, y: int, x: int, h: int, w: int, decode=pillow_decode) -> np.ndarray:
    pieces = level.pieces(y, x, h, w)
    out = np.full((h, w, 3), 255, np.uint8)
    place(out, pieces, decode(level.streams(pieces)))
    return out


@pytest.fixture
def jpeg_slide(tmp_path: Path) -> Path:
    """A generated JPEG pyramid (YCbCr tiles with their own tables), edge tiles partial."""
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(150, 40, (700, 900, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, image, mpp=0.5, tile_px=128)
    return path


def _split_tables(stream: bytes) -> tuple[bytes, bytes]:
    """A full JPEG as (JPEGTables, abbreviated tile): DQT/DHT segments moved out, as TIFF writers do."""
    i, tables, rest = 2, b"", b""
    while stream[i + 1] != 0xDA:
        length = int.from_bytes(stream[i + 2 : i + 4], "big")
        segment = stream[i : i + 2 + length]
        if stream[i + 1] in (0xDB, 0xC4):
            tables += segment
        else:
            rest += segment
        i += 2 + length
    return SOI + tables + EOI, SOI + rest + stream[i:]


def test_splice_moves_shared_tables_in_and_marks_rgb_once():
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    full = buffer.getvalue()
    tables, tile = _split_tables(full)
    spliced = splice(tile, tables)
    np.testing.assert_array_equal(pillow_decode([spliced])[0], pillow_decode([full])[0])
    marked = splice(tile, tables, rgb=True)
    assert marked.startswith(SOI + ADOBE_NO_TRANSFORM) and marked.count(b"Adobe") == 1
    assert splice(marked, rgb=True).count(b"Adobe") == 1  # a tile that says so already is left alone
    with pytest.raises(JpegStreamError, match="SOI"):
        splice(b"\x00\x01" + tile)
    with pytest.raises(JpegStreamError, match="JPEGTables"):
        splice(tile, tables[:-2])


def test_rgb_coded_svs_tiles_decode_to_tifffiles_pixels(cmu_svs: Path):
    """Aperio's tiles: abbreviated, RGB-coded without a marker; every region equals tifffile's."""
    with closing(TiffTiles(cmu_svs)) as tiles, open_slide(cmu_svs, backend="tifffile") as reader:
        level = JpegLevel.of(tiles, 0)
        assert level is not None and level.rgb and level.grid.jpegtables
        for y, x, h, w in REGIONS:
            np.testing.assert_array_equal(region_from_tiles(level, y, x, h, w), reader.read_region(0, y, x, h, w))
        level.rgb = False  # without the marker the decoder would convert "YCbCr" to RGB: wrong colours
        assert np.abs(region_from_tiles(level, 0, 0, 240, 240).astype(int)
                      - reader.read_region(0, 0, 0, 240, 240)).max() > 50


def test_generated_jpeg_levels_decode_to_tifffiles_pixels(jpeg_slide: Path):
    with closing(TiffTiles(jpeg_slide)) as tiles, open_slide(jpeg_slide, backend="tifffile") as reader:
        for index in range(reader.level_count):
            level = JpegLevel.of(tiles, index)
            assert level is not None and not level.rgb
            height, width = reader.level_dims[index]
            for y, x, h, w in [(0, 0, height, width), (60, 70, 200, 300), (height - 50, width - 60, 100, 100)]:
                np.testing.assert_array_equal(region_from_tiles(level, y, x, h, w),
                                              reader.read_region(index, y, x, h, w))


def test_non_jpeg_levels_are_refused_with_the_reason(tmp_path: Path):
    import tifffile

    path = tmp_path / "zlib.tif"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint8), tile=(128, 128), compression="zlib", photometric="rgb")
    with closing(TiffTiles(path)) as tiles:
        assert JpegLevel.of(tiles, 0) is None
        assert "Deflate tiles, not JPEG" in jpeg_problem(tiles, tiles.grid(0))


def test_skipped_and_zero_length_tiles_stay_white(jpeg_slide: Path):
    with closing(TiffTiles(jpeg_slide)) as tiles:
        level = JpegLevel.of(tiles, 0)
        pieces = level.pieces(0, 0, 256, 256, skip=[(0, 1)])
        assert {(p.row, p.col) for p in pieces} == {(0, 0), (1, 0), (1, 1)}
        assert not level.covers(pieces, 256, 256) and level.covers(level.pieces(0, 0, 256, 256), 256, 256)
        out = np.zeros((256, 256, 3), np.uint8)
        out[...] = 255
        place(out, pieces, pillow_decode(level.streams(pieces)))
        assert (out[:128, 128:] == 255).all() and not (out[:128, :128] == 255).all()


# -- the nvImageCodec reader --------------------------------------------------------------


def nvimgcodec_cpu():
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec (the gpu extra) is not installed")
    from nic_fast.engine.tile_decode import NvImageCodec

    try:
        return NvImageCodec(None)
    except RuntimeError as exc:  # a build without its CPU backend
        pytest.skip(f"nvImageCodec has no CPU backend here: {exc}")


def test_nvimagecodec_cpu_backend_reads_regions_as_tifffile(cmu_svs: Path, jpeg_slide: Path):
    from nic_fast.engine.tile_decode import TileRegionReader

    codec = nvimgcodec_cpu()
    for path, regions in [(cmu_svs, REGIONS), (jpeg_slide, [(0, 0, 700, 900), (100, 500, 333, 444)])]:
        with closing(TiffTiles(path)) as tiles, open_slide(path, backend="tifffile") as reader:
            tile_reader = TileRegionReader(JpegLevel.of(tiles, 0), codec)
            for y, x, h, w in regions:
                out = np.zeros((h, w, 3), np.uint8)
                assert tile_reader.read_host(y, x, h, w, out=out) is out
                np.testing.assert_array_equal(out, reader.read_region(0, y, x, h, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvimagecodec_on_the_gpu_matches_cucim_on_the_real_svs(cmu_svs: Path):
    """The GPU decoders (hardware engine or CUDA) may round the IDCT and upsampling
    differently from libjpeg-turbo: a few grey levels at most."""
    pytest.importorskip("nvidia.nvimgcodec")
    pytest.importorskip("cucim")
    from nic_fast.engine.tile_decode import NvImageCodec, TileRegionReader

    codec = NvImageCodec(0)
    with closing(TiffTiles(cmu_svs)) as tiles, open_slide(cmu_svs, backend="cucim") as reader:
        tile_reader = TileRegionReader(JpegLevel.of(tiles, 0), codec)
        for y, x, h, w in REGIONS:
            device, _ = tile_reader.read_device(y, x, h, w, torch.device("cuda", 0))
            torch.cuda.synchronize()
            cucim = reader.read_region(0, y, x, h, w).astype(np.int16)
            diff = np.abs(device.cpu().numpy().astype(np.int16) - cucim)
            assert diff.max() <= 8 and diff.mean() < 1.0, (
                f"region {(y, x, h, w)}: max abs difference {diff.max()} grey levels, mean {diff.mean():.3f} "
                "(nvImageCodec on the GPU against cuCIM)")

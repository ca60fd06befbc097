"""The extension's JPEG stream walker: valid streams of every common flavour pass, and
damage that decoders only warn about (or do not notice) is reported."""
from __future__ import annotations

import io
import os
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from nic_fast import _C

UNCHECKED = (0, 0)


def _image(height: int = 240, width: int = 256) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx % 256, yy * 2 % 256, (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)


def _pil(**kwargs: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_image()).save(out, "JPEG", **kwargs)
    return out.getvalue()


def _check(data: bytes, tables: bytes = b"", hw: tuple[int, int] = UNCHECKED, components: int = 0) -> str:
    return _C.check_jpeg(data, tables, hw, hw, components)


STREAMS = {
    "YCbCr 4:2:0": lambda: imagecodecs.jpeg8_encode(_image(), level=90),
    "YCbCr 4:2:2": lambda: imagecodecs.jpeg8_encode(_image(), level=85, subsampling=(2, 1)),
    "YCbCr 4:4:4 q100": lambda: imagecodecs.jpeg8_encode(_image(), level=100, subsampling=(1, 1)),
    "RGB-coded": lambda: imagecodecs.jpeg8_encode(_image(), level=80, colorspace="rgb", outcolorspace="rgb"),
    "grayscale": lambda: imagecodecs.jpeg8_encode(_image()[..., 0].copy(), level=75),
    "odd size": lambda: imagecodecs.jpeg8_encode(_image(237, 251), level=85),
    "12-bit": lambda: imagecodecs.jpeg8_encode(_image().astype(np.uint16) * 16, level=90, bitspersample=12),
    "optimized tables": lambda: _pil(quality=75, optimize=True),
    "restart every block": lambda: _pil(quality=75, restart_marker_blocks=1),
    "restart every 7 MCUs": lambda: _pil(quality=75, restart_marker_blocks=7),
    "progressive": lambda: _pil(quality=75, progressive=True),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_valid_streams_pass(name: str) -> None:
    assert _check(STREAMS[name]()) == ""


def _scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


@pytest.mark.parametrize("name", ["YCbCr 4:2:0", "grayscale", "restart every 7 MCUs"])
def test_random_bytes_mid_scan_are_caught(name: str) -> None:
    data = STREAMS[name]()
    rng = np.random.default_rng(0)
    start = _scan_start(data)
    caught = 0
    for _ in range(50):
        damaged = bytearray(data)
        at = int(rng.integers(start, len(data) - 220))
        damaged[at : at + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        caught += _check(bytes(damaged)) != ""
    assert caught >= 48  # a desynchronised walk almost never lands on the exact MCU count and EOI


def test_each_kind_of_damage_gets_its_reason() -> None:
    data = STREAMS["YCbCr 4:2:0"]()
    assert "does not start with SOI" in _check(b"\0" * 64 + data[64:])
    assert "does not start with SOI" in _check(b"\xff" * len(data))
    assert "truncated" in _check(data[: len(data) * 2 // 3])
    assert "ends without EOI" in _check(data[:-2])
    assert "bytes of entropy data after MCU" in _check(data[:-2] + b"\x12\x34" + data[-2:])
    assert "frame is 240x256 px, the TIFF tile 256x256" in _check(data, hw=(256, 256))
    assert "frame has 3 components, the TIFF tile 1" in _check(data, components=1)
    restarts = bytearray(STREAMS["restart every 7 MCUs"]())
    at = restarts.index(b"\xff\xd3")
    restarts[at + 1] = 0xD5
    assert "expected restart marker 3" in _check(bytes(restarts))


def test_abbreviated_streams_need_their_tables() -> None:
    """TIFF JPEG tiles usually carry only the scan; JPEGTables holds the Huffman and
    quantisation tables (as in the Aperio slide): both are parsed, in that order."""
    full = STREAMS["YCbCr 4:2:0"]()
    sof = full.index(b"\xff\xc0")
    tables, tile = full[:sof] + b"\xff\xd9", b"\xff\xd8" + full[sof:]
    assert _check(tile, tables) == ""
    assert "not defined" in _check(tile) or "undefined Huffman table" in _check(tile)
    assert "JPEGTables does not start with SOI" in _check(tile, tables[2:])


def test_tiles_are_read_from_the_file(tmp_path: Path) -> None:
    """The batch entry point preads each tile itself and checks tiles independently."""
    path = tmp_path / "tiles.tiff"
    image = _image(256, 512)
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", compression="jpeg")
    page = tifffile.TiffFile(path).pages[0]
    offsets = np.asarray(page.dataoffsets, np.int64)
    sizes = np.asarray(page.databytecounts, np.int64)
    with open(path, "r+b") as f:
        f.seek(int(offsets[5]) + int(sizes[5]) // 2)
        f.write(b"\x00\xff\x10" * 40)
    clip = np.full((len(offsets), 2), 128, np.int32)
    fd = os.open(path, os.O_RDONLY)
    try:
        for threads in (1, 2):
            reasons = _C.check_jpeg_tiles(fd, offsets, sizes, clip, (128, 128), 3, page.jpegtables or b"", threads)
            assert [i for i, why in enumerate(reasons) if why] == [5]
        past_end = offsets.copy()
        past_end[0] = path.stat().st_size
        assert "cannot read" in _C.check_jpeg_tiles(fd, past_end, sizes, clip, (128, 128), 3, b"", 1)[0]
    finally:
        os.close(fd)
    with pytest.raises(TypeError):  # int32 offsets: a wrong dtype is refused, never converted
        _C.check_jpeg_tiles(0, offsets.astype(np.int32), sizes, clip, (128, 128), 3, b"", 1)

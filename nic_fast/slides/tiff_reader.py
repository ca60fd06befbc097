"""tifffile backend: tiled, stripped and pyramidal TIFFs that tifffile and imagecodecs
decode, read region by region.

cuCIM crashes on some TIFFs and decodes others wrongly, and OpenSlide reads neither
stripped TIFFs nor most codecs (see :mod:`nic_fast.slides.tiff_support`). This backend
decodes exactly the tiles (or strips) a region touches, one at a time, with tifffile's
own per-segment decoder (predictors, bit depths, fill order and planar layouts
included), and never a whole level: memory stays at one tile (one strip; for an
uncompressed strip only the rows read) whatever the level's size. Pixels come out as
cuCIM and OpenSlide give them: 16-bit samples keep their high byte, palettes are
looked up, grayscale is repeated to RGB, CMYK converted as libtiff does, alpha
composited onto white, zero-length tiles white.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic_fast.slides.base import WHITE, SlideError, SlideReader, rgb_on_white
from nic_fast.slides.mpp import (
    MppEvidence,
    check_override_mpp,
    evidence_from_aperio,
    evidence_from_tiff_resolution,
    scanned_mpp,
)
from nic_fast.slides.tiff_support import tifffile_problem
from nic_fast.slides.tiles import TiffTiles, TileGrid, tiles_of

# A compressed strip is decoded whole for every region that touches it: refuse layouts
# where that would mean hundreds of MB per read, and say how to re-save the file.
MAX_SEGMENT_BYTES = 256 << 20
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([^|\s]+)")
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _SEPARATED, _YCBCR = 0, 1, 2, 3, 5, 6
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2


@dataclass(frozen=True)
class PixelFormat:
    """How one page's decoded samples become RGB uint8."""

    photometric: int
    bits: int
    alpha: int  # 0 none, else the ExtraSamples kind of the sample after the colour ones
    palette: np.ndarray | None  # (2**bits, 3) uint8 look-up table

    @classmethod
    def of(cls, page: Any) -> PixelFormat:
        palette = None
        if int(page.photometric) == _PALETTE:
            colormap = np.asarray(page.colormap)
            # libtiff's rule: a colormap with no entry above 255 was written 8-bit
            palette = (colormap if colormap.max() < 256 else colormap >> 8).astype(np.uint8).T.copy()
        extras = [int(kind) for kind in page.extrasamples]
        alpha = extras[0] if extras and extras[0] in (_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA) else 0
        return cls(int(page.photometric), int(page.bitspersample), alpha, palette)

    def to_rgb(self, samples: np.ndarray) -> np.ndarray:
        """(h, w, S) decoded samples (bool, uint8 or uint16) -> (h, w, 3) uint8."""
        if self.photometric == _PALETTE:
            return np.ascontiguousarray(self.palette[samples[..., 0].astype(np.intp)])
        values = self._eight_bit(samples)
        if self.photometric in (_MINISBLACK, _MINISWHITE):
            gray = values[..., :1] if self.photometric == _MINISBLACK else WHITE - values[..., :1]
            return self._composite(np.repeat(gray, 3, axis=-1), values, colour=1)
        if self.photometric == _SEPARATED:
            cmy, k = values[..., :3].astype(np.uint16), values[..., 3:4].astype(np.uint16)
            rgb = ((WHITE - cmy) * (WHITE - k) // WHITE).astype(np.uint8)  # libtiff's CMYK -> RGB
            return self._composite(rgb, values, colour=4)
        return self._composite(np.ascontiguousarray(values[..., :3]), values, colour=3)

    @staticmethod
    def _eight_bit(samples: np.ndarray) -> np.ndarray:
        if samples.dtype == np.bool_:
            return samples.astype(np.uint8) * np.uint8(WHITE)
        if samples.dtype == np.uint16:
            return (samples >> 8).astype(np.uint8)  # the high byte, as libtiff's RGBA interface
        return samples

    def _composite(self, rgb: np.ndarray, values: np.ndarray, colour: int) -> np.ndarray:
        if not self.alpha or values.shape[-1] <= colour:
            return rgb
        alpha = values[..., colour : colour + 1]
        if self.alpha == _UNASSOCIATED_ALPHA:
            return rgb_on_white(np.concatenate([rgb, alpha], axis=-1))
        # associated (premultiplied) alpha: what is not covered is white
        return np.minimum(rgb.astype(np.uint16) + (WHITE - alpha), WHITE).astype(np.uint8)


class TiffReader(SlideReader):
    """A TIFF read with tifffile + imagecodecs; levels as cuCIM and OpenSlide number them
    (:func:`nic_fast.slides.tiles.pyramid_pages`)."""

    backend = "tifffile"
    verify_deflate = False  # zlib checks Deflate's Adler-32 in this backend's own decode

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None) -> None:
        self.path = Path(path)
        try:
            self._tiles = TiffTiles(self.path, strips=True)
        except Exception as exc:  # tifffile raises many types for a file that is no TIFF
            raise SlideError(f"{self.path}: tifffile cannot open it as a TIFF ({exc})") from exc
        try:
            self._setup(slide_mpp)
        except BaseException:
            self._tiles.close()
            raise
        self._strip_cache: tuple[int, int, np.ndarray | None] | None = None

    def _setup(self, slide_mpp: float | None) -> None:
        pages = self._tiles.pages
        if not pages:
            raise SlideError(f"{self.path}: a TIFF header but no readable image (truncated or damaged?)")
        for level, page in enumerate(pages):
            problem = tifffile_problem(page)
            if problem:
                raise SlideError(f"{self.path}: the tifffile reader cannot decode level {level}: {problem}; "
                                 f"try the openslide backend")
            grid = self._tiles.grid(level)
            if grid is None:
                raise SlideError(f"{self.path}: level {level} has no tile or strip layout tifffile can locate")
            self._check_segment_size(level, page, grid)
        self.level_dims = list(self._tiles.level_dims)
        height0, width0 = self.level_dims[0]
        # OpenSlide's (and cuCIM's) downsample: the mean of the two axes' ratios
        self.level_downsamples = [(width0 / w + height0 / h) / 2 for h, w in self.level_dims]
        if slide_mpp is not None:
            self.mpp = check_override_mpp(slide_mpp, source=f"{self.path}: --slide-mpp")
        else:
            self.mpp = scanned_mpp(self.path, self._mpp_evidence(pages[0]))
        self._formats = [PixelFormat.of(page) for page in pages]
        self._raw_rows = [_reads_raw_rows(page) for page in pages]

    def _check_segment_size(self, level: int, page: Any, grid: TileGrid) -> None:
        decoded = grid.tile_h * grid.tile_w * page.samplesperpixel * max(1, page.bitspersample // 8)
        if decoded > MAX_SEGMENT_BYTES and not _reads_raw_rows(page):
            raise SlideError(
                f"{self.path}: level {level} is stored in {'tiles' if grid.tiled else 'strips'} of "
                f"{decoded >> 20} MiB (decoded), each decoded whole by every region read that touches it; "
                f"save it tiled, e.g. tifffile.imwrite(path, image, tile=(256, 256), compression='jpeg')"
            )

    def _mpp_evidence(self, page: Any) -> list[MppEvidence]:
        aperio = _APERIO_MPP.search(page.description or "") if self._tiles.tif.is_svs else None
        tags = page.tags
        unit = tags.get(296)  # ResolutionUnit
        return [
            evidence_from_aperio(aperio.group(1) if aperio else None),
            evidence_from_tiff_resolution(_rational(tags.get(282)), _rational(tags.get(283)),
                                          int(unit.value) if unit is not None else None),
        ]

    def _tile_access(self) -> TiffTiles:
        return self._tiles

    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        grid = self._tiles.grid(level)
        assert grid is not None  # every level has one (checked when opened)
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        for row, col in tiles_of(grid, y, x, y + height, x + width):
            ty0, tx0, ty1, tx1 = grid.rect(row, col)
            iy0, ix0, iy1, ix1 = max(ty0, y), max(tx0, x), min(ty1, y + height), min(tx1, x + width)
            try:
                if self._raw_rows[level]:
                    pixels = self._raw_strip_rows(level, grid, row, iy0, iy1, ix0, ix1)
                else:
                    tile = self._tile_rgb(level, grid, row, col)
                    pixels = None if tile is None else tile[iy0 - ty0 : iy1 - ty0, ix0 - tx0 : ix1 - tx0]
            except SlideError:
                raise
            except Exception as exc:  # imagecodecs and tifffile raise many types
                raise SlideError(f"{self.path}: cannot decode the {grid.codec} tile (row {row}, col {col}) "
                                 f"of level {level} ({type(exc).__name__}: {exc})") from exc
            if pixels is not None:
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = pixels
        return out

    def _tile_rgb(self, level: int, grid: TileGrid, row: int, col: int) -> np.ndarray | None:
        """One tile (or strip) as RGB, clipped to the level; None when it has no data."""
        if not grid.tiled and self._strip_cache is not None and self._strip_cache[:2] == (level, row):
            return self._strip_cache[2]
        planes = [self._segment(level, grid, index) for index in grid.indices(row, col)]
        rgb = None
        if any(plane is not None for plane in planes):
            if any(plane is None for plane in planes):
                raise SlideError(f"{self.path}: tile (row {row}, col {col}) of level {level} lacks some sample planes")
            samples = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)
            y0, x0, y1, x1 = grid.rect(row, col)
            if samples.shape[0] < y1 - y0 or samples.shape[1] < x1 - x0:
                raise SlideError(f"{self.path}: tile (row {row}, col {col}) of level {level} decoded to "
                                 f"{samples.shape[0]}x{samples.shape[1]} px, expected {y1 - y0}x{x1 - x0}")
            rgb = self._formats[level].to_rgb(samples[: y1 - y0, : x1 - x0])
        if not grid.tiled:
            self._strip_cache = (level, row, rgb)
        return rgb

    def _segment(self, level: int, grid: TileGrid, index: int) -> np.ndarray | None:
        count, offset = int(grid.counts[index]), int(grid.offsets[index])
        if count == 0:
            return None
        data = os.pread(self._tiles.fd, count, offset)
        if len(data) < count:
            raise SlideError(f"{self.path}: the file ends inside a tile of level {level} ({offset}+{count} bytes)")
        page = self._tiles.pages[level]
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return decoded[0]  # (depth 1, h, w, samples) -> (h, w, samples)

    def _raw_strip_rows(self, level: int, grid: TileGrid, strip: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows [y0, y1), columns [x0, x1) of an uncompressed strip, reading only those rows."""
        page = self._tiles.pages[level]
        samples = page.samplesperpixel
        dtype = np.dtype(page.dtype).newbyteorder(self._tiles.tif.byteorder)
        row_bytes = grid.width * samples * dtype.itemsize
        start = int(grid.offsets[strip]) + (y0 - strip * grid.tile_h) * row_bytes
        size = (y1 - y0) * row_bytes
        if int(grid.counts[strip]) == 0:
            return np.full((y1 - y0, x1 - x0, 3), WHITE, np.uint8)
        if start + size > int(grid.offsets[strip]) + int(grid.counts[strip]):
            raise SlideError(f"{self.path}: strip {strip} of level {level} is shorter than its rows")
        data = os.pread(self._tiles.fd, size, start)
        if len(data) < size:
            raise SlideError(f"{self.path}: the file ends inside strip {strip} of level {level}")
        rows = np.frombuffer(data, dtype).reshape(y1 - y0, grid.width, samples)[:, x0:x1]
        return self._formats[level].to_rgb(rows.astype(dtype.newbyteorder("="), copy=False))

    def reopen(self) -> TiffReader:
        return TiffReader(self.path, slide_mpp=self.mpp)

    def close(self) -> None:
        self._tiles.close()


def _reads_raw_rows(page: Any) -> bool:
    """Uncompressed interleaved whole-byte strips: any run of rows can be read directly."""
    return (not page.is_tiled and int(page.compression) == 1 and page.predictor == 1 and page.fillorder == 1
            and page.planarconfig == 1 and page.bitspersample in (8, 16))


def _rational(tag: Any) -> float | None:
    """A TIFF RATIONAL tag's value as a number (None when the tag is absent or 0/0)."""
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple):
        numerator, denominator = value[:2]
        return numerator / denominator if denominator else None
    return float(value)

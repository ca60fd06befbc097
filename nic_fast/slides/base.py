"""The reader interface every slide backend implements, and the pixel logic they share.

Backends differ in how they index levels, what they return past the image edge and
whether they hand back alpha; this module pins one behaviour down so that the rest of
nic-fast never sees the difference: (row, col) coordinates in a level's own pixels,
uint8 RGB out, white outside the image.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

from nic_fast.slides.tiles import TiffTiles, TileGrid, TileReport, tiles_of

WHITE = 255
# Thumbnails are resampled block by block; a block reads about this many level pixels
# per side, so memory stays at a few tens of MB whatever the slide size.
_THUMBNAIL_BLOCK_PX = 1024
# A level whose downsample exceeds the requested one by at most this fraction still
# counts as "not coarser": vendors store 16.03 for a nominal 16 and reading the finer
# level instead would cost 16 times the pixels.
_DOWNSAMPLE_SLACK = 0.01
# Without a tile grid, a region whose read fails is retried in blocks of this many level
# pixels (aligned to the level), so that only the blocks that fail again are lost.
SPLIT_BLOCK_PX = 256
_UNSET = object()

Rect = tuple[int, int, int, int]  # (y0, x0, y1, x1) in a level's pixels, ends exclusive


class SlideError(Exception):
    """A slide cannot be used; the message names the file and the fix."""


class BadRegion(NamedTuple):
    """Level pixels [y0, y1) x [x0, x1) that could not be read, and why."""

    y0: int
    x0: int
    y1: int
    x1: int
    reason: str


@dataclass
class RegionRead:
    """What :meth:`SlideReader.read_region_checked` returns.

    ``pixels`` is the region as ``read_region`` gives it, except that ``bad`` rectangles
    are white; every other pixel is exactly what a clean read gives. ``absent`` are the
    zero-length tiles the region touches (no data: white, and valid). Rectangles are in
    the level's pixels, clipped to the region and the level.
    """

    pixels: np.ndarray
    bad: list[BadRegion] = field(default_factory=list)
    absent: list[Rect] = field(default_factory=list)


@dataclass
class RegionCheck:
    """What :meth:`SlideReader.check_region` finds: corrupt tiles (``bad``) and zero-length
    ones (``absent``), in level pixels clipped to the region; ``checked`` False when the
    slide's tiles could not be located."""

    bad: list[BadRegion] = field(default_factory=list)
    absent: list[Rect] = field(default_factory=list)
    checked: bool = True


class SlideReader(abc.ABC):
    """An open whole-slide image: pyramid geometry, scanned µm/px and region reads.

    One handle is not meant to be shared between threads; call :meth:`reopen` to get an
    independent one per worker.
    """

    path: Path
    backend: str
    level_dims: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float
    channels: int = 3  # 3 for RGB slides; 1 for grayscale plain images (ImageReader)
    # OpenMP threads that check one region's JPEG tiles; 1 because reader threads
    # (one per handle) already use the cores.
    check_threads: int = 1
    # Inflate Deflate tiles to verify their checksum (backends that decode themselves
    # with zlib get that check from their decode and turn this off).
    verify_deflate: bool = True

    @property
    def level_count(self) -> int:
        return len(self.level_dims)

    def level_mpp(self, level: int) -> float:
        """µm/px of a level: the scanned µm/px times the level's downsample."""
        return self.mpp * self.level_downsamples[level]

    def read_region(self, level: int, y: int, x: int, height: int, width: int, *,
                    out: np.ndarray | None = None) -> np.ndarray:
        """RGB pixels of a rectangle in ``level``'s own pixel coordinates.

        Returns a C-contiguous uint8 array of shape (height, width, channels) (RGB for
        every slide; one channel for grayscale plain images). Any part of the rectangle
        outside the level is white, so callers may read a grid that overhangs the
        slide's right and bottom edges without special cases. ``out`` (such an array,
        e.g. a view of a pinned staging buffer) is filled and returned instead of a new
        one: the backend's pixels are copied once, straight where they are needed.
        """
        out, inside = self._blank_region(level, y, x, height, width, out)
        if inside is not None:
            y0, x0, y1, x1 = inside
            self._read_inside_into(level, y0, x0, y1 - y0, x1 - x0, out[y0 - y : y1 - y, x0 - x : x1 - x])
        return out

    def read_region_checked(self, level: int, y: int, x: int, height: int, width: int, *,
                            out: np.ndarray | None = None) -> RegionRead:
        """``read_region`` that never passes off undecodable or corrupt data as pixels.

        When the slide is a TIFF whose tiles can be located, every compressed tile the
        region touches is checked from its bytes first (see :mod:`nic_fast.slides.tiles`);
        corrupt tiles are never handed to the backend and come back as ``bad``. When a
        read still raises, the region is read again tile by tile (in 256-px blocks
        where there is no tile grid: MRXS, NDPI, ...), so only the failing tiles are
        lost. The cost on a clean region is the check alone (see
        ``benchmarks/tile_check.py``). ``out`` is as for :meth:`read_region`.
        """
        out, inside = self._blank_region(level, y, x, height, width, out)
        result = RegionRead(out)
        if inside is None:
            return result
        access = self._tile_access()
        grid = access.grid(level) if access is not None else None
        if grid is None:
            self._read_parts(result, level, (y, x), [inside], lambda rect: _blocks(rect, SPLIT_BLOCK_PX))
            return result
        report = self._inspect(access, grid, inside)
        result.bad = _bad_tiles(grid, inside, report)
        self._read_parts(result, level, (y, x), _good_parts(grid, inside, set(report.bad)),
                         lambda rect: [_clip(grid.rect(*tile), rect) for tile in tiles_of(grid, *rect)])
        result.absent = [_clip(grid.rect(*tile), inside) for tile in sorted(report.absent)]
        for y0, x0, y1, x1 in result.absent:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = WHITE
        for y0, x0, y1, x1, _ in result.bad:  # a reused ``out`` still holds the last region there
            out[y0 - y : y1 - y, x0 - x : x1 - x] = WHITE
        return result

    def check_region(self, level: int, y: int, x: int, height: int, width: int) -> RegionCheck:
        """The tile checks of :meth:`read_region_checked` without the decode, for callers
        that decode elsewhere (cuCIM on a GPU): which rectangles hold corrupt or absent
        tiles. ``checked`` is False when the slide's tiles cannot be located (then only
        a decoder's own errors can tell)."""
        inside = self._inside(level, y, x, height, width)
        access = self._tile_access()
        grid = access.grid(level) if access is not None else None
        if grid is None or inside is None:
            return RegionCheck(checked=grid is not None)
        report = self._inspect(access, grid, inside)
        return RegionCheck(_bad_tiles(grid, inside, report),
                           [_clip(grid.rect(*tile), inside) for tile in sorted(report.absent)])

    def _inspect(self, access: TiffTiles, grid: TileGrid, inside: Rect) -> TileReport:
        return grid.inspect(access.fd, access.file_size, list(tiles_of(grid, *inside)),
                            verify_deflate=self.verify_deflate, threads=self.check_threads)

    def _read_parts(self, result: RegionRead, level: int, origin: tuple[int, int], parts: list[Rect],
                    split: Callable[[Rect], list[Rect]]) -> None:
        """Read each part into ``result.pixels``; a part that fails is split once and
        its pieces read alone, and a piece that fails again becomes a bad rectangle."""
        oy, ox = origin
        for part in parts:
            y0, x0, y1, x1 = part
            try:
                self._read_inside_into(level, y0, x0, y1 - y0, x1 - x0, result.pixels[y0 - oy : y1 - oy, x0 - ox : x1 - ox])
            except SlideError as exc:
                pieces = split(part)
                if pieces == [part]:
                    result.bad.append(BadRegion(*part, f"decode error: {exc}"))
                else:
                    self._read_parts(result, level, origin, pieces, lambda rect: [rect])

    def _blank_region(self, level: int, y: int, x: int, height: int, width: int,
                      out: np.ndarray | None = None) -> tuple[np.ndarray, Rect | None]:
        """The array a region is read into, white where the request lies outside the level
        (a new white array, or ``out`` checked and whitened outside), and the part inside."""
        inside = self._inside(level, y, x, height, width)
        if out is None:
            return np.full((height, width, self.channels), WHITE, dtype=np.uint8), inside
        shape = (height, width, self.channels)
        if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {shape}, "
                             f"got {out.dtype} {out.shape}")
        if inside is None:
            out[...] = WHITE
        else:
            y0, x0, y1, x1 = inside
            out[: y0 - y], out[y1 - y :] = WHITE, WHITE
            out[:, : x0 - x], out[:, x1 - x :] = WHITE, WHITE
        return out, inside

    def _inside(self, level: int, y: int, x: int, height: int, width: int) -> Rect | None:
        """The part of a requested rectangle inside the level (None if nothing is)."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        if height < 0 or width < 0:
            raise ValueError(f"region size must not be negative, got {height}x{width}")
        level_h, level_w = self.level_dims[level]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, level_h), min(x + width, level_w)
        return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None

    def _tile_access(self) -> TiffTiles | None:
        """Where the checks find this handle's tiles: the file parsed as a TIFF once per
        handle, or None when it is not one tifffile can parse."""
        tiles = getattr(self, "_checked_tiles", _UNSET)
        if tiles is _UNSET:
            try:
                tiles = TiffTiles(self.path, self.level_dims)
            except Exception:  # noqa: BLE001 - not a TIFF: regions rely on the backend's own errors
                tiles = None
            self._checked_tiles = tiles
        return tiles

    def _release_tile_access(self) -> None:
        tiles = getattr(self, "_checked_tiles", None)
        if tiles is not None:
            tiles.close()
        self._checked_tiles = None

    @abc.abstractmethod
    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Backend read of a rectangle that lies wholly inside the level: (h, w, 3) uint8."""

    def _read_inside_into(self, level: int, y: int, x: int, height: int, width: int, out: np.ndarray) -> None:
        """:meth:`_read_inside` into ``out`` (an (h, w, channels) view): one copy of the
        backend's buffer; backends that assemble tiles themselves write there directly."""
        out[...] = self._read_inside(level, y, x, height, width)

    @abc.abstractmethod
    def reopen(self) -> SlideReader:
        """A new, independent handle to the same file with the same µm/px."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's file handle."""

    def thumbnail(self, downsample: float) -> np.ndarray:
        """Area-averaged view of the slide at ``downsample`` relative to level 0.

        Shape is (ceil(H0 / downsample), ceil(W0 / downsample), channels). It is computed from
        the coarsest level that is not coarser than requested and read block by block,
        so even a single-level gigapixel slide never has to fit in memory.
        """
        return self.thumbnail_checked(downsample)[0]

    def thumbnail_checked(self, downsample: float) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`thumbnail` read with every tile checked, and a bool mask of the thumbnail
        pixels that cover unreadable or corrupt tiles (white in the thumbnail: nothing is
        known there, so a caller should not take them for glass)."""
        if downsample <= 0:
            raise ValueError(f"thumbnail downsample must be positive, got {downsample}")
        level = self._thumbnail_level(downsample)
        full_h, full_w = self.level_dims[0]
        level_h, level_w = self.level_dims[level]
        out_h, out_w = math.ceil(full_h / downsample), math.ceil(full_w / downsample)
        unknown = np.zeros((out_h, out_w), bool)
        # Output pixel k spans [k * step, (k + 1) * step) level pixels on each axis.
        step_y = downsample * level_h / full_h
        step_x = downsample * level_w / full_w
        if step_y == 1.0 and step_x == 1.0:  # a level at exactly this downsample: no resampling
            read = self.read_region_checked(level, 0, 0, out_h, out_w)
            for y0, x0, y1, x1, _ in read.bad:
                unknown[y0:y1, x0:x1] = True
            return read.pixels, unknown
        block_h = max(1, int(_THUMBNAIL_BLOCK_PX / step_y))
        block_w = max(1, int(_THUMBNAIL_BLOCK_PX / step_x))
        out = np.empty((out_h, out_w, self.channels), dtype=np.uint8)
        for i0 in range(0, out_h, block_h):
            i1 = min(i0 + block_h, out_h)
            edges_y = np.minimum(np.arange(i0, i1 + 1) * step_y, level_h)
            r0, r1 = math.floor(edges_y[0]), math.ceil(edges_y[-1])
            for j0 in range(0, out_w, block_w):
                j1 = min(j0 + block_w, out_w)
                edges_x = np.minimum(np.arange(j0, j1 + 1) * step_x, level_w)
                c0, c1 = math.floor(edges_x[0]), math.ceil(edges_x[-1])
                read = self.read_region_checked(level, r0, c0, r1 - r0, c1 - c0)
                # Columns first, so the second pass runs on the narrowed block.
                averaged = _area_mean(_area_mean(read.pixels, edges_x - c0, axis=1), edges_y - r0, axis=0)
                out[i0:i1, j0:j1] = np.rint(averaged).astype(np.uint8)
                for y0, x0, y1, x1, _ in read.bad:  # level px → the output pixels they touch
                    unknown[math.floor(y0 / step_y) : math.ceil(y1 / step_y),
                            math.floor(x0 / step_x) : math.ceil(x1 / step_x)] = True
        return out, unknown

    def _thumbnail_level(self, downsample: float) -> int:
        allowed = downsample * (1 + _DOWNSAMPLE_SLACK)
        candidates = [lv for lv, ds in enumerate(self.level_downsamples) if ds <= allowed]
        return max(candidates, key=lambda lv: self.level_downsamples[lv]) if candidates else 0

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        dims = ", ".join(f"{h}x{w}" for h, w in self.level_dims)
        return f"{type(self).__name__}({str(self.path)!r}, mpp={self.mpp:g}, levels=[{dims}])"


def _area_mean(values: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
    """Mean of ``values`` over the fractional intervals [edges[k], edges[k+1]) along ``axis``.

    Uses the prefix sum, which is piecewise linear in a fractional position, so partial
    pixels at interval ends are weighted exactly and the cost is linear in the input.
    The axis is moved last first: numpy's cumulative sum is several times faster there.
    """
    moved = np.moveaxis(values, axis, -1)
    inclusive = np.cumsum(moved, axis=-1, dtype=np.float64)
    whole = np.minimum(np.floor(edges).astype(np.int64), moved.shape[-1] - 1)
    # Prefix sum at fractional position whole + frac: the inclusive sum up to pixel
    # `whole` minus the part of that pixel beyond the position.
    at_edges = inclusive[..., whole] - (1.0 - (edges - whole)) * moved[..., whole]
    return np.moveaxis(np.diff(at_edges, axis=-1) / np.diff(edges), -1, axis)


def rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) uint8 from a backend as C-contiguous RGB, compositing alpha onto white.

    Backends report areas without tissue data (and OpenSlide everything outside the
    scanned region) as transparent; white keeps those areas "background" downstream.
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or pixels.dtype != np.uint8:
        raise SlideError(f"backend returned pixels of shape {pixels.shape} and dtype {pixels.dtype}, expected RGB(A) uint8")
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    rgb, alpha = pixels[..., :3], pixels[..., 3:]
    if alpha.min() == WHITE:
        return np.ascontiguousarray(rgb)
    alpha16 = alpha.astype(np.uint16)
    blended = (rgb.astype(np.uint16) * alpha16 + WHITE * (WHITE - alpha16) + WHITE // 2) // WHITE
    return blended.astype(np.uint8)


def _clip(rect: Rect, bounds: Rect) -> Rect:
    return max(rect[0], bounds[0]), max(rect[1], bounds[1]), min(rect[2], bounds[2]), min(rect[3], bounds[3])


def _blocks(rect: Rect, block_px: int) -> list[Rect]:
    """``rect`` cut along the level's ``block_px`` grid."""
    y0, x0, y1, x1 = rect
    return [
        (by, bx, min(by - by % block_px + block_px, y1), min(bx - bx % block_px + block_px, x1))
        for by in [y0, *range(y0 - y0 % block_px + block_px, y1, block_px)]
        for bx in [x0, *range(x0 - x0 % block_px + block_px, x1, block_px)]
    ]


def _bad_tiles(grid: TileGrid, inside: Rect, report: TileReport) -> list[BadRegion]:
    return [BadRegion(*_clip(grid.rect(row, col), inside), f"corrupt {grid.codec} tile (row {row}, col {col}): {why}")
            for (row, col), why in sorted(report.bad.items())]


def _good_parts(grid: TileGrid, inside: Rect, bad: set[tuple[int, int]]) -> list[Rect]:
    """``inside`` minus the ``bad`` tiles, as few rectangles as row bands allow: tile rows
    without a bad tile merge into bands, the others split into runs of good tiles."""
    if not bad:
        return [inside]
    r0, r1, c0, c1 = grid.span(*inside)
    parts: list[Rect] = []
    band_start: int | None = None
    for row in range(r0, r1 + 1):
        row_bad = row < r1 and any((row, col) in bad for col in range(c0, c1))
        if row < r1 and not row_bad:
            band_start = row if band_start is None else band_start
            continue
        if band_start is not None:
            parts.append(_clip((band_start * grid.tile_h, inside[1], row * grid.tile_h, inside[3]), inside))
            band_start = None
        if row_bad:
            col = c0
            while col < c1:
                if (row, col) in bad:
                    col += 1
                    continue
                end = col
                while end < c1 and (row, end) not in bad:
                    end += 1
                parts.append(_clip((row * grid.tile_h, col * grid.tile_w, (row + 1) * grid.tile_h, end * grid.tile_w),
                                   inside))
                col = end
    return parts

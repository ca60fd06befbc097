"""The reader interface every slide backend implements, and the pixel logic they share.

Backends differ in how they index levels, what they return past the image edge and
whether they hand back alpha; this module pins one behaviour down so that the rest of
nic-fast never sees the difference: (row, col) coordinates in a level's own pixels,
uint8 RGB out, white outside the image.
"""
from __future__ import annotations

import abc
import math
from pathlib import Path
from types import TracebackType

import numpy as np

WHITE = 255
# Thumbnails are resampled block by block; a block reads about this many level pixels
# per side, so memory stays at a few tens of MB whatever the slide size.
_THUMBNAIL_BLOCK_PX = 1024
# A level whose downsample exceeds the requested one by at most this fraction still
# counts as "not coarser": vendors store 16.03 for a nominal 16 and reading the finer
# level instead would cost 16 times the pixels.
_DOWNSAMPLE_SLACK = 0.01


class SlideError(Exception):
    """A slide cannot be used; the message names the file and the fix."""


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

    @property
    def level_count(self) -> int:
        return len(self.level_dims)

    def level_mpp(self, level: int) -> float:
        """µm/px of a level: the scanned µm/px times the level's downsample."""
        return self.mpp * self.level_downsamples[level]

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """RGB pixels of a rectangle in ``level``'s own pixel coordinates.

        Returns a C-contiguous uint8 array of shape (height, width, channels) (RGB for
        every slide; one channel for grayscale plain images). Any part of the rectangle
        outside the level is white, so callers may read a grid that overhangs the
        slide's right and bottom edges without special cases.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        if height < 0 or width < 0:
            raise ValueError(f"region size must not be negative, got {height}x{width}")
        out = np.full((height, width, self.channels), WHITE, dtype=np.uint8)
        level_h, level_w = self.level_dims[level]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, level_h), min(x + width, level_w)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_inside(level, y0, x0, y1 - y0, x1 - x0)
        return out

    @abc.abstractmethod
    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Backend read of a rectangle that lies wholly inside the level: (h, w, 3) uint8."""

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
        if downsample <= 0:
            raise ValueError(f"thumbnail downsample must be positive, got {downsample}")
        level = self._thumbnail_level(downsample)
        full_h, full_w = self.level_dims[0]
        level_h, level_w = self.level_dims[level]
        out_h, out_w = math.ceil(full_h / downsample), math.ceil(full_w / downsample)
        # Output pixel k spans [k * step, (k + 1) * step) level pixels on each axis.
        step_y = downsample * level_h / full_h
        step_x = downsample * level_w / full_w
        if step_y == 1.0 and step_x == 1.0:  # a level at exactly this downsample: no resampling
            return self.read_region(level, 0, 0, out_h, out_w)
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
                region = self.read_region(level, r0, c0, r1 - r0, c1 - c0)
                # Columns first, so the second pass runs on the narrowed block.
                averaged = _area_mean(_area_mean(region, edges_x - c0, axis=1), edges_y - r0, axis=0)
                out[i0:i1, j0:j1] = np.rint(averaged).astype(np.uint8)
        return out

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

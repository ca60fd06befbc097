"""Grid geometry: where each cell of the compressed grid lies in the slide.

Cell (i, j) starts at working-resolution pixel (i * stride_px, j * stride_px) and spans
``patch_px``; the working resolution is a pyramid level box-downsampled by an integer
factor, so in level pixels everything is ``downsample`` times larger.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["DIHEDRAL", "GridGeometry", "Tile", "dihedral"]

DIHEDRAL = tuple(range(8))
"""The 8 dihedral transforms: k = rotations + 4 * mirror, 0 = identity."""


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """T_k on the first two axes: ``rot90(fliplr(a) if k >= 4 else a, k % 4)``.

    The same convention as the patchify kernel, so compressing a slide transformed by
    T_k gives, for every cell, the embedding that variant k of the original stores.
    """
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    out = np.flip(array, axis=1) if k >= 4 else array
    return np.rot90(out, k % 4, axes=(0, 1))


@dataclass(frozen=True)
class Tile:
    """A block of grid cells compressed, and written as one Zarr chunk, together."""

    row: int  # tile index
    col: int
    i0: int  # first cell row / col, and one past the last
    j0: int
    i1: int
    j1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.i1 - self.i0, self.j1 - self.j0


@dataclass(frozen=True)
class GridGeometry:
    """Grid of cells over one pyramid level of a slide."""

    height: int  # cells
    width: int
    patch_px: int  # at the working resolution
    stride_px: int
    downsample: int  # level pixels per working pixel

    @classmethod
    def over_level(cls, level_height_px: int, level_width_px: int, *, patch_px: int, stride_px: int,
                   downsample: int) -> GridGeometry:
        """Every cell whose patch lies entirely inside the level (partial edge cells are dropped)."""
        if patch_px < 1 or stride_px < 1 or downsample < 1:
            raise ValueError("patch_px, stride_px and downsample must be >= 1")
        work_h, work_w = level_height_px // downsample, level_width_px // downsample

        def cells(extent: int) -> int:
            return 0 if extent < patch_px else (extent - patch_px) // stride_px + 1

        return cls(cells(work_h), cells(work_w), patch_px, stride_px, downsample)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def level_patch_px(self) -> int:
        return self.patch_px * self.downsample

    @property
    def level_stride_px(self) -> int:
        return self.stride_px * self.downsample

    def level_origin(self, i: int | np.ndarray, j: int | np.ndarray) -> tuple:
        """Top-left level pixel (y, x) of cell (i, j)."""
        return i * self.level_stride_px, j * self.level_stride_px

    def tiles(self, tile_cells: int) -> Iterator[Tile]:
        """Tiles of ``tile_cells`` x ``tile_cells`` cells in row-major order."""
        for row, i0 in enumerate(range(0, self.height, tile_cells)):
            for col, j0 in enumerate(range(0, self.width, tile_cells)):
                yield Tile(row, col, i0, j0, min(i0 + tile_cells, self.height), min(j0 + tile_cells, self.width))

"""Tissue detection: a thumbnail becomes a boolean mask, then a per-cell tissue fraction.

Background cells are not encoded, so this decides how much work a slide is. It runs on
a thumbnail (one small read), never on full-resolution pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nic_fast import kernels
from nic_fast.grid import GridGeometry

__all__ = ["TissueMap", "detect_tissue"]


@dataclass(frozen=True)
class TissueMap:
    mask: np.ndarray  # bool, thumbnail resolution
    fraction: np.ndarray  # float32 (H', W'): tissue fraction of each cell's patch
    cells: np.ndarray  # bool (H', W'): cells to encode
    threshold: int  # saturation threshold that Otsu chose (0..255)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of grid cells that are tissue."""
        return float(self.cells.mean()) if self.cells.size else 0.0


def detect_tissue(thumbnail: np.ndarray, grid: GridGeometry, *, thumb_px_per_level_px: float,
                  min_fraction: float = 0.1) -> TissueMap:
    """Tissue mask of ``thumbnail`` and the grid cells with at least ``min_fraction`` tissue.

    ``thumb_px_per_level_px`` maps the grid's level pixels to thumbnail pixels. Specks
    smaller than half a cell are dropped and holes smaller than half a cell filled, so
    dust does not create cells and nuclei-sparse stroma is not punched out.
    """
    stride = grid.level_stride_px * thumb_px_per_level_px
    size = grid.level_patch_px * thumb_px_per_level_px
    cell_area_px = max(1, int(round(size * size)))
    mask, threshold = kernels.tissue_mask(thumbnail, min_object_px=cell_area_px // 2, max_hole_px=cell_area_px // 2)
    fraction = kernels.cell_fraction(mask, grid.shape, stride_px=stride, size_px=size)
    return TissueMap(mask=mask, fraction=fraction, cells=fraction >= min_fraction, threshold=threshold)

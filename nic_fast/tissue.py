"""Tissue detection: a thumbnail becomes a boolean mask, then a per-cell tissue fraction.

Background cells are not encoded, so this decides how much work a slide is. It runs on
a thumbnail (one small read), never on full-resolution pixels. The mask is automatic
(:func:`detect_tissue`: stained pixels, without pen marks) or a user's (:func:`tissue_from_mask`,
e.g. drawn in QuPath and read by :mod:`nic_fast.annotations`); either way the grid's
cells follow from it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nic_fast import kernels
from nic_fast.grid import GridGeometry

__all__ = ["METHOD_SATURATION", "METHOD_SATURATION_INK", "TissueMap", "detect_tissue", "tissue_from_mask"]

METHOD_SATURATION = "HSV saturation, Otsu threshold"
METHOD_SATURATION_INK = "HSV saturation, Otsu threshold; blue, green and black marker ink removed (hue/value rules)"
INK_MIN_CELLS = 2  # a pen stroke holds at least this many cells' area of certain ink


@dataclass(frozen=True)
class TissueMap:
    mask: np.ndarray  # bool, thumbnail resolution
    fraction: np.ndarray  # float32 (H', W'): tissue fraction of each cell's patch
    cells: np.ndarray  # bool (H', W'): cells to encode
    threshold: int  # saturation threshold that Otsu chose (0..255); 0 for a user's mask
    method: str = METHOD_SATURATION  # how `mask` was made, for the store's `tissue_detection`
    ink: np.ndarray | None = None  # bool, thumbnail resolution: marker ink found (None: not looked for)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of grid cells that are tissue."""
        return float(self.cells.mean()) if self.cells.size else 0.0


def _cell_footprint(grid: GridGeometry, thumb_px_per_level_px: float) -> tuple[float, float, int]:
    """A cell's stride and patch side in thumbnail px, and the patch's area (at least 1 px)."""
    stride = grid.level_stride_px * thumb_px_per_level_px
    size = grid.level_patch_px * thumb_px_per_level_px
    return stride, size, max(1, int(round(size * size)))


def detect_tissue(thumbnail: np.ndarray, grid: GridGeometry, *, thumb_px_per_level_px: float,
                  min_fraction: float = 0.1, remove_ink: bool = True, unknown: np.ndarray | None = None) -> TissueMap:
    """Tissue mask of ``thumbnail`` and the grid cells with at least ``min_fraction`` tissue.

    ``thumb_px_per_level_px`` maps the grid's level pixels to thumbnail pixels. Specks
    smaller than half a cell are dropped and holes smaller than half a cell filled, so
    dust does not create cells and nuclei-sparse stroma is not punched out. With
    ``remove_ink``, marker strokes (:func:`nic_fast.kernels.ink_mask`; a stroke holds
    at least ``INK_MIN_CELLS`` cells' area of certain ink) are never tissue: saturated
    blue or green ink would otherwise pass as stained tissue, on glass and over tissue.

    ``unknown`` (bool, the thumbnail's shape) marks pixels over tiles that could not be
    read: nothing is known there, so they are left out of Otsu's histogram and counted as
    tissue — their cells are then read, found unreadable and stored as not ``valid``,
    rather than silently taken for glass.
    """
    stride, size, cell_area_px = _cell_footprint(grid, thumb_px_per_level_px)
    ink = kernels.ink_mask(thumbnail, min_strong_px=INK_MIN_CELLS * cell_area_px) if remove_ink else None
    exclude = ink if unknown is None or not unknown.any() else (unknown if ink is None else ink | unknown)
    mask, threshold = kernels.tissue_mask(thumbnail, min_object_px=cell_area_px // 2, max_hole_px=cell_area_px // 2,
                                          exclude=exclude)
    if unknown is not None and unknown.any():
        mask = mask | unknown
    fraction = kernels.cell_fraction(mask, grid.shape, stride_px=stride, size_px=size)
    return TissueMap(mask=mask, fraction=fraction, cells=fraction >= min_fraction, threshold=threshold,
                     method=METHOD_SATURATION_INK if remove_ink else METHOD_SATURATION, ink=ink)


def tissue_from_mask(mask: np.ndarray, grid: GridGeometry, *, thumb_px_per_level_px: float, method: str,
                     min_fraction: float = 0.1) -> TissueMap:
    """The grid's tissue cells from a given bool mask at thumbnail resolution (a user's,
    e.g. :func:`nic_fast.annotations.read_tissue_mask`), counted exactly as for the
    automatic mask. ``method`` says where the mask came from (e.g. "mask file X.geojson").
    """
    if mask.ndim != 2:
        raise ValueError(f"a tissue mask is 2-d (height, width), got shape {mask.shape}")
    stride, size, _ = _cell_footprint(grid, thumb_px_per_level_px)
    mask = np.ascontiguousarray(mask, dtype=bool)
    fraction = kernels.cell_fraction(mask, grid.shape, stride_px=stride, size_px=size)
    return TissueMap(mask=mask, fraction=fraction, cells=fraction >= min_fraction, threshold=0, method=method)

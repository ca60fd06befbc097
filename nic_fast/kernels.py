"""Typed Python face of the C++/CUDA kernels (``nic_fast._C`` and ``nic_fast._C_cuda``).

Arrays cross by DLPack without copies: callers allocate outputs where the next stage
reads them (a pinned batch buffer, a device tensor, a tile of the grid) and the kernel
writes there. A wrong dtype, device or layout raises ``ValueError``; a cell outside
its region or grid raises ``IndexError``.

The CUDA module is imported lazily, only when a device array is passed, so that
``import nic_fast`` works on machines without a GPU, driver or CUDA libraries.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from nic_fast import _C

_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA

__all__ = ["InkRule", "cell_fraction", "cuda_module", "ink_evidence", "ink_mask", "patchify", "scatter", "tissue_mask"]


@functools.cache
def cuda_module() -> ModuleType:
    """The CUDA kernels; raises a clear error where they were not built or cannot run."""
    try:
        from nic_fast import _C_cuda
    except ImportError as exc:  # built without nvcc, or no usable CUDA runtime
        raise RuntimeError(
            "nic-fast was built without its CUDA kernels (no nvcc at build time); "
            "reinstall on a machine with the CUDA toolkit, or use --device cpu"
        ) from exc
    return _C_cuda


def _on_cuda(array: Any) -> bool:
    device = getattr(array, "__dlpack_device__", None)
    return device is not None and device()[0] == _DLPACK_CUDA


def _current_stream(array: Any) -> int:
    import torch

    return torch.cuda.current_stream(array.device).cuda_stream


def _ordered(*arrays: Any) -> bool:
    """True when every device array is a torch tensor: the kernels launch on torch's current
    stream, where torch has ordered their writes, so the DLPack export needs no event."""
    import torch

    return all(isinstance(array, torch.Tensor) for array in arrays if _on_cuda(array))


def _check_host_cells(cells: np.ndarray, limit_y: int, limit_x: int, span_px: int, what: str) -> None:
    if len(cells) == 0:
        return
    low = cells.min(axis=0)
    high = cells.max(axis=0) + span_px
    if low.min() < 0 or high[0] > limit_y or high[1] > limit_x:
        raise IndexError(f"{what}: cells span outside ({limit_y}, {limit_x})")


def patchify(
    region: Any,
    cells: Any,
    out: Any,
    *,
    scale: Sequence[float],
    offset: Sequence[float],
    downsample: int = 1,
    dihedral: int = 0,
    host_cells: np.ndarray | None = None,
) -> Any:
    """Cut patches out of a uint8 (H, W, C) region into ``out`` (N, C, P, P).

    ``cells`` holds each patch's top-left (y, x) in region pixels (int32, (N, 2)); a
    patch spans ``P * downsample`` region pixels and is box-averaged down to P, then
    transformed by dihedral ``k`` (``T_k(a) = rot90(fliplr(a) if k >= 4 else a, k % 4)``),
    then normalised as ``value * scale[c] + offset[c]``. ``out`` is float32, float16 or
    bfloat16 (rounded to nearest even), contiguous NCHW or channels-last. On CUDA, pass ``host_cells`` (the same cells on the
    host) so that bounds are checked before launch.
    """
    if _on_cuda(out):
        patch_span = out.shape[-1] * downsample
        if host_cells is None:
            raise ValueError("patchify on CUDA needs host_cells to check bounds before launch")
        _check_host_cells(host_cells, region.shape[0], region.shape[1], patch_span, "patchify")
        cuda_module().patchify(region, cells, out, downsample, dihedral, list(scale), list(offset), _current_stream(out),
                               _ordered(region, cells, out))
    else:
        _C.patchify(region, cells, out, downsample, dihedral, [float(s) for s in scale], [float(o) for o in offset])
    return out


def scatter(embeddings: Any, cells: Any, grid: Any, *, host_cells: np.ndarray | None = None) -> Any:
    """Write (N, C) ``embeddings`` to their (i, j) ``cells`` of an (H, W, C) ``grid``.

    ``embeddings`` are float32, float16 or bfloat16 (what a half-precision encoder
    returns, so no cast is needed); ``grid`` is float16 or float32. On CUDA, pass
    ``host_cells`` (the same cells on the host) so that bounds are checked before launch.
    """
    if _on_cuda(grid):
        if host_cells is None:
            raise ValueError("scatter on CUDA needs host_cells to check bounds before launch")
        _check_host_cells(host_cells, grid.shape[0], grid.shape[1], 1, "scatter")
        cuda_module().scatter(embeddings, cells, grid, _current_stream(grid), _ordered(embeddings, cells, grid))
    else:
        _C.scatter(embeddings, cells, grid)
    return grid


def tissue_mask(
    rgb: np.ndarray,
    *,
    black_level: int = 25,
    min_threshold: int = 20,
    max_threshold: int = 60,
    min_object_px: int = 0,
    max_hole_px: int = 0,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Boolean tissue mask of an RGB thumbnail and the saturation threshold used.

    Tissue is stained, so it is saturated; background glass is grey-white. Otsu's
    threshold on HSV saturation separates the two. It is clamped to
    [``min_threshold``, ``max_threshold``] because Otsu splits any histogram in two:
    the floor keeps a blank slide from yielding noise "tissue", the ceiling keeps a
    slide that is all tissue from losing its paler half (stained tissue sits well
    above 60/255 saturation; glass well below 20). Pixels no brighter than
    ``black_level`` (pen, slide edge) are not tissue. Connected tissue smaller than
    ``min_object_px`` is removed and enclosed holes smaller than ``max_hole_px``
    are filled. Pixels of ``exclude`` (bool, the thumbnail's shape; e.g. :func:`ink_mask`)
    are never tissue and are left out of Otsu's histogram, where saturated ink would
    pull the threshold up.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    mask = np.empty(rgb.shape[:2], dtype=np.uint8)
    excluded = None if exclude is None else np.ascontiguousarray(exclude, dtype=np.uint8)
    threshold = _C.tissue_mask(rgb, mask, black_level, min_threshold, max_threshold, int(min_object_px),
                               int(max_hole_px), excluded)
    return mask.astype(bool), threshold


@dataclass(frozen=True)
class InkRule:
    """Thresholds of the marker-ink rule (``ink_evidence`` in csrc/elements.h), in 8-bit RGB.

    With V = max(R,G,B), chroma = V - min(R,G,B) and hue the HSV hue in whole degrees,
    a pixel is *certain* ink when it is coloured like blue or green ink (chroma >=
    ``strong_chroma`` and ``strong_hue_lo`` <= hue <= ``strong_hue_hi``, or chroma >=
    ``green_chroma`` and G - R >= ``strong_green_excess``), darker than stained tissue
    gets (V <= ``strong_dark``) or dark grey (V <= ``neutral_max`` and ``neutral_ratio``
    x chroma <= V); *possible* ink with the looser ``weak_*`` bounds or V <=
    ``weak_dark``. H&E never passes the certain tests (red passes at least as well as
    green through both stains, and dark tissue stays coloured); ink over tissue often
    passes only the possible ones, which count where they touch certain ink. Defaults
    measured in ``benchmarks/tissue_ink.py``. The field order is the C++ struct's.
    """

    strong_chroma: int = 40
    strong_hue_lo: int = 70
    strong_hue_hi: int = 245
    weak_chroma: int = 12
    weak_hue_lo: int = 60
    weak_hue_hi: int = 255
    green_chroma: int = 12
    strong_green_excess: int = 15
    weak_green_excess: int = 6
    strong_dark: int = 40
    weak_dark: int = 70
    neutral_max: int = 110
    neutral_ratio: int = 4

    def as_ints(self) -> list[int]:
        return [int(v) for v in dataclasses.astuple(self)]


def ink_evidence(rgb: np.ndarray, rule: InkRule = InkRule()) -> np.ndarray:
    """Per-pixel marker-ink evidence of an RGB image: uint8, 2 certain, 1 possible, 0 none."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    _C.ink_evidence(rgb, out, rule.as_ints())
    return out


def ink_mask(rgb: np.ndarray, *, min_strong_px: int, dilate_px: int = 1, rule: InkRule = InkRule()) -> np.ndarray:
    """Marker ink on an RGB thumbnail, bool: 8-connected regions of certain or possible
    ink (:func:`ink_evidence`) holding at least ``min_strong_px`` certain pixels, grown
    by ``dilate_px``.

    A pen stroke is a wide band, so it holds many certain pixels (on glass, at least);
    scattered bluish or dark pixels of real tissue (margin dye, dense nuclei) do not
    reach ``min_strong_px``. The dilation takes the stroke's soft edge, whose mix of ink
    and stain looks like tissue.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    _C.ink_mask(rgb, out, rule.as_ints(), int(min_strong_px), int(dilate_px))
    return out.astype(bool)


def cell_fraction(mask: np.ndarray, grid_shape: tuple[int, int], *, stride_px: float, size_px: float) -> np.ndarray:
    """Per grid cell, the fraction of ``mask`` pixels in its footprint.

    Cell (i, j) covers ``[i*stride_px, i*stride_px + size_px)`` rows (and likewise
    columns) in mask pixels; a pixel counts when its centre is inside.
    """
    mask_u8 = np.ascontiguousarray(mask, dtype=np.uint8)
    out = np.empty(grid_shape, dtype=np.float32)
    _C.cell_fraction(mask_u8, out, float(stride_px), float(size_px))
    return out

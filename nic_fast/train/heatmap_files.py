"""A heatmap as files a pathologist and their viewers open: an overlay PNG on the slide
itself, QuPath GeoJSON contours and a float32 TIFF in slide coordinates.

The map has one value per grid cell; cell (i, j) is the stride square centred on its
patch, so in level-0 pixels it starts at ``origin + (i, j) * level0_px_per_cell``. The
overlay is drawn on pixels read from the original slide (about 2 µm/px, long side capped)
rather than on the store's 8-px-per-cell thumbnail, which shows no tissue structure.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic_fast.annotations import mask_features
from nic_fast.slides import SlideError, open_slide
from nic_fast.store import CompressedSlide
from nic_fast.train.gradcam import HEATMAP_THRESHOLD, lesion_cells, level0_px_per_cell

__all__ = ["CONTOUR_LEVELS", "DISPLAY_MPP", "MAX_DISPLAY_PX", "Background", "cell_origin_level0_px",
           "heatmap_geojson", "save_overlay", "slide_background", "write_heatmap_tiff"]

DISPLAY_MPP = 2.0  # µm/px of the overlay's slide image, where the size cap allows
MAX_DISPLAY_PX = 4096  # long side of the overlay's slide image at most
CONTOUR_LEVELS = (0.25, HEATMAP_THRESHOLD, 0.75)  # of the heatmap's maximum on tissue
COLORMAP = "viridis"  # perceptually uniform; its blue-green-yellow stands apart from H&E's pink and purple
TRANSPARENT_BELOW = 0.1  # of the maximum: no colour at all there, the tissue shows through
OPAQUE_FROM = 0.5  # alpha ramps from 0 at TRANSPARENT_BELOW to MAX_ALPHA here
MAX_ALPHA = 0.7
_SCALE_BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass(frozen=True)
class Background:
    """The image a heatmap is drawn on and where it lies in the slide."""

    image: np.ndarray  # uint8 (h, w, 3)
    level0_px_per_px: float  # its downsample from level 0
    mpp: float | None  # µm/px of the image (None: a plain image in pixel units)
    source: str  # "slide" (read from the original file) or "thumbnail" (the store's)
    note: str = ""  # why the store's thumbnail stands in for the slide, when it does


def cell_origin_level0_px(slide: CompressedSlide) -> float:
    """Level-0 px from the slide's edge to the first cell's stride square (patches wider
    than the stride centre it on the patch)."""
    attrs = slide.attrs
    per_working_px = level0_px_per_cell(slide) / attrs["stride_px"]
    return 0.5 * (attrs.get("patch_px", attrs["stride_px"]) - attrs["stride_px"]) * per_working_px


def slide_background(slide: CompressedSlide, *, display_mpp: float = DISPLAY_MPP,
                     max_px: int = MAX_DISPLAY_PX) -> Background:
    """The original slide at ``display_mpp`` (coarser where its long side would pass
    ``max_px``, never finer than the scan), or the store's thumbnail with a note saying
    why when the file is gone or cannot be read."""
    attrs = slide.attrs
    source = Path(attrs.get("source", {}).get("path", ""))
    scanned_mpp = attrs.get("scanned_mpp")
    try:
        if not source.is_file():
            raise SlideError(f"{source}: no such file")
        reader = open_slide(source, slide_mpp=scanned_mpp) if scanned_mpp else open_slide(source, backend="image")
    except SlideError as exc:
        return _thumbnail_background(slide, f"the slide cannot be read ({exc}); drawn on the store's thumbnail")
    with reader:
        height, width = reader.level_dims[0]
        downsample = max(1.0, max(height, width) / max_px)
        if scanned_mpp:
            downsample = max(downsample, display_mpp / scanned_mpp)
        try:
            image = reader.thumbnail(downsample)
        except SlideError as exc:
            return _thumbnail_background(slide, f"the slide cannot be read ({exc}); drawn on the store's thumbnail")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    return Background(image, downsample, scanned_mpp * downsample if scanned_mpp else None, "slide")


def _thumbnail_background(slide: CompressedSlide, note: str) -> Background:
    downsample = slide.attrs["thumbnail_downsample"]
    scanned_mpp = slide.attrs.get("scanned_mpp")
    return Background(slide.thumbnail, downsample, scanned_mpp * downsample if scanned_mpp else None, "thumbnail",
                      note)


def _on_tissue_fraction(slide: CompressedSlide, heatmap: np.ndarray) -> np.ndarray:
    """The map on tissue cells as a fraction of its maximum there (0 elsewhere)."""
    on_tissue = np.where(slide.tissue, heatmap, 0.0).astype(np.float32)
    peak = float(on_tissue.max(initial=0.0))
    return on_tissue / peak if peak > 0 else on_tissue


def save_overlay(path: str | Path, background: Background, slide: CompressedSlide, heatmap: np.ndarray, *,
                 predicted: np.ndarray, truth: np.ndarray | None, title: str) -> Path:
    """A PNG of the heatmap over ``background`` at the background's own resolution: the
    map alpha-blended (viridis, transparent below 10 % of its maximum, 70 % opaque from
    50 %), the post-processed heatmap outlined in white and the ground truth, when
    given, in green, with a colour bar, a legend and a scale bar.

    Drawn on a bare matplotlib Figure (Agg), so pyplot's global state is left alone.
    """
    import cv2
    from matplotlib import colormaps
    from matplotlib import patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    image = background.image
    height, width = image.shape[:2]
    cell_px = level0_px_per_cell(slide) / background.level0_px_per_px
    origin_px = cell_origin_level0_px(slide) / background.level0_px_per_px
    fraction = _on_tissue_fraction(slide, heatmap)
    rows, cols = slide.grid_shape
    # Bilinear between cell centres, over the grid's extent in display pixels.
    size = (max(1, round(cols * cell_px)), max(1, round(rows * cell_px)))
    upsampled = cv2.resize(fraction, size, interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((height, width), np.float32)
    top = left = max(0, round(origin_px))
    part = upsampled[: height - top, : width - left]
    canvas[top : top + part.shape[0], left : left + part.shape[1]] = part
    colours = colormaps[COLORMAP](canvas)[..., :3]
    alpha = (MAX_ALPHA * np.clip((canvas - TRANSPARENT_BELOW) / (OPAQUE_FROM - TRANSPARENT_BELOW), 0, 1))[..., None]
    blended = (image / 255.0) * (1 - alpha) + colours * alpha

    dpi, right_px, top_px = 100, 260, 60
    figure = Figure(figsize=((width + right_px) / dpi, (height + top_px) / dpi), dpi=dpi)
    total_w, total_h = width + right_px, height + top_px
    axes = figure.add_axes((0, 0, width / total_w, height / total_h))
    axes.imshow(blended, interpolation="none", extent=(0, width, height, 0))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    centres_x = (np.arange(cols) + 0.5) * cell_px + origin_px
    centres_y = (np.arange(rows) + 0.5) * cell_px + origin_px
    halo = [patheffects.withStroke(linewidth=3.5, foreground="black")]
    handles = []
    if predicted.any():
        lines = axes.contour(centres_x, centres_y, predicted.astype(float), levels=[0.5], colors="white",
                             linewidths=1.6)
        lines.set(path_effects=halo)
    handles.append(Line2D([], [], color="white", linewidth=1.6, path_effects=halo,
                          label=f"heatmap ≥ {HEATMAP_THRESHOLD:.0%} of its maximum (scored)"))
    if truth is not None:
        if truth.any():
            lines = axes.contour(centres_x, centres_y, truth.astype(float), levels=[0.5], colors="lime",
                                 linewidths=1.6)
            lines.set(path_effects=halo)
        handles.append(Line2D([], [], color="lime", linewidth=1.6, path_effects=halo, label="ground-truth mask"))
    legend = axes.legend(handles=handles, loc="lower left", fontsize=9, framealpha=0.85)
    legend.get_frame().set_edgecolor("0.5")
    bar_px, bar_label = _scale_bar(background, width)
    axes.add_artist(AnchoredSizeBar(axes.transData, bar_px, bar_label, "lower right", pad=0.6, color="black",
                                    frameon=True, size_vertical=max(2.0, height / 300), fontproperties={"size": 9}))
    colorbar_axes = figure.add_axes((width / total_w + 30 / total_w, 0.1 * height / total_h, 22 / total_w,
                                     0.8 * height / total_h))
    colorbar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormaps[COLORMAP]), cax=colorbar_axes)
    colorbar.set_label(f"Grad-CAM, fraction of its maximum on tissue\n(transparent below {TRANSPARENT_BELOW:.0%})",
                       fontsize=9)
    where = (f"{background.mpp:.2g} µm/px" if background.mpp else f"1:{background.level0_px_per_px:.3g}")
    shown = "slide" if background.source == "slide" else "store thumbnail"
    figure.text(0.01, 1 - 12 / total_h, f"{title}  ({shown}, {where})", fontsize=10, va="top")
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path


def _scale_bar(background: Background, width_px: int) -> tuple[float, str]:
    """A round length of about a fifth of the image, in display px, and its label."""
    if background.mpp is None:
        level0_px = 10 ** math.floor(math.log10(max(1.0, width_px * background.level0_px_per_px / 5)))
        return level0_px / background.level0_px_per_px, f"{level0_px:g} px"
    target_um = width_px * background.mpp / 5
    length_um = max([u for u in _SCALE_BAR_UM if u <= target_um], default=_SCALE_BAR_UM[0])
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um} µm"
    return length_um / background.mpp, label


def heatmap_geojson(slide: CompressedSlide, heatmap: np.ndarray, *, levels: tuple[float, ...] = CONTOUR_LEVELS,
                    smooth_cells: float = 0.0) -> dict[str, Any]:
    """The heatmap's contours as QuPath annotations in level-0 px: for each level, the
    tissue cells at or above it (of the maximum on tissue, after the same smoothing as
    the scored heatmap), classified "Grad-CAM ≥ NN %"; the 50 % level is the scored one."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    features = []
    for level in levels:
        cells = lesion_cells(heatmap, slide.tissue, level, smooth_cells=smooth_cells)
        color = [int(round(255 * c)) for c in cmap(level)[:3]]
        features += mask_features(cells, level0_px_per_mask_px=level0_px_per_cell(slide),
                                  classification=f"Grad-CAM ≥ {level:.0%}", color=color, id_seed=slide.path.name,
                                  origin_xy_level0_px=(cell_origin_level0_px(slide),) * 2,
                                  extra_properties={"heatmap_level": level})
    return {"type": "FeatureCollection", "features": features}


def write_heatmap_tiff(path: str | Path, slide: CompressedSlide, heatmap: np.ndarray) -> float | None:
    """The raw map on tissue cells (0 elsewhere) as a float32 TIFF, one pixel per cell, in
    slide coordinates: its resolution tags hold its µm/px (pixels per centimetre, as
    OpenSlide, QuPath and ImageJ read them) and its ImageDescription (JSON) the cell
    size and origin in level-0 px. Returns the µm/px (None for plain images in pixel units).
    """
    import tifffile

    attrs = slide.attrs
    per_px = level0_px_per_cell(slide)
    mpp = attrs["stride_px"] * attrs["mpp"] if attrs.get("mpp") else None
    values = np.where(slide.tissue, heatmap, 0.0).astype(np.float32)
    origin = cell_origin_level0_px(slide)
    description = {"nic_fast": "Grad-CAM heatmap, one pixel per grid cell, 0 outside tissue cells",
                   "store": str(slide.path), "mpp": mpp, "level0_px_per_px": per_px,
                   "origin_level0_px_xy": [origin, origin], "peak": float(values.max(initial=0.0))}
    tags: dict[str, Any] = {}
    if mpp:
        px_per_cm = 1e4 / mpp
        tags = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, values, photometric="minisblack", description=json.dumps(description), metadata=None,
                     **tags)
    return mpp

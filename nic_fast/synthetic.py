"""Synthetic H&E-like pyramidal slides with known lesion masks, for tests and benchmarks.

Real slides are large, licensed and unlabelled at the pixel level; these are none of
that. A slide is a low-resolution *layout* (where tissue and lesion are, in µm) plus
periodic high-frequency *texture banks* (stroma fibres, nuclei), so any tile of any
pyramid level is rendered independently from absolute coordinates: generation is
parallel, memory-bounded and bit-identical for a seed. Lesions differ from normal
tissue in texture only (denser, larger, darker nuclei), which a CNN on patch
embeddings must learn to find.
"""
from __future__ import annotations

import csv
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import tifffile
from PIL import Image, PngImagePlugin
from scipy.ndimage import distance_transform_edt

# (downsample, y, x, height, width) -> uint8 RGB (height, width, 3); y/x/height/width
# in the pixels of the level whose downsample relative to level 0 is given.
TileFn = Callable[[int, int, int, int, int], np.ndarray]
MppMetadata = Literal["aperio", "resolution"]
ResolutionUnit = Literal["centimeter", "inch", "none"]

PYRAMID_STEP = 4  # cuCIM and OpenSlide both read 4x pyramids of separate pages
MIN_LEVEL_PX = 1024  # levels are added until the coarsest fits in this many px per side
MASK_DOWNSAMPLE = 16  # lesion masks are stored at 1/16 of level 0
REFERENCE_MPP = 0.5  # `size_px` of write_synthetic_slides is given at this µm/px
LAYOUT_UM = 16.0  # µm per cell of the tissue/lesion layout
_RESOLUTION_UM = {"centimeter": 1e4, "inch": 25400.0, "none": 1e4}
_TIFF_RESUNIT = {"centimeter": "CENTIMETER", "inch": "INCH", "none": "NONE"}
_COMPRESS_BUFFER_BYTES = 2**26  # raw tiles tifffile gathers per parallel compression pass
_BIGTIFF_RAW_BYTES = 2**32  # JPEG at these qualities is far smaller than raw RGB: a classic TIFF fits
APERIO_THUMBNAIL_PX = 768  # long side of the SVS thumbnail page at most (scanners write ~1024x768)
APERIO_LABEL_PX = 256  # side of the square label image
_APERIO_SOFTWARE = "Aperio Image Library v12.0.0"

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------- TIFF writer


def pyramid_dims(height: int, width: int) -> list[tuple[int, int, int]]:
    """(downsample, height, width) of each pyramid level, level 0 first, ceil-divided."""
    levels = [(1, height, width)]
    while max(levels[-1][1:]) > MIN_LEVEL_PX:
        ds = levels[-1][0] * PYRAMID_STEP
        levels.append((ds, math.ceil(height / ds), math.ceil(width / ds)))
    return levels


def write_pyramid_tiff(
    path: str | Path,
    source: np.ndarray | TileFn,
    *,
    height: int | None = None,
    width: int | None = None,
    mpp: float | None,
    tile_px: int = 256,
    jpeg_quality: int = 90,
    mpp_metadata: MppMetadata = "aperio",
    resolution_unit: ResolutionUnit = "centimeter",
    label_text: str = "nic-fast",
    workers: int | None = None,
) -> list[tuple[int, int]]:
    """Write a tiled, JPEG-compressed pyramidal TIFF that cuCIM, OpenSlide and tifffile read.

    ``source`` is a whole uint8 RGB array (coarser levels are box-averaged from it) or a
    TileFn that renders any tile of any level (then ``height``/``width`` are required).
    Each level is a separate page, 4x smaller than the previous, until it fits in
    ~1024 px; tiles are produced and compressed on ``workers`` threads a few at a time,
    so memory stays bounded for a 40,000² slide.

    µm/px: with ``mpp_metadata="aperio"`` the file is laid out as an Aperio SVS (see
    :func:`_write_aperio`): page 0 gets an Aperio ImageDescription with ``MPP``
    (cuCIM's metadata["aperio"]["MPP"], OpenSlide's openslide.mpp-x) plus centimetre
    resolution tags, and a thumbnail, a label (``label_text`` as a barcode) and a macro
    image join the levels. With ``"resolution"`` only the TIFF
    resolution tags in ``resolution_unit`` ("none" writes the µm/px value with no unit,
    which readers must reject) and a generic pyramid: levels as reduced-resolution pages
    (NewSubfileType 1). ``mpp=None`` writes neither: tifffile's neutral 1/1 resolution,
    no unit, generic pyramid.

    Returns the (height, width) of each level written.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError(f"image must be uint8 (height, width, 3), got {source.dtype} {source.shape}")
        height, width = source.shape[:2]
        tile_fn = _array_tile_fn(source, levels=len(pyramid_dims(height, width)))
    elif height is None or width is None:
        raise ValueError("height and width are required when source renders tiles")
    else:
        tile_fn = source
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (TIFF tiles), got {tile_px}")
    workers = workers or os.cpu_count() or 1
    levels = pyramid_dims(height, width)
    raw_bytes = sum(3 * h * w for _, h, w in levels)
    aperio = mpp is not None and mpp_metadata == "aperio"
    page = _PageWriter(tile_fn, tile_px=tile_px, jpeg_quality=jpeg_quality, workers=workers)
    with tifffile.TiffWriter(path, bigtiff=raw_bytes >= _BIGTIFF_RAW_BYTES) as tiff:
        if aperio:
            assert mpp is not None
            _write_aperio(tiff, page, levels, mpp=mpp, label_text=label_text)
        else:
            for ds, level_h, level_w in levels:
                page.level(tiff, ds, level_h, level_w, subfiletype=0 if ds == 1 else 1,
                           **_resolution_tags(mpp, ds, resolution_unit))
    return [(h, w) for _, h, w in levels]


@dataclass(frozen=True)
class _PageWriter:
    """Writes the pages of one pyramid file: tiled JPEG levels and stripped images."""

    tile_fn: TileFn
    tile_px: int
    jpeg_quality: int
    workers: int

    def level(self, tiff: tifffile.TiffWriter, ds: int, level_h: int, level_w: int, **tags: object) -> None:
        tiles = _ordered_map(
            lambda yx: self.tile_fn(ds, yx[0], yx[1], self.tile_px, self.tile_px),
            ((y, x) for y in range(0, level_h, self.tile_px) for x in range(0, level_w, self.tile_px)),
            workers=self.workers,
        )
        tiff.write(tiles, shape=(level_h, level_w, 3), dtype=np.uint8, tile=(self.tile_px, self.tile_px),
                   photometric="rgb", compression="jpeg", compressionargs={"level": self.jpeg_quality},
                   metadata=None, maxworkers=self.workers, buffersize=_COMPRESS_BUFFER_BYTES, **tags)

    def render(self, ds: int, level_h: int, level_w: int) -> np.ndarray:
        """A whole (small) level as one array, from its tiles."""
        out = np.empty((level_h, level_w, 3), np.uint8)
        for y in range(0, level_h, self.tile_px):
            for x in range(0, level_w, self.tile_px):
                tile = self.tile_fn(ds, y, x, self.tile_px, self.tile_px)
                out[y : y + self.tile_px, x : x + self.tile_px] = tile[: level_h - y, : level_w - x]
        return out


def _write_aperio(tiff: tifffile.TiffWriter, page: _PageWriter, levels: list[tuple[int, int, int]], *, mpp: float,
                  label_text: str) -> None:
    """The page order and tags of an Aperio SVS, which every reader classifies the same way.

    Aperio's layout (its "Digital Slides and Third-party data interchange" note, as
    OpenSlide's aperio driver, cuCIM's TIFF loader and tifffile's SVS series read it):
    the tiled baseline; a stripped thumbnail as the second page; the reduced levels,
    tiled, NewSubfileType 0 (tifffile stops the level list at the first page marked
    reduced); then a stripped label (NewSubfileType 1) and macro image (9). Readers
    take the tiled pages as levels and the stripped ones as associated images.
    """
    _, height, width = levels[0]
    thumbnail = _box_downsample(page.render(*levels[-1]), max(1, math.ceil(max(levels[-1][1:]) / APERIO_THUMBNAIL_PX)))
    label = _label_image(label_text)
    software = f"{_APERIO_SOFTWARE} \r\n{width}x{height} ({page.tile_px}x{page.tile_px}) JPEG/RGB Q={page.jpeg_quality}"
    keys = f"|AppMag = {max(1, round(10 / mpp))}|MPP = {mpp:.6g}"
    stripped = {"photometric": "rgb", "metadata": None, "rowsperstrip": 64}
    for ds, level_h, level_w in levels:
        reduced = f" -> {level_w}x{level_h}" if ds > 1 else ""
        page.level(tiff, ds, level_h, level_w, subfiletype=0, description=f"{software}{reduced}{keys}",
                   **_resolution_tags(mpp, ds, "centimeter"))
        if ds == 1:
            th, tw = thumbnail.shape[:2]
            tiff.write(thumbnail, subfiletype=0, compression="jpeg", compressionargs={"level": page.jpeg_quality},
                       description=f"{_APERIO_SOFTWARE} \n{width}x{height} -> {tw}x{th} - {keys}", **stripped)
    tiff.write(label, subfiletype=1, compression="lzw",
               description=f"{_APERIO_SOFTWARE} \nlabel {label.shape[1]}x{label.shape[0]}", **stripped)
    macro = _macro_image(label, thumbnail)
    tiff.write(macro, subfiletype=9, compression="jpeg", compressionargs={"level": page.jpeg_quality},
               description=f"{_APERIO_SOFTWARE} \nmacro {macro.shape[1]}x{macro.shape[0]}", **stripped)


def _resolution_tags(mpp: float | None, downsample: int, unit: ResolutionUnit) -> dict[str, object]:
    """tifffile keyword arguments carrying the µm/px of one page (none without a µm/px)."""
    if mpp is None:
        return {}
    px_per_unit = _RESOLUTION_UM[unit] / (mpp * downsample)
    return {"resolution": (px_per_unit, px_per_unit), "resolutionunit": _TIFF_RESUNIT[unit]}


def _label_image(text: str) -> np.ndarray:
    """A slide label: the name as a barcode of its bytes (one bar per bit), on white.

    Drawn without fonts so that the same name gives the same pixels everywhere.
    """
    bits = np.unpackbits(np.frombuffer(text.encode() or b"\0", np.uint8))
    bar_px = max(1, APERIO_LABEL_PX // (2 * len(bits) + 8))
    label = np.full((APERIO_LABEL_PX, APERIO_LABEL_PX, 3), 250, np.uint8)
    bars = np.repeat(np.where(bits, 20, 250).astype(np.uint8), bar_px)[: APERIO_LABEL_PX - 8 * bar_px]
    top, bottom = APERIO_LABEL_PX // 4, APERIO_LABEL_PX // 2
    label[top:bottom, 4 * bar_px : 4 * bar_px + len(bars)] = bars[None, :, None]
    return label


def _macro_image(label: np.ndarray, thumbnail: np.ndarray) -> np.ndarray:
    """The whole glass slide as the macro camera sees it: label on the left, then the tissue."""
    side = thumbnail.shape[0]
    small_label = np.asarray(Image.fromarray(label).resize((side, side), Image.Resampling.BOX))
    return np.ascontiguousarray(np.concatenate([small_label, thumbnail], axis=1))


def _array_tile_fn(image: np.ndarray, levels: int) -> TileFn:
    """A TileFn slicing ``image`` and its 4x box-averaged levels, white past the edges."""
    pyramid = {1: image}
    for k in range(1, levels):
        pyramid[PYRAMID_STEP**k] = _box_downsample(pyramid[PYRAMID_STEP ** (k - 1)], PYRAMID_STEP)

    def tile(ds: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        part = pyramid[ds][y : y + height, x : x + width]
        if part.shape[:2] == (height, width):
            return part
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        out[: part.shape[0], : part.shape[1]] = part
        return out

    return tile


def _box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks; a partial edge block averages its own pixels only.

    ``reduceat`` sums the blocks without a padded float copy of the whole image.
    """
    starts_y = np.arange(0, image.shape[0], factor)
    starts_x = np.arange(0, image.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(image, starts_y, axis=0, dtype=np.uint32), starts_x, axis=1)
    counts = np.outer(np.diff(starts_y, append=image.shape[0]), np.diff(starts_x, append=image.shape[1]))
    return np.rint(sums / counts[..., None]).astype(np.uint8)


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with only a few results in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Field:
    """A smooth scalar field on the layout grid, soft-thresholded into [0, 1] per pixel.

    alpha = clip((value - threshold) * gain + 0.5, 0, 1): 0.5 exactly at the threshold,
    with a transition a few µm wide whatever the resolution it is rendered at.
    """

    values: np.ndarray  # float32 (cells_y, cells_x)
    threshold: float
    gain: float

    def alpha(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Alpha at layout coordinates (float cell units, cell centres at i + 0.5).

        Bilinear interpolation by gathers rather than a matrix product: BLAS would
        start its own threads inside every tile worker and oversubscribe the cores.
        """
        r_lo, r_hi, r_frac = _lerp_index(rows, self.values.shape[0])
        c_lo, c_hi, c_frac = _lerp_index(cols, self.values.shape[1])
        by_row = self.values[r_lo] + r_frac[:, None] * (self.values[r_hi] - self.values[r_lo])
        smooth = by_row[:, c_lo] + c_frac * (by_row[:, c_hi] - by_row[:, c_lo])
        return np.clip((smooth - self.threshold) * self.gain + 0.5, 0.0, 1.0)

    def may_exceed(self, rows: np.ndarray, cols: np.ndarray) -> bool:
        """False when alpha is certainly 0 everywhere over these (ascending) coordinates.

        Interpolated values are convex combinations of the cells around them, so the
        cells' maximum bounds them: a tile of background costs no per-pixel work.
        """
        r0 = max(int(rows[0]) - 1, 0)
        c0 = max(int(cols[0]) - 1, 0)
        window = self.values[r0 : int(rows[-1]) + 2, c0 : int(cols[-1]) + 2]
        return window.size > 0 and float(window.max()) > self.threshold - 0.5 / self.gain


@dataclass(frozen=True)
class _Ink:
    """One marker stroke: where it is (a soft band around a curve) and how it filters light."""

    band: _Field  # half width minus the distance to the stroke's centre line, in µm
    transmittance: np.ndarray  # float32 (3,): fraction of R, G, B light the ink lets through
    opacity: float  # share of the band's area the ink covers (marker on glass is not quite solid)

    def filter(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """Per-pixel RGB factor (h, w, 3) of this stroke, None where it does not reach."""
        if not self.band.may_exceed(rows, cols):
            return None
        alpha = (self.band.alpha(rows, cols) * self.opacity)[..., None]
        return 1.0 - alpha * (1.0 - self.transmittance)


@dataclass(frozen=True)
class _Layout:
    tissue: _Field
    lesion: _Field | None
    inks: tuple[_Ink, ...] = ()


def _lerp_index(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbouring cells and weight of the upper one for linear interpolation over n cells."""
    pos = np.clip(coords - 0.5, 0.0, n - 1.0)
    lo = np.floor(pos).astype(np.intp)
    return lo, np.minimum(lo + 1, n - 1), (pos - lo).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float, float]) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit std, periodic over ``shape``.

    ``sigma`` in cells is isotropic, or (along, across, angle) for oriented fibres.
    The white noise is drawn directly as a spectrum, which saves the forward FFT.
    """
    spectrum = rng.standard_normal((shape[0], shape[1] // 2 + 1, 2), dtype=np.float32).view(np.complex64)[..., 0]
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    if isinstance(sigma, tuple):
        along, across, angle = sigma
        f_along = fy * math.sin(angle) + fx * math.cos(angle)
        f_across = fy * math.cos(angle) - fx * math.sin(angle)
        power = (along * f_along) ** 2 + (across * f_across) ** 2
    else:
        power = sigma**2 * (fy**2 + fx**2)
    smooth = np.fft.irfft2(spectrum * np.exp(-2 * math.pi**2 * power), s=shape).astype(np.float32)
    smooth -= smooth.mean()
    return smooth / max(float(smooth.std()), 1e-12)


def _gain_for_edge(values: np.ndarray, threshold: float, edge_um: float) -> float:
    """Gain that makes alpha go 0 -> 1 over ~edge_um µm across the threshold contour."""
    gy, gx = np.gradient(values)
    slope = np.hypot(gy, gx) / LAYOUT_UM  # field units per µm
    near = np.abs(values - threshold) < 0.25 * float(values.std())
    typical = float(np.median(slope[near])) if near.any() else float(np.median(slope))
    return 1.0 / max(typical * edge_um, 1e-6)


def _make_layout(height_um: float, width_um: float, seed: int, lesion: bool, ink: bool = False) -> _Layout:
    """Tissue blobs covering 40-60 % of the slide, if ``lesion`` 1-2 lesion blobs, and if
    ``ink`` marker strokes over it.

    Everything is in physical units, so the same seed gives the same layout at any µm/px.
    """
    shape = (math.ceil(height_um / LAYOUT_UM) + 1, math.ceil(width_um / LAYOUT_UM) + 1)
    rng = np.random.default_rng([seed, 0])
    short = min(shape)
    pad = short // 2  # the FFT filter is periodic: pad so blobs do not wrap around
    padded = (shape[0] + 2 * pad, shape[1] + 2 * pad)
    inner = (slice(pad, pad + shape[0]), slice(pad, pad + shape[1]))
    coarse = _smooth_noise(rng, padded, 0.12 * short)[inner]
    ragged = _smooth_noise(rng, padded, 100.0 / LAYOUT_UM)[inner]
    edge_cells = np.minimum.outer(
        np.minimum(np.arange(shape[0]), np.arange(shape[0])[::-1]),
        np.minimum(np.arange(shape[1]), np.arange(shape[1])[::-1]),
    )
    margin = 2.5 * np.clip(1.0 - edge_cells / (0.08 * short), 0.0, 1.0) ** 2
    tissue_values = (coarse / coarse.std() + 0.2 * ragged - margin).astype(np.float32)
    fraction = rng.uniform(0.42, 0.58)
    threshold = float(np.quantile(tissue_values, 1.0 - fraction))
    tissue = _Field(tissue_values, threshold, _gain_for_edge(tissue_values, threshold, edge_um=20.0))
    inks = _make_inks(shape, seed, distance_transform_edt(tissue_values < threshold) * LAYOUT_UM) if ink else ()
    return _Layout(tissue, _make_lesion(tissue, seed) if lesion else None, inks)


# Marker inks as the scanner sees them on glass: blue and green let their own colour
# through and absorb most red; black absorbs everything.
INK_TRANSMITTANCE = {
    "blue": (0.15, 0.30, 0.65),
    "green": (0.20, 0.55, 0.35),
    "black": (0.08, 0.08, 0.09),
}
_INK_EDGE_UM = 8.0  # a marker's edge goes from clear to full ink over about this width
_STROKE_POINTS = 65


def _make_inks(shape: tuple[int, int], seed: int, glass_room_um: np.ndarray | None,
               opacity: float | None = None) -> tuple[_Ink, ...]:
    """1-3 wide marker strokes over a layout grid of ``shape`` cells: the first crosses the
    slide (and so, mostly, its tissue); each other one crosses it too or is a short mark
    on the glass beside the tissue (where ``glass_room_um``, the distance from each
    layout cell to the nearest tissue, leaves room for one).

    Widths are 5-10 % of the slide's short side (60-800 µm: a fine to broad marker on
    a real slide), opacity 0.8-0.95 (or ``opacity``), colours blue, green or black.
    """
    rng = np.random.default_rng([seed, 3])
    short_um = min(shape) * LAYOUT_UM
    rows, cols = np.indices(shape, dtype=np.float32)
    centres = np.stack([rows.ravel() + 0.5, cols.ravel() + 0.5], axis=1)
    inks = []
    for index in range(int(rng.integers(1, 4))):
        colour = str(rng.choice(list(INK_TRANSMITTANCE)))
        width_um = float(np.clip(rng.uniform(0.05, 0.10) * short_um, 60.0, 800.0))
        on_glass = index > 0 and glass_room_um is not None and rng.uniform() < 0.5
        if not on_glass:
            curve = _crossing_curve(rng, shape)
        else:
            curve = _glass_mark(rng, glass_room_um, width_um)
            if curve is None:
                continue
        distance_um = _distance_to_polyline(centres, curve).reshape(shape) * LAYOUT_UM
        band = (0.5 * width_um - distance_um).astype(np.float32)
        drawn_opacity = float(rng.uniform(0.8, 0.95))
        inks.append(_Ink(_Field(band, 0.0, 1.0 / _INK_EDGE_UM), np.array(INK_TRANSMITTANCE[colour], np.float32),
                         drawn_opacity if opacity is None else opacity))
    return tuple(inks)


def draw_marker_ink(rgb: np.ndarray, *, mpp: float, seed: int, opacity: float | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` (uint8 (h, w, 3) at ``mpp`` µm/px) seen through 1-3 marker strokes crossing
    it, as :func:`write_synthetic_slide` draws them (``opacity`` overrides theirs), and
    the strokes' ground truth (bool (h, w): inside a stroke's nominal width). Inks a real
    slide's pixels for measuring tissue detection under pen marks on real tissue.
    """
    height, width = rgb.shape[:2]
    shape = (math.ceil(height * mpp / LAYOUT_UM) + 1, math.ceil(width * mpp / LAYOUT_UM) + 1)
    rows = ((np.arange(height) + 0.5) * mpp / LAYOUT_UM).astype(np.float32)
    cols = ((np.arange(width) + 0.5) * mpp / LAYOUT_UM).astype(np.float32)
    inks = _make_inks(shape, seed, glass_room_um=None, opacity=opacity)
    factors = [f for f in (ink.filter(rows, cols) for ink in inks) if f is not None]
    mask = np.zeros((height, width), dtype=bool)
    for ink in inks:
        mask |= ink.band.alpha(rows, cols) >= 0.5
    return _through_inks(rgb.astype(np.float32), factors), mask


def _crossing_curve(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A gently bent stroke from one side of the slide to the opposite one (layout cells)."""
    h, w = shape
    if rng.uniform() < 0.5:  # top to bottom
        ends = np.array([[0.0, rng.uniform(0.1, 0.9) * w], [h, rng.uniform(0.1, 0.9) * w]])
    else:  # left to right
        ends = np.array([[rng.uniform(0.1, 0.9) * h, 0.0], [rng.uniform(0.1, 0.9) * h, w]])
    bend = rng.uniform(-0.2, 0.2) * min(h, w)
    return _bezier(ends[0], ends.mean(axis=0) + bend * _unit_normal(ends[1] - ends[0]), ends[1])


def _glass_mark(rng: np.random.Generator, glass_room_um: np.ndarray, width_um: float) -> np.ndarray | None:
    """A short straight mark that stays on glass, or None where no glass is wide enough."""
    length_um = rng.uniform(3.0, 6.0) * width_um
    room = np.argwhere(glass_room_um >= 0.5 * length_um + width_um)
    if len(room) == 0:
        return None
    centre = room[rng.integers(len(room))] + 0.5
    angle = rng.uniform(0, math.pi)
    half = 0.5 * length_um / LAYOUT_UM * np.array([math.sin(angle), math.cos(angle)])
    return _bezier(centre - half, centre, centre + half)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, _STROKE_POINTS)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _unit_normal(direction: np.ndarray) -> np.ndarray:
    return np.array([-direction[1], direction[0]]) / max(float(np.hypot(*direction)), 1e-9)


def _distance_to_polyline(points: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Distance of each (y, x) point to the nearest segment of ``curve``."""
    best = np.full(len(points), np.inf, np.float32)
    for a, b in zip(curve[:-1], curve[1:], strict=True):
        ab = b - a
        t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(*(points - a - t[:, None] * ab).T).astype(np.float32))
    return best


def _make_lesion(tissue: _Field, seed: int) -> _Field:
    """1-2 irregular blobs deep in tissue, together 4-12 % of the tissue area."""
    rng = np.random.default_rng([seed, 1])
    inside = tissue.values > tissue.threshold
    depth = tissue.values - tissue.threshold
    deep = np.argwhere(depth >= np.quantile(depth[inside], 0.6))
    n_blobs = int(rng.integers(1, 3))
    fraction = rng.uniform(0.04, 0.12)
    radius = math.sqrt(fraction * inside.sum() / (n_blobs * math.pi))
    rows, cols = np.indices(tissue.values.shape, dtype=np.float32)
    bumps = np.zeros_like(tissue.values)
    for r, c in deep[rng.choice(len(deep), size=min(n_blobs, len(deep)), replace=False)]:
        bumps = np.maximum(bumps, np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * (0.9 * radius) ** 2)))
    wobble = _smooth_noise(rng, tissue.values.shape, 60.0 / LAYOUT_UM)
    values = (bumps * (1.0 + 0.25 * wobble)).astype(np.float32)
    threshold = float(np.quantile(values[inside], 1.0 - fraction))
    return _Field(values, threshold, _gain_for_edge(values, threshold, edge_um=12.0))


# --------------------------------------------------------------------------- texture


@dataclass(frozen=True)
class _Bank:
    """Periodic texture layers at one downsample, wrap-padded so any tile is a slice."""

    period: int  # px at this downsample (the layers repeat every `period` px)
    background: np.ndarray  # float32 (p+t, p+t, 3)
    background_u8: np.ndarray  # the same, uint8, for all-background tiles
    stroma: np.ndarray  # float32 (p+t, p+t, 3)
    nuclei: np.ndarray  # float32 (p+t, p+t) coverage of normal nuclei in [0, 1]
    lesion_nuclei: np.ndarray  # float32 (p+t, p+t) coverage of lesion nuclei

    def window(self, layer: np.ndarray, y: int, x: int, height: int, width: int) -> np.ndarray:
        y0, x0 = y % self.period, x % self.period
        return layer[y0 : y0 + height, x0 : x0 + width]


def _texture_layers(seed: int, mpp: float, max_side_px: int) -> dict[str, np.ndarray]:
    """Level-0 texture of one slide: background grain, eosin fibres, two nucleus kinds.

    Feature sizes are set in µm and converted with ``mpp``, so a 0.25 µm/px slide shows
    the same tissue with twice the pixels per nucleus. The texture repeats every ~0.5 mm
    (a multiple of 256 px, so it divides evenly into the pyramid levels), or not at all
    on slides smaller than that, which then cost less to set up.
    """
    rng = np.random.default_rng([seed, 2])
    px_per_um = 1.0 / mpp
    period = 256 * max(2, min(round(512 * px_per_um / 256), math.ceil(max_side_px / 256)))
    shape = (period, period)
    background_rgb = (np.array([242.0, 240.0, 244.0]) + rng.uniform(-3, 3, 3)).astype(np.float32)
    grain = _smooth_noise(rng, shape, 0.6 * px_per_um)
    background = background_rgb + 2.0 * grain[..., None]

    # 255 - stroma RGB: how much each channel is absorbed by eosin.
    eosin_depth = (np.array([25.0, 95.0, 55.0]) * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    fibres = _smooth_noise(rng, shape, (10.0 * px_per_um, 1.0 * px_per_um, angle))
    waves = _smooth_noise(rng, shape, (10.0 * px_per_um, 1.0 * px_per_um, angle + rng.uniform(0.4, 1.2)))
    blotches = _smooth_noise(rng, shape, 6.0 * px_per_um)
    density = np.clip(1.0 + 0.2 * np.tanh(fibres) + 0.12 * np.tanh(waves) + 0.15 * blotches, 0.3, 1.6)
    stroma = 255.0 - density[..., None] * eosin_depth

    chromatin = 0.8 + 0.2 * np.tanh(_smooth_noise(rng, shape, 0.4 * px_per_um))
    normal = np.clip((_smooth_noise(rng, shape, 2.2 * px_per_um) - 1.7) * 4.0, 0.0, 1.0) * chromatin
    lesion = np.clip((_smooth_noise(rng, shape, 3.2 * px_per_um) - 0.9) * 4.0, 0.0, 1.0) * chromatin
    return {"background": background, "stroma": stroma, "nuclei": 0.85 * normal, "lesion_nuclei": lesion}


def _bank_at(layers: dict[str, np.ndarray], downsample: int, tile_px: int) -> _Bank:
    """Layers box-averaged to a pyramid level; flat means when the period is too short."""
    period0 = layers["nuclei"].shape[0]
    if period0 % downsample == 0:
        period = period0 // downsample
        scaled = {name: _block_mean(layer, downsample) for name, layer in layers.items()}
    else:
        period = 1
        scaled = {name: layer.mean(axis=(0, 1), keepdims=True) for name, layer in layers.items()}
    padded = {
        name: np.pad(layer, ((0, tile_px), (0, tile_px)) + ((0, 0),) * (layer.ndim - 2), mode="wrap")
        for name, layer in scaled.items()
    }
    background_u8 = np.clip(np.rint(padded["background"]), 0, 255).astype(np.uint8)
    return _Bank(period=period, background_u8=background_u8, **padded)


def _block_mean(layer: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return layer
    h, w = layer.shape[:2]
    return layer.reshape(h // factor, factor, w // factor, factor, *layer.shape[2:]).mean(axis=(1, 3))


# --------------------------------------------------------------------------- rendering

_NUCLEUS_RGB = np.array([88.0, 58.0, 140.0], dtype=np.float32)
_LESION_NUCLEUS_RGB = np.array([58.0, 30.0, 110.0], dtype=np.float32)


class _SlideRenderer:
    """Renders any tile of any pyramid level of one synthetic slide (thread-safe)."""

    def __init__(self, layout: _Layout, layers: dict[str, np.ndarray], *, mpp: float, downsamples: Iterable[int], tile_px: int):
        self.layout = layout
        self.mpp = mpp
        self.banks = {ds: _bank_at(layers, ds, tile_px) for ds in downsamples}

    def layout_coords(self, downsample: int, start: int, count: int) -> np.ndarray:
        """Layout coordinates (cells) of the centres of ``count`` pixels from ``start``."""
        return ((np.arange(start, start + count) + 0.5) * downsample * self.mpp / LAYOUT_UM).astype(np.float32)

    def masks(self, downsample: int, y: int, x: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tissue alpha and lesion alpha (None where there is no lesion) of a tile.

        Tiles that are certainly all background skip the interpolation.
        """
        rows = self.layout_coords(downsample, y, height)
        cols = self.layout_coords(downsample, x, width)
        if not self.layout.tissue.may_exceed(rows, cols):
            return np.zeros((height, width), dtype=np.float32), None
        tissue = self.layout.tissue.alpha(rows, cols)
        lesion_field = self.layout.lesion
        if lesion_field is None or not lesion_field.may_exceed(rows, cols):
            return tissue, None
        return tissue, lesion_field.alpha(rows, cols) * tissue

    def ink_filters(self, downsample: int, y: int, x: int, height: int, width: int) -> list[np.ndarray]:
        """The RGB factor of each marker stroke that reaches this tile."""
        rows = self.layout_coords(downsample, y, height)
        cols = self.layout_coords(downsample, x, width)
        filters = (ink.filter(rows, cols) for ink in self.layout.inks)
        return [f for f in filters if f is not None]

    def ink_mask(self, downsample: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Pixels inside a stroke's nominal width (its ground truth), bool (height, width)."""
        rows = self.layout_coords(downsample, y, height)
        cols = self.layout_coords(downsample, x, width)
        mask = np.zeros((height, width), dtype=bool)
        for ink in self.layout.inks:
            if ink.band.may_exceed(rows, cols):
                mask |= ink.band.alpha(rows, cols) >= 0.5
        return mask

    def tile(self, downsample: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        bank = self.banks[downsample]
        tissue, lesion = self.masks(downsample, y, x, height, width)
        inks = self.ink_filters(downsample, y, x, height, width)
        if not tissue.any():
            if not inks:
                return bank.window(bank.background_u8, y, x, height, width).copy()
            return _through_inks(bank.window(bank.background_u8, y, x, height, width).astype(np.float32), inks)
        nuclei = bank.window(bank.nuclei, y, x, height, width)
        stroma = bank.window(bank.stroma, y, x, height, width)
        nucleus_rgb: np.ndarray = _NUCLEUS_RGB
        if lesion is not None:
            nuclei = nuclei + lesion * (bank.window(bank.lesion_nuclei, y, x, height, width) - nuclei)
            stroma = 255.0 - (255.0 - stroma) * (1.0 + 0.3 * lesion)[..., None]
            nucleus_rgb = _NUCLEUS_RGB + lesion[..., None] * (_LESION_NUCLEUS_RGB - _NUCLEUS_RGB)
        if tissue.min() < 1.0:
            background = bank.window(bank.background, y, x, height, width)
            base = background + tissue[..., None] * (stroma - background)
        else:
            base = stroma
        out = base + (nuclei * tissue)[..., None] * (nucleus_rgb - base)
        return _through_inks(out, inks)


def _through_inks(rgb: np.ndarray, inks: list[np.ndarray]) -> np.ndarray:
    """Light through the slide and then through each stroke's ink (float RGB in, uint8 out)."""
    for factor in inks:
        rgb *= factor
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


# --------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide and its ground truth."""

    path: Path
    mask_path: Path  # uint8 PNG, 255 = lesion, at 1/mask_downsample of level 0
    label: int  # 1 = the slide has a lesion
    height: int  # level-0 px
    width: int
    mpp: float
    tissue_fraction: float  # of the slide area
    lesion_fraction: float  # of the tissue area (0 without lesion)
    mask_downsample: int
    ink_mask_path: Path | None = None  # uint8 PNG, 255 = marker ink, like mask_path; None without ink
    ink_fraction: float = 0.0  # of the slide area under marker ink
    inked_tissue_fraction: float = 0.0  # of the tissue area under marker ink


def write_synthetic_slide(
    path: str | Path,
    *,
    height: int,
    width: int,
    mpp: float = REFERENCE_MPP,
    seed: int,
    lesion: bool,
    ink: bool = False,
    tile_px: int = 256,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write one H&E-like pyramidal slide and its lesion mask ``<stem>_mask.png`` beside it.

    With ``ink``, blue, green or black marker strokes are drawn over it (see
    :func:`_make_inks`) and their ground truth goes to ``<stem>_ink.png``. The layout
    depends on the seed and the physical size (height * mpp, width * mpp) only, so the
    same seed at 0.25 µm/px and twice the pixels gives the same tissue.
    """
    if min(height, width) < 256:
        raise ValueError(f"synthetic slides need at least 256 px per side for tissue and lesion to show, got {height}x{width}")
    path = Path(path)
    layout = _make_layout(height * mpp, width * mpp, seed, lesion, ink)
    downsamples = [ds for ds, _, _ in pyramid_dims(height, width)]
    renderer = _SlideRenderer(layout, _texture_layers(seed, mpp, max(height, width)), mpp=mpp, downsamples=downsamples, tile_px=tile_px)
    write_pyramid_tiff(path, renderer.tile, height=height, width=width, mpp=mpp, tile_px=tile_px,
                       label_text=f"nic-fast synthetic seed={seed}", workers=workers)

    mask_h, mask_w = math.ceil(height / MASK_DOWNSAMPLE), math.ceil(width / MASK_DOWNSAMPLE)
    tissue, lesion_alpha = renderer.masks(MASK_DOWNSAMPLE, 0, 0, mask_h, mask_w)
    tissue_px = tissue >= 0.5
    lesion_px = lesion_alpha >= 0.5 if lesion_alpha is not None else np.zeros_like(tissue_px)
    mask_path = path.with_name(f"{path.stem}_mask.png")
    _write_mask_png(mask_path, lesion_px, mpp=mpp, what="lesion")
    ink_path, ink_px = None, np.zeros_like(tissue_px)
    if layout.inks:
        ink_px = renderer.ink_mask(MASK_DOWNSAMPLE, 0, 0, mask_h, mask_w)
        ink_path = path.with_name(f"{path.stem}_ink.png")
        _write_mask_png(ink_path, ink_px, mpp=mpp, what="marker ink")
    return SyntheticSlide(
        path=path,
        mask_path=mask_path,
        label=int(lesion),
        height=height,
        width=width,
        mpp=mpp,
        tissue_fraction=float(tissue_px.mean()),
        lesion_fraction=float(lesion_px.sum() / max(tissue_px.sum(), 1)),
        mask_downsample=MASK_DOWNSAMPLE,
        ink_mask_path=ink_path,
        ink_fraction=float(ink_px.mean()),
        inked_tissue_fraction=float((ink_px & tissue_px).sum() / max(tissue_px.sum(), 1)),
    )


def _write_mask_png(path: Path, mask: np.ndarray, *, mpp: float, what: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("downsample", str(MASK_DOWNSAMPLE))
    info.add_text("mpp", f"{mpp * MASK_DOWNSAMPLE:.6g}")
    info.add_text("description", f"nic-fast synthetic {what} mask: 255 = {what}, 0 = none")
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, pnginfo=info)


def read_mask_downsample(mask_path: str | Path) -> int:
    """The level-0 downsample a mask PNG was written at (from its text metadata)."""
    with Image.open(mask_path) as image:
        return int(image.text["downsample"])


def write_synthetic_slides(
    out_dir: str | Path,
    n: int,
    *,
    size_px: int = 8192,
    mpp: float = REFERENCE_MPP,
    seed: int = 0,
    ink: bool = False,
    workers: int | None = None,
    on_slide: Callable[[SyntheticSlide], None] | None = None,
) -> list[SyntheticSlide]:
    """Write ``slide_000.tif`` ... and ``labels.csv`` (columns slide,label) into ``out_dir``.

    Slides come in pairs with one lesion slide each (in random order), so half of them,
    rounded either way, have a lesion. ``size_px`` is the side at 0.5 µm/px; sides vary
    by -15..+15 % and are rounded to 256 px there, then scaled to ``mpp``: ``mpp=0.25``
    gives the same slides at 40x (twice the px per side). Slide i depends only on the
    seed and i, not on n. With ``ink``, slides 0, 2, 4, ... get marker strokes and a
    ``slide_NNN_ink.png`` (the others stay clean, as most of a real batch does; slide i
    is the same slide either way, with or without its strokes). ``on_slide`` is called
    as each slide is done.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = []
    for index in range(n):
        first_of_pair_has_lesion = bool(np.random.default_rng([seed, index // 2, 0]).integers(2))
        rng = np.random.default_rng([seed, index, 1])
        ref_h = max(256, 256 * round(size_px * rng.uniform(0.85, 1.0) / 256))
        ref_w = max(256, 256 * round(size_px * rng.uniform(0.9, 1.15) / 256))
        slide = write_synthetic_slide(
            out_dir / f"slide_{index:03d}.tif",
            height=round(ref_h * REFERENCE_MPP / mpp),
            width=round(ref_w * REFERENCE_MPP / mpp),
            mpp=mpp,
            seed=int(rng.integers(2**63)),
            lesion=first_of_pair_has_lesion == (index % 2 == 0),
            ink=ink and index % 2 == 0,
            workers=workers,
        )
        slides.append(slide)
        if on_slide is not None:
            on_slide(slide)
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label"])
        writer.writerows((slide.path.name, slide.label) for slide in slides)
    return slides

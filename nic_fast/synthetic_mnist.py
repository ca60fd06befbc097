"""The paper's synthetic benchmark: MNIST digits on a canvas, labelled by a tilted rectangle.

Tellez et al. (TPAMI 2019, Sec. 4.1.1) built this task so that the label needs both
local information (which digit class sits inside a rectangle) and global information
(which of the two rectangles is the tilted one). A canvas of ``canvas_px`` square is
black, with about 16 % of the positions of a 9-px grid holding a binarised 9-px MNIST
glyph, jittered by up to ±4 px. A ground-truth mask holds two rectangles (long side
uniform in [canvas/100, canvas/2), short side half of it): a *tilted* one (45° or 135°)
in one half of the canvas and an axis-aligned one in the other; the mask is then
rotated by a random multiple of 90° and randomly mirrored. Digits whose centre falls
inside a rectangle are drawn from that rectangle's class (the tilted one's class c,
the other a different class); elsewhere from any class. The image's label is c.

Besides the image and the mask, each canvas gets a *cell map*: one pixel per 9-px grid
cell (the cells ``compress --mpp none`` encodes) holding the class of the digit whose
centre lies in that cell, or :data:`NO_DIGIT`. It is the ground truth for a supervised
cell classifier (the benchmark's oracle encoder) and for probing what an encoder's codes
of real canvas cells say; a jittered digit spills into its neighbours, so a cell rarely
holds a whole digit.

Generation is deterministic per (seed, image index) and parallel over processes.
"""
from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from nic_fast.encoder_training.mnist import MNIST_PATCH_PX, binarised_mnist_patches, load_mnist_npz

__all__ = ["DEFAULT_DIGITS", "DIGIT_FILL", "NO_DIGIT", "MnistCanvas", "RenderedCanvas", "canvas_layout",
           "digit_pool", "load_digits", "render_canvas", "write_mnist_rectangles"]

# The reference digits beside a checkout (../shared/data/mnist/); any other MNIST file
# can be given instead.
DEFAULT_DIGITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist-10k.npz"

GRID_PX = MNIST_PATCH_PX  # P = S = 9
JITTER_PX = 4
# The paper placed 25,920 digits on its 400 x 400 grid of 9-px positions: 16.2 % of them.
DIGIT_FILL = 25_920 / 400**2
N_CLASSES = 10
TILTED, STRAIGHT = 1, 2  # mask values
NO_DIGIT = 255  # cell-map value of a cell without a digit centred in it
# Digits: of each class, the first TRAIN_FRACTION feed training images, the rest test
# images, so that the two never share a digit.
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class MnistCanvas:
    """One generated image and its ground truth."""

    image_path: Path
    mask_path: Path
    cells_path: Path  # the cell map: digit class per 9-px grid cell, NO_DIGIT where none
    label: int  # class of the digits inside the tilted rectangle
    straight_class: int
    tilted_fraction: float  # tilted rectangle's area / canvas area
    split: str


class RenderedCanvas(NamedTuple):
    """One canvas in memory: image and mask (canvas_px²), cell map (canvas_px // 9)²."""

    image: np.ndarray
    mask: np.ndarray
    tilted_class: int
    straight_class: int
    cells: np.ndarray


@dataclass(frozen=True)
class _Rectangle:
    centre_y: float
    centre_x: float
    long_px: float
    short_px: float
    angle_deg: float  # 0 = long side horizontal

    def contains(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        theta = np.deg2rad(self.angle_deg)
        dy, dx = y - self.centre_y, x - self.centre_x
        along = dx * np.cos(theta) + dy * np.sin(theta)
        across = -dx * np.sin(theta) + dy * np.cos(theta)
        return (np.abs(along) <= self.long_px / 2) & (np.abs(across) <= self.short_px / 2)

    def half_extent(self) -> tuple[float, float]:
        """Half height and half width of its axis-aligned bounding box."""
        theta = np.deg2rad(self.angle_deg)
        c, s = abs(np.cos(theta)), abs(np.sin(theta))
        return (self.long_px * s + self.short_px * c) / 2, (self.long_px * c + self.short_px * s) / 2


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the original MNIST format, optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (MNIST's train-images-idx3-ubyte format)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_digits(path: str | os.PathLike[str], labels_path: str | os.PathLike[str] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits (N, 28, 28) uint8 and labels from an .npz (arrays images, labels), or
    from an IDX image file plus its IDX label file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such digits file; give --digits FILE (an MNIST .npz or IDX file)")
    if labels_path is None:
        if path.suffix != ".npz":
            raise ValueError(f"{path}: IDX digits need their label file too (--digit-labels FILE)")
        return load_mnist_npz(path)
    images, labels = _read_idx(path), _read_idx(Path(labels_path)).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{path}: expected (N, 28, 28) images matching {len(labels)} labels, got {images.shape}")
    return images, labels


def digit_pool(digits: tuple[np.ndarray, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Binarised 9-px glyphs and labels of one split ("train" or "test").

    The splits are disjoint: of each class's digits, in file order, the first
    TRAIN_FRACTION feed training canvases and the rest test canvases (per class,
    because MNIST files may be sorted by label).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = digits
    chosen = []
    for digit_class in range(N_CLASSES):
        indices = np.flatnonzero(labels == digit_class)
        if len(indices) < 2:
            raise ValueError(f"the digits hold {len(indices)} of class {digit_class}; each class needs at least 2")
        cut = max(1, int(len(indices) * TRAIN_FRACTION))
        chosen.append(indices[:cut] if split == "train" else indices[cut:])
    keep = np.sort(np.concatenate(chosen))
    return binarised_mnist_patches(images[keep]), labels[keep]


def _place_rectangle(rng: np.random.Generator, canvas_px: int, angle_deg: float, left_half: bool) -> _Rectangle:
    """A rectangle of random size inside one vertical half of the canvas (clipped by the
    half's border when its rotated box is wider than the half)."""
    half_px = canvas_px / 2
    long_px = rng.uniform(half_px / 50, half_px)
    rect = _Rectangle(0.0, 0.0, long_px, long_px / 2, angle_deg)
    extent_y, extent_x = rect.half_extent()
    x_lo, x_hi = (0.0, half_px) if left_half else (half_px, float(canvas_px))

    def centre(lo: float, hi: float, extent: float) -> float:
        return rng.uniform(lo + extent, hi - extent) if hi - lo > 2 * extent else (lo + hi) / 2

    return _Rectangle(centre(0.0, float(canvas_px), extent_y), centre(x_lo, x_hi, extent_x), long_px, long_px / 2,
                      angle_deg)


def canvas_layout(rng: np.random.Generator, canvas_px: int) -> np.ndarray:
    """The ground-truth mask: 0 background, 1 tilted rectangle, 2 axis-aligned rectangle,
    after a random multiple of 90° rotation and a random mirror."""
    tilted_left = bool(rng.integers(2))
    tilted = _place_rectangle(rng, canvas_px, float(rng.choice([45.0, 135.0])), tilted_left)
    straight = _place_rectangle(rng, canvas_px, float(rng.choice([0.0, 90.0])), not tilted_left)
    y, x = np.mgrid[0:canvas_px, 0:canvas_px].astype(np.float32) + 0.5
    half = x < canvas_px / 2
    in_tilted_half = half if tilted_left else ~half
    mask = np.zeros((canvas_px, canvas_px), np.uint8)
    mask[straight.contains(y, x) & ~in_tilted_half] = STRAIGHT
    mask[tilted.contains(y, x) & in_tilted_half] = TILTED
    mask = np.rot90(mask, int(rng.integers(4)))
    return np.ascontiguousarray(np.fliplr(mask) if rng.integers(2) else mask)


def _digit_positions(rng: np.random.Generator, canvas_px: int) -> np.ndarray:
    """Top-left corners of the glyphs: a random DIGIT_FILL of the 9-px grid, jittered."""
    cells = canvas_px // GRID_PX
    n_digits = int(round(DIGIT_FILL * cells * cells))
    flat = rng.choice(cells * cells, size=n_digits, replace=False)
    corners = np.stack([flat // cells, flat % cells], axis=1) * GRID_PX
    corners += rng.integers(-JITTER_PX, JITTER_PX + 1, size=corners.shape)
    return np.clip(corners, 0, canvas_px - GRID_PX)


def render_canvas(rng: np.random.Generator, canvas_px: int, glyphs: np.ndarray, glyph_labels: np.ndarray,
                  ) -> RenderedCanvas:
    """Image, mask, the two rectangles' classes and the cell map of one canvas."""
    mask = canvas_layout(rng, canvas_px)
    tilted_class = int(rng.integers(N_CLASSES))
    straight_class = int((tilted_class + rng.integers(1, N_CLASSES)) % N_CLASSES)
    by_class = [np.flatnonzero(glyph_labels == c) for c in range(N_CLASSES)]
    corners = _digit_positions(rng, canvas_px)
    centre = corners + GRID_PX // 2
    region = mask[centre[:, 0], centre[:, 1]]
    classes = rng.integers(N_CLASSES, size=len(corners))
    classes[region == TILTED] = tilted_class
    classes[region == STRAIGHT] = straight_class
    image = np.zeros((canvas_px, canvas_px), np.uint8)
    for (y, x), digit_class in zip(corners, classes):
        glyph = glyphs[by_class[digit_class][rng.integers(len(by_class[digit_class]))]]
        window = image[y : y + GRID_PX, x : x + GRID_PX]
        np.maximum(window, glyph, out=window)
    return RenderedCanvas(image, mask, tilted_class, straight_class, _cell_map(canvas_px, centre, classes))


def _cell_map(canvas_px: int, centres: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class of the digit centred in each grid cell. Jitter keeps a centre inside its own
    grid position's cell, so no cell gets two digits."""
    cells = canvas_px // GRID_PX
    cell_map = np.full((cells, cells), NO_DIGIT, np.uint8)
    row, col = np.minimum(centres // GRID_PX, cells - 1).T
    cell_map[row, col] = classes
    return cell_map


def _write_one(args: tuple[Path, int, int, int, str, np.ndarray, np.ndarray]) -> MnistCanvas:
    out_dir, index, seed, canvas_px, split, glyphs, glyph_labels = args
    rng = np.random.default_rng([seed, index])
    canvas = render_canvas(rng, canvas_px, glyphs, glyph_labels)
    stem = f"{split}_{index:05d}"
    image_path, mask_path, cells_path = (out_dir / f"{stem}{suffix}.png" for suffix in ("", "_mask", "_cells"))
    Image.fromarray(canvas.image, mode="L").save(image_path, optimize=False)
    Image.fromarray(canvas.mask, mode="L").save(mask_path)
    Image.fromarray(canvas.cells, mode="L").save(cells_path)
    return MnistCanvas(image_path, mask_path, cells_path, canvas.tilted_class, canvas.straight_class,
                       float((canvas.mask == TILTED).mean()), split)


def write_mnist_rectangles(out_dir: str | os.PathLike[str], n: int, *, digits: tuple[np.ndarray, np.ndarray],
                           canvas_px: int = 3600, seed: int = 0, split: str = "train", workers: int | None = None,
                           on_image: Callable[[MnistCanvas], None] | None = None) -> list[MnistCanvas]:
    """Write ``n`` canvases (``<split>_NNNNN.png``, ``..._mask.png``) and ``labels.csv``.

    ``digits`` is (images, labels) as :func:`load_digits` returns them.
    ``labels.csv`` has columns image,label,straight_class,tilted_fraction,split,mask,cells.
    The mask PNG holds 1 inside the tilted rectangle and 2 inside the other one; the
    cells PNG is the cell map (one pixel per 9-px cell, NO_DIGIT where no digit).
    """
    if canvas_px < 20 * GRID_PX:
        raise ValueError(f"canvas_px must be at least {20 * GRID_PX} (20 digits across), got {canvas_px}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    glyphs, glyph_labels = digit_pool(digits, split)
    jobs = [(out_dir, index, seed, canvas_px, split, glyphs, glyph_labels) for index in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    canvases: list[MnistCanvas] = []
    with ProcessPoolExecutor(workers) as pool:
        for canvas in pool.map(_write_one, jobs):
            canvases.append(canvas)
            if on_image:
                on_image(canvas)
    _write_labels(out_dir / "labels.csv", canvases)
    return canvases


def _write_labels(path: Path, canvases: list[MnistCanvas]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "straight_class", "tilted_fraction", "split", "mask", "cells"])
        for c in canvases:
            writer.writerow([c.image_path.name, c.label, c.straight_class, f"{c.tilted_fraction:.6f}", c.split,
                             c.mask_path.name, c.cells_path.name])

"""Training patches: sampled from slides the way ``compress`` sees them, and paired for the contrastive task.

A slide is opened with the same readers, pyramid-level choice and tissue mask as
``nic-fast compress``, its grid is laid at the working µm/px with stride = patch size,
and random tissue cells are read one patch at a time, so no slide is ever held in
memory and an encoder trains on exactly the kind of patch it will later encode. Each
sampled cell also brings one adjacent tissue cell (the next non-overlapping patch): the
paper's hardest "different" example for the Siamese network.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from nic_fast.compress import MAX_THUMBNAIL_PX
from nic_fast.grid import GridGeometry
from nic_fast.slides import LevelChoice, SlideReader, choose_level, load_mpp_csv, open_slide, resolve_slide_mpp
from nic_fast.tissue import detect_tissue

NEIGHBOUR_OFFSETS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)])
THUMB_PX_PER_CELL = 8  # as in compress: enough for the tissue mask from a coarse level
SAME_FRACTION = 0.5  # of contrastive pairs
ADJACENT_FRACTION = 0.75  # of "different" pairs, when adjacent patches exist (the rest: another slide)

__all__ = ["PatchSet", "SlideSampling", "contrastive_pairs", "sample_labelled_points", "sample_slide_patches"]


@dataclass
class PatchSet:
    """Patches for training or probing, channels last.

    ``source[k]`` indexes ``sources`` (the slide or file patch k came from);
    ``cells[k]`` is its (i, j) in the slide's grid at the working resolution with stride =
    patch size, and ``neighbours[k]`` the patch of an adjacent cell (slides only);
    ``labels[k]`` indexes ``class_names`` (labelled sets only). ``mpp`` is None for sets
    in plain pixels (MNIST, image folders).
    """

    images: np.ndarray  # uint8 (N, P, P, C)
    source: np.ndarray  # int32 (N,)
    sources: list[str]
    mpp: float | None
    neighbours: np.ndarray | None = None  # uint8 (N, P, P, C)
    cells: np.ndarray | None = None  # int32 (N, 2)
    labels: np.ndarray | None = None  # int64 (N,)
    class_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        images = self.images
        square = images.ndim == 4 and images.shape[1] == images.shape[2] and images.shape[3] in (1, 3)
        if not square or images.dtype != np.uint8:
            raise ValueError(f"patches must be uint8 (N, P, P, 1|3), got {images.dtype} {images.shape}")
        n = len(images)
        if len(self.source) != n:
            raise ValueError(f"{n} patches but {len(self.source)} source indices")
        if self.neighbours is not None and self.neighbours.shape != images.shape:
            raise ValueError(f"neighbours {self.neighbours.shape} do not match patches {images.shape}")
        if self.cells is not None and self.cells.shape != (n, 2):
            raise ValueError(f"cells must be (N, 2) = ({n}, 2), got {self.cells.shape}")
        if self.labels is not None:
            if len(self.labels) != n:
                raise ValueError(f"{n} patches but {len(self.labels)} labels")
            if self.class_names is None or (n and int(self.labels.max()) >= len(self.class_names)):
                raise ValueError("labels need class_names covering every label index")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def patch_px(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def subset(self, index: np.ndarray) -> PatchSet:
        """The patches at ``index`` (same sources, classes and µm/px)."""
        return replace(
            self,
            images=self.images[index],
            source=self.source[index],
            neighbours=None if self.neighbours is None else self.neighbours[index],
            cells=None if self.cells is None else self.cells[index],
            labels=None if self.labels is None else self.labels[index],
        )


@dataclass(frozen=True)
class SlideSampling:
    """How patches are drawn from slides (the CLI maps its options one to one)."""

    patch_px: int = 128
    mpp: float = 0.5  # working resolution, µm/px, as in compress
    patches_per_slide: int = 256
    seed: int = 0
    min_tissue: float = 0.5  # tissue fraction of a cell to be sampled (compress encodes from 0.1)
    slide_mpp: float | None = None  # override of every slide's scanned µm/px
    slide_mpp_csv: Path | None = None
    mask_suffix: str | None = None  # label mask beside each slide: <stem><suffix>, e.g. "_mask.png"


@dataclass(frozen=True)
class _SlideGrid:
    """A slide opened at the working resolution: level, grid and tissue cells."""

    choice: LevelChoice
    grid: GridGeometry
    cells: np.ndarray  # bool (H', W'): tissue cells eligible for sampling


SlideCallback = Callable[[Path, int], None]


def sample_slide_patches(slides: Sequence[Path], sampling: SlideSampling,
                         on_slide: SlideCallback | None = None) -> PatchSet:
    """Up to ``patches_per_slide`` random tissue patches per slide, each with an adjacent one.

    With ``sampling.mask_suffix`` every patch also gets a label: the majority value of the
    label mask ``<stem><suffix>`` over the patch; classes are the mask values found,
    in increasing order (a 0/255 lesion mask gives classes "0" and "255").
    ``on_slide(path, n_patches)`` is called as each slide is done.
    """
    if not slides:
        raise ValueError("no slides to sample patches from")
    slides = [Path(s) for s in slides]
    mpp_table = load_mpp_csv(sampling.slide_mpp_csv) if sampling.slide_mpp_csv else None
    images, neighbours, cells, sources, values = [], [], [], [], []
    for index, path in enumerate(slides):
        slide_mpp = resolve_slide_mpp(path, sampling.slide_mpp, mpp_table)
        rng = np.random.default_rng([sampling.seed, index])
        with open_slide(path, slide_mpp=slide_mpp) as reader:
            slide_grid = _slide_grid(reader, sampling)
            anchors, partners = _draw_cells(slide_grid.cells, sampling.patches_per_slide, rng)
            images.append(_read_cells(reader, slide_grid, anchors))
            neighbours.append(_read_cells(reader, slide_grid, partners))
            cells.append(anchors.astype(np.int32))
            if sampling.mask_suffix is not None:
                values.append(_mask_values(_mask_path(path, sampling.mask_suffix), reader, slide_grid, anchors))
        sources.append(np.full(len(anchors), index, np.int32))
        if on_slide is not None:
            on_slide(path, len(anchors))
    if sum(map(len, sources)) < 2:
        raise ValueError(f"found fewer than 2 tissue patches in {len(slides)} slide(s) at {sampling.mpp:g} µm/px "
                         f"with {sampling.patch_px}-px patches; lower --min-tissue ({sampling.min_tissue:g}) "
                         "or give more slides")
    labels, class_names = _classes_from_values(np.concatenate(values)) if values else (None, None)
    return PatchSet(images=np.concatenate(images), source=np.concatenate(sources),
                    sources=[str(s) for s in slides], mpp=sampling.mpp, neighbours=np.concatenate(neighbours),
                    cells=np.concatenate(cells), labels=labels, class_names=class_names)


def sample_labelled_points(csv_path: Path, slides: Sequence[Path], sampling: SlideSampling) -> PatchSet:
    """Patches centred on labelled points: CSV columns ``slide,x,y,label``.

    ``slide`` is a file name (with or without extension) of one of ``slides``; ``x``, ``y``
    are level-0 pixels of the patch centre; ``label`` is any text (classes are the
    distinct labels, sorted). Points need not be on tissue: the label says what is there.
    """
    slides = [Path(s) for s in slides]
    by_name = _slides_by_name(slides)
    rows = _read_points_csv(csv_path, by_name)
    mpp_table = load_mpp_csv(sampling.slide_mpp_csv) if sampling.slide_mpp_csv else None
    class_names = sorted({label for _, _, _, label in rows})
    images, sources, labels = [], [], []
    for index, path in enumerate(slides):
        points = [(x, y, label) for slide, x, y, label in rows if slide == path]
        if not points:
            continue
        with open_slide(path, slide_mpp=resolve_slide_mpp(path, sampling.slide_mpp, mpp_table)) as reader:
            slide_grid = _slide_grid(reader, sampling)
            level_scale = reader.level_downsamples[slide_grid.choice.level]
            span = slide_grid.grid.level_patch_px
            for x, y, label in points:
                top = round(y / level_scale - span / 2)
                left = round(x / level_scale - span / 2)
                images.append(_read_patch(reader, slide_grid, top, left))
                sources.append(index)
                labels.append(class_names.index(label))
    return PatchSet(images=np.stack(images), source=np.array(sources, np.int32), sources=[str(s) for s in slides],
                    mpp=sampling.mpp, labels=np.array(labels, np.int64), class_names=class_names)


def contrastive_pairs(patches: PatchSet, anchors: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Partner patches for ``anchors`` and whether each pair is the same location (1.0) or not.

    Half the pairs are *same*: the anchor itself (its two views then differ only by
    augmentation). A *different* partner is the anchor's adjacent patch 75 % of the time
    and a patch of another slide otherwise, as in the paper. Sets without neighbours
    (independent patches such as digits) draw every *different* partner at random from
    the other patches, and one-slide sets draw their "other slide" partner that way.
    """
    n = len(anchors)
    same = rng.random(n) < SAME_FRACTION
    partners = patches.images[anchors].copy()
    different = np.flatnonzero(~same)
    adjacent = rng.random(len(different)) < ADJACENT_FRACTION
    if patches.neighbours is not None:
        use_neighbour = different[adjacent]
        partners[use_neighbour] = patches.neighbours[anchors[use_neighbour]]
        different = different[~adjacent]
    others = _other_patches(patches, anchors[different], rng)
    partners[different] = patches.images[others]
    return partners, same.astype(np.float32)


def _other_patches(patches: PatchSet, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor, a random patch of another source, or (one source) any patch but the anchor."""
    n_total = len(patches)
    if n_total < 2:
        raise ValueError("the contrastive task needs at least 2 patches")
    several_sources = len(np.unique(patches.source)) > 1
    picks = rng.integers(0, n_total, len(anchors))
    while True:
        clash = patches.source[picks] == patches.source[anchors] if several_sources else picks == anchors
        if not clash.any():
            return picks
        picks[clash] = rng.integers(0, n_total, int(clash.sum()))


# --------------------------------------------------------------------------- slide reading


def _slide_grid(reader: SlideReader, sampling: SlideSampling) -> _SlideGrid:
    """Level, grid (stride = patch) and tissue cells of a slide, as compress computes them."""
    level_mpps = [reader.level_mpp(level) for level in range(reader.level_count)]
    choice = choose_level(level_mpps, sampling.mpp, slide=reader.path.name)
    level_h, level_w = reader.level_dims[choice.level]
    grid = GridGeometry.over_level(level_h, level_w, patch_px=sampling.patch_px, stride_px=sampling.patch_px,
                                   downsample=choice.downsample)
    level0_stride = grid.level_stride_px * reader.level_downsamples[choice.level]
    height0, width0 = reader.level_dims[0]
    thumb_downsample = max(level0_stride / THUMB_PX_PER_CELL, max(height0, width0) / MAX_THUMBNAIL_PX, 1.0)
    tissue = detect_tissue(reader.thumbnail(thumb_downsample), grid, min_fraction=sampling.min_tissue,
                           thumb_px_per_level_px=reader.level_downsamples[choice.level] / thumb_downsample)
    return _SlideGrid(choice, grid, tissue.cells)


def _draw_cells(cells: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct tissue cells that have a tissue neighbour, and one such neighbour each."""
    height, width = cells.shape
    padded = np.pad(cells, 1)
    # has_neighbour[i, j, k]: cell (i, j) + NEIGHBOUR_OFFSETS[k] is tissue (and inside the grid).
    has_neighbour = np.stack([padded[1 + di : 1 + di + height, 1 + dj : 1 + dj + width]
                              for di, dj in NEIGHBOUR_OFFSETS], axis=-1)
    candidates = np.argwhere(cells & has_neighbour.any(axis=-1))
    anchors = candidates[rng.permutation(len(candidates))[:n]]
    options = has_neighbour[anchors[:, 0], anchors[:, 1]]
    pick = np.where(options, rng.random(options.shape), -1.0).argmax(axis=1)
    return anchors, anchors + NEIGHBOUR_OFFSETS[pick]


def _read_cells(reader: SlideReader, slide_grid: _SlideGrid, cells: np.ndarray) -> np.ndarray:
    grid = slide_grid.grid
    patches = [_read_patch(reader, slide_grid, *grid.level_origin(int(i), int(j))) for i, j in cells]
    return np.stack(patches) if patches else np.empty((0, grid.patch_px, grid.patch_px, 3), np.uint8)


def _read_patch(reader: SlideReader, slide_grid: _SlideGrid, top: int, left: int) -> np.ndarray:
    """One (P, P, 3) patch at the working resolution whose level-pixel corner is (top, left)."""
    grid = slide_grid.grid
    span = grid.level_patch_px
    pixels = reader.read_region(slide_grid.choice.level, top, left, span, span)
    factor = grid.downsample
    if factor == 1:
        return pixels
    # Box average, the same resampling the patchify kernel applies for compress.
    blocks = pixels.reshape(grid.patch_px, factor, grid.patch_px, factor, 3).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


# --------------------------------------------------------------------------- labels


def _mask_path(slide: Path, suffix: str) -> Path:
    path = slide.with_name(slide.stem + suffix)
    if not path.is_file():
        raise FileNotFoundError(f"{slide}: no label mask {path.name} beside it (--mask-suffix {suffix!r}); "
                                "give every slide a mask or leave --mask-suffix out")
    return path


def _mask_values(mask_path: Path, reader: SlideReader, slide_grid: _SlideGrid, cells: np.ndarray) -> np.ndarray:
    """Majority mask value over each cell's patch; the mask may be at any fraction of level 0.

    The mask is read whole, so give it at a reduced resolution (the synthetic slides'
    masks are at 1/16 of level 0) rather than at full slide size.
    """
    with Image.open(mask_path) as image:
        mask = np.asarray(image.convert("L"))
    height0, width0 = reader.level_dims[0]
    scale_y, scale_x = mask.shape[0] / height0, mask.shape[1] / width0
    level_scale = reader.level_downsamples[slide_grid.choice.level]
    span0 = slide_grid.grid.level_patch_px * level_scale
    values = np.empty(len(cells), np.int64)
    for k, (i, j) in enumerate(cells):
        y0, x0 = (v * level_scale for v in slide_grid.grid.level_origin(int(i), int(j)))
        rows = slice(math.floor(y0 * scale_y), max(math.ceil((y0 + span0) * scale_y), math.floor(y0 * scale_y) + 1))
        cols = slice(math.floor(x0 * scale_x), max(math.ceil((x0 + span0) * scale_x), math.floor(x0 * scale_x) + 1))
        values[k] = np.bincount(mask[rows, cols].ravel(), minlength=1).argmax()
    return values


def _classes_from_values(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    distinct = np.unique(values)
    return np.searchsorted(distinct, values).astype(np.int64), [str(int(v)) for v in distinct]


def _slides_by_name(slides: Sequence[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in slides:
        for key in (path.name, path.stem, str(path)):
            names[key] = path
    return names


def _read_points_csv(csv_path: Path, by_name: dict[str, Path]) -> list[tuple[Path, float, float, str]]:
    """Rows (slide path, x, y, label) of a labelled-points CSV, each problem reported with its line."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"slide", "x", "y", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}; a labels CSV has slide,x,y,label")
        rows = []
        for line, row in enumerate(reader, start=2):
            slide = by_name.get(row["slide"])
            if slide is None:
                raise ValueError(f"{csv_path}:{line}: slide {row['slide']!r} is not among the given slides")
            try:
                rows.append((slide, float(row["x"]), float(row["y"]), row["label"]))
            except ValueError as exc:
                raise ValueError(f"{csv_path}:{line}: x and y must be numbers (level-0 px), got "
                                 f"{row['x']!r}, {row['y']!r}") from exc
    if not rows:
        raise ValueError(f"{csv_path}: no labelled points")
    return rows

"""Where training and test crops come from in one store.

A crop is an R×R window of the compressed grid (R = ``crop_px``, in grid cells, i.e.
pixels of the compressed image). Training centres are drawn with probability
proportional to each cell's distance to background, so crops sit mostly inside tissue
rather than on its rim (the paper's sampling); test centres are spread evenly over the
tissue. A crop also picks one of the 8 dihedral transforms T_k: from variant k of the
store when it was compressed with ``--augment`` (A = 8), otherwise by rearranging the
cells of variant 0. Windows past the grid edge are padded with the background embedding,
so a padded cell looks exactly like a background cell of the store.

Everything here is pure NumPy on an opened store, so it runs the same in DALI's and
PyTorch's worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from scipy.ndimage import distance_transform_edt

from nic_fast.encoders import EncoderError, load_encoder
from nic_fast.grid import DIHEDRAL, dihedral
from nic_fast.store import CompressedSlide, StoreError, open_store
from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.settings import StoreSettings

__all__ = ["CropSpec", "StoreSampler", "background_embedding", "distance_map", "read_crop"]

_AUGMENTED_VARIANTS = len(DIHEDRAL)


def distance_map(usable: np.ndarray) -> np.ndarray:
    """Euclidean distance in cells from each usable cell to the nearest unusable one (0 off tissue).

    The grid's border counts as background: tissue cut by the slide edge is a rim too,
    and a store that is tissue everywhere still gets a well-defined map.
    """
    padded = np.pad(np.asarray(usable, dtype=bool), 1, constant_values=False)
    return distance_transform_edt(padded)[1:-1, 1:-1].astype(np.float32)


@dataclass(frozen=True)
class CropSpec:
    """One crop: its top-left cell (may lie outside the grid) and its dihedral transform k."""

    top: int
    left: int
    variant: int


def background_embedding(slide: CompressedSlide) -> np.ndarray:
    """The (C,) float16 vector the store's background cells hold, used to pad crops.

    Read from a background cell when the store has one; a store that is tissue
    everywhere re-encodes a white patch with the encoder its attributes name.
    """
    if slide.attrs.get("background") == "zero":
        return np.zeros(slide.code_size, np.float16)
    background = ~slide.tissue & slide.valid
    if background.any():
        i, j = np.argwhere(background)[0]
        return np.asarray(slide.embeddings[0, int(i), int(j), :], dtype=np.float16)
    return _encode_white_patch(slide)


def _encode_white_patch(slide: CompressedSlide) -> np.ndarray:
    source = str(slide.attrs["encoder"]["source"]).removeprefix("builtin:")
    try:
        encoder = load_encoder(source)
    except EncoderError as exc:
        raise StoreError(f"{slide.path} has no background cell, so its background embedding must be recomputed "
                         f"with its encoder, which failed to load ({exc}); recompress the slide with "
                         "--background zero or keep the encoder file where the store says") from exc
    spec = encoder.spec
    white = [(1.0 - m) / s for m, s in zip(spec.mean, spec.std)]
    patch = torch.tensor(white, dtype=torch.float32).view(1, spec.channels, 1, 1)
    patch = patch.expand(1, spec.channels, spec.input_px, spec.input_px).contiguous()
    return encoder(patch)[0].float().numpy().astype(np.float16)


def read_crop(embeddings: Any, spec: CropSpec, crop_px: int, background: np.ndarray) -> np.ndarray:
    """The float16 (crop_px, crop_px, C) crop ``spec`` names, in the orientation of T_k.

    ``embeddings`` is the store's (A, H', W', C) array (Zarr or NumPy). With A = 8 the
    window comes from variant k, whose cells already hold E(T_k(patch)); with A = 1 only
    the cells are rearranged. Either way the result is the window of ``dihedral(grid, k)``
    that T_k maps the identity-oriented window onto.
    """
    variants, height, width, code_size = embeddings.shape
    source_variant = spec.variant if variants == _AUGMENTED_VARIANTS else 0
    window = np.empty((crop_px, crop_px, code_size), np.float16)
    window[...] = background
    i0, i1 = max(spec.top, 0), min(spec.top + crop_px, height)
    j0, j1 = max(spec.left, 0), min(spec.left + crop_px, width)
    if i0 < i1 and j0 < j1:
        window[i0 - spec.top : i1 - spec.top, j0 - spec.left : j1 - spec.left] = \
            embeddings[source_variant, i0:i1, j0:j1, :]
    return np.ascontiguousarray(dihedral(window, spec.variant))


def _crop_start(rng: np.random.Generator, centre: int, size: int, crop_px: int) -> int:
    """First cell of a crop along one axis: centred on ``centre``, or, where the store's
    ``size`` fits in the crop, anywhere that keeps all of it inside."""
    if crop_px >= size:
        return int(rng.integers(size - crop_px, 1))
    return centre - crop_px // 2


class StoreSampler:
    """What the loaders need to know about one store, computed once when a run starts.

    Holds no open arrays, so it pickles cheaply into worker processes: each worker
    opens the store's embeddings itself.
    """

    def __init__(self, slide: CompressedSlide) -> None:
        if slide.variants not in (1, _AUGMENTED_VARIANTS):
            raise StoreError(f"{slide.path} has {slide.variants} variants; training reads stores with 1 or 8 "
                             "(compress with or without --augment)")
        self.path: Path = slide.path
        self.grid_shape: tuple[int, int] = slide.grid_shape
        self.code_size: int = slide.code_size
        self.settings: StoreSettings = StoreSettings.from_attrs(slide.attrs, slide.code_size)
        self.usable: np.ndarray = slide.tissue & slide.valid
        self.distance: np.ndarray = distance_map(self.usable)
        self.background: np.ndarray = background_embedding(slide)
        cumulative = np.cumsum(self.distance.ravel(), dtype=np.float64)
        self._cdf: np.ndarray | None = cumulative if cumulative[-1] > 0 else None
        self._moments: np.ndarray | None = None

    def channel_moments(self) -> np.ndarray:
        """(3, C) float64: count, sum and sum of squares of variant 0's codes over usable cells.

        Read once per store and kept: stores are in the training set of several rotations.
        """
        if self._moments is None:
            height, width = self.grid_shape
            codes = EmbeddingReader(self.path)[0, 0:height, 0:width, :][self.usable].astype(np.float64)
            self._moments = np.stack([np.full(self.code_size, len(codes), np.float64), codes.sum(axis=0),
                                      (codes**2).sum(axis=0)])
        return self._moments

    @classmethod
    def open(cls, path: str | Path) -> StoreSampler:
        return cls(open_store(path))

    def random_centre(self, rng: np.random.Generator) -> tuple[int, int]:
        """A cell drawn with probability proportional to its distance to background.

        A store without tissue has nothing to prefer: its centre is drawn uniformly.
        """
        height, width = self.grid_shape
        if self._cdf is None:
            return int(rng.integers(height)), int(rng.integers(width))
        flat = int(np.searchsorted(self._cdf, rng.random() * self._cdf[-1], side="right"))
        return divmod(min(flat, height * width - 1), width)

    def random_crop(self, rng: np.random.Generator, crop_px: int) -> CropSpec:
        """A training crop: centre ∝ distance to background, one of the 8 transforms at random.

        Along an axis the store fits in, the crop holds the store's whole extent at a
        random offset instead: a crop centred on a cell would cut off part of a small
        image (a synthetic canvas), and with it perhaps the evidence its label rests on.
        """
        variant = int(rng.integers(_AUGMENTED_VARIANTS))
        i, j = self.random_centre(rng)
        height, width = self.grid_shape
        return CropSpec(top=_crop_start(rng, i, height, crop_px), left=_crop_start(rng, j, width, crop_px),
                        variant=variant)

    def spread_centres(self, count: int) -> np.ndarray:
        """Up to ``count`` (i, j) tissue cells spread evenly over the tissue, for test-time crops.

        k-means (seeded, so a slide always gets the same test crops) on the coordinates
        of the usable cells, each centroid moved to its nearest usable cell; a store
        without tissue gives its grid centre.
        """
        cells = np.argwhere(self.usable)
        if len(cells) == 0:
            return np.array([[self.grid_shape[0] // 2, self.grid_shape[1] // 2]])
        if len(cells) <= count:
            return cells
        centroids, _ = kmeans2(cells.astype(np.float64), count, seed=0, minit="++")
        nearest = np.argmin(((cells[None, :, :] - centroids[:, None, :]) ** 2).sum(-1), axis=1)
        return cells[np.unique(nearest)]

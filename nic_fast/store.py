"""The compressed-slide store: one Zarr v3 group per slide (DESIGN.md's contract).

``<out>/<slide-stem>.zarr`` holds ``embeddings`` float16 (A, H', W', C), ``tissue`` and
``valid`` bool (H', W'), ``thumbnail`` uint8 (h, w, 3) and the JSON attribute
``nic_fast``. A store is written under ``<stem>.zarr.partial`` and renamed only once
its status attribute says ``complete``, so a reader never sees half a slide; a
partial store keeps a list of finished tiles so an interrupted run resumes mid-slide.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = ["FORMAT_VERSION", "CompressedSlide", "StoreError", "StoreWriter", "is_complete", "open_store", "store_path"]

FORMAT_VERSION = 1
COMPLETE = "complete"
PARTIAL = "partial"
_ATTR = "nic_fast"
_PROGRESS_FILE = "tiles_done.txt"


class StoreError(Exception):
    """A store is missing, incomplete or not a nic-fast store."""


def store_path(out_dir: Path, slide_path: Path) -> Path:
    """Where ``compress`` writes the store of ``slide_path``."""
    return Path(out_dir) / f"{Path(slide_path).stem}.zarr"


def _partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _read_attrs(path: Path) -> dict[str, Any] | None:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get(_ATTR)
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> bool:
    attrs = _read_attrs(Path(path))
    return attrs is not None and attrs.get("status") == COMPLETE


@dataclass
class CompressedSlide:
    """An opened, complete store. ``embeddings`` stays lazy (a Zarr array); masks are loaded."""

    path: Path
    embeddings: zarr.Array  # float16 (A, H', W', C); variant 0 is the identity
    tissue: np.ndarray  # bool (H', W')
    valid: np.ndarray  # bool (H', W')
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    attrs: dict[str, Any]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.embeddings.shape[1:3])  # type: ignore[return-value]

    @property
    def code_size(self) -> int:
        return int(self.embeddings.shape[3])

    @property
    def variants(self) -> int:
        return int(self.embeddings.shape[0])

    def load(self, variant: int = 0) -> np.ndarray:
        """Embeddings of one dihedral variant as a float16 (H', W', C) array, in the identity orientation."""
        return self.embeddings[variant]


def open_store(path: str | os.PathLike) -> CompressedSlide:
    """Open a complete store; an incomplete or foreign one raises :class:`StoreError`."""
    path = Path(path)
    attrs = _read_attrs(path)
    if attrs is None:
        if _partial_path(path).exists():
            raise StoreError(f"{path} is not finished (only {_partial_path(path).name} exists): "
                             "rerun nic-fast compress on its slide to complete it")
        raise StoreError(f"{path} is not a nic-fast store (no '{_ATTR}' attributes in zarr.json)")
    if attrs.get("status") != COMPLETE:
        raise StoreError(f"{path} is incomplete (status {attrs.get('status')!r}): rerun nic-fast compress to finish it")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{path} has format version {attrs['format_version']}; this nic-fast reads up to "
                         f"{FORMAT_VERSION}: upgrade nic-fast")
    group = zarr.open_group(path, mode="r")
    return CompressedSlide(path=path, embeddings=group["embeddings"], tissue=group["tissue"][...],
                           valid=group["valid"][...], thumbnail=group["thumbnail"][...], attrs=attrs)


class StoreWriter:
    """Writes one slide's store tile by tile under a temporary name, then publishes it.

    ``config`` identifies what is being computed (encoder hash, µm/px, sizes...): a
    partial store left by an interrupted run with the same config is resumed, any
    other partial store is discarded.
    """

    def __init__(self, final_path: Path, *, variants: int, grid_shape: tuple[int, int], code_size: int,
                 tile_cells: int, thumbnail: np.ndarray, tissue: np.ndarray, attrs: dict[str, Any],
                 config: dict[str, Any]) -> None:
        self.final_path = Path(final_path)
        self.path = _partial_path(self.final_path)
        self.attrs = {"format_version": FORMAT_VERSION, **attrs, "config": config, "status": PARTIAL}
        self.done_tiles: set[tuple[int, int]] = set()
        if self._resumable(config):
            self.group = zarr.open_group(self.path, mode="r+")
            self.done_tiles = self._read_progress()
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            self._create(variants, grid_shape, code_size, tile_cells, thumbnail, tissue)
        self._progress = open(self.path / _PROGRESS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in publish/close

    def _resumable(self, config: dict[str, Any]) -> bool:
        attrs = _read_attrs(self.path)
        return attrs is not None and attrs.get("config") == config and (self.path / _PROGRESS_FILE).exists()

    def _create(self, variants: int, grid_shape: tuple[int, int], code_size: int, tile_cells: int,
                thumbnail: np.ndarray, tissue: np.ndarray) -> None:
        self.group = zarr.open_group(self.path, mode="w", zarr_format=3)
        h, w = grid_shape
        tile_h, tile_w = max(1, min(tile_cells, h)), max(1, min(tile_cells, w))
        self.group.create_array("embeddings", shape=(variants, h, w, code_size), dtype="float16",
                                chunks=(1, tile_h, tile_w, code_size), fill_value=0)
        self.group.create_array("valid", shape=(h, w), dtype="bool", chunks=(tile_h, tile_w), fill_value=False)
        self.group.create_array("tissue", shape=(h, w), dtype="bool", chunks=(max(h, 1), max(w, 1)))[...] = tissue
        self.group.create_array("thumbnail", shape=thumbnail.shape, dtype="uint8",
                                chunks=(min(1024, thumbnail.shape[0]), min(1024, thumbnail.shape[1]), 3))[...] = thumbnail
        self.group.attrs[_ATTR] = self.attrs
        (self.path / _PROGRESS_FILE).touch()

    def _read_progress(self) -> set[tuple[int, int]]:
        done = set()
        for line in (self.path / _PROGRESS_FILE).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by a crash is incomplete: redo that tile
                done.add((int(parts[0]), int(parts[1])))
        return done

    def write_tile(self, row: int, col: int, i0: int, j0: int, embeddings: np.ndarray, valid: np.ndarray) -> None:
        """Write one tile's (A, h, w, C) embeddings and (h, w) valid mask, then record it as done."""
        h, w = valid.shape
        self.group["embeddings"][:, i0 : i0 + h, j0 : j0 + w, :] = embeddings
        self.group["valid"][i0 : i0 + h, j0 : j0 + w] = valid
        self._progress.write(f"{row} {col}\n")
        self.done_tiles.add((row, col))

    def publish(self, extra_attrs: dict[str, Any], *, overwrite: bool) -> Path:
        """Mark the store complete and move it to its final name (replacing an old one when ``overwrite``)."""
        self._progress.close()
        (self.path / _PROGRESS_FILE).unlink()
        self.attrs.update(extra_attrs)
        self.attrs["status"] = COMPLETE
        self.group.attrs[_ATTR] = self.attrs
        if self.final_path.exists():
            if not overwrite:
                raise StoreError(f"{self.final_path} appeared while compressing; use --overwrite to replace it")
            stale = self.final_path.with_name(self.final_path.name + ".old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(self.final_path, stale)
            os.replace(self.path, self.final_path)
            shutil.rmtree(stale)
        else:
            os.replace(self.path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Leave the partial store for a later resume (after a failure or interruption)."""
        if not self._progress.closed:
            self._progress.close()

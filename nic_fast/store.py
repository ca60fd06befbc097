"""The compressed-slide store: one Zarr v3 group per slide (DESIGN.md's contract).

``<out>/<name>.zarr`` holds ``embeddings`` float16 (A, H', W', C), ``tissue`` and
``valid`` bool (H', W'), ``thumbnail`` uint8 (h, w, 3), coordinate arrays and the JSON
attribute ``nic_fast``. Format 2 makes a store something other tools open as it is:

* every array has Zarr v3 ``dimension_names`` (``variant``, ``row``, ``col``,
  ``channel``; the thumbnail ``thumb_row``, ``thumb_col``, ``rgb``) and the cell centres
  are coordinate arrays in µm (``row``, ``col``; ``row_px``/``col_px`` in level-0 pixels),
  so ``xarray.open_zarr(store)`` gives a Dataset in slide coordinates;
* metadata is consolidated into the root ``zarr.json`` (one read opens the store);
* every chunk carries a CRC-32C checksum (the ``crc32c`` codec) and every chunk is
  written, even one holding only the fill value, so a deleted, truncated or overwritten
  chunk is found (:func:`verify_store`) instead of read back as zeros.

A store is written under ``<name>.zarr.partial`` and renamed only once its status
attribute says ``complete``, so a reader never sees half a slide; the partial store
keeps a log of finished tiles (with their invalid cells and why) and of the seconds
each run spent, so an interrupted run resumes mid-slide and the finished store counts
the whole slide, not the last run's share. Format 1 stores (no dimension names, no
checksums) are still read.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

__all__ = [
    "FORMAT_VERSION",
    "CellGeometry",
    "CompressedSlide",
    "StoreError",
    "StoreProblem",
    "StoreWriter",
    "is_complete",
    "open_store",
    "read_attrs",
    "store_path",
    "verify_store",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
COMPLETE = "complete"
PARTIAL = "partial"
_ATTR = "nic_fast"
_PROGRESS_FILE = "tiles_done.txt"
_RUNS_FILE = "runs.json"
DENSE_ARRAYS = ("embeddings", "tissue", "valid", "thumbnail")
DIMENSIONS = {
    "embeddings": ("variant", "row", "col", "channel"),
    "tissue": ("row", "col"),
    "valid": ("row", "col"),
    "thumbnail": ("thumb_row", "thumb_col", "rgb"),
}


class StoreError(Exception):
    """A store is missing, incomplete, damaged or not a nic-fast store."""


def store_path(out_dir: Path, name: str) -> Path:
    """Where ``compress`` writes the store called ``name`` (a slide's stem, or its relative path)."""
    return Path(out_dir) / f"{name}.zarr"


def _partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The ``nic_fast`` attributes of a store (complete or partial), None if there are none."""
    meta = Path(path) / "zarr.json"
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get(_ATTR)
    except (OSError, ValueError, AttributeError):
        return None


def is_complete(path: Path) -> bool:
    attrs = read_attrs(Path(path))
    return attrs is not None and attrs.get("status") == COMPLETE


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """zarr-python warns that consolidated metadata is not (yet) in the v3 spec (xarray and
    zarr-python both read it, which is why it is written), and about the partial store's
    progress files, which are not Zarr nodes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr hierarchy.*")
        yield


@dataclass(frozen=True)
class CellGeometry:
    """Where the grid and the thumbnail lie in the slide: for the coordinate arrays.

    ``level0_px_per_px`` maps working pixels to level-0 pixels; ``level0_mpp`` is µm per
    level-0 pixel, None for plain images in pixel units (coordinates are then in pixels).
    """

    stride_px: int
    patch_px: int
    level0_px_per_px: float
    level0_mpp: float | None
    thumbnail_downsample: float  # level-0 pixels per thumbnail pixel


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
        """Embeddings of one dihedral variant as a float16 (H', W', C) array, in the identity
        orientation; a chunk whose checksum does not match raises :class:`StoreError`."""
        return _read_checked(self.path, "embeddings", lambda: self.embeddings[variant])


def _read_checked(path: Path, name: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ValueError as exc:
        if "checksum" not in str(exc).lower():
            raise
        raise StoreError(f"{path}: a chunk of '{name}' is damaged (checksum mismatch); "
                         f"run `nic-fast verify {path}` for the cells affected, then recompress the slide") from exc


def open_store(path: str | os.PathLike) -> CompressedSlide:
    """Open a complete store; an incomplete, foreign or damaged one raises :class:`StoreError`."""
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None:
        if _partial_path(path).exists():
            raise StoreError(f"{path} is not finished (only {_partial_path(path).name} exists): "
                             "rerun nic-fast compress on its slide to complete it")
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        raise StoreError(f"{path} is not a nic-fast store (no '{_ATTR}' attributes in zarr.json)")
    if attrs.get("status") != COMPLETE:
        raise StoreError(f"{path} is incomplete (status {attrs.get('status')!r}): rerun nic-fast compress to finish it")
    version = attrs.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} has format version {version}; this nic-fast reads up to {FORMAT_VERSION}: "
                         "upgrade nic-fast")
    with _quiet_zarr():
        group = zarr.open_group(path, mode="r")
    # consolidated metadata still lists a deleted array: look for each array's own metadata
    missing_arrays = [name for name in DENSE_ARRAYS if name not in group or not (path / name / "zarr.json").is_file()]
    if missing_arrays:
        raise StoreError(f"{path}: array(s) {', '.join(missing_arrays)} missing: the store is damaged; "
                         "recompress the slide (nic-fast compress --overwrite)")
    if version >= 2:
        missing = {name: n for name in DENSE_ARRAYS if (n := len(_missing_chunks(group[name])))}
        if missing:
            listed = ", ".join(f"{name} ({n} chunk{'s' if n > 1 else ''})" for name, n in missing.items())
            raise StoreError(f"{path}: missing chunks in {listed}: the store is damaged; run `nic-fast verify "
                             f"{path}` for the cells affected, then recompress the slide")
    masks = {name: _read_checked(path, name, lambda n=name: group[n][...]) for name in ("tissue", "valid", "thumbnail")}
    return CompressedSlide(path=path, embeddings=group["embeddings"], attrs=attrs, **masks)


# -- integrity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreProblem:
    """One damaged part of a store: an array's chunk and the grid cells it covers."""

    array: str
    chunk: tuple[int, ...]
    problem: str  # missing | checksum mismatch | undecodable: ...
    cells: tuple[slice, slice] | None  # (rows, cols) of the grid it covers; None for the thumbnail

    def describe(self) -> str:
        where = ""
        if self.cells is not None:
            rows, cols = self.cells
            where = f" (cells rows {rows.start}-{rows.stop - 1}, cols {cols.start}-{cols.stop - 1})"
        return f"{self.array} chunk {self.chunk}: {self.problem}{where}"


def _chunk_grid(array: zarr.Array) -> Iterator[tuple[int, ...]]:
    counts = [-(-size // chunk) for size, chunk in zip(array.shape, array.chunks)]
    return itertools.product(*(range(n) for n in counts))


def _missing_chunks(array: zarr.Array) -> list[tuple[int, ...]]:
    """Chunks of ``array`` that have no file in a local store (format 2 writes every chunk)."""
    root = Path(array.store.root) / array.path  # type: ignore[attr-defined]
    encode = array.metadata.encode_chunk_key  # type: ignore[union-attr]
    return [coords for coords in _chunk_grid(array) if not (root / encode(coords)).is_file()]


def _cells_of(name: str, array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, slice] | None:
    dims = DIMENSIONS.get(name, ())
    if "row" not in dims:
        return None
    axis = dims.index("row")
    spans = [slice(c * size, min((c + 1) * size, extent))
             for c, size, extent in zip(coords, array.chunks, array.shape)]
    return spans[axis], spans[axis + 1]


def verify_store(path: str | os.PathLike) -> list[StoreProblem]:
    """Every chunk of every array checked: present, decodable, checksum matching.

    Raises :class:`StoreError` when the store cannot be opened at all (not a store,
    unfinished, metadata unreadable); returns the problems found (empty: intact).
    Format 1 stores have no checksums: only what decodes is checked there.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None or attrs.get("status") != COMPLETE:
        open_store(path)  # raises the message that says why
    try:
        with _quiet_zarr():
            group = zarr.open_group(path, mode="r")
    except Exception as exc:  # noqa: BLE001 - damaged metadata has no common exception type
        raise StoreError(f"{path}: the store's metadata cannot be read ({exc}); recompress the slide") from exc
    present = [name for name in DENSE_ARRAYS if name in group and (path / name / "zarr.json").is_file()]
    problems = [StoreProblem(name, (), "array missing", None) for name in DENSE_ARRAYS if name not in present]
    dense = attrs.get("format_version", 1) >= 2 if attrs else False
    for name in present:
        array = group[name]
        missing = set(_missing_chunks(array)) if dense else set()
        for coords in _chunk_grid(array):
            cells = _cells_of(name, array, coords)
            if coords in missing:
                problems.append(StoreProblem(name, coords, "missing", cells))
                continue
            selection = tuple(slice(c * size, (c + 1) * size) for c, size in zip(coords, array.chunks))
            try:
                array[selection]
            except ValueError as exc:
                problem = "checksum mismatch" if "checksum" in str(exc).lower() else f"undecodable ({exc})"
                problems.append(StoreProblem(name, coords, problem, cells))
            except Exception as exc:  # noqa: BLE001 - a codec's own error for garbage bytes
                problems.append(StoreProblem(name, coords, f"undecodable ({type(exc).__name__}: {exc})", cells))
    return problems


# -- writing --------------------------------------------------------------------------------


class StoreWriter:
    """Writes one slide's store tile by tile under a temporary name, then publishes it.

    ``config`` identifies what is being computed (encoder hash, µm/px, sizes...): a
    partial store left by an interrupted run with the same config is resumed, any
    other partial store is discarded. Call it only while holding the slide's claim.
    """

    def __init__(self, final_path: Path, *, variants: int, grid_shape: tuple[int, int], code_size: int,
                 tile_cells: int, thumbnail: np.ndarray, tissue: np.ndarray, geometry: CellGeometry,
                 attrs: dict[str, Any], config: dict[str, Any], run_id: str = "",
                 started_s: float | None = None) -> None:
        self.final_path = Path(final_path)
        self.path = _partial_path(self.final_path)
        self.run_id = run_id or f"pid{os.getpid()}-{time.time():.0f}"
        self.attrs = {"format_version": FORMAT_VERSION, **attrs, "config": config, "status": PARTIAL}
        self.done_tiles: set[tuple[int, int]] = set()
        self._invalid: dict[tuple[int, int], dict[str, int]] = {}
        self._started = time.perf_counter() if started_s is None else started_s  # perf_counter() of this run's start
        self.resumed = self._resumable(config)
        if self.resumed:
            with _quiet_zarr():
                self.group = zarr.open_group(self.path, mode="r+")
            self._read_progress()
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            self._create(variants, grid_shape, code_size, tile_cells, thumbnail, tissue, geometry)
        with _quiet_zarr():  # the write-empty-chunks setting is per handle, not stored in the metadata
            self._tiles = {name: zarr.open_array(self.path / name, mode="r+").with_config({"write_empty_chunks": True})
                           for name in ("embeddings", "valid")}
        self._runs = self._read_runs()
        self._progress = open(self.path / _PROGRESS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in publish/close

    def _resumable(self, config: dict[str, Any]) -> bool:
        attrs = read_attrs(self.path)
        return (attrs is not None and attrs.get("config") == config
                and attrs.get("format_version") == FORMAT_VERSION and (self.path / _PROGRESS_FILE).exists())

    def _create(self, variants: int, grid_shape: tuple[int, int], code_size: int, tile_cells: int,
                thumbnail: np.ndarray, tissue: np.ndarray, geometry: CellGeometry) -> None:
        with _quiet_zarr():
            self.group = zarr.open_group(self.path, mode="w", zarr_format=3)
        h, w = grid_shape
        tile_h, tile_w = max(1, min(tile_cells, h)), max(1, min(tile_cells, w))
        self._array("embeddings", (variants, h, w, code_size), "float16", (1, tile_h, tile_w, code_size), fill_value=0)
        self._array("valid", (h, w), "bool", (tile_h, tile_w), fill_value=False)
        self._array("tissue", (h, w), "bool", (max(h, 1), max(w, 1)))[...] = tissue
        thumb_chunks = (min(1024, max(1, thumbnail.shape[0])), min(1024, max(1, thumbnail.shape[1])), 3)
        self._array("thumbnail", thumbnail.shape, "uint8", thumb_chunks)[...] = thumbnail
        self._coordinates(grid_shape, variants, code_size, thumbnail.shape[:2], geometry)
        self.group.attrs[_ATTR] = self.attrs
        (self.path / _PROGRESS_FILE).touch()

    def _array(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], *,
               fill_value: Any = None, attrs: dict[str, Any] | None = None) -> zarr.Array:
        """An array with its dimension names, checksummed chunks and every chunk written."""
        return self.group.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
            compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=DIMENSIONS.get(name),
            config={"write_empty_chunks": True}, attributes=attrs or {})

    def _coordinates(self, grid_shape: tuple[int, int], variants: int, code_size: int,
                     thumb_shape: tuple[int, int], geometry: CellGeometry) -> None:
        """Cell centres in µm (row, col) and level-0 px (row_px, col_px); thumbnail pixel centres.

        µm are level-0 pixels times the scanned µm/px, so grid and thumbnail align exactly;
        plain images (no µm/px) get pixel coordinates under the same names, with units "px".
        """
        g = geometry
        units = "µm" if g.level0_mpp is not None else "px"
        per_um = g.level0_mpp if g.level0_mpp is not None else 1.0
        for axis, n in zip(("row", "col"), grid_shape):
            centre_px = (np.arange(n) * g.stride_px + g.patch_px / 2) * g.level0_px_per_px
            self._coordinate(axis, centre_px * per_um, units, f"cell centre along the slide's {axis}s")
            self._coordinate(f"{axis}_px", centre_px, "level-0 px", f"cell centre along the slide's {axis}s")
        for axis, n in zip(("thumb_row", "thumb_col"), thumb_shape):
            centre_px = (np.arange(n) + 0.5) * g.thumbnail_downsample
            self._coordinate(axis, centre_px * per_um, units, "thumbnail pixel centre")
        self._coordinate("variant", np.arange(variants), "", "dihedral transform k (0 = identity)", dtype="int32")
        self._coordinate("channel", np.arange(code_size), "", "embedding component", dtype="int32")
        self._coordinate("rgb", np.arange(3), "", "colour channel (red, green, blue)", dtype="int32")
        for name in ("embeddings", "tissue", "valid"):
            self.group[name].attrs["coordinates"] = "row_px col_px"

    def _coordinate(self, name: str, values: np.ndarray, units: str, meaning: str, dtype: str = "float64") -> None:
        dim = name.removesuffix("_px")
        array = self.group.create_array(name, shape=values.shape, dtype=dtype, chunks=(max(1, len(values)),),
                                        compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=(dim,),
                                        config={"write_empty_chunks": True},
                                        attributes={"units": units, "long_name": meaning})
        array[...] = values

    def _read_progress(self) -> None:
        """Finished tiles and their invalid cells; a line cut by a crash means: redo that tile."""
        for line in (self.path / _PROGRESS_FILE).read_text().splitlines():
            try:
                fields = json.loads(line)
                tile = (int(fields["tile"][0]), int(fields["tile"][1]))
                invalid = {str(k): int(v) for k, v in fields.get("invalid", {}).items()}
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            self.done_tiles.add(tile)
            self._invalid[tile] = invalid

    def _read_runs(self) -> dict[str, dict[str, float]]:
        try:
            runs = json.loads((self.path / _RUNS_FILE).read_text())
            return {str(k): {"seconds": float(v["seconds"]), "patches": int(v["patches"])} for k, v in runs.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def write_tile(self, row: int, col: int, i0: int, j0: int, embeddings: np.ndarray, valid: np.ndarray,
                   invalid: dict[str, int] | None = None, patches: int = 0) -> None:
        """Write one tile's (A, h, w, C) embeddings and (h, w) valid mask, then record it as done,
        with its not-valid cells counted by reason and the ``patches`` encoded for it."""
        h, w = valid.shape
        self._tiles["embeddings"][:, i0 : i0 + h, j0 : j0 + w, :] = embeddings
        self._tiles["valid"][i0 : i0 + h, j0 : j0 + w] = valid
        invalid = {reason: n for reason, n in (invalid or {}).items() if n}
        self._progress.write(json.dumps({"tile": [row, col], "invalid": invalid}) + "\n")
        self.done_tiles.add((row, col))
        self._invalid[(row, col)] = invalid
        self._note_run(patches)

    def _note_run(self, patches: int) -> None:
        """This run's seconds and patches so far, kept in the partial store for a later resume."""
        run = self._runs.setdefault(self.run_id, {"seconds": 0.0, "patches": 0})
        run["seconds"] = time.perf_counter() - self._started
        run["patches"] += patches
        tmp = self.path / f".{_RUNS_FILE}.tmp"
        tmp.write_text(json.dumps(self._runs))
        os.replace(tmp, self.path / _RUNS_FILE)

    def totals(self) -> dict[str, Any]:
        """Whole-slide counts over every run that worked on this store."""
        invalid: Counter[str] = Counter()
        for counts in self._invalid.values():
            invalid.update(counts)
        self._note_run(0)
        seconds = sum(run["seconds"] for run in self._runs.values())
        patches = sum(run["patches"] for run in self._runs.values())
        return {"invalid_cells": int(sum(invalid.values())), "invalid_reasons": dict(invalid),
                "compute_seconds": round(seconds, 3), "patches_encoded": patches, "runs": len(self._runs)}

    def publish(self, extra_attrs: dict[str, Any], *, overwrite: bool,
                still_owned: Callable[[], bool] = lambda: True) -> Path:
        """Mark the store complete and move it to its final name (replacing an old one when
        ``overwrite``). ``still_owned`` is asked last: a process that lost the slide's claim
        leaves the partial store to its successor."""
        self._progress.close()
        if not still_owned():
            raise ClaimLost(f"{self.final_path}: another process took over this slide (this one stalled past its "
                            "claim's lease); it will publish the store")
        self.attrs.update(extra_attrs)
        self.attrs["status"] = COMPLETE
        self.attrs["completed_at"] = time.time()
        with _quiet_zarr():
            self.group.attrs[_ATTR] = self.attrs
            zarr.consolidate_metadata(self.path)
        for name in (_PROGRESS_FILE, _RUNS_FILE):
            (self.path / name).unlink(missing_ok=True)
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


class ClaimLost(StoreError):
    """This process no longer holds the slide's claim: it must not publish."""

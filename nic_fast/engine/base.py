"""What every engine shares: region plans, slide jobs, the tile writer, reader handles, timings.

An engine streams one slide's tiles through read → patchify → encode → scatter → write.
The CPU engine (:mod:`nic_fast.engine.cpu`) and the GPU engine
(:mod:`nic_fast.engine.cuda`) both depend on this module and on nothing of each other;
:class:`EngineConfig` is all they know of the compression they run, so neither
depends on the compressor that builds it either.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from nic_fast.encoders import Encoder
from nic_fast.grid import GridGeometry, Tile
from nic_fast.slides import SlideError, SlideReader
from nic_fast.store import StoreWriter

__all__ = [
    "Engine",
    "EngineConfig",
    "ReaderHandles",
    "RegionPlan",
    "SlideJob",
    "StreamResult",
    "TileWriter",
    "Timings",
    "WriteJob",
    "background_tile",
    "encode_to_host",
    "fail_if_unreadable",
    "max_region_px",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class EngineConfig:
    """The compression an engine runs, fixed for a whole batch of slides."""

    encoder: Encoder  # on ``device``, in ``dtype``
    encoder_source: str  # built-in name or file: where an fp32 reference copy is loaded from
    device: torch.device
    dtype: torch.dtype
    variants: tuple[int, ...]  # dihedral transforms compressed per cell
    batch_size: int
    patch_px: int  # the encoder's input side
    scale: list[float]  # per-channel normalisation: x_uint8 * scale + offset
    offset: list[float]
    background: np.ndarray  # float16 (C,): what cells without tissue hold
    workers: int  # reader threads
    tile_cells: int  # cells per tile side: one region read and one Zarr chunk
    decode: str = "auto"  # GPU runs: where cuCIM decodes (cpu | gpu | auto)
    cuda_graph: bool = True
    batches_in_flight: int = 2

    @property
    def code_size(self) -> int:
        return self.encoder.spec.code_size

    @property
    def channels(self) -> int:
        return self.encoder.spec.channels


def encode_to_host(config: EngineConfig, patches: torch.Tensor) -> np.ndarray:
    """(N, C, P, P) normalised patches → float32 (N, code_size) on the host."""
    with torch.inference_mode():
        x = patches.to(config.device, config.dtype, non_blocking=True)
        out = config.encoder(x)
    return out.float().cpu().numpy()


@dataclass(frozen=True)
class RegionPlan:
    """One tile's read: the level-pixel bounding box of its tissue cells and where each
    cell lies in it (grid cells are grid-aligned, so one read serves them all)."""

    tile: Tile
    local_cells: np.ndarray  # int32 (n, 2): cells' (i, j) within the tile
    level_px: np.ndarray  # int32 (n, 2): cells' top-left pixel within the region
    y0: int  # region origin and size in level pixels
    x0: int
    height: int
    width: int

    @classmethod
    def of(cls, grid: GridGeometry, tile: Tile, cells: np.ndarray) -> RegionPlan:
        """Plan for the (n, 2) global tissue ``cells`` of ``tile`` (n >= 1)."""
        i_min, j_min = cells.min(axis=0)
        i_max, j_max = cells.max(axis=0)
        y0, x0 = grid.level_origin(int(i_min), int(j_min))
        height = int(i_max - i_min) * grid.level_stride_px + grid.level_patch_px
        width = int(j_max - j_min) * grid.level_stride_px + grid.level_patch_px
        level_px = np.ascontiguousarray((cells - (i_min, j_min)) * grid.level_stride_px, dtype=np.int32)
        local_cells = np.ascontiguousarray(cells - (tile.i0, tile.j0), dtype=np.int32)
        return cls(tile, local_cells, level_px, int(y0), int(x0), height, width)

    @property
    def n_cells(self) -> int:
        return len(self.local_cells)


def max_region_px(grid: GridGeometry, tile_cells: int) -> tuple[int, int]:
    """The largest (height, width) a tile's region can have: sizes staging buffers."""
    cells_h, cells_w = min(tile_cells, grid.height), min(tile_cells, grid.width)
    return ((max(cells_h, 1) - 1) * grid.level_stride_px + grid.level_patch_px,
            (max(cells_w, 1) - 1) * grid.level_stride_px + grid.level_patch_px)


@dataclass
class WriteJob:
    """A finished tile for the writer thread. ``ready`` blocks until its host arrays hold
    the data (a device-to-host copy); ``release`` hands its buffers back afterwards."""

    tile: Tile
    embeddings: np.ndarray  # float16 (A, h, w, C)
    valid: np.ndarray  # bool (h, w)
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None


class TileWriter:
    """Writes finished tiles on its own thread, so Zarr compression overlaps encoding."""

    def __init__(self, store: StoreWriter, max_pending: int) -> None:
        self.store = store
        self.queue: queue.Queue[WriteJob | None] = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="nic-fast-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                if self.error is None:
                    if job.ready is not None:
                        job.ready()
                    t = job.tile
                    self.store.write_tile(t.row, t.col, t.i0, t.j0, job.embeddings, job.valid)
            except BaseException as exc:  # reported by close(); keeps draining so producers never block
                self.error = exc
            finally:
                if job.release is not None:
                    job.release()

    def put(self, job: WriteJob) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class ReaderHandles:
    """One slide handle per reader thread (a handle is not thread-safe), all closed at the end."""

    def __init__(self, reader: SlideReader) -> None:
        self.reader = reader
        self._local = threading.local()
        self._handles: list[SlideReader] = []
        self._lock = threading.Lock()

    def get(self) -> SlideReader:
        if not hasattr(self._local, "reader"):
            self._local.reader = self.reader.reopen()
            with self._lock:
                self._handles.append(self._local.reader)
        return self._local.reader

    def close(self) -> None:
        for handle in self._handles:
            handle.close()


@dataclass
class Timings:
    """Seconds per stage of one slide; the waits say which stage bound the run."""

    read_wait_s: float = 0.0  # the pipeline waited for decoded regions (decode-bound)
    patchify_s: float = 0.0
    encode_s: float = 0.0
    thumbnail_s: float = 0.0
    total_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_attrs(self) -> dict[str, float]:
        fields = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {k: round(v, 4) for k, v in {**fields, **self.extra}.items()}


@dataclass
class SlideJob:
    """Everything an engine needs to stream one slide's unfinished tiles into its store."""

    reader: SlideReader
    level: int
    downsample: int  # level pixels per working pixel (the patchify kernel's box downsample)
    grid: GridGeometry
    store: StoreWriter
    tiles: list[tuple[Tile, np.ndarray]]  # unfinished tiles with their global tissue cells
    timings: Timings
    progress: ProgressFn | None


@dataclass
class StreamResult:
    invalid_cells: int  # cells whose pixels could not be read
    attrs: dict[str, Any] = field(default_factory=dict)  # what the engine adds to the store's attributes


class Engine(Protocol):
    """Streams a slide's tiles through read → patchify → encode → scatter → write."""

    def stream(self, job: SlideJob) -> StreamResult: ...


def background_tile(config: EngineConfig, tile: Tile) -> np.ndarray:
    """A tile's host embeddings, every cell holding the background embedding."""
    h, w = tile.shape
    embeddings = np.empty((len(config.variants), h, w, config.code_size), np.float16)
    embeddings[...] = config.background
    return embeddings


def fail_if_unreadable(reader: SlideReader, failed_regions: list[str], read_regions: int) -> None:
    """A slide whose every region failed is a failed slide; otherwise log a few reasons."""
    if failed_regions and len(failed_regions) == read_regions:
        raise SlideError(f"{reader.path}: no region could be read ({failed_regions[0]})")
    for reason in failed_regions[:3]:
        log.warning("%s: region read failed, cells marked invalid: %s", reader.path, reason)

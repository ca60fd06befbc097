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

from nic_fast.engine.fastpath import FastEncoder
from nic_fast.grid import GridGeometry, Tile
from nic_fast.slides import SlideError, SlideReader
from nic_fast.slides.base import BadRegion, RegionRead
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
    "EncoderOutputError",
    "background_tile",
    "check_embeddings",
    "check_output",
    "encode_to_host",
    "ReadFailures",
    "bad_cells",
    "read_region",
    "max_region_px",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class EngineConfig:
    """The compression an engine runs, fixed for a whole batch of slides."""

    encoder: FastEncoder  # on ``device``; its dtype may change once, after the CPU precision trial
    device: torch.device
    variants: tuple[int, ...]  # dihedral transforms compressed per cell
    batch_size: int
    scale: list[float]  # per-channel normalisation: x_uint8 * scale + offset
    offset: list[float]
    background: np.ndarray  # float16 (C,): what cells without tissue hold
    workers: int  # reader threads
    tile_cells: int  # cells per tile side: one region read and one Zarr chunk
    decode: str = "auto"  # GPU runs: where cuCIM decodes (cpu | gpu | auto)
    cuda_graph: bool = True
    batches_in_flight: int = 2

    @property
    def patch_px(self) -> int:
        """The side of the patches the encoder takes (after a pool absorbed into patchify)."""
        return self.encoder.input_px

    @property
    def pool_px(self) -> int:
        """Extra box-downsampling patchify does for the encoder (its absorbed leading pool)."""
        return self.encoder.pool_px

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def code_size(self) -> int:
        return self.encoder.spec.code_size

    @property
    def channels(self) -> int:
        return self.encoder.spec.channels


FLOAT16_MAX = 65504.0  # stores hold float16: anything larger becomes inf


class EncoderOutputError(ValueError):
    """The encoder returned values a store cannot hold (NaN, ±inf, beyond float16's range)."""


def encode_to_host(config: EngineConfig, patches: torch.Tensor) -> np.ndarray:
    """(N, C, P, P) normalised patches → float32 (N, code_size) on the host, checked."""
    with torch.inference_mode():
        x = patches.to(config.device, non_blocking=True)
        out = config.encoder(x)
    embeddings = out.float().cpu().numpy()
    check_embeddings(config, embeddings)
    return embeddings


def check_embeddings(config: EngineConfig, embeddings: np.ndarray) -> None:
    """Raise :class:`EncoderOutputError` unless the shape is the spec's and every value is
    finite and fits float16."""
    check_output(config.encoder.spec.name, config.code_size, embeddings)


def check_output(encoder_name: str, code_size: int, embeddings: np.ndarray) -> None:
    if embeddings.ndim != 2 or embeddings.shape[1] != code_size:
        raise EncoderOutputError(f"encoder {encoder_name!r} returned shape {tuple(embeddings.shape)} for "
                                 f"{len(embeddings)} patches, but its spec says code_size {code_size}; "
                                 "fix the encoder file's spec (nic_fast.encoders.save_encoder checks it)")
    finite = np.isfinite(embeddings)
    if finite.all() and not (np.abs(embeddings) > FLOAT16_MAX).any():
        return
    counts = {"NaN": int(np.isnan(embeddings).sum()), "infinite": int(np.isinf(embeddings).sum()),
              "beyond float16's range (±65504)": int((np.abs(embeddings[finite]) > FLOAT16_MAX).sum())}
    found = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    raise EncoderOutputError(f"encoder {encoder_name!r} returned {found} values (of {embeddings.size}); the slide is "
                             "not stored. Check the encoder's normalisation and weights, or run it in fp32 "
                             "(--precision fp32)")


def raise_bad_values(config: EngineConfig, bad: int, total: int) -> None:
    """The GPU engine counts bad values on the device, without telling the kinds apart."""
    raise EncoderOutputError(f"encoder {config.encoder.spec.name!r} returned {bad} NaN, infinite or beyond "
                             f"float16's range (±65504) values (of {total}); the slide is not stored. Check the "
                             "encoder's normalisation and weights, or run it in fp32 (--precision fp32)")


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

    def subset(self, keep: np.ndarray) -> RegionPlan:
        """The same region with only the cells where ``keep`` (bool (n,)) is True."""
        return RegionPlan(self.tile, np.ascontiguousarray(self.local_cells[keep]),
                          np.ascontiguousarray(self.level_px[keep]), self.y0, self.x0, self.height, self.width)

    def cells_touching(self, patch_px: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """bool (n,): cells whose ``patch_px``-side patch overlaps the level-pixel box [y0, y1) × [x0, x1)."""
        top = self.y0 + self.level_px[:, 0]
        left = self.x0 + self.level_px[:, 1]
        return (top < y1) & (top + patch_px > y0) & (left < x1) & (left + patch_px > x0)


def read_region(reader: SlideReader, level: int, plan: RegionPlan, out: np.ndarray | None = None) -> RegionRead:
    """Read a plan's region with every tile checked: corrupt or undecodable tiles come back
    as bad rectangles (white pixels), every other pixel exactly as a clean read gives it.
    An error the reader could not narrow down to tiles costs the region's cells. ``out``:
    decode into this (height, width, 3) array (a staging buffer) instead of a new one."""
    try:
        return reader.read_region_checked(level, plan.y0, plan.x0, plan.height, plan.width, out=out)
    except Exception as exc:  # noqa: BLE001 - a codec's error has no common type
        return RegionRead(np.empty((0, 0, 0), np.uint8),
                          [BadRegion(plan.y0, plan.x0, plan.y0 + plan.height, plan.x0 + plan.width,
                                     f"unreadable region ({type(exc).__name__}: {exc})")])


def bad_cells(plan: RegionPlan, grid: GridGeometry, areas: list[BadRegion]) -> tuple[np.ndarray, dict[str, int]]:
    """bool (n,) of the plan's cells that touch a bad area, and how many per reason (a cell
    touching several areas counts once, under the first)."""
    bad = np.zeros(plan.n_cells, bool)
    reasons: dict[str, int] = {}
    for area in areas:
        hit = plan.cells_touching(grid.level_patch_px, area.y0, area.x0, area.y1, area.x1) & ~bad
        if hit.any():
            reasons[area.reason] = reasons.get(area.reason, 0) + int(hit.sum())
            bad |= hit
    return bad, reasons


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
    invalid: dict[str, int] = field(default_factory=dict)  # not-valid cells by reason
    patches: int = 0  # patch encodings this tile took
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
                    self.store.write_tile(t.row, t.col, t.i0, t.j0, job.embeddings, job.valid, job.invalid, job.patches)
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


class ReadFailures:
    """Counts what could not be read over a slide; a slide with no readable cell fails."""

    def __init__(self) -> None:
        self.cells = 0  # tissue cells read
        self.bad_cells = 0
        self.reasons: dict[str, int] = {}

    def add(self, n_cells: int, reasons: dict[str, int]) -> None:
        self.cells += n_cells
        for reason, n in reasons.items():
            self.bad_cells += n
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def check(self, reader: SlideReader) -> None:
        """Raise when every cell failed; otherwise log the first few reasons."""
        if self.cells and self.bad_cells == self.cells:
            first = next(iter(self.reasons))
            raise SlideError(f"{reader.path}: no region could be read ({first}); try another reader (--reader)")
        for reason, n in list(self.reasons.items())[:3]:
            log.warning("%s: %d cell(s) marked not valid: %s", reader.path, n, reason)

"""The CPU engine: reader threads, the OpenMP kernels and the encoder on the host.

::

    reader threads   large grid-aligned region reads, own slide handle each, bounded look-ahead
    patchify kernel  downsample, dihedral, normalise, straight into the encoder batch
    encoder thread   a full batch encodes while the next one is patchified (two buffers)
    scatter kernel   embeddings into their tile's block of the grid
    writer thread    one Zarr chunk per tile

Reading the next regions overlaps encoding the current batch and memory stays flat
whatever the slide size.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from nic_fast import kernels
from nic_fast.engine.base import (
    EngineConfig,
    ProgressFn,
    ReaderHandles,
    ReadFailures,
    RegionPlan,
    SlideJob,
    StreamResult,
    TileWriter,
    Timings,
    WriteJob,
    background_tile,
    bad_cells,
    encode_to_host,
    read_region,
)
from nic_fast.grid import Tile
from nic_fast.slides.base import RegionRead

__all__ = ["CpuEngine", "new_batch"]


def new_batch(config: EngineConfig) -> torch.Tensor:
    """A reusable patch buffer in the encoder's dtype (patchify writes bf16 itself), channels-last:
    the layout oneDNN convolutions want."""
    shape = (config.batch_size, config.channels, config.patch_px, config.patch_px)
    return torch.empty(shape, dtype=config.dtype).contiguous(memory_format=torch.channels_last)




@dataclass
class _TileWork:
    """One tile in flight on the CPU: its grid block, filled as batches come back."""

    tile: Tile
    embeddings: np.ndarray  # float16 (A, h, w, C), background pre-filled
    valid: np.ndarray  # bool (h, w)
    pending: int = 0  # patch encodings not yet scattered
    patches: int = 0  # patch encodings queued
    invalid: dict[str, int] = field(default_factory=dict)  # not-valid cells by reason

    def fail(self, cells: np.ndarray, reasons: dict[str, int], variants: int) -> None:
        """Mark ``cells`` (local (n, 2)) not valid: they are never encoded."""
        self.valid[cells[:, 0], cells[:, 1]] = False
        self.pending -= len(cells) * variants
        for reason, n in reasons.items():
            self.invalid[reason] = self.invalid.get(reason, 0) + n


@dataclass
class _Region:
    work: _TileWork
    plan: RegionPlan
    read: RegionRead


class _Batcher:
    """Fills encoder batches with patches from many regions and scatters the embeddings
    back into their tiles.

    Two batch buffers: a full batch is encoded on its own thread while the next one is
    patchified, so the encoder never waits for the kernel. Scattering and tile hand-off
    stay on the caller's thread, which owns the tiles."""

    def __init__(self, config: EngineConfig, downsample: int, on_tile_done: Callable[[_TileWork], None],
                 timings: Timings, progress: ProgressFn | None) -> None:
        self.c = config
        self.downsample = downsample
        self.on_tile_done = on_tile_done
        self.timings = timings
        self.progress = progress
        self.buffers = (new_batch(config), new_batch(config))
        self.current = 0
        self.filled = 0
        self.parts: list[tuple[_TileWork, int, np.ndarray, int, int]] = []  # work, variant, cells, start, count
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="nic-fast-encode")
        self.in_flight: tuple[Future[tuple[np.ndarray, float]], list, int] | None = None

    @property
    def batch(self) -> torch.Tensor:
        return self.buffers[self.current]

    def add(self, work: _TileWork, plan: RegionPlan, pixels: np.ndarray, variants: Iterable[int]) -> None:
        for variant in variants:
            start = 0
            while start < plan.n_cells:
                count = min(plan.n_cells - start, len(self.batch) - self.filled)
                t0 = time.perf_counter()
                kernels.patchify(pixels, plan.level_px[start : start + count],
                                 self.batch[self.filled : self.filled + count], scale=self.c.scale,
                                 offset=self.c.offset, downsample=self.downsample * self.c.pool_px,
                                 dihedral=variant)
                self.timings.patchify_s += time.perf_counter() - t0
                self.parts.append((work, variant, plan.local_cells[start : start + count], self.filled, count))
                work.patches += count
                self.filled += count
                start += count
                if self.filled == len(self.batch):
                    self.flush()

    def flush(self) -> None:
        """Send the current batch to the encoder thread and switch to the other buffer
        (after collecting the batch that was using it)."""
        if self.filled == 0:
            return
        self._collect()
        self.in_flight = (self.encoder.submit(self._encode, self.batch[: self.filled]), self.parts, self.filled)
        self.current ^= 1
        self.parts, self.filled = [], 0

    def finish(self) -> None:
        """Encode what is left and scatter everything."""
        self.flush()
        self._collect()

    def close(self) -> None:
        self.encoder.shutdown(wait=True, cancel_futures=True)

    def _encode(self, patches: torch.Tensor) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        return encode_to_host(self.c, patches), time.perf_counter() - t0

    def _collect(self) -> None:
        if self.in_flight is None:
            return
        future, parts, filled = self.in_flight
        self.in_flight = None
        embeddings, seconds = future.result()
        self.timings.encode_s += seconds
        for work, variant, cells, start, count in parts:
            kernels.scatter(embeddings[start : start + count], cells, work.embeddings[variant])
            work.pending -= count
            if work.pending == 0:
                self.on_tile_done(work)
        if self.progress:
            self.progress(filled)


class CpuEngine:
    """The CPU pipeline: reader threads, the OpenMP kernels and the encoder on the host."""

    def __init__(self, config: EngineConfig) -> None:
        self.c = config

    def stream(self, job: SlideJob) -> StreamResult:
        workers = self.c.workers
        writer = TileWriter(job.store, max_pending=2 * workers + 2)

        def write(work: _TileWork) -> None:
            writer.put(WriteJob(work.tile, work.embeddings, work.valid, work.invalid, work.patches))

        batcher = _Batcher(self.c, job.downsample, write, job.timings, job.progress)
        handles = ReaderHandles(job.reader)

        def read(work: _TileWork, plan: RegionPlan) -> _Region:
            return _Region(work, plan, read_region(handles.get(), job.level, plan))

        failures = ReadFailures()
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="nic-fast-read") as pool:
                in_flight: deque[Future[_Region]] = deque()
                for tile, cells in job.tiles:
                    h, w = tile.shape
                    work = _TileWork(tile, background_tile(self.c, tile), np.ones((h, w), bool),
                                     pending=len(cells) * len(self.c.variants))
                    if len(cells) == 0:
                        write(work)
                        continue
                    in_flight.append(pool.submit(read, work, RegionPlan.of(job.grid, tile, cells)))
                    if len(in_flight) >= 2 * workers:
                        self._consume(in_flight.popleft(), batcher, job, failures)
                while in_flight:
                    self._consume(in_flight.popleft(), batcher, job, failures)
            batcher.finish()
        finally:
            batcher.close()
            writer.close()
            handles.close()
        failures.check(job.reader)
        return StreamResult(failures.bad_cells, {})

    def _consume(self, future: Future[_Region], batcher: _Batcher, job: SlideJob, failures: ReadFailures) -> None:
        """Hand a read region's good cells to the batcher; its bad cells are marked not valid."""
        t0 = time.perf_counter()
        region = future.result()
        job.timings.read_wait_s += time.perf_counter() - t0
        work, plan = region.work, region.plan
        bad, reasons = bad_cells(plan, job.grid, region.read.bad)
        failures.add(plan.n_cells, reasons)
        if bad.any():
            work.fail(plan.local_cells[bad], reasons, len(self.c.variants))
            plan = plan.subset(~bad)
        if plan.n_cells:
            batcher.add(work, plan, region.read.pixels, self.c.variants)
        elif work.pending == 0:
            batcher.on_tile_done(work)

"""The GPU engine: a device-resident compress pipeline on one CUDA device.

::

    reader threads   the CPU reader (cuCIM, tifffile, OpenSlide) decodes regions straight
                     into a ring of pinned host buffers, one thread per core; and/or
                     nvImageCodec decodes the regions' JPEG tiles in batches on the GPU's
                     JPEG engines into device memory (cuCIM's GPU decode without it)
    copy stream      host-staged region + cell offsets → one of two device region buffers
    compute stream   patchify kernel → encoder batch (fp16/bf16, channels-last)
                     → encoder (CUDA-graph replay) → scatter kernel → device tiles
    copy stream      finished tiles → pinned host tiles
    writer thread    one Zarr chunk per tile

The decoder is chosen per slide from its level (:meth:`CudaEngine._decoder`): GPU
decoders take JPEG tiles only; with ``--decode auto`` both sides run at once, each
region going where :class:`~nic_fast.engine.decode_split.DecodeSplit` expects it done
first; a region the GPU must not or cannot decode (a corrupt tile, a codec error) is
decoded on the CPU instead. Staging, device regions and tiles are the engine's, made
once for every slide it streams.

The host thread only queues work. It waits in three places, each timed into the
store's attributes so that a run says which stage bound it: for a decoded region
(``read_wait_s``: decode-bound), for the GPU when ``batches_in_flight`` batches are
already queued (``batch_wait_s``: encoder-bound), and for a free device tile
(``tile_wait_s``: write-bound); ``patchify_s`` and ``encode_s`` are the kernels' device
time, from events. Buffers go back to their pools from other threads once the GPU work
reading them has finished, so no wait depends on the host thread itself.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic_fast import kernels
from nic_fast.engine.base import (
    FLOAT16_MAX,
    EngineConfig,
    ReadFailures,
    bad_cells,
    ReaderHandles,
    RegionPlan,
    SlideJob,
    StreamResult,
    TileWriter,
    Timings,
    WriteJob,
    background_tile,
    raise_bad_values,
    read_region,
    max_region_px,
)
from nic_fast.engine.decode_split import DecodeSplit, Side
from nic_fast.engine.fastpath import FastEncoder
from nic_fast.engine.tile_decode import nvimgcodec_available
from nic_fast.grid import GridGeometry, Tile
from nic_fast.slides import SlideError
from nic_fast.slides.base import BadRegion
from nic_fast.slides.jpeg_tiles import JpegLevel, jpeg_problem
from nic_fast.slides.tiles import TiffTiles

__all__ = ["CpuDecoder", "CucimDeviceReads", "CudaEngine", "EventReleaser", "GpuDecoder", "SplitDecoder", "StagingRing",
           "TileDeviceReads"]

log = logging.getLogger(__name__)

RGB = 3
GPU_DECODE_THREADS = 2  # GPU decodes queue on one device: two host threads keep it fed
# TorchScript's profiling executor re-optimises during its first calls (3 when the
# background embedding ran at batch 1 first): warm well past that, so the graph records
# the optimised plan and no profiling step.
GRAPH_WARMUP_CALLS = 10
DECODE_PROBE_READS = 2  # timed reads per decoder when --decode auto measures a kind of level


# -- host-side buffer pools (no CUDA needed: tested on the CPU) -----------------------------


@dataclass
class StagingSlot:
    """One pinned host buffer: a decoded region and its cells' pixel offsets."""

    pixels: torch.Tensor  # uint8 (capacity_bytes,)
    cells: torch.Tensor  # int32 (max_cells, 2)

    def pixel_view(self, height: int, width: int) -> np.ndarray:
        """The first height * width * 3 bytes as a writable (height, width, 3) array."""
        return self.pixels[: height * width * RGB].numpy().reshape(height, width, RGB)


class StagingRing:
    """A fixed set of host buffers that decoded regions wait in for their copy to the device.

    Pinned (page-locked) on a GPU run, so the copy is asynchronous and runs at full bus
    speed. Readers block in :meth:`acquire` when all are in use: memory stays flat and
    decoding never runs further ahead than the device can take.
    """

    def __init__(self, count: int, capacity_bytes: int, max_cells: int, *, pin: bool) -> None:
        self.capacity_bytes = capacity_bytes
        self.count = count
        self._free: queue.Queue[StagingSlot] = queue.Queue()
        for _ in range(count):
            self._free.put(StagingSlot(torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin),
                                       torch.empty((max_cells, 2), dtype=torch.int32, pin_memory=pin)))

    def acquire(self) -> StagingSlot:
        return self._free.get()

    def release(self, slot: StagingSlot) -> None:
        self._free.put(slot)

    @property
    def free(self) -> int:
        return self._free.qsize()


class EventReleaser:
    """Hands buffers back once the device work reading them is done, on its own thread.

    Each item is a ``wait`` (typically ``event.synchronize``) and a ``release``; items are
    released in order. The host thread queuing GPU work therefore never blocks on a copy
    it has just queued, and a reader waiting for a staging buffer is never waiting on the
    host thread.
    """

    def __init__(self) -> None:
        self._items: queue.Queue[tuple[Callable[[], None], Callable[[], None]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nic-fast-release", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            wait, release = item
            try:
                wait()
            except BaseException as exc:  # reported by close(); the buffer is released regardless
                self.error = self.error or exc
            release()

    def put(self, wait: Callable[[], None], release: Callable[[], None]) -> None:
        self._items.put((wait, release))

    def close(self) -> None:
        self._items.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


# -- device-side state ----------------------------------------------------------------------


@dataclass
class _DeviceRegion:
    """A device buffer a region is copied into; ``free`` is recorded after its last reader."""

    pixels: torch.Tensor  # uint8 (capacity_bytes,)
    cells: torch.Tensor  # int32 (max_cells, 2)
    free: torch.cuda.Event


@dataclass
class _DeviceTile:
    """One tile in flight: device embeddings the scatter kernel fills, their host copy."""

    tile: Tile
    buffer: int  # index in the tile pool
    embeddings: torch.Tensor  # float16 (A, h, w, C) on the device
    host: torch.Tensor  # float16 (A, h, w, C), pinned
    valid: np.ndarray  # bool (h, w)
    pending: int  # patch encodings not yet scattered
    patches: int = 0  # patch encodings queued
    invalid: dict[str, int] = field(default_factory=dict)  # not-valid cells by reason


class _TilePool:
    """Device tiles and their pinned host twins, reused across tiles and slides."""

    def __init__(self, count: int, numel: int, device: torch.device) -> None:
        self.device_buffers = [torch.empty(numel, dtype=torch.float16, device=device) for _ in range(count)]
        self.host_buffers = [torch.empty(numel, dtype=torch.float16, pin_memory=True) for _ in range(count)]
        self._free: queue.Queue[int] = queue.Queue()
        for index in range(count):
            self._free.put(index)

    def try_acquire(self) -> int | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def acquire(self) -> int:
        return self._free.get()

    def release(self, index: int) -> None:
        self._free.put(index)


@dataclass
class _Staged:
    """A region as a reader thread hands it over: in a staging slot (CPU decode), in
    device memory (GPU decode), or failed."""

    plan: RegionPlan  # the cells to encode: those whose pixels were read cleanly
    slot: StagingSlot | None = None
    device_pixels: torch.Tensor | None = None
    owner: Any = None  # what owns device_pixels' memory (cuCIM's image, nvImageCodec's tiles)
    ready: torch.cuda.Event | None = None  # recorded on the decode stream after device_pixels' last write
    failed_cells: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int32))  # local (i, j), not valid
    reasons: dict[str, int] = field(default_factory=dict)  # failed cells by reason
    cells_read: int = 0  # cells of the region before the failed ones were taken out

    @classmethod
    def checked(cls, plan: RegionPlan, grid: GridGeometry, areas: list[BadRegion], **where: Any) -> _Staged:
        """The region's good cells to encode, its bad ones (touching ``areas``) set aside."""
        bad, reasons = bad_cells(plan, grid, areas)
        return cls(plan.subset(~bad) if bad.any() else plan, failed_cells=plan.local_cells[bad], reasons=reasons,
                   cells_read=plan.n_cells, **where)


class _BatchSlot:
    """One encoder batch: its device input, the cells its embeddings scatter to, and,
    when captured, the CUDA graph that encodes it."""

    def __init__(self, batch_size: int, channels: int, patch_px: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch_size, channels, patch_px, patch_px)
        # zeros, not empty: a graph replays the whole batch, unused rows included
        self.input = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        self.host_cells = torch.empty((batch_size, 2), dtype=torch.int32, pin_memory=True)
        self.cells = torch.empty((batch_size, 2), dtype=torch.int32, device=device)
        self.done = torch.cuda.Event(blocking=True)  # the host waits on it: sleep, do not spin
        self.done.record(torch.cuda.current_stream(device))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def capture(self, encoder: FastEncoder) -> None:
        """Record the encoder on this slot's input as a CUDA graph (one launch per batch)."""
        device = self.input.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_CALLS):
                encoder(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = encoder(self.input).contiguous()
        self.graph, self.output = graph, output

    def encode(self, encoder: FastEncoder, filled: int) -> torch.Tensor:
        """Embeddings of the first ``filled`` patches, queued on the current stream. A
        partial batch (a slide's last) runs eagerly on its rows alone rather than
        replaying the whole batch's graph."""
        if self.graph is not None and self.output is not None and filled == len(self.input):
            self.graph.replay()
            return self.output[:filled]
        return encoder(self.input[:filled]).contiguous()


# -- decoders -------------------------------------------------------------------------------


class CpuDecoder:
    """cuCIM (or tifffile, OpenSlide) decodes on a reader thread straight into a pinned
    staging slot (``out=``: no region-sized intermediate, no second copy)."""

    def __init__(self, job: SlideJob, ring: StagingRing, threads: int) -> None:
        self.level = job.level
        self.grid = job.grid
        self.handles = ReaderHandles(job.reader)
        self.ring = ring
        self.threads = threads
        self.lookahead = ring.count  # never more reads in flight than slots: no reader can starve the consumer

    def __call__(self, plan: RegionPlan) -> _Staged:
        slot = self.ring.acquire()
        read = read_region(self.handles.get(), self.level, plan, out=slot.pixel_view(plan.height, plan.width))
        staged = _Staged.checked(plan, self.grid, read.bad)
        if staged.plan.n_cells == 0:
            self.ring.release(slot)
            return staged
        slot.cells[: staged.plan.n_cells].numpy()[...] = staged.plan.level_px
        staged.slot = slot
        return staged

    def report(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.handles.close()


class _ThreadStreams:
    """One CUDA stream per decoding thread, so that decodes of different regions overlap."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()

    def get(self) -> torch.cuda.Stream:
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        return self._local.stream

    def ready(self) -> torch.cuda.Event:
        """An event after the work queued so far on this thread's stream."""
        event = torch.cuda.Event()
        event.record(self.get())
        return event


DeviceRead = tuple[torch.Tensor, Any, torch.cuda.Event]  # pixels, their memory's owner, written when this fires


class CucimDeviceReads:
    """cuCIM decodes a region on the GPU (nvJPEG; JPEG tiles only) into device memory."""

    name = "cucim"

    def __init__(self, path: Path, level: int, level_downsample: float, device: torch.device) -> None:
        self.path, self.level, self.level_downsample, self.device = path, level, level_downsample, device
        self._local = threading.local()
        self.streams = _ThreadStreams(device)

    def _image(self) -> Any:
        if not hasattr(self._local, "image"):
            from cucim import CuImage

            self._local.image = CuImage(str(self.path))
        return self._local.image

    def read(self, plan: RegionPlan, absent: list[tuple[int, int, int, int]]) -> DeviceRead:
        """A device uint8 (h, w, 3) tensor, the cuCIM object owning its memory, its event."""
        # cuCIM takes level-0 locations and floors them by the downsample: ceil lands on (y0, x0)
        location = (math.ceil(plan.x0 * self.level_downsample), math.ceil(plan.y0 * self.level_downsample))
        region = self._image().read_region(location=location, size=(plan.width, plan.height), level=self.level,
                                           device=f"cuda:{self.device.index}")
        pixels = torch.as_tensor(region, device=self.device)
        if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (plan.height, plan.width, RGB):
            raise SlideError(f"{self.path}: cuCIM's GPU decode returned {tuple(pixels.shape)} {pixels.dtype}, "
                             f"expected ({plan.height}, {plan.width}, 3) uint8; use --decode cpu")
        # cuCIM decodes on a stream of its own: wait for it before any stream of ours reads the pixels
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.streams.get()):
            for y0, x0, y1, x1 in absent:  # zero-length tiles are white, as on the CPU path
                pixels[y0 - plan.y0 : y1 - plan.y0, x0 - plan.x0 : x1 - plan.x0] = 255
        return pixels, region, self.streams.ready()

    def close(self) -> None:
        self._local = threading.local()


class TileDeviceReads:
    """nvImageCodec decodes the region's JPEG tiles, read from the file by nic-fast, in one
    batch on the GPU (:mod:`nic_fast.engine.tile_decode`); zero-length tiles stay white."""

    name = "nvimagecodec"

    def __init__(self, tiles: TiffTiles, level: JpegLevel, device: torch.device) -> None:
        self.tiles, self.level, self.device = tiles, level, device
        self.streams = _ThreadStreams(device)
        self._local = threading.local()

    def _reader(self) -> Any:
        """This thread's reader: nvImageCodec decoders are not shared between threads."""
        if not hasattr(self._local, "reader"):
            from nic_fast.engine.tile_decode import NvImageCodec, TileRegionReader

            self._local.reader = TileRegionReader(self.level, NvImageCodec(self.device.index))
        return self._local.reader

    def read(self, plan: RegionPlan, absent: list[tuple[int, int, int, int]]) -> DeviceRead:
        with torch.cuda.stream(self.streams.get()):
            pixels, images = self._reader().read_device(plan.y0, plan.x0, plan.height, plan.width, self.device)
        return pixels, images, self.streams.ready()

    def close(self) -> None:
        self.tiles.close()


GpuReads = CucimDeviceReads | TileDeviceReads


class GpuDecoder:
    """Regions decoded on the GPU into device memory, which the patchify kernel reads in place.

    Every region's tiles are checked first, as on the CPU path (``check_region``): a
    region with a corrupt tile, or whose GPU decode fails, is decoded by the CPU decoder
    instead, which isolates the bad tiles; a GPU failure never costs cells by itself.
    """

    def __init__(self, reads: GpuReads, job: SlideJob, fallback: CpuDecoder) -> None:
        self.reads, self.level, self.fallback = reads, job.level, fallback
        self.threads = GPU_DECODE_THREADS
        self.lookahead = min(2 * GPU_DECODE_THREADS, fallback.ring.count)  # a fallback needs a staging slot
        self.on_cpu: dict[str, int] = {}  # regions the CPU decoded instead, by reason
        self._lock = threading.Lock()  # the decode threads count into on_cpu

    def __call__(self, plan: RegionPlan) -> _Staged:
        check = self.fallback.handles.get().check_region(self.level, plan.y0, plan.x0, plan.height, plan.width)
        if check.bad:
            return self._on_cpu(plan, "corrupt tiles")
        try:
            pixels, owner, ready = self.reads.read(plan, check.absent)
        except Exception as exc:  # noqa: BLE001 - the CPU decoder reads this region instead
            if "gpu decode failed" not in self.on_cpu:  # once per slide: the count is in the store
                log.warning("%s: GPU decode failed at (y=%d, x=%d), decoding on the CPU instead (%s: %s)",
                            self.fallback.handles.reader.path, plan.y0, plan.x0, type(exc).__name__, exc)
            return self._on_cpu(plan, "gpu decode failed")
        return _Staged(plan, device_pixels=pixels, owner=owner, ready=ready, cells_read=plan.n_cells)

    def _on_cpu(self, plan: RegionPlan, reason: str) -> _Staged:
        with self._lock:
            self.on_cpu[reason] = self.on_cpu.get(reason, 0) + 1
        return self.fallback(plan)

    def report(self) -> dict[str, Any]:
        return {"decoder": self.reads.name, "regions_on_cpu_instead": dict(self.on_cpu)}

    def close(self) -> None:
        try:
            self.reads.close()
        finally:
            self.fallback.close()


class SplitDecoder:
    """The CPU reader threads and the GPU decode at once: each region goes to the side
    :class:`~nic_fast.engine.decode_split.DecodeSplit` expects to finish it first."""

    def __init__(self, cpu: CpuDecoder, gpu: GpuDecoder, split: DecodeSplit) -> None:
        self.cpu, self.gpu, self.split = cpu, gpu, split
        self.threads = split.capacity
        self.lookahead = cpu.ring.count  # any region in flight may hold a staging slot (a GPU one falls back)

    def __call__(self, plan: RegionPlan) -> _Staged:
        side = self.split.acquire()
        t0 = time.perf_counter()
        try:
            return (self.gpu if side == "gpu" else self.cpu)(plan)
        finally:
            self.split.release(side, time.perf_counter() - t0)

    def report(self) -> dict[str, Any]:
        return {"regions": self.split.shares(), **self.gpu.report()}

    def close(self) -> None:
        self.gpu.close()


Decoder = CpuDecoder | GpuDecoder | SplitDecoder


# -- the engine -----------------------------------------------------------------------------


class CudaEngine:
    """Streams slides through the device-resident pipeline on one GPU; reused across slides
    (streams, batch slots and captured graphs are made once)."""

    def __init__(self, config: EngineConfig) -> None:
        self.c = config
        index = config.device.index if config.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        self.compute = torch.cuda.Stream(self.device)
        self.upload = torch.cuda.Stream(self.device)
        self.download = torch.cuda.Stream(self.device)
        self.slots = [_BatchSlot(config.batch_size, config.channels, config.patch_px, config.dtype, self.device)
                      for _ in range(max(2, config.batches_in_flight))]
        self.graphs = config.cuda_graph and self._capture_graphs()
        self.captured_version = config.encoder.version  # the module the graphs replay
        self.background = torch.from_numpy(config.background).to(self.device)
        self._measured: dict[tuple[Any, ...], dict[str, Any]] = {}  # decode times by kind of level
        self._reference: Callable[[torch.Tensor], torch.Tensor] | None = None  # fp32 encoder for the error sample
        self._buffers: _SlideBuffers | None = None  # staging, device regions and tiles: reused by every slide

    def _capture_graphs(self) -> bool:
        try:
            for slot in self.slots:
                slot.capture(self.c.encoder)
        except RuntimeError as exc:  # an encoder with host syncs or dynamic shapes cannot be captured
            log.warning("cannot capture encoder %r as a CUDA graph (%s); running it eagerly",
                        self.c.encoder.spec.name, exc)
            for slot in self.slots:
                slot.graph = slot.output = None
            return False
        return True

    # -- per slide ------------------------------------------------------------------------
    def stream(self, job: SlideJob) -> StreamResult:
        self._settle_encoder()
        buffers = self.buffers(job)
        decoder, decode_attrs = self._decoder(job, buffers.ring)
        run = _SlideRun(self, job, decoder, buffers)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
                run.stream()
        finally:
            try:
                decoder.close()
            finally:
                run.close()
        attrs = {"precision": run.precision_attrs, "decode": {**decode_attrs, **decoder.report()},
                 "cuda_graph": self.graphs, "batches_in_flight": len(self.slots)}
        return StreamResult(run.failures.bad_cells, attrs)

    def _settle_encoder(self) -> None:
        """Let the encoder compile for this slide (when its patches repay it), then re-capture
        the graphs if the module they replay has changed."""
        with torch.cuda.device(self.device):
            self.c.encoder.settle(self.slots[0].input)
        if self.c.encoder.version != self.captured_version and self.c.cuda_graph:
            self.graphs = self._capture_graphs()
            self.captured_version = self.c.encoder.version

    def buffers(self, job: SlideJob) -> _SlideBuffers:
        """The pinned staging ring, device regions and tile pool, allocated once and reused
        by every slide (pinning ~1 GB costs about a second); made anew only when a slide
        needs larger regions than any before it."""
        height, width = max_region_px(job.grid, self.c.tile_cells)
        region_bytes = height * width * RGB
        if self._buffers is None or self._buffers.region_bytes < region_bytes:
            self._buffers = None  # free the smaller pinned buffers before pinning the new ones
            self._buffers = _SlideBuffers(self, region_bytes)
        return self._buffers

    def reference_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The (rewritten) encoder in fp32 on this device: what the half-precision error is
        measured against, on the same pooled patches."""
        if self._reference is None:
            self._reference = self.c.encoder.reference_module()
        return self._reference

    def _decoder(self, job: SlideJob, ring: StagingRing) -> tuple[Decoder, dict[str, Any]]:
        """This slide's decoder, decided from its level: the CPU threads alone (--decode
        cpu, a level that is not JPEG, no GPU decoder), the GPU alone (--decode gpu) or
        both at once, split by measured region times (auto)."""
        cpu = CpuDecoder(job, ring, self.c.workers)
        if self.c.decode == "cpu":
            return cpu, {"device": "cpu", "reason": "--decode cpu"}
        reads, kind, why = self._gpu_reads(job)
        if reads is None:
            return cpu, {"device": "cpu", "reason": why}
        gpu = GpuDecoder(reads, job, cpu)
        if self.c.decode == "gpu":
            return gpu, {"device": "gpu", "reason": "--decode gpu"}
        key = (reads.name, *kind)
        if key not in self._measured:
            self._measured[key] = _measure_decoders(job, cpu, gpu)
        measured = self._measured[key]
        if "gpu_region_s" not in measured:
            gpu.reads.close()
            return cpu, {"device": "cpu", **measured}
        split = DecodeSplit([Side("gpu", gpu.threads, measured["gpu_region_s"]),
                             Side("cpu", cpu.threads, measured["cpu_region_s"])])
        return SplitDecoder(cpu, gpu, split), {"device": "cpu+gpu", **measured}

    def _gpu_reads(self, job: SlideJob) -> tuple[GpuReads | None, tuple[Any, ...], str]:
        """A GPU decoder for the slide's level, the kind of level it is (what a measurement
        is kept for), or None and why not: GPU decoders take JPEG tiles only."""
        try:
            tiles = TiffTiles(job.reader.path, job.reader.level_dims)
        except Exception as exc:  # noqa: BLE001 - not a TIFF tifffile parses: no tiles to hand to a GPU decoder
            return None, (), f"GPU decode needs a TIFF's JPEG tiles; tifffile cannot parse it ({type(exc).__name__})"
        grid = tiles.grid(job.level)
        problem = jpeg_problem(tiles, grid)
        level = None if problem else JpegLevel.of(tiles, job.level)
        if level is None:
            tiles.close()
            return None, (), f"GPU decode needs JPEG tiles; level {job.level} has {problem}"
        kind = (level.rgb, level.grid.tile_h, level.grid.tile_w)
        if nvimgcodec_available():
            return TileDeviceReads(tiles, level, self.device), kind, ""
        tiles.close()
        if job.reader.backend == "cucim":
            return CucimDeviceReads(job.reader.path, job.level, job.reader.level_downsamples[job.level],
                                    self.device), kind, ""
        return None, (), "no GPU JPEG decoder: install nvImageCodec (pip install 'nic-fast[gpu]') or read with cuCIM"


def _measure_decoders(job: SlideJob, cpu: CpuDecoder, gpu: GpuDecoder) -> dict[str, Any]:
    """One region's decode time on each side, the split's starting point (it follows the
    observed times from there); a GPU that cannot decode the level leaves it to the CPU."""
    plans = [RegionPlan.of(job.grid, tile, cells) for tile, cells in job.tiles if len(cells)]
    if not plans:
        return {"reason": "no tissue to measure"}
    plan = max(plans, key=lambda p: p.height * p.width)

    def on_cpu() -> None:
        staged = cpu(plan)
        if staged.slot is not None:
            cpu.ring.release(staged.slot)

    def on_gpu() -> None:
        gpu.reads.read(plan, [])[2].synchronize()

    cpu_s = _best_of(on_cpu)
    found = {"region_px": [plan.height, plan.width], "cpu_region_s": round(cpu_s, 5), "cpu_threads": cpu.threads}
    try:
        on_gpu()  # the first GPU decode initialises the codec
        gpu_s = _best_of(on_gpu)
    except Exception as exc:  # noqa: BLE001 - no GPU codec for this file: decode on the CPU
        return {**found, "reason": f"GPU decode unavailable ({type(exc).__name__}: {exc})"}
    return {**found, "reason": "measured", "decoder": gpu.reads.name, "gpu_region_s": round(gpu_s, 5),
            "gpu_threads": gpu.threads}


def _best_of(read: Callable[[], Any]) -> float:
    best = math.inf
    for _ in range(DECODE_PROBE_READS):
        t0 = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t0)
    return best


class _SlideBuffers:
    """What every slide of an engine streams through: the pinned staging ring, two device
    region buffers and the device/pinned tile pool, sized for ``region_bytes``."""

    def __init__(self, engine: CudaEngine, region_bytes: int) -> None:
        c = engine.c
        max_cells = c.tile_cells ** 2
        self.region_bytes = region_bytes
        self.ring = StagingRing(c.workers + 2 + 2 * GPU_DECODE_THREADS, region_bytes, max_cells, pin=True)
        self.regions = [_DeviceRegion(torch.empty(region_bytes, dtype=torch.uint8, device=engine.device),
                                      torch.empty((max_cells, 2), dtype=torch.int32, device=engine.device),
                                      torch.cuda.Event()) for _ in range(2)]
        for region in self.regions:
            region.free.record(engine.compute)
        self.tiles = _TilePool(2 * (c.workers + 2), len(c.variants) * max_cells * c.code_size, engine.device)


def _host_event() -> torch.cuda.Event:
    """An event a host thread waits on: blocking, so the waiting thread sleeps instead of
    spinning on a core that the decoders need."""
    return torch.cuda.Event(blocking=True)


class _SlideRun:
    """The state of one slide on the GPU: the decoder, writer and releaser, the partial
    batch; the buffers are the engine's (:class:`_SlideBuffers`)."""

    def __init__(self, engine: CudaEngine, job: SlideJob, decoder: Decoder, buffers: _SlideBuffers) -> None:
        self.e, self.c, self.job, self.decoder = engine, engine.c, job, decoder
        self.timings: Timings = job.timings
        self.ring, self.regions, self.tiles = buffers.ring, buffers.regions, buffers.tiles
        self.next_region = 0
        self.stages = _StageTimer(engine.compute)
        self.writer = TileWriter(job.store, max_pending=len(self.tiles.device_buffers))
        self.releaser = EventReleaser()
        self.batch = _DeviceBatch(self)
        self.failures = ReadFailures()
        self.bad_values = torch.zeros((), dtype=torch.int64, device=engine.device)  # non-finite embeddings, counted on the GPU
        self.precision_attrs: dict[str, Any] = {"dtype": str(self.c.dtype).removeprefix("torch.")}
        self.wait = {"batch_wait_s": 0.0, "tile_wait_s": 0.0}

    def stream(self) -> None:
        decoder = self.decoder
        with ThreadPoolExecutor(decoder.threads, thread_name_prefix="nic-fast-read") as pool:
            in_flight: deque[Future[_Staged]] = deque()
            for tile, cells in self.job.tiles:
                if len(cells) == 0:
                    h, w = tile.shape
                    self.writer.put(WriteJob(tile, background_tile(self.c, tile), np.ones((h, w), bool)))
                    continue
                in_flight.append(pool.submit(decoder, RegionPlan.of(self.job.grid, tile, cells)))
                if len(in_flight) >= decoder.lookahead:
                    self._consume(in_flight.popleft())
            while in_flight:
                self._consume(in_flight.popleft())
        self.batch.flush()
        self.failures.check(self.job.reader)
        bad = int(self.bad_values)  # the one host sync of the check, once per slide
        if bad:
            raise_bad_values(self.c, bad, self.batch.encoded * self.c.code_size)

    def close(self) -> None:
        """Wait for the queued work, then let the writer and releaser finish."""
        try:
            self.e.compute.synchronize()
            self.e.download.synchronize()
            self.timings.patchify_s, self.timings.encode_s = self.stages.seconds("patchify", "encode")
        finally:
            try:
                self.writer.close()
            finally:
                self.releaser.close()
                self.timings.extra.update(self.wait)

    def _consume(self, future: Future[_Staged]) -> None:
        t0 = time.perf_counter()
        staged = future.result()
        self.timings.read_wait_s += time.perf_counter() - t0
        plan = staged.plan
        tile = self._device_tile(plan.tile)
        self.failures.add(staged.cells_read, staged.reasons)
        if len(staged.failed_cells):
            tile.valid[staged.failed_cells[:, 0], staged.failed_cells[:, 1]] = False
            for reason, n in staged.reasons.items():
                tile.invalid[reason] = tile.invalid.get(reason, 0) + n
        if plan.n_cells == 0:  # the tile's only region: it is finished, its tissue cells not valid
            self.finish_tile(tile)
            return
        if staged.slot is not None:
            region, cells, buffer = self._upload(staged.slot, plan)
        else:
            assert staged.device_pixels is not None and staged.ready is not None
            self.e.compute.wait_event(staged.ready)  # the decode stream has written the pixels
            region, cells, buffer = staged.device_pixels, torch.from_numpy(plan.level_px).to(self.e.device), None
        self.batch.add(region, cells, plan, tile)
        read_done = _host_event()
        read_done.record(self.e.compute)
        if buffer is not None:
            buffer.free = read_done
        else:  # keep the decoder's device memory alive until the kernels reading it have run
            self.releaser.put(read_done.synchronize, partial(_drop, staged))

    def _upload(self, slot: StagingSlot, plan: RegionPlan) -> tuple[torch.Tensor, torch.Tensor, _DeviceRegion]:
        """Copy a staged region to the next device region buffer on the upload stream."""
        buffer = self.regions[self.next_region]
        self.next_region = (self.next_region + 1) % len(self.regions)
        n_bytes = plan.height * plan.width * RGB
        with torch.cuda.stream(self.e.upload):
            self.e.upload.wait_event(buffer.free)  # the kernels reading its last region are done
            buffer.pixels[:n_bytes].copy_(slot.pixels[:n_bytes], non_blocking=True)
            buffer.cells[: plan.n_cells].copy_(slot.cells[: plan.n_cells], non_blocking=True)
            copied = _host_event()
            copied.record(self.e.upload)
        self.releaser.put(copied.synchronize, partial(self.ring.release, slot))
        self.e.compute.wait_event(copied)
        return buffer.pixels[:n_bytes].view(plan.height, plan.width, RGB), buffer.cells[: plan.n_cells], buffer

    def _device_tile(self, tile: Tile) -> _DeviceTile:
        """A device tile filled with the background embedding, from the pool. When none is
        free, the partial batch is encoded first: its tiles are what holds the pool."""
        index = self.tiles.try_acquire()
        if index is None:
            self.batch.flush()
            t0 = time.perf_counter()
            index = self.tiles.acquire()
            self.wait["tile_wait_s"] += time.perf_counter() - t0
        h, w = tile.shape
        shape = (len(self.c.variants), h, w, self.c.code_size)
        numel = math.prod(shape)
        embeddings = self.tiles.device_buffers[index][:numel].view(shape)
        embeddings.copy_(self.e.background.expand(shape))
        host = self.tiles.host_buffers[index][:numel].view(shape)
        return _DeviceTile(tile, index, embeddings, host, np.ones((h, w), bool), pending=0)

    def scattered(self, tile: _DeviceTile, count: int) -> None:
        """``count`` of the tile's patch embeddings are queued into it; the last finishes it."""
        tile.pending -= count
        if tile.pending == 0:
            self.finish_tile(tile)

    def finish_tile(self, tile: _DeviceTile) -> None:
        """Queue the tile's copy to the host; the writer waits for it, writes, and frees it."""
        scattered = torch.cuda.Event()
        scattered.record(self.e.compute)
        with torch.cuda.stream(self.e.download):
            self.e.download.wait_event(scattered)
            tile.host.copy_(tile.embeddings, non_blocking=True)
            copied = _host_event()
            copied.record(self.e.download)
        self.writer.put(WriteJob(tile.tile, tile.host.numpy(), tile.valid, tile.invalid, tile.patches,
                                 ready=copied.synchronize,
                                 release=partial(self.tiles.release, tile.buffer)))


def _drop(staged: _Staged) -> None:
    staged.device_pixels = staged.owner = None


class _StageTimer:
    """Device time of the patchify and encode kernels, from event pairs on the compute
    stream (host timers would only see the asynchronous launches); read once at the end
    of a slide, after the stream has finished."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self.pairs: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def stop(self, stage: str, start: torch.cuda.Event) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self.pairs.setdefault(stage, []).append((start, end))

    def seconds(self, *stages: str) -> tuple[float, ...]:
        return tuple(sum(a.elapsed_time(b) for a, b in self.pairs.get(stage, [])) / 1e3 for stage in stages)


class _DeviceBatch:
    """Fills batch slots with patches from many regions, encodes each when full, and
    scatters the embeddings into their device tiles; at most ``len(slots)`` batches are
    queued on the GPU at once."""

    def __init__(self, run: _SlideRun) -> None:
        self.run = run
        self.e, self.c = run.e, run.c
        self.index = 0
        self.filled = 0
        self.parts: list[tuple[_DeviceTile, int, np.ndarray, int, int]] = []  # tile, variant, cells, start, count
        self.sample = self.c.dtype != torch.float32  # measure the half-precision error on this slide's first batch
        self.reference_input: torch.Tensor | None = None
        self.encoded = 0  # patches encoded on this slide

    @property
    def slot(self) -> _BatchSlot:
        return self.e.slots[self.index]

    def add(self, region: torch.Tensor, cells: torch.Tensor, plan: RegionPlan, tile: _DeviceTile) -> None:
        tile.pending += plan.n_cells * len(self.c.variants)
        tile.patches += plan.n_cells * len(self.c.variants)
        capacity = len(self.slot.input)
        for variant in self.c.variants:
            start = 0
            while start < plan.n_cells:
                count = min(plan.n_cells - start, capacity - self.filled)
                rows = slice(self.filled, self.filled + count)
                self._patchify(region, cells[start : start + count], self.slot.input[rows], plan.level_px[start : start + count], variant)
                if self.sample:
                    self._patchify(region, cells[start : start + count], self._reference_input()[rows],
                                   plan.level_px[start : start + count], variant)
                self.parts.append((tile, variant, plan.local_cells[start : start + count], self.filled, count))
                self.filled += count
                start += count
                if self.filled == capacity:
                    self.flush()

    def _patchify(self, region: torch.Tensor, cells: torch.Tensor, out: torch.Tensor, host_cells: np.ndarray,
                  variant: int) -> None:
        start = self.run.stages.start()
        self._launch_patchify(region, cells, out, host_cells, variant)
        self.run.stages.stop("patchify", start)

    def _launch_patchify(self, region: torch.Tensor, cells: torch.Tensor, out: torch.Tensor, host_cells: np.ndarray,
                         variant: int) -> None:
        kernels.patchify(region, cells, out, scale=self.c.scale, offset=self.c.offset, downsample=self.run.job.downsample * self.c.pool_px,
                         dihedral=variant, host_cells=host_cells)

    def _reference_input(self) -> torch.Tensor:
        if self.reference_input is None:
            self.reference_input = torch.empty(self.slot.input.shape, dtype=torch.float32, device=self.e.device
                                               ).contiguous(memory_format=torch.channels_last)
        return self.reference_input

    def flush(self) -> None:
        if self.filled == 0:
            return
        slot, filled = self.slot, self.filled
        start = self.run.stages.start()
        embeddings = slot.encode(self.c.encoder, filled)
        self.run.stages.stop("encode", start)
        self.run.bad_values += (~(embeddings.abs() <= FLOAT16_MAX)).sum()  # NaN compares False: counted
        self.encoded += filled
        host_cells = slot.host_cells.numpy()
        for _, _, cells, start, count in self.parts:
            host_cells[start : start + count] = cells
        slot.cells[:filled].copy_(slot.host_cells[:filled], non_blocking=True)
        if self.sample:
            self._measure_error(embeddings)
        for tile, variant, cells, start, count in self.parts:
            kernels.scatter(embeddings[start : start + count], slot.cells[start : start + count],
                            tile.embeddings[variant], host_cells=cells)
            self.run.scattered(tile, count)
        slot.done.record(self.e.compute)
        if self.run.job.progress:
            self.run.job.progress(filled)
        self.parts.clear()
        self.filled = 0
        self.index = (self.index + 1) % len(self.e.slots)
        t0 = time.perf_counter()
        self.slot.done.synchronize()  # back-pressure: the slot's previous batch has left the GPU
        self.run.wait["batch_wait_s"] += time.perf_counter() - t0

    def _measure_error(self, embeddings: torch.Tensor) -> None:
        """Relative L2 and max-abs error of this batch's embeddings against the fp32 encoder
        on fp32 patches of the same pixels (one host sync, once per slide)."""
        n = len(embeddings)
        assert self.reference_input is not None
        reference = self.e.reference_encoder()(self.reference_input[:n]).float()
        error = embeddings.float() - reference
        self.run.precision_attrs.update({
            "reference": "float32 encoder on float32 patches",
            "sample_patches": n,
            "relative_l2_error": float(error.norm() / reference.norm().clamp_min(1e-30)),
            "max_abs_error": float(error.abs().max()),
        })
        self.sample = False
        self.reference_input = None

"""`compress`: slides in, one Zarr store per slide out, as a pipeline.

Per slide: open a reader, pick the pyramid level by µm/px, find tissue on a thumbnail,
then stream the tissue tiles through

    reader threads (large grid-aligned region reads, own handle each, bounded look-ahead)
      → patchify kernel (downsample, dihedral, normalise) straight into the encoder batch
      → encoder → scatter kernel into the tile → writer thread (one Zarr chunk per tile)

so reading the next regions overlaps encoding the current batch and memory stays flat
whatever the slide size. Every failure is confined to its slide (or, for an unreadable
region, to its cells, which the store marks not ``valid``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic_fast import __version__, kernels
from nic_fast.encoders import Encoder, load_encoder
from nic_fast.grid import DIHEDRAL, GridGeometry, Tile
from nic_fast.slides import SlideError, SlideReader, choose_level, load_mpp_csv, open_slide, resolve_slide_mpp
from nic_fast.store import StoreWriter, is_complete, store_path
from nic_fast.tissue import TissueMap, detect_tissue

__all__ = ["CompressOptions", "Compressor", "SlideResult", "write_summary"]

log = logging.getLogger(__name__)

MAX_THUMBNAIL_PX = 4096


@dataclass
class CompressOptions:
    """What `nic-fast compress` is asked to do; the CLI maps its flags one to one."""

    encoder: str = "mean-rgb"
    mpp: float = 0.5  # working resolution, µm/px
    mpp_tolerance: float = 0.1  # relative
    patch_px: int | None = None  # default: the encoder's input size
    stride_px: int | None = None  # default: patch_px
    augment: bool = False  # all 8 dihedral variants
    batch_size: int = 128
    workers: int = 2  # reader threads, each with its own slide handle
    device: str = "cpu"
    slide_mpp: float | None = None
    slide_mpp_csv: Path | None = None
    overwrite: bool = False
    min_tissue: float = 0.1  # tissue fraction for a cell to be encoded
    tile_cells: int = 16  # cells per tile side: one region read and one Zarr chunk
    background: str = "blank"  # "blank": embedding of a white patch; "zero": zeros
    thumb_px_per_cell: int = 8  # enough for the tissue mask; keeps the thumbnail read to a coarse level


@dataclass
class SlideResult:
    slide: str
    status: str  # ok | skipped | failed
    reason: str = ""
    store: str | None = None
    seconds: float = 0.0
    patches: int = 0
    patches_per_s: float = 0.0
    grid_shape: tuple[int, int] | None = None
    tissue_fraction: float | None = None
    invalid_cells: int = 0


ProgressFn = Callable[[int], None]


def _header_sha256(path: Path, n_bytes: int = 1 << 20) -> str:
    """Hash of the file's first MiB: identifies the slide without reading gigabytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n_bytes)).hexdigest()


@dataclass
class _TileWork:
    """One tile in flight: its grid block, filled as batches come back from the encoder."""

    tile: Tile
    embeddings: np.ndarray  # float16 (A, h, w, C), background pre-filled
    valid: np.ndarray  # bool (h, w)
    pending: int = 0  # patch encodings not yet scattered


@dataclass
class _Region:
    work: _TileWork
    local_cells: np.ndarray  # int32 (n, 2): cells' (i, j) within the tile
    level_px: np.ndarray  # int32 (n, 2): cells' top-left pixel within the region
    pixels: np.ndarray | None  # uint8 (h, w, 3), None when the read failed
    error: str = ""


@dataclass
class _Timings:
    read_wait_s: float = 0.0
    patchify_s: float = 0.0
    encode_s: float = 0.0
    thumbnail_s: float = 0.0
    total_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class _Batcher:
    """Fills a fixed encoder batch with patches from many regions, encodes it when full,
    and scatters the embeddings back into their tiles."""

    def __init__(self, compressor: Compressor, on_tile_done: Callable[[_TileWork], None], timings: _Timings,
                 progress: ProgressFn | None) -> None:
        self.c = compressor
        self.on_tile_done = on_tile_done
        self.timings = timings
        self.progress = progress
        self.batch = compressor.new_batch()
        self.filled = 0
        self.parts: list[tuple[_TileWork, int, np.ndarray, int, int]] = []  # work, variant, cells, start, count

    def add(self, region: _Region, variants: Iterable[int]) -> None:
        assert region.pixels is not None
        n = len(region.local_cells)
        for variant in variants:
            start = 0
            while start < n:
                count = min(n - start, len(self.batch) - self.filled)
                t0 = time.perf_counter()
                kernels.patchify(region.pixels, region.level_px[start : start + count],
                                 self.batch[self.filled : self.filled + count], scale=self.c.scale,
                                 offset=self.c.offset, downsample=self.c.downsample, dihedral=variant)
                self.timings.patchify_s += time.perf_counter() - t0
                self.parts.append((region.work, variant, region.local_cells[start : start + count], self.filled, count))
                self.filled += count
                start += count
                if self.filled == len(self.batch):
                    self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        t0 = time.perf_counter()
        embeddings = self.c.encode(self.batch[: self.filled])
        self.timings.encode_s += time.perf_counter() - t0
        for work, variant, cells, start, count in self.parts:
            kernels.scatter(embeddings[start : start + count], cells, work.embeddings[variant])
            work.pending -= count
            if work.pending == 0:
                self.on_tile_done(work)
        if self.progress:
            self.progress(self.filled)
        self.parts.clear()
        self.filled = 0


class _Writer:
    """Writes finished tiles on its own thread, so Zarr compression overlaps encoding."""

    def __init__(self, store: StoreWriter, max_pending: int) -> None:
        self.store = store
        self.queue: queue.Queue[_TileWork | None] = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="nic-fast-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (work := self.queue.get()) is not None:
            if self.error is None:
                try:
                    t = work.tile
                    self.store.write_tile(t.row, t.col, t.i0, t.j0, work.embeddings, work.valid)
                except BaseException as exc:  # reported by close(); keeps draining so producers never block
                    self.error = exc

    def put(self, work: _TileWork) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(work)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Compressor:
    """Compresses slides with one loaded encoder; reusable across many slides."""

    def __init__(self, options: CompressOptions) -> None:
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SlideError("--device cuda was given but PyTorch sees no CUDA device; use --device cpu")
        half = self.device.type == "cuda"
        self.encoder: Encoder = load_encoder(options.encoder, device="cpu").to(self.device, torch.float16 if half else None)
        spec = self.encoder.spec
        self.patch_px = options.patch_px or spec.input_px
        if self.patch_px != spec.input_px:
            raise ValueError(f"--patch-px {self.patch_px} does not match encoder {spec.name!r}, which takes "
                             f"{spec.input_px}-px patches; leave --patch-px out or pick another encoder")
        self.stride_px = options.stride_px or self.patch_px
        scale, offset = spec.scale_offset()
        self.scale, self.offset = list(scale), list(offset)
        self.mpp_table = load_mpp_csv(options.slide_mpp_csv) if options.slide_mpp_csv else None
        self.variants = DIHEDRAL if options.augment else (0,)
        self.downsample = 1  # set per slide
        self.background = self._background_embedding()

    # -- encoder ------------------------------------------------------------------
    def new_batch(self) -> torch.Tensor:
        """The reusable patch buffer the kernel writes into: channels-last on CPU (what
        oneDNN convolutions want), pinned for an asynchronous copy when encoding on CUDA."""
        spec = self.encoder.spec
        shape = (self.options.batch_size, spec.channels, self.patch_px, self.patch_px)
        if self.device.type == "cuda":
            return torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return torch.empty(shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last)

    def encode(self, patches: torch.Tensor) -> np.ndarray:
        """(N, C, P, P) normalised patches → float32 (N, code_size) on the host."""
        with torch.inference_mode():
            x = patches.to(self.device, non_blocking=True)
            out = self.encoder(x)
        return out.float().cpu().numpy()

    def _background_embedding(self) -> np.ndarray:
        code_size = self.encoder.spec.code_size
        if self.options.background == "zero":
            return np.zeros(code_size, np.float16)
        if self.options.background != "blank":
            raise ValueError(f"background must be 'blank' or 'zero', got {self.options.background!r}")
        channels = self.encoder.spec.channels
        white = np.full((self.patch_px, self.patch_px, channels), 255, np.uint8)
        batch = torch.empty((1, channels, self.patch_px, self.patch_px))
        kernels.patchify(white, np.zeros((1, 2), np.int32), batch, scale=self.scale, offset=self.offset)
        return self.encode(batch)[0].astype(np.float16)

    # -- slides -------------------------------------------------------------------
    def run(self, slides: list[Path], out_dir: Path, *, on_slide_start: Callable[[Path, int], None] | None = None,
            progress: ProgressFn | None = None, on_slide_done: Callable[[SlideResult], None] | None = None,
            ) -> list[SlideResult]:
        """Compress every slide; a failure is recorded and the batch goes on."""
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for slide in slides:
            result = self.compress_slide(Path(slide), out_dir, on_start=on_slide_start, progress=progress)
            results.append(result)
            if on_slide_done:
                on_slide_done(result)
        write_summary(out_dir, results, self.options)
        return results

    def compress_slide(self, slide: Path, out_dir: Path, *, on_start: Callable[[Path, int], None] | None = None,
                       progress: ProgressFn | None = None) -> SlideResult:
        final = store_path(out_dir, slide)
        if is_complete(final) and not self.options.overwrite:
            return SlideResult(str(slide), "skipped", "complete store exists (use --overwrite to redo)", str(final))
        t0 = time.perf_counter()
        try:
            result = self._compress(slide, final, on_start, progress)
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            log.debug("slide %s failed", slide, exc_info=True)
            return SlideResult(str(slide), "failed", f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
        result.seconds = time.perf_counter() - t0
        result.patches_per_s = result.patches / result.seconds if result.seconds > 0 else 0.0
        return result

    def _compress(self, slide: Path, final: Path, on_start: Callable[[Path, int], None] | None,
                  progress: ProgressFn | None) -> SlideResult:
        if not slide.is_file():
            raise SlideError(f"{slide}: no such file")
        timings = _Timings()
        t_start = time.perf_counter()
        slide_mpp = resolve_slide_mpp(slide, self.options.slide_mpp, self.mpp_table)
        with open_slide(slide, slide_mpp=slide_mpp) as reader:
            level_mpps = [reader.level_mpp(level) for level in range(reader.level_count)]
            choice = choose_level(level_mpps, self.options.mpp, self.options.mpp_tolerance, slide=slide.name)
            self.downsample = choice.downsample
            level_h, level_w = reader.level_dims[choice.level]
            grid = GridGeometry.over_level(level_h, level_w, patch_px=self.patch_px, stride_px=self.stride_px,
                                           downsample=choice.downsample)
            t0 = time.perf_counter()
            thumbnail, thumb_downsample = self._thumbnail(reader, choice.level, grid)
            tissue = detect_tissue(thumbnail, grid, min_fraction=self.options.min_tissue,
                                   thumb_px_per_level_px=reader.level_downsamples[choice.level] / thumb_downsample)
            timings.thumbnail_s = time.perf_counter() - t0
            n_cells = int(tissue.cells.sum())
            if n_cells == 0:
                log.warning("%s: no tissue found; writing an empty store", slide)
            if on_start:
                on_start(slide, n_cells * len(self.variants))
            attrs = self._attrs(slide, reader, choice, grid, tissue, thumb_downsample)
            config = {key: attrs[key] for key in ("source", "mpp", "level", "downsample", "patch_px", "stride_px",
                                                  "augmentations", "min_tissue", "background", "tile_cells")}
            config["encoder_sha256"] = self.encoder.spec.sha256
            store = StoreWriter(final, variants=len(self.variants), grid_shape=grid.shape,
                                code_size=self.encoder.spec.code_size, tile_cells=self.options.tile_cells,
                                thumbnail=thumbnail, tissue=tissue.cells, attrs=attrs, config=config)
            try:
                invalid = self._stream_tiles(reader, choice.level, grid, tissue, store, timings, progress)
            finally:
                store.close()
        timings.total_s = time.perf_counter() - t_start
        patches = n_cells * len(self.variants)
        extra = {"timings": {k: round(v, 4) for k, v in asdict(timings).items() if k != "extra"},
                 "invalid_cells": invalid, "valid_fraction": 1.0 - invalid / max(1, grid.height * grid.width)}
        store.publish(extra, overwrite=self.options.overwrite)
        return SlideResult(str(slide), "ok", store=str(final), patches=patches, grid_shape=grid.shape,
                           tissue_fraction=tissue.tissue_fraction, invalid_cells=invalid)

    def _thumbnail(self, reader: SlideReader, level: int, grid: GridGeometry) -> tuple[np.ndarray, float]:
        """Thumbnail with ``thumb_px_per_cell`` pixels per cell stride (capped in size), and
        its downsample relative to level 0."""
        level0_stride = grid.level_stride_px * reader.level_downsamples[level]
        height0, width0 = reader.level_dims[0]
        downsample = max(level0_stride / self.options.thumb_px_per_cell, max(height0, width0) / MAX_THUMBNAIL_PX, 1.0)
        return reader.thumbnail(downsample), downsample

    def _attrs(self, slide: Path, reader: SlideReader, choice: Any, grid: GridGeometry, tissue: TissueMap,
               thumb_downsample: float) -> dict[str, Any]:
        spec = self.encoder.spec
        return {
            "nic_fast_version": __version__,
            "source": {"path": str(slide.resolve()), "name": slide.name, "size_bytes": slide.stat().st_size,
                       "header_sha256": _header_sha256(slide), "reader": reader.backend},
            "scanned_mpp": reader.mpp,
            "mpp": choice.working_mpp,
            "level": choice.level,
            "level_mpp": choice.level_mpp,
            "downsample": choice.downsample,
            "patch_px": self.patch_px,
            "stride_px": self.stride_px,
            "code_size": spec.code_size,
            "encoder": {**spec.to_json(), "source": self.encoder.source},
            "augmentations": [f"dihedral-{k}" for k in self.variants],
            "dihedral_convention": "variant k stores E(T_k(patch)) at the cell's identity position; "
                                   "T_k(a) = rot90(fliplr(a) if k >= 4 else a, k % 4)",
            "grid_shape": list(grid.shape),
            "tissue_fraction": tissue.tissue_fraction,
            "tissue_threshold": tissue.threshold,
            "min_tissue": self.options.min_tissue,
            "background": self.options.background,
            "background_embedding": "embedding of a white patch" if self.options.background == "blank" else "zeros",
            "tile_cells": self.options.tile_cells,
            "thumbnail_downsample": thumb_downsample,
        }

    # -- the pipeline ---------------------------------------------------------------
    def _stream_tiles(self, reader: SlideReader, level: int, grid: GridGeometry, tissue: TissueMap,
                      store: StoreWriter, timings: _Timings, progress: ProgressFn | None) -> int:
        """Run all unfinished tiles of a slide through read → patchify → encode → write.
        Returns the number of cells whose pixels could not be read."""
        workers = max(1, self.options.workers)
        writer = _Writer(store, max_pending=2 * workers + 2)
        batcher = _Batcher(self, writer.put, timings, progress)
        local = threading.local()
        handles: list[SlideReader] = []
        handles_lock = threading.Lock()

        def thread_reader() -> SlideReader:
            if not hasattr(local, "reader"):
                local.reader = reader.reopen()
                with handles_lock:
                    handles.append(local.reader)
            return local.reader

        def read(work: _TileWork, cells: np.ndarray) -> _Region:
            i_min, j_min = cells.min(axis=0)
            i_max, j_max = cells.max(axis=0)
            y0, x0 = grid.level_origin(int(i_min), int(j_min))
            height = (int(i_max - i_min)) * grid.level_stride_px + grid.level_patch_px
            width = (int(j_max - j_min)) * grid.level_stride_px + grid.level_patch_px
            level_px = np.ascontiguousarray((cells - (i_min, j_min)) * grid.level_stride_px, dtype=np.int32)
            local_cells = np.ascontiguousarray(cells - (work.tile.i0, work.tile.j0), dtype=np.int32)
            try:
                pixels = thread_reader().read_region(level, y0, x0, height, width)
            except Exception as exc:  # noqa: BLE001 - a decode error costs these cells, not the slide
                return _Region(work, local_cells, level_px, None, f"{type(exc).__name__}: {exc}")
            return _Region(work, local_cells, level_px, np.ascontiguousarray(pixels))

        invalid = 0
        failed_regions: list[str] = []
        read_regions = 0
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="nic-fast-read") as pool:
                in_flight: deque[Future[_Region]] = deque()
                for work, cells in self._tile_jobs(grid, tissue, store):
                    if len(cells) == 0:
                        writer.put(work)
                        continue
                    in_flight.append(pool.submit(read, work, cells))
                    if len(in_flight) >= 2 * workers:
                        invalid += self._consume(in_flight.popleft(), batcher, timings, failed_regions)
                        read_regions += 1
                while in_flight:
                    invalid += self._consume(in_flight.popleft(), batcher, timings, failed_regions)
                    read_regions += 1
            batcher.flush()
        finally:
            writer.close()
            for handle in handles:
                handle.close()
        if failed_regions and len(failed_regions) == read_regions:
            raise SlideError(f"{reader.path}: no region could be read ({failed_regions[0]})")
        for reason in failed_regions[:3]:
            log.warning("%s: region read failed, cells marked invalid: %s", reader.path, reason)
        return invalid

    def _tile_jobs(self, grid: GridGeometry, tissue: TissueMap, store: StoreWriter,
                   ) -> Iterator[tuple[_TileWork, np.ndarray]]:
        """Unfinished tiles with their tissue cells (global (i, j)), background pre-filled."""
        for tile in grid.tiles(self.options.tile_cells):
            if (tile.row, tile.col) in store.done_tiles:
                continue
            h, w = tile.shape
            embeddings = np.empty((len(self.variants), h, w, self.encoder.spec.code_size), np.float16)
            embeddings[...] = self.background
            block = tissue.cells[tile.i0 : tile.i1, tile.j0 : tile.j1]
            cells = np.argwhere(block) + (tile.i0, tile.j0)
            work = _TileWork(tile, embeddings, np.ones((h, w), bool), pending=len(cells) * len(self.variants))
            yield work, cells

    def _consume(self, future: Future[_Region], batcher: _Batcher, timings: _Timings, failed: list[str]) -> int:
        t0 = time.perf_counter()
        region = future.result()
        timings.read_wait_s += time.perf_counter() - t0
        if region.pixels is None:
            failed.append(region.error)
            work = region.work
            work.valid[region.local_cells[:, 0], region.local_cells[:, 1]] = False
            work.pending -= len(region.local_cells) * len(self.variants)
            if work.pending == 0:
                batcher.on_tile_done(work)
            return len(region.local_cells)
        batcher.add(region, self.variants)
        return 0


def write_summary(out_dir: Path, results: list[SlideResult], options: CompressOptions) -> Path:
    """``OUT/summary.json``: every slide with its status, reason, time and patches/s."""
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "skipped", "failed")}
    summary = {
        "nic_fast_version": __version__,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "counts": counts,
        "slides": [asdict(r) for r in results],
    }
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path

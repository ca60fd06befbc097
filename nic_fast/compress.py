"""One slide through an engine: open it, pick the level, find tissue, stream, publish.

Per slide: open a reader, pick the pyramid level by µm/px, find tissue on a thumbnail,
then stream the tissue tiles through an engine (:mod:`nic_fast.engine.cpu` on the host,
:mod:`nic_fast.engine.cuda` device-resident on a GPU) into a store that is published
only when complete. Every failure is confined to its slide (or, for an unreadable
region, to its cells, which the store marks not ``valid``). Many slides, claims,
records and worker processes are :mod:`nic_fast.batch`'s business.

Plain images (``mpp=None``, the CLI's ``--mpp none``) are read in pixel units through
the image backend: level 0, no resampling, no µm/px checks, the store's µm/px attributes
null. Grayscale images keep one channel and need a one-channel encoder. A saturation
tissue mask means nothing on a grayscale image (everything has saturation 0), so every
cell of one is encoded; its thumbnail is stored as three equal channels, as the store's
contract asks. Plain images are held in memory and cut into patches on the host, so
they always take the CPU engine (the encoder itself still runs on ``device``).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic_fast import __version__, kernels
from nic_fast.encoders import Encoder, EncoderError, load_encoder
from nic_fast.engine.base import (
    Engine,
    EncoderOutputError,
    EngineConfig,
    ProgressFn,
    SlideJob,
    Timings,
    check_output,
)
from nic_fast.engine.cpu import CpuEngine
from nic_fast.engine.fastpath import FastEncoder
from nic_fast.annotations import MaskFileError, find_mask_for, read_tissue_mask, tissue_geojson, write_geojson
from nic_fast.grid import DIHEDRAL, GridGeometry, Tile
from nic_fast.job import (
    AUTO_BATCH_CAP,
    DECODERS,
    MPP_FROM_ENCODER,
    PRECISION_DTYPES,
    CompressOptions,
    SlideResult,
    available_cpus,
    source_identity,
)
from nic_fast.slides import SlideError, SlideReader, choose_level, load_mpp_csv, open_slide, resolve_slide_mpp
from nic_fast.store import CellGeometry, ClaimLost, StoreError, StoreWriter
from nic_fast.tissue import TissueMap, detect_tissue, tissue_from_mask

__all__ = ["CompressOptions", "Compressor", "SlideResult", "failure_reason"]

log = logging.getLogger(__name__)

MAX_THUMBNAIL_PX = 4096
PRECISIONS = {name: getattr(torch, dtype) for name, dtype in PRECISION_DTYPES.items()}
CPU_READER_THREADS = 2  # on the CPU the encoder needs the cores too
SMALL_ENCODER_PARAMETERS = 20_000_000  # below this and SMALL_ENCODER_PX, --batch-size auto takes the CPU cap
SMALL_ENCODER_PX = 192
PREFETCH_SLIDES = 2  # the slide about to be claimed and the one after it


def failure_reason(exc: BaseException) -> str:
    """One line for a failed slide: our own errors say what to do already; others keep
    their type so a bug is recognisable."""
    if isinstance(exc, (SlideError, StoreError, EncoderError, EncoderOutputError, MaskFileError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ReadPlanLevel:
    """Which level a slide is read at and by how much it is box-downsampled; the µm/px
    are None for a plain image read in pixel units."""

    level: int
    downsample: int
    level_mpp: float | None
    working_mpp: float | None


PIXEL_UNITS = ReadPlanLevel(level=0, downsample=1, level_mpp=None, working_mpp=None)


def _file_identity(path: Path) -> tuple[int, int]:
    """(size, mtime in ns): a prepared slide whose file changed since is prepared again."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@dataclass
class _Prepared:
    """A slide opened, its level chosen and its tissue found: all of its setup that comes
    before the store, none of it visible on disk."""

    slide: Path
    identity: tuple[int, int]
    reader: SlideReader
    choice: ReadPlanLevel
    grid: GridGeometry
    thumbnail: np.ndarray
    thumb_downsample: float
    tissue: TissueMap
    thumbnail_s: float


def _discard(prepared: Future[_Prepared]) -> None:
    """Close a prepared slide nobody took (one that failed to prepare has nothing open)."""
    try:
        prepared.result().reader.close()
    except Exception:  # noqa: BLE001 - its failure belongs to a compression that never came
        pass


# -- the compressor --------------------------------------------------------------------------


def _encoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The encoder's dtype for ``--precision``: auto is fp16 on a GPU and, on a CPU, fp32 until
    the fast path's trial measures whether bf16 pays (:mod:`nic_fast.engine.fastpath`)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if device.type != "cuda" and precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU (CPUs have no fast fp16 convolutions); "
                         "use --precision bf16, fp32 or auto, or --device cuda")
    return PRECISIONS[precision]


class Compressor:
    """Compresses slides with one loaded encoder; reusable across many slides."""

    def __init__(self, options: CompressOptions) -> None:
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device cuda was given but PyTorch {torch.__version__} sees no CUDA device; "
                               "use --device cpu")
        if options.decode not in DECODERS:
            raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {options.decode!r}")
        if options.decode == "gpu" and self.device.type != "cuda":
            raise ValueError("--decode gpu needs --device cuda (or --gpus); use --decode cpu")
        self.encoder: Encoder = load_encoder(options.encoder, device="cpu")
        spec = self.encoder.spec
        self.patch_px = options.patch_px or spec.input_px
        if self.patch_px != spec.input_px:
            raise ValueError(f"--patch-px {self.patch_px} does not match encoder {spec.name!r}, which takes "
                             f"{spec.input_px}-px patches; leave --patch-px out or pick another encoder")
        self.stride_px = options.stride_px or self.patch_px
        scale, offset = spec.scale_offset()
        self.scale, self.offset = list(scale), list(offset)
        # the working resolution: the encoder's own unless asked otherwise (a 224-px preset at 1 µm/px
        # fed 0.5-µm/px patches would see tissue at twice the scale it learnt)
        self.mpp: float | None = spec.mpp if options.mpp == MPP_FROM_ENCODER else options.mpp
        if self.mpp is None and (options.slide_mpp is not None or options.slide_mpp_csv is not None):
            raise ValueError("--slide-mpp and --slide-mpp-csv give a slide's µm/px, which plain images read in "
                             "pixel units (--mpp none, or an encoder without µm/px) do not use; leave them out "
                             "or give --mpp in µm/px")
        self.mpp_table = load_mpp_csv(options.slide_mpp_csv) if options.slide_mpp_csv else None
        self.variants = DIHEDRAL if options.augment else (0,)
        default_workers = available_cpus() if self.device.type == "cuda" else CPU_READER_THREADS
        self.workers = max(1, options.workers or default_workers)
        self.fast = FastEncoder(self.encoder, self.device, _encoder_dtype(options.precision, self.device),
                                precision=options.precision, compile=options.compile, fast_path=options.fast_path,
                                expected_slides=options.expected_slides or 1)
        self.batch_size = self._batch_size()
        self.background = self._background_embedding()
        self.config = EngineConfig(
            encoder=self.fast, device=self.device,
            variants=tuple(self.variants), batch_size=self.batch_size, scale=self.scale,
            offset=self.offset, background=self.background, workers=self.workers, tile_cells=options.tile_cells,
            decode=options.decode, cuda_graph=options.cuda_graph, batches_in_flight=options.batches_in_flight)
        self.engine: Engine = self._engine()
        self._prefetched: dict[Path, Future[_Prepared]] = {}  # the next slide(s), prepared while one streams
        self._preparer: ThreadPoolExecutor | None = None  # made on the first prefetch
        self.prefetches = self.device.type == "cuda" and not self.pixel_units  # see prefetch()

    @property
    def pixel_units(self) -> bool:
        """Plain images read pixel for pixel (``--mpp none``)."""
        return self.mpp is None

    def _engine(self) -> Engine:
        if self.device.type != "cuda" or self.pixel_units:
            return CpuEngine(self.config)
        from nic_fast.engine.cuda import CudaEngine  # imported only where a GPU runs

        return CudaEngine(self.config)

    def _batch_size(self) -> int:
        """``--batch-size`` as given, or for ``auto`` the largest batch whose forward fits the
        device's free memory (measured on the encoder as it will run), capped per device."""
        if self.options.batch_size != "auto":
            return int(self.options.batch_size)
        cap = AUTO_BATCH_CAP[self.device.type]
        if self.device.type == "cpu" and self._small_encoder():
            return cap  # its full batch needs well under a GiB; the trial would cost seconds per worker
        from nic_fast.encoders.memory import suggest_batch_size  # only where auto asks for it

        spec = replace(self.encoder.spec, input_px=self.fast.input_px)
        probe = Encoder(spec, self.fast.module, self.encoder.source).to(self.device, self.fast.dtype)
        return suggest_batch_size(probe, max_batch=cap)

    def _small_encoder(self) -> bool:
        """A CNN like the paper's (under 20 M parameters, patches under 192 px): ~1 MiB of
        activations per patch, so the CPU cap fits any machine. Measuring it would import
        torch's dispatch machinery (~3.5 s) in every worker for nothing."""
        module = self.fast.module
        parameters = sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0
        return parameters < SMALL_ENCODER_PARAMETERS and self.fast.input_px < SMALL_ENCODER_PX

    def _background_embedding(self) -> np.ndarray:
        """What cells without tissue hold: the embedding of a white patch, or zeros."""
        code_size = self.encoder.spec.code_size
        if self.options.background == "zero":
            return np.zeros(code_size, np.float16)
        if self.options.background != "blank":
            raise ValueError(f"background must be 'blank' or 'zero', got {self.options.background!r}")
        channels, input_px = self.encoder.spec.channels, self.fast.input_px
        white = np.full((self.patch_px, self.patch_px, channels), 255, np.uint8)
        batch = torch.empty((1, channels, input_px, input_px))
        kernels.patchify(white, np.zeros((1, 2), np.int32), batch, scale=self.scale, offset=self.offset,
                         downsample=self.fast.pool_px)
        out = self.fast(batch.to(self.device)).float().cpu().numpy()
        check_output(self.encoder.spec.name, code_size, out)
        return out[0].astype(np.float16)

    # -- slides -------------------------------------------------------------------
    def compress_slide(self, slide: Path, final: Path, *, replace: bool = False, run_id: str = "",
                       still_owned: Callable[[], bool] = lambda: True,
                       on_start: Callable[[Path, int], None] | None = None,
                       progress: ProgressFn | None = None) -> SlideResult:
        """Compress ``slide`` into the store ``final``; a failure is returned, never raised.

        The caller holds the slide's claim (see :mod:`nic_fast.batch.claims`): ``still_owned``
        is asked before publishing. ``replace`` lets the new store replace a complete one.
        """
        t0 = time.perf_counter()
        try:
            result = self._compress(slide, final, replace, run_id, still_owned, on_start, progress, t0)
        except ClaimLost as exc:
            return SlideResult(str(slide), "skipped", str(exc), seconds=time.perf_counter() - t0,
                               device=str(self.device))
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            log.debug("slide %s failed", slide, exc_info=True)
            return SlideResult(str(slide), "failed", failure_reason(exc), seconds=time.perf_counter() - t0,
                               device=str(self.device))
        result.seconds = time.perf_counter() - t0
        return result

    def prefetch(self, slide: Path) -> None:
        """Prepare ``slide`` (open, level, thumbnail, tissue) on a background thread while the
        current slide streams, so that its own setup is done by the time it is claimed.

        Only where a GPU engine streams (on the CPU the encoder needs the cores). Preparing
        creates nothing on disk: the claim, the store and everything visible still come
        in :meth:`compress_slide`, which uses the prepared slide when the file is
        unchanged and discards it otherwise. At most :data:`PREFETCH_SLIDES` are kept: one
        that is never compressed (skipped, held elsewhere) is discarded when a later one
        comes, or by :meth:`close`.
        """
        if not self.prefetches or slide in self._prefetched:
            return
        while len(self._prefetched) >= PREFETCH_SLIDES:
            _discard(self._prefetched.pop(next(iter(self._prefetched))))
        if self._preparer is None:
            self._preparer = ThreadPoolExecutor(1, thread_name_prefix="nic-fast-prefetch")
        self._prefetched[slide] = self._preparer.submit(self._prepare, slide)

    def close(self) -> None:
        """Discard the prepared slides nobody took (their readers are closed)."""
        while self._prefetched:
            _discard(self._prefetched.popitem()[1])
        if self._preparer is not None:
            self._preparer.shutdown(wait=True)
            self._preparer = None

    def _take_prepared(self, slide: Path) -> _Prepared:
        """The prefetched preparation of ``slide`` if there is one for the file as it is now,
        else ``slide`` prepared here."""
        prefetched = self._prefetched.pop(slide, None)
        if prefetched is not None:
            prepared = prefetched.result()  # the slide's own failure is raised here, as if prepared now
            if prepared.identity == _file_identity(slide):
                return prepared
            prepared.reader.close()
        return self._prepare(slide)

    def _prepare(self, slide: Path) -> _Prepared:
        """Everything before the store: open, pick the level, thumbnail, tissue."""
        if not slide.is_file():
            raise SlideError(f"{slide}: no such file" if not slide.exists() else f"{slide}: not a regular file")
        identity = _file_identity(slide)
        reader = self._open(slide)
        try:
            self._check_channels(reader)
            choice = self._read_level(reader, slide)
            level_h, level_w = reader.level_dims[choice.level]
            grid = GridGeometry.over_level(level_h, level_w, patch_px=self.patch_px, stride_px=self.stride_px,
                                           downsample=choice.downsample)
            self._check_grid(slide, grid, level_h, level_w, choice)
            t0 = time.perf_counter()
            thumbnail, unknown, thumb_downsample = self._thumbnail(reader, choice.level, grid)
            tissue = self._tissue(slide, reader, thumbnail, unknown, grid, thumb_downsample,
                                  reader.level_downsamples[choice.level] / thumb_downsample)
            thumbnail = np.repeat(thumbnail, 3, axis=2) if thumbnail.shape[2] == 1 else thumbnail
            return _Prepared(slide, identity, reader, choice, grid, thumbnail, thumb_downsample, tissue,
                             time.perf_counter() - t0)
        except BaseException:
            reader.close()
            raise

    def _compress(self, slide: Path, final: Path, replace: bool, run_id: str, still_owned: Callable[[], bool],
                  on_start: Callable[[Path, int], None] | None, progress: ProgressFn | None,
                  t_start: float) -> SlideResult:
        prepared = self._take_prepared(slide)
        timings = Timings()
        with prepared.reader as reader:
            choice, grid, tissue = prepared.choice, prepared.grid, prepared.tissue
            thumbnail, thumb_downsample = prepared.thumbnail, prepared.thumb_downsample
            timings.thumbnail_s = prepared.thumbnail_s
            n_cells = int(tissue.cells.sum())
            if n_cells == 0:
                log.warning("%s: no tissue found; writing an empty store", slide)
            if on_start:
                on_start(slide, n_cells * len(self.variants))
            attrs = self._attrs(slide, reader, choice, grid, tissue, thumb_downsample)
            config = {key: attrs[key] for key in ("source", "mpp", "level", "downsample", "patch_px", "stride_px",
                                                  "augmentations", "min_tissue", "background", "tile_cells",
                                                  "tissue_detection")}
            config["encoder_sha256"] = self.encoder.spec.sha256
            geometry = CellGeometry(stride_px=self.stride_px, patch_px=self.patch_px,
                                    level0_px_per_px=reader.level_downsamples[choice.level] * choice.downsample,
                                    level0_mpp=None if self.pixel_units else reader.mpp,
                                    thumbnail_downsample=thumb_downsample)
            store = StoreWriter(final, variants=len(self.variants), grid_shape=grid.shape,
                                code_size=self.encoder.spec.code_size, tile_cells=self.options.tile_cells,
                                thumbnail=thumbnail, tissue=tissue.cells, geometry=geometry, attrs=attrs,
                                config=config, run_id=run_id, started_s=t_start)
            job = SlideJob(reader, choice.level, choice.downsample, grid, store,
                           self._unfinished_tiles(grid, tissue, store), timings, progress)
            self.fast.begin_slide(sum(len(cells) for _, cells in job.tiles) * len(self.variants))
            try:
                streamed = self.engine.stream(job)
            finally:
                store.close()
        timings.total_s = time.perf_counter() - t_start
        totals = store.totals()
        patches = n_cells * len(self.variants)
        seconds = max(totals["compute_seconds"], 1e-9)
        extra = {"timings": timings.as_attrs(), "device": str(self.device), **totals,
                 "valid_fraction": 1.0 - totals["invalid_cells"] / max(1, grid.height * grid.width),
                 "patches": patches, "patches_per_s": round(patches / seconds, 2), **streamed.attrs,
                 "fast_path": self.fast.attrs()}
        extra["precision"] = {**extra["fast_path"]["precision"], **streamed.attrs.get("precision", {})}
        if not self.pixel_units and reader.channels == 3:
            extra["tissue_geojson"] = self._write_tissue_geojson(final, slide, tissue, thumb_downsample).name
        store.publish(extra, overwrite=replace, still_owned=still_owned)
        return SlideResult(str(slide), "ok", store=str(final), patches=patches, patches_per_s=patches / seconds,
                           grid_shape=grid.shape, tissue_fraction=tissue.tissue_fraction,
                           invalid_cells=totals["invalid_cells"], invalid_reasons=totals["invalid_reasons"],
                           device=str(self.device), resumed=store.resumed)

    def _check_grid(self, slide: Path, grid: GridGeometry, level_h: int, level_w: int, choice: ReadPlanLevel) -> None:
        """A slide smaller than one patch has no cell to compress: say so, with the sizes."""
        if grid.height and grid.width:
            return
        work_h, work_w = level_h // choice.downsample, level_w // choice.downsample
        at = f"{choice.working_mpp:g} µm/px" if choice.working_mpp else "its pixel size"
        raise SlideError(f"{slide}: is {work_w}×{work_h} px at {at}, smaller than one {self.patch_px}-px patch: "
                         "nothing to compress; use a finer --mpp or an encoder with smaller patches")

    def _open(self, slide: Path) -> SlideReader:
        """The slide's reader: the image backend in pixel units, else by format with its µm/px."""
        if self.pixel_units:
            return open_slide(slide, backend="image")
        return open_slide(slide, slide_mpp=resolve_slide_mpp(slide, self.options.slide_mpp, self.mpp_table),
                          backend=self.options.reader)

    def _check_channels(self, reader: SlideReader) -> None:
        """The encoder must take exactly the image's channels: converting gray to RGB or
        back would feed it inputs it was never trained on."""
        spec = self.encoder.spec
        if reader.channels != spec.channels:
            kind = {1: "grayscale", 3: "RGB"}.get(reader.channels, f"{reader.channels}-channel")
            raise SlideError(f"{reader.path}: is {kind} ({reader.channels} channel(s)) but encoder {spec.name!r} takes "
                             f"{spec.channels}-channel patches; use an encoder trained on {kind} patches")

    def _read_level(self, reader: SlideReader, slide: Path) -> ReadPlanLevel:
        """Level and downsample: level 0 as it is in pixel units, else chosen by µm/px."""
        if self.pixel_units:
            return PIXEL_UNITS
        assert self.mpp is not None
        level_mpps = [reader.level_mpp(level) for level in range(reader.level_count)]
        choice = choose_level(level_mpps, self.mpp, self.options.mpp_tolerance, slide=slide.name)
        return ReadPlanLevel(choice.level, choice.downsample, choice.level_mpp, choice.working_mpp)

    def _tissue(self, slide: Path, reader: SlideReader, thumbnail: np.ndarray, unknown: np.ndarray,
                grid: GridGeometry, thumb_downsample: float, thumb_px_per_level_px: float) -> TissueMap:
        """Cells to encode: the user's mask file where ``--tissue-masks`` has one for this slide,
        else found on the thumbnail (saturation, ink removed). A grayscale image has no stain
        to measure, so every one of its cells is encoded."""
        if thumbnail.shape[2] == 1:
            ones = np.ones(grid.shape, np.float32)
            return TissueMap(mask=np.ones(thumbnail.shape[:2], bool), fraction=ones, cells=ones.astype(bool),
                             threshold=0, method="every cell (grayscale image)")
        mask_file = find_mask_for(slide, self.options.tissue_masks) if self.options.tissue_masks else None
        if mask_file is not None:
            mask = read_tissue_mask(mask_file, mask_shape=thumbnail.shape[:2], level0_px_per_mask_px=thumb_downsample,
                                    level0_shape=reader.level_dims[0])
            return tissue_from_mask(mask, grid, thumb_px_per_level_px=thumb_px_per_level_px,
                                    method=f"mask file {mask_file.name}", min_fraction=self.options.min_tissue)
        if self.options.tissue_masks:
            log.warning("%s: no mask file for it in %s; tissue found automatically", slide, self.options.tissue_masks)
        return detect_tissue(thumbnail, grid, min_fraction=self.options.min_tissue,
                             thumb_px_per_level_px=thumb_px_per_level_px, unknown=unknown)

    def _thumbnail(self, reader: SlideReader, level: int, grid: GridGeometry) -> tuple[np.ndarray, np.ndarray, float]:
        """Thumbnail with ``thumb_px_per_cell`` pixels per cell stride (capped in size), its
        pixels over unreadable tiles, and its downsample relative to level 0."""
        level0_stride = grid.level_stride_px * reader.level_downsamples[level]
        height0, width0 = reader.level_dims[0]
        downsample = max(level0_stride / self.options.thumb_px_per_cell, max(height0, width0) / MAX_THUMBNAIL_PX, 1.0)
        thumbnail, unknown = reader.thumbnail_checked(downsample)
        return thumbnail, unknown, downsample

    @staticmethod
    def _write_tissue_geojson(final: Path, slide: Path, tissue: TissueMap, thumb_downsample: float) -> Path:
        """``OUT/<name>.tissue.geojson``: the tissue regions as QuPath annotations (level-0 px),
        written beside the store by the claim's owner just before it publishes."""
        path = final.with_name(final.name.removesuffix(".zarr") + ".tissue.geojson")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_geojson(tmp, tissue_geojson(tissue.mask, thumb_downsample, name=slide.name))
        os.replace(tmp, path)
        return path

    def _attrs(self, slide: Path, reader: SlideReader, choice: ReadPlanLevel, grid: GridGeometry, tissue: TissueMap,
               thumb_downsample: float) -> dict[str, Any]:
        spec = self.encoder.spec
        return {
            "nic_fast_version": __version__,
            "source": {"path": str(slide.resolve()), "name": slide.name, **source_identity(slide),
                       "reader": reader.backend},
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
            "tissue_detection": tissue.method,
            "min_tissue": self.options.min_tissue,
            "background": self.options.background,
            "background_embedding": "embedding of a white patch" if self.options.background == "blank" else "zeros",
            "tile_cells": self.options.tile_cells,
            "thumbnail_downsample": thumb_downsample,
        }

    def _unfinished_tiles(self, grid: GridGeometry, tissue: TissueMap, store: StoreWriter,
                          ) -> list[tuple[Tile, np.ndarray]]:
        """Tiles not yet in the store, each with its global (i, j) tissue cells."""
        tiles = []
        for tile in grid.tiles(self.options.tile_cells):
            if (tile.row, tile.col) not in store.done_tiles:
                block = tissue.cells[tile.i0 : tile.i1, tile.j0 : tile.j1]
                tiles.append((tile, np.argwhere(block) + (tile.i0, tile.j0)))
        return tiles

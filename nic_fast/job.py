"""What a compression is asked to do and what one slide gives back.

Free of torch and of the engines, so that whatever only plans and supervises work — the
``compress`` command's parent process, a cluster client, a Slurm launcher — starts fast
and never touches a GPU.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DECODERS", "MPP_FROM_ENCODER", "PRECISION_DTYPES", "CompressOptions", "SlideResult", "available_cpus", "check_options",
           "source_identity", "stale_reason"]

DECODERS = ("auto", "cpu", "gpu")
MPP_FROM_ENCODER = "encoder"
COMPILE_MODES = ("auto", "on", "off")  # --compile
# --batch-size auto: the batch that fits memory, capped where larger batches stop paying (a CPU
# is saturated by 128 patches of the paper's CNN; a GPU's graphs and pinned buffers grow with it)
AUTO_BATCH_CAP = {"cpu": 128, "cuda": 256}
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --precision → torch dtype name


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class CompressOptions:
    """What `nic-fast compress` is asked to do; the CLI maps its flags one to one."""

    encoder: str = "mean-rgb"
    # working resolution in µm/px; "encoder": the encoder's own (its spec's µm/px; pixel units when it has
    # none); None: plain images in pixel units (image backend)
    mpp: float | str | None = "encoder"
    mpp_tolerance: float = 0.1  # relative
    patch_px: int | None = None  # default: the encoder's input size
    stride_px: int | None = None  # default: patch_px
    augment: bool = False  # all 8 dihedral variants
    batch_size: int | str = "auto"  # patches per encoder batch; auto: what fits memory, at most AUTO_BATCH_CAP
    workers: int | None = None  # reader threads; default 2 on the CPU, every core on a GPU
    device: str = "cpu"
    precision: str = "auto"  # fp32 | fp16 | bf16; auto: fp16 on a GPU, on a CPU bf16 where a trial shows it pays
    compile: str = "auto"  # torch.compile the encoder: auto (when the slide's patches repay it) | on | off
    fast_path: bool = True  # exact graph rewrites (pool into patchify, BatchNorm folding) and compile
    # slides one compressor expects to compress (the batch layer sets its share of the run): the
    # compile rule weighs the compile time against all of them, not only the first
    expected_slides: int | None = None
    decode: str = "auto"  # where cuCIM decodes on a GPU run: cpu | gpu | auto (measured per format)
    cuda_graph: bool = True  # replay the fixed-size encoder batch as a CUDA graph
    batches_in_flight: int = 2  # GPU batches queued ahead of the one running
    reader: str = "auto"  # slide backend: auto picks per file (see nic_fast.slides.open_slide)
    slide_mpp: float | None = None
    slide_mpp_csv: Path | None = None
    overwrite: bool = False
    min_tissue: float = 0.1  # tissue fraction for a cell to be encoded
    tissue_masks: Path | None = None  # folder of users' masks (QuPath GeoJSON, PNG/TIFF), one per slide
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
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # not-valid cells by why
    device: str = ""  # where it ran ("cpu", "cuda:1")
    attempts: int = 1  # > 1 when a dead worker's slide was retried
    resumed: bool = False  # the store continued a partial one left by an earlier run
    held_by: str = ""  # skipped because this process (host:pid) held a fresh claim on the slide


def check_options(options: CompressOptions) -> None:
    """Cheap checks of what every worker would otherwise find out at start-up (ValueError):
    names of choices, the µm/px table, the encoder reference. Loads no model."""
    from nic_fast.slides import BACKENDS, load_mpp_csv

    if options.decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {options.decode!r}")
    if options.batch_size != "auto" and not (isinstance(options.batch_size, int) and options.batch_size >= 1):
        raise ValueError(f"batch size must be auto or a positive integer; got {options.batch_size!r}")
    if options.compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {options.compile!r}")
    if options.precision != "auto" and options.precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be auto, {', '.join(PRECISION_DTYPES)}; got {options.precision!r}")
    if options.reader not in BACKENDS or options.reader == "image":
        readers = ", ".join(b for b in BACKENDS if b != "image")
        raise ValueError(f"reader must be one of {readers}; got {options.reader!r}")
    if options.mpp is None and (options.slide_mpp is not None or options.slide_mpp_csv is not None):
        raise ValueError("--slide-mpp and --slide-mpp-csv give a slide's µm/px, which plain images read with "
                         "--mpp none do not use; leave them out or give --mpp in µm/px")
    if options.slide_mpp_csv is not None:
        load_mpp_csv(options.slide_mpp_csv)
    encoder = Path(options.encoder)
    if encoder.suffix in (".pt", ".pt2", ".h5") and not encoder.is_file():  # a name is checked by the workers
        raise ValueError(f"--encoder {options.encoder}: no such file")


def source_identity(slide: Path) -> dict[str, Any]:
    """What identifies a slide file without reading gigabytes: size and a hash of its first MiB."""
    return {"size_bytes": slide.stat().st_size, "header_sha256": _header_sha256(slide)}


def stale_reason(store_attrs: dict[str, Any], slide: Path) -> str | None:
    """Why a complete store no longer matches the slide file on disk, or None when it does."""
    source = store_attrs.get("source") or {}
    try:
        size = slide.stat().st_size
    except OSError:
        return None  # the slide is gone: the store is all there is, not stale
    if source.get("size_bytes") != size:
        return (f"the store was made from a different file ({source.get('size_bytes')} bytes, now {size}); "
                "use --overwrite to recompress it")
    if source.get("header_sha256") not in (None, _header_sha256(slide)):
        return "the slide file changed since its store was made (header hash differs); use --overwrite to recompress it"
    return None




def _header_sha256(path: Path, n_bytes: int = 1 << 20) -> str:
    """Hash of the file's first MiB: identifies the slide without reading gigabytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n_bytes)).hexdigest()

"""What the QC image and the run report cost, measured in one run on one machine.

Prints:
  * `nic-fast compress` seconds of a generated slide (mean-RGB, the cheapest encoder, so
    the ratio is the worst case) and the seconds of its QC image, as a ratio;
  * the QC image of a store with the largest thumbnail compress writes (4096 px long
    side, shrunk to 1024), and the same drawing done with matplotlib (thumbnail, cell
    overlays, tissue contour, legend, saved at the same pixel size), as a ratio: why
    the QC image is drawn with Pillow and NumPy;
  * `write_report` seconds and size for a batch of N slides.

Usage: python benchmarks/report.py [--size 8192] [--slides 5000] [--repeats 5] [--workdir bench-report]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from machine import describe as describe_machine
from PIL import Image

from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions
from nic_fast.report import STATUS_ORDER, qc_path, write_qc_image, write_report
from nic_fast.store import CellGeometry, StoreWriter, open_store
from nic_fast.synthetic import write_synthetic_slide


def timed(function, repeats: int) -> float:  # noqa: ANN001 - any callable
    """Median seconds of ``repeats`` calls (the machine is shared: the median resists other jobs)."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def large_thumbnail_store(source: Path, path: Path) -> Path:
    """``source``'s store as if its slide were larger: thumbnail and grid scaled up to a 4096-px
    thumbnail (the largest compress writes), the top-left 1/64 of the cells unreadable."""
    slide = open_store(source)
    factor = max(1, round(4096 / max(slide.thumbnail.shape[:2])))
    thumbnail = np.asarray(Image.fromarray(slide.thumbnail).resize(
        (slide.thumbnail.shape[1] * factor, slide.thumbnail.shape[0] * factor)))
    tissue = np.kron(slide.tissue, np.ones((factor, factor), bool))
    valid = np.kron(slide.valid, np.ones((factor, factor), bool))
    valid[: tissue.shape[0] // 8, : tissue.shape[1] // 8] = False
    attrs = {**slide.attrs, "grid_shape": list(tissue.shape)}  # a slide `factor` times larger per side
    geometry = CellGeometry(stride_px=attrs["stride_px"], patch_px=attrs["patch_px"], level0_px_per_px=1.0,
                            level0_mpp=attrs["scanned_mpp"], thumbnail_downsample=attrs["thumbnail_downsample"])
    writer = StoreWriter(path, variants=1, grid_shape=tissue.shape, code_size=1, tile_cells=256, thumbnail=thumbnail,
                         tissue=tissue, geometry=geometry, attrs=attrs, config={})
    for row, i0 in enumerate(range(0, tissue.shape[0], 256)):
        for col, j0 in enumerate(range(0, tissue.shape[1], 256)):
            block = valid[i0 : i0 + 256, j0 : j0 + 256]
            writer.write_tile(row, col, i0, j0, np.zeros((1, *block.shape, 1), np.float16), block)
    return writer.publish({}, overwrite=True)


def matplotlib_qc(store: Path, out_png: Path, size_px: int) -> None:
    """The QC image's content drawn the matplotlib way, at the same pixel size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from nic_fast.report import ENCODED_RGB, INVALID_RGB, TISSUE_RGB, _tissue_map

    slide = open_store(store)
    height, width = slide.thumbnail.shape[:2]
    dpi = 100
    figure = Figure(figsize=(size_px * width / max(height, width) / dpi, size_px * height / max(height, width) / dpi
                             + 0.7), dpi=dpi)
    axes = figure.add_axes((0, 0.7 / figure.get_figheight(), 1, 1 - 0.7 / figure.get_figheight()))
    axes.imshow(slide.thumbnail)
    extent = (0, width, height, 0)
    overlay = np.zeros((*slide.grid_shape, 4), np.float32)
    overlay[slide.tissue] = (*np.divide(ENCODED_RGB, 255), 0.22)
    overlay[~slide.valid] = (*np.divide(INVALID_RGB, 255), 0.6)
    axes.imshow(overlay, extent=extent, interpolation="nearest")
    tissue = _tissue_map(slide)
    if tissue is not None:
        axes.contour(tissue.mask, levels=[0.5], colors=[np.divide(TISSUE_RGB, 255)], linewidths=1)
    axes.set_axis_off()
    figure.legend(handles=[Patch(color=np.divide(c, 255), label=label) for c, label in
                           ((TISSUE_RGB, "tissue outline"), (ENCODED_RGB, "encoded"), (INVALID_RGB, "invalid"))],
                  loc="lower left", ncol=3, fontsize=8)
    figure.savefig(out_png, dpi=dpi)


def report_summary(out: Path, slides: int) -> dict:
    rows = [{"slide": f"/data/cohort/slide_{i:05d}.svs", "store": str(out / f"slide_{i:05d}.zarr"),
             "status": "failed" if i % 97 == 0 else "ok", "reason": "SlideError: no µm/px" if i % 97 == 0 else "",
             "seconds": 31.5, "patches": 21000, "patches_per_s": 666.0, "grid_shape": [390, 270],
             "tissue_fraction": 0.21, "invalid_cells": 2, "invalid_reasons": {"JPEG decode error": 2},
             "device": "cuda:0", "attempts": 1, "host": "node-1", "pid": 1, "run_id": "r1",
             "finished_at": "2025-01-01T00:00:00+00:00"}
            for i in range(slides)]
    return {"nic_fast_version": "bench", "updated_at": "2025-01-01T00:00:00+00:00", "out_dir": str(out),
            "counts": {status: sum(r["status"] == status for r in rows) for status in STATUS_ORDER},
            "runs": [{"run_id": "r1", "host": "node-1", "pid": 1, "started_at": "2025-01-01T00:00:00+00:00",
                      "finished_at": None, "command": "nic-fast compress ...", "options": {"mpp": 0.5}}],
            "workers": [], "slides": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="side of the generated slide, px at 0.5 µm/px")
    parser.add_argument("--slides", type=int, default=5000, help="slides in the report")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("bench-report"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(describe_machine())
    slide = work / f"slide_{args.size}.tif"
    if not slide.exists():
        write_synthetic_slide(slide, height=args.size, width=args.size, mpp=0.5, seed=3, lesion=True)
    out = work / "out"
    (result,) = compress_slides([slide], out, CompressOptions(overwrite=True)).results
    compress_s = result.seconds  # the slide's own time, without loading the encoder
    store = Path(result.store)
    qc_s = timed(lambda: write_qc_image(store, qc_path(out, store)), args.repeats)
    print(f"{args.size} px slide: compress {compress_s:.2f} s ({result.patches} patches, mean-rgb), QC image "
          f"{qc_s * 1000:.0f} ms = {qc_s / compress_s:.3f} x compress")
    large = large_thumbnail_store(store, work / "large.zarr")
    thumb = open_store(large).thumbnail.shape
    ours = timed(lambda: write_qc_image(large, work / "large_qc.png"), args.repeats)
    with Image.open(work / "large_qc.png") as image:
        size_px = max(image.size)
    theirs = timed(lambda: matplotlib_qc(large, work / "large_qc_matplotlib.png", size_px), args.repeats)
    print(f"{thumb[1]}x{thumb[0]} px thumbnail: QC image {ours * 1000:.0f} ms "
          f"({(work / 'large_qc.png').stat().st_size / 1024:.0f} KiB), matplotlib {theirs * 1000:.0f} ms: "
          f"Pillow/NumPy {theirs / ours:.1f} x faster")
    summary = report_summary(out, args.slides)
    report_s = timed(lambda: write_report(out, summary), args.repeats)
    size_mib = (out / "report.html").stat().st_size / 2**20
    print(f"report of {args.slides} slides: {report_s * 1000:.0f} ms, {size_mib:.1f} MiB "
          f"({size_mib * 2**20 / args.slides:.0f} bytes per slide)")


if __name__ == "__main__":
    main()

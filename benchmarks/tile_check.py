"""What the tile integrity checks cost, measured in one run on one machine.

For the real CMU-1-Small-Region.svs (240-px JPEG tiles, shared JPEGTables) and a
generated slide (``nic-fast synth slides --size 20000``: 256-px JPEG tiles), level 0 is
read whole in the engine's 2048-px regions (16 x 16 cells of 128 px) by ``--threads``
reader threads, each with its own handle, and the script prints:

  * per backend: seconds for ``read_region`` (decode only) and for
    ``read_region_checked`` (the checks, then the same decode), and their ratio;
  * the check alone (``TileGrid.inspect`` on the same tiles, same threads) as a fraction
    of decoding the same tiles: with the backend's region reads, and with imagecodecs'
    libjpeg-turbo on the bare tiles;
  * a strict library decoder on the same tiles for comparison (simplejpeg with
    ``strict=True``, libjpeg-turbo stopping on warnings), when simplejpeg is installed.

Each figure is the best of ``--repeats`` runs, the variants interleaved so that load
from other jobs hits them alike.

Usage: python benchmarks/tile_check.py [--size 20000] [--workdir bench-work/tile-check]
       [--threads N] [--repeats 3] [--backends cucim,tifffile]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from machine import describe as describe_machine

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NIC_FAST_SHARED_DATA", ROOT.parent / "shared" / "data"))
REGION_PX = 2048


def generated_slide(workdir: Path, size: int) -> Path:
    out = workdir / f"synth-{size}"
    slide = out / "slide_000.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nic_fast", "synth", "slides", "-o", str(out), "--n", "1",
                        "--size", str(size)], check=True)
        print(f"generated {slide} in {time.perf_counter() - t0:.0f} s", flush=True)
    return slide


def regions(height: int, width: int) -> list[tuple[int, int, int, int]]:
    return [(y, x, min(REGION_PX, height - y), min(REGION_PX, width - x))
            for y in range(0, height, REGION_PX) for x in range(0, width, REGION_PX)]


def threaded(pool: ThreadPoolExecutor, items: Iterable[object], work: Callable[[object], object]) -> tuple[float, float]:
    """(wall s, CPU s of the whole process) to run ``work`` on every item in ``pool``.
    CPU seconds are the steadier cost on a shared machine."""
    items = list(items)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in pool.map(work, items):
        pass
    return time.perf_counter() - t0, time.process_time() - c0


class Handles:
    """One reader handle per thread, as the engine keeps them."""

    def __init__(self, reader) -> None:
        self.reader, self.local, self.all = reader, threading.local(), []

    def get(self):
        if not hasattr(self.local, "reader"):
            self.local.reader = self.reader.reopen()
            self.all.append(self.local.reader)
        return self.local.reader

    def close(self) -> None:
        for handle in self.all:
            handle.close()


def tile_bytes(path: Path) -> tuple[list[bytes], bytes]:
    import tifffile

    with tifffile.TiffFile(path) as tif, open(path, "rb") as f:
        page = tif.pages[0]
        data = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            f.seek(offset)
            data.append(f.read(count))
        return data, bytes(page.jpegtables or b"")


def tile_grid(path: Path):
    from nic_fast.slides.tiles import TiffTiles

    tiles = TiffTiles(path)
    try:
        return tiles.grid(0)
    finally:
        tiles.close()


def best(repeats: int, variants: dict[str, Callable[[], tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Per variant the smallest wall and the smallest CPU seconds over ``repeats`` rounds."""
    times = {name: (float("inf"), float("inf")) for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            wall, cpu = run()
            times[name] = (min(times[name][0], wall), min(times[name][1], cpu))
    return times


def line(label: str, value: tuple[float, float], base: tuple[float, float] | None = None, what: str = "ratio") -> str:
    text = f"    {label:22s} {value[0]:7.3f} s wall {value[1]:7.3f} s CPU"
    if base is not None:
        text += f"  ({what} {value[0] / base[0]:.3f} wall, {value[1] / base[1]:.3f} CPU)"
    return text


def measure(path: Path, backends: list[str], threads: int, repeats: int) -> None:
    import imagecodecs

    from nic_fast.slides import open_slide

    print(f"\n{path.name}", flush=True)
    tiles, tables = tile_bytes(path)
    n_bytes = sum(map(len, tiles))
    grid = tile_grid(path)
    for backend in backends:
        with open_slide(path, backend=backend) as slide, ThreadPoolExecutor(threads) as pool:
            height, width = slide.level_dims[0]
            plan = regions(height, width)
            handles = Handles(slide)
            assert slide.check_region(0, 0, 0, 1, 1).checked, f"{path}: no tile grid to check"
            # untimed pass: opens each thread's handle, fills the page cache and the table caches
            threaded(pool, plan, lambda r, handles=handles: handles.get().read_region_checked(0, *r))
            times = best(repeats, {
                name: lambda method=method, plan=plan, handles=handles, pool=pool: threaded(
                    pool, plan, lambda r: getattr(handles.get(), method)(0, *r))
                for name, method in (("decode", "read_region"), ("checked", "read_region_checked"),
                                     ("check", "check_region"))
            })
            handles.close()
        print(f"  {backend:9s} {height}x{width} px, {len(plan)} regions, {grid.rows * grid.cols} {grid.codec} tiles "
              f"({n_bytes / 1e6:.1f} MB), {threads} threads "
              f"({height * width / 1e6 / times['decode'][0]:.0f} Mpx/s decoded):")
        print(line("read_region", times["decode"]))
        print(line("read_region_checked", times["checked"], times["decode"]))
        print(line("check_region alone", times["check"], times["decode"], f"fraction of {backend}'s decode:"))

    fd = os.open(path, os.O_RDONLY)
    pool = ThreadPoolExecutor(threads)
    try:
        variants = {
            "walker": lambda: threaded(pool, range(len(tiles)), lambda i: _walk(fd, grid, i)),
            "libjpeg-turbo": lambda: threaded(pool, tiles, lambda t: imagecodecs.jpeg8_decode(t, tables=tables or None)),
        }
        try:
            import simplejpeg

            whole = [tables[:-2] + tile[2:] if tables else tile for tile in tiles]
            variants["strict"] = lambda: threaded(pool, whole, lambda d: _strict(simplejpeg, d))
        except ImportError:
            print("  (simplejpeg is not installed: no strict-decoder comparison; pip install simplejpeg)")
        times = best(repeats, variants)
    finally:
        pool.shutdown()
        os.close(fd)
    print(f"  bare tiles, one call per tile, {threads} threads:")
    print(line("imagecodecs decode", times["libjpeg-turbo"]))
    print(line("JPEG walker", times["walker"], times["libjpeg-turbo"], "fraction of the decode:"))
    if "strict" in times:
        print(line("simplejpeg strict", times["strict"], times["libjpeg-turbo"], "fraction of the decode:"))


def _walk(fd: int, grid, index: int) -> list[str]:
    from nic_fast import _C

    one = slice(index, index + 1)
    return _C.check_jpeg_tiles(fd, grid.offsets[one], grid.counts[one], np.array([[grid.tile_h, grid.tile_w]], np.int32),
                               (grid.tile_h, grid.tile_w), grid.components, grid.jpegtables, 1)


def _strict(simplejpeg, data: bytes) -> None:
    try:
        simplejpeg.decode_jpeg(data, colorspace="rgb", strict=True)
    except ValueError:
        pass  # the comparison is about time; a strict failure costs the same work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-work" / "tile-check")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="cucim,tifffile")
    args = parser.parse_args()
    print(describe_machine())
    backends = args.backends.split(",")
    slides = []
    cmu = SHARED / "slides" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        slides.append(cmu)
    else:
        print(f"({cmu} is absent: generated slide only)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides.append(generated_slide(args.workdir, args.size))
    for slide in slides:
        measure(slide, backends, args.threads, args.repeats)


if __name__ == "__main__":
    main()

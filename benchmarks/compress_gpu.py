"""GPU compression throughput against its ceilings, in one run that fits a 240-s step.

On --slides generated slides of --size² px at 0.25 µm/px, compressed at 0.5 µm/px with
the paper's BiGAN encoder, it measures, in this order (results.json is rewritten after
each step, so a run stopped by its time limit keeps what it measured):
  (1) end to end: `nic-fast compress --device cuda` over all the slides in one process,
      per-slide seconds (steady state: the median of every slide after the first) and
      patches/s;
  (2) decode ceilings on the first slide's tissue regions, nothing else running: the CPU
      reader threads (one per core), nvImageCodec on the GPU's JPEG engines, and both at
      once pulling from one queue;
  (3) the encoder ceiling: the fp16 encoder on a ready device batch (CUDA graph);
  (4) the naive baseline: OpenSlide read_region per patch in a DataLoader with every core,
      the same fp16 encoder on the GPU.
The slides are one generated slide and hard links to it under other names (generating
four 40,000² slides would take the whole step); each is a separate slide to the pipeline.

--dry-run (or NIC_FAST_DRY_RUN=1) runs every step on the CPU with tiny sizes (the GPU
decoder through nvImageCodec's CPU backend), so the script is checked where no GPU is.

Usage: python benchmarks/compress_gpu.py [--slides 4] [--size 40000] [--out DIR] [--h5 encoder_bigan.h5] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PATCH_PX = 128
SCANNED_MPP = 0.25
WORKING_MPP = 0.5
DOWNSAMPLE = round(WORKING_MPP / SCANNED_MPP)
TILE_CELLS = 16
CHILD_TIMEOUT_S = 200  # a hung child fails the benchmark with its output instead of hanging it
GPU_DECODE_THREADS = 2  # as the engine's GPU decoder


def machine(device: str) -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"gpus": gpus, "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def prepare(workdir: Path, size: int, count: int, h5: Path) -> tuple[Path, list[Path]]:
    """The encoder as TorchScript and ``count`` slides: one generated, the rest hard links."""
    from nic_fast.encoders.keras import import_keras
    from nic_fast.synthetic import write_synthetic_slide

    workdir.mkdir(parents=True, exist_ok=True)
    encoder = workdir / "bigan.pt"
    if not encoder.exists():
        import_keras(h5, encoder)
    first = workdir / f"slide_{size}_0.tif"
    if not first.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(first, height=size, width=size, mpp=SCANNED_MPP, seed=11, lesion=True)
        print(f"generated {first.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    slides = [first]
    for k in range(1, count):
        link = workdir / f"slide_{size}_{k}.tif"
        if not link.exists():
            os.link(first, link)
        slides.append(link)
    return encoder, slides


def run_cli(args: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """`nic-fast compress ARGS -o OUT` in a child process: (summary.json, wall seconds)."""
    cmd = [sys.executable, "-m", "nic_fast", "compress", *args, "-o", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def end_to_end(slides: list[Path], encoder: Path, device: str, batch_size: int, out: Path) -> dict[str, Any]:
    summary, wall = run_cli([*map(str, slides), "--encoder", str(encoder), "--device", device,
                             "--batch-size", str(batch_size)], out)
    records = sorted(summary["slides"], key=lambda r: r["slide"])
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"end to end: {failed[0]['slide']} {failed[0]['status']}: {failed[0].get('reason')}")
    seconds = [r["seconds"] for r in records]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    store = out / f"{slides[0].stem}.zarr"
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["nic_fast"]
    patches = records[0]["patches"]
    return {"slide_s": seconds, "steady_slide_s": steady, "patches": patches, "patches_per_s": patches / steady,
            "process_wall_s": wall, "timings": attrs["timings"], "decode": attrs.get("decode", {}),
            "tissue_fraction": attrs["tissue_fraction"], "level": attrs["level"], "store": str(store)}


def region_plans(store_path: Path) -> list[Any]:
    """The pipeline's region reads for a compressed slide."""
    from nic_fast import open_store
    from nic_fast.engine.base import RegionPlan
    from nic_fast.grid import GridGeometry

    store = open_store(store_path)
    h, w = store.grid_shape
    grid = GridGeometry(h, w, PATCH_PX, PATCH_PX, store.attrs["downsample"])
    plans = []
    for tile in grid.tiles(TILE_CELLS):
        cells = np.argwhere(store.tissue[tile.i0 : tile.i1, tile.j0 : tile.j1]) + (tile.i0, tile.j0)
        if len(cells):
            plans.append(RegionPlan.of(grid, tile, cells))
    return plans


class _Readers:
    """Per-thread region readers for the decode ceilings: the CPU reader (the backend the
    pipeline picks) into a per-thread buffer, or nvImageCodec's tile reader."""

    def __init__(self, slide: Path, level: int, device: str) -> None:
        self.slide, self.level, self.device = slide, level, device
        self.local = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def _keep(self, thing: Any) -> Any:
        with self.lock:
            self.opened.append(thing)
        return thing

    def cpu(self, plan: Any) -> None:
        from nic_fast.slides import open_slide

        if not hasattr(self.local, "reader"):
            self.local.reader = self._keep(open_slide(self.slide))
            self.local.buffer = np.empty((plan.height + 4096, plan.width + 4096, 3), np.uint8).reshape(-1)
        out = self.local.buffer[: plan.height * plan.width * 3].reshape(plan.height, plan.width, 3)
        self.local.reader.read_region(self.level, plan.y0, plan.x0, plan.height, plan.width, out=out)

    def gpu(self, plan: Any) -> None:
        from nic_fast.engine.tile_decode import NvImageCodec, TileRegionReader
        from nic_fast.slides.jpeg_tiles import JpegLevel
        from nic_fast.slides.tiles import TiffTiles

        if not hasattr(self.local, "tiles"):
            tiles = self._keep(TiffTiles(self.slide))
            self.local.tiles = TileRegionReader(JpegLevel.of(tiles, self.level),
                                                NvImageCodec(0 if self.device == "cuda" else None))
            self.local.stream = torch.cuda.Stream() if self.device == "cuda" else None
        if self.device == "cuda":
            with torch.cuda.stream(self.local.stream):
                self.local.tiles.read_device(plan.y0, plan.x0, plan.height, plan.width, torch.device("cuda", 0))
            self.local.stream.synchronize()
        else:
            self.local.tiles.read_host(plan.y0, plan.x0, plan.height, plan.width)

    def close(self) -> None:
        for thing in self.opened:
            thing.close()


def decode_ceilings(slide: Path, level: int, plans: list[Any], cores: int, device: str) -> dict[str, Any]:
    """Tissue patches/s each way: CPU threads, GPU decode, both pulling from one queue."""
    cells = sum(plan.n_cells for plan in plans)
    readers = _Readers(slide, level, device)
    try:
        readers.gpu(plans[0])  # opens the codec outside the timing
        results = {}
        for name, workers in (("cpu", [(readers.cpu, cores)]), ("gpu", [(readers.gpu, GPU_DECODE_THREADS)]),
                              ("both", [(readers.cpu, cores), (readers.gpu, GPU_DECODE_THREADS)])):
            seconds, counts = _drain(plans, workers)
            results[name] = {"patches_per_s": cells / seconds, "regions": counts}
            print(f"decode ceiling, {name}: {cells / seconds:,.0f} patches/s", flush=True)
    finally:
        readers.close()
    results["threads"] = {"cpu": cores, "gpu": GPU_DECODE_THREADS}
    return results


def _drain(plans: list[Any], workers: list[tuple[Callable[[Any], None], int]]) -> tuple[float, list[int]]:
    """Seconds for ``workers`` (read function, threads) to empty one queue of regions, and
    how many regions each kind took."""
    todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for plan in plans:
        todo.put(plan)
    counts = [0] * len(workers)

    def work(kind: int, read: Callable[[Any], None]) -> None:
        while True:
            try:
                plan = todo.get_nowait()
            except queue.Empty:
                return
            read(plan)
            counts[kind] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sum(n for _, n in workers)) as pool:
        futures = [pool.submit(work, kind, read) for kind, (read, n) in enumerate(workers) for _ in range(n)]
        for future in futures:
            future.result()
    return time.perf_counter() - t0, counts


def encoder_ceiling(encoder_path: Path, device: str, batch_size: int, seconds: float) -> float:
    """Patches/s of the encoder alone on a ready batch: fp16 CUDA-graph replays on a GPU,
    fp32 eager calls on the CPU (dry run)."""
    from nic_fast.encoders import load_encoder

    dtype = torch.float16 if device == "cuda" else torch.float32
    encoder = load_encoder(encoder_path).to(device, dtype)
    x = torch.randn(batch_size, 3, PATCH_PX, PATCH_PX, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        if device != "cuda":
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                encoder(x)
                calls += 1
            return calls * batch_size / (time.perf_counter() - t0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(10):
                encoder(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            encoder(x)
        replays, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                graph.replay()
            replays += 20
            torch.cuda.synchronize()
        return replays * batch_size / (time.perf_counter() - t0)


class _NaivePatches(torch.utils.data.Dataset):
    """One OpenSlide read_region per patch at the scanned resolution, as common tools do."""

    def __init__(self, slide: Path, cells: np.ndarray) -> None:
        self.slide_path, self.cells, self.slide = str(slide), cells, None

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import openslide

        if self.slide is None:
            self.slide = openslide.OpenSlide(self.slide_path)
        i, j = (int(v) for v in self.cells[index])
        span = PATCH_PX * DOWNSAMPLE
        image = self.slide.read_region((j * span, i * span), 0, (span, span)).convert("RGB")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), torch.tensor([i, j])


def naive_baseline(slide: Path, store_path: Path, encoder_path: Path, device: str, batch_size: int,
                   n_patches: int, workers: int) -> float:
    """Patches/s of the naive loader + the same encoder, writing the same grid."""
    from nic_fast import open_store
    from nic_fast.encoders import load_encoder

    store = open_store(store_path)
    cells = np.argwhere(store.tissue)[:n_patches]
    dtype = torch.float16 if device == "cuda" else torch.float32
    encoder = load_encoder(encoder_path).to(device, dtype)
    scale, offset = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in encoder.spec.scale_offset())
    loader = torch.utils.data.DataLoader(_NaivePatches(slide, cells), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device == "cuda")
    grid = np.zeros((*store.grid_shape, store.code_size), np.float16)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for pixels, ij in loader:
            x = torch.nn.functional.avg_pool2d(pixels.to(device, non_blocking=True).float(), DOWNSAMPLE) * scale + offset
            grid[ij[:, 0], ij[:, 1]] = encoder(x.to(dtype)).float().cpu().numpy().astype(np.float16)
    return len(cells) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="slide side in px at 0.25 µm/px")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--baseline-patches", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-gpu-work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-gpu")
    parser.add_argument("--h5", type=Path, default=SHARED / "nic-paper-encoders" / "encoder_bigan.h5",
                        help="the paper's BiGAN encoder (Keras HDF5)")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("NIC_FAST_DRY_RUN") == "1",
                        help="every step on the CPU with tiny sizes (also NIC_FAST_DRY_RUN=1)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.size, args.batch_size, args.baseline_patches = min(args.size, 3072), 64, 64
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU engine (--dry-run checks it on the CPU)")
    if not args.h5.exists():
        raise SystemExit(f"{args.h5} not found: pass --h5 with the paper's encoder_bigan.h5")
    cores = len(os.sched_getaffinity(0))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(device), "size_px": args.size, "slides": args.slides,
                               "batch_size": args.batch_size, "dry_run": args.dry_run}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    encoder, slides = prepare(args.workdir, args.size, args.slides, args.h5)
    results["end_to_end"] = e2e = end_to_end(slides, encoder, device, args.batch_size, args.workdir / "out-e2e")
    save()
    print(f"end to end: {e2e['steady_slide_s']:.2f} s per slide (steady), {e2e['patches_per_s']:,.0f} patches/s",
          flush=True)
    plans = region_plans(Path(e2e["store"]))
    results["decode"] = decode_ceilings(slides[0], e2e["level"], plans, cores, device)
    save()
    results["encoder"] = {"patches_per_s": encoder_ceiling(encoder, device, args.batch_size, 1.0 if args.dry_run else 3.0)}
    save()
    results["naive"] = {"patches_per_s": naive_baseline(slides[0], Path(e2e["store"]), encoder, device,
                                                        args.batch_size, args.baseline_patches, cores)}
    save()
    table = render(results)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)


def render(r: dict[str, Any]) -> str:
    m, e2e, decode = r["machine"], r["end_to_end"], r["decode"]
    encoder, naive = r["encoder"]["patches_per_s"], r["naive"]["patches_per_s"]
    both = decode["both"]["patches_per_s"]
    rows = [
        ("per-slide seconds, steady state", f"{e2e['steady_slide_s']:.2f} s",
         f"slides: {', '.join(f'{s:.2f}' for s in e2e['slide_s'])} s (target <= 2 s)"),
        ("end to end, nic-fast compress", f"{e2e['patches_per_s']:,.0f} patches/s",
         f"{e2e['patches_per_s'] / min(both, encoder):.2f} x min(decode both, encoder) (target >= 0.8); "
         f"decode {e2e['decode'].get('device', '?')}"),
        ("decode ceiling, CPU threads", f"{decode['cpu']['patches_per_s']:,.0f} patches/s",
         f"{decode['threads']['cpu']} threads"),
        ("decode ceiling, nvImageCodec (GPU)", f"{decode['gpu']['patches_per_s']:,.0f} patches/s",
         f"{decode['threads']['gpu']} threads"),
        ("decode ceiling, both at once", f"{both:,.0f} patches/s",
         f"regions cpu/gpu: {decode['both']['regions'][0]}/{decode['both']['regions'][1]}"),
        ("encoder ceiling", f"{encoder:,.0f} patches/s", f"batch {r['batch_size']}"),
        ("naive: OpenSlide per patch + DataLoader", f"{naive:,.0f} patches/s",
         f"ours = {e2e['patches_per_s'] / naive:.1f} x naive"),
    ]
    t = e2e["timings"]
    waits = ", ".join(f"{k} {t[k]:.2f}" for k in ("read_wait_s", "batch_wait_s", "tile_wait_s", "patchify_s",
                                                    "encode_s") if k in t)
    where = f"GPU: {', '.join(m['gpus'])}" if m["gpus"] else "dry run on the CPU (tiny sizes, not a measurement)"
    lines = [f"{where}; CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (CUDA {m['cuda']})",
             f"{r['slides']} slides of {r['size_px']}² px at {SCANNED_MPP} µm/px → {WORKING_MPP} µm/px, "
             f"{e2e['patches']} tissue patches each ({e2e['tissue_fraction']:.0%} of cells), BiGAN encoder; "
             f"first slide's stage times (s): {waits}", "",
             "| measurement | result | note |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

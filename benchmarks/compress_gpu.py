"""GPU compression throughput against the hardware ceilings, all in one run on one machine.

On a generated slide of --size² px at 0.25 µm/px (about half tissue), compressed at
0.5 µm/px with the paper's BiGAN encoder, it measures:
  (a) the decode ceiling: cuCIM reading the same tissue regions as the pipeline with every
      CPU core (and, where cuCIM can, on the GPU), nothing else;
  (b) the encoder ceiling: the half-precision encoder on ready device tensors (CUDA graph);
  (c) `nic-fast compress --device cuda` end to end, and its ratio to min(a, b);
  (d) `nic-fast compress --gpus` over 1..N GPUs (N = the GPUs present);
  (e) a naive baseline: OpenSlide read_region per patch in a DataLoader with every core,
      the same fp16 encoder on the GPU;
  (f) the fp16 and bf16 embedding error against fp32 on a batch of real patches.
It prints a table and writes results.json and results.md into --out.

Usage: python benchmarks/compress_gpu.py [--size 40000] [--out bench-gpu] [--h5 encoder_bigan.h5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
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
CHILD_TIMEOUT_S = 300  # a hung child fails the benchmark with its output instead of hanging it


def machine() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def prepare(workdir: Path, size: int, h5: Path) -> tuple[Path, Path]:
    from nic_fast.encoders.keras import import_keras
    from nic_fast.synthetic import write_synthetic_slide

    workdir.mkdir(parents=True, exist_ok=True)
    encoder = workdir / "bigan.pt"
    if not encoder.exists():
        import_keras(h5, encoder)
    slide = workdir / f"slide_{size}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(slide, height=size, width=size, mpp=SCANNED_MPP, seed=11, lesion=True)
        print(f"generated {slide.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return encoder, slide


def run_cli(args: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """`nic-fast compress ARGS -o OUT` in a child process: (summary.json, wall seconds)."""
    cmd = [sys.executable, "-m", "nic_fast", "compress", *args, "-o", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def region_plans(store_path: Path) -> tuple[list[Any], int]:
    """The pipeline's region reads for a compressed slide: (plans, tissue cells)."""
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
    return plans, int(store.tissue.sum())


def decode_cpu(slide: Path, level: int, plans: list[Any], threads: int) -> float:
    """Seconds for cuCIM to read every region with ``threads`` threads (own handle each)."""
    from nic_fast.slides import open_slide

    local = threading.local()
    handles = []

    def read(plan: Any) -> None:
        if not hasattr(local, "reader"):
            local.reader = open_slide(slide, backend="cucim")
            handles.append(local.reader)
        local.reader.read_region(level, plan.y0, plan.x0, plan.height, plan.width)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, plans))
    seconds = time.perf_counter() - t0
    for handle in handles:
        handle.close()
    return seconds


def decode_gpu(slide: Path, level: int, plans: list[Any]) -> float:
    """Seconds for cuCIM's GPU decode to read every region (as the pipeline's GPU decoder)."""
    from nic_fast.engine.cuda import GPU_DECODE_THREADS, GpuDecoder
    from nic_fast.slides import open_slide

    with open_slide(slide, backend="cucim") as reader:
        downsample = reader.level_downsamples[level]
    decoder = GpuDecoder(slide, level, downsample, torch.device("cuda", 0))
    decoder.read(plans[0])  # initialises the codec
    t0 = time.perf_counter()
    with ThreadPoolExecutor(GPU_DECODE_THREADS) as pool:
        list(pool.map(decoder.read, plans))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def encoder_ceiling(encoder_path: Path, dtype: torch.dtype, batch_size: int, seconds: float = 3.0) -> float:
    """Patches/s of the encoder alone on a ready device batch, replayed as a CUDA graph."""
    from nic_fast.encoders import load_encoder

    encoder = load_encoder(encoder_path).to("cuda", dtype)
    x = torch.randn(batch_size, 3, PATCH_PX, PATCH_PX, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            encoder(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        encoder(x)
    replays = 0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            graph.replay()
        replays += 20
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    return replays * batch_size / (start.elapsed_time(end) / 1e3)


def precision_errors(slide: Path, encoder_path: Path, plans: list[Any], level: int, batch_size: int) -> dict[str, Any]:
    """fp16 and bf16 embeddings against fp32 on real patches: relative L2 and max abs error."""
    from nic_fast import kernels
    from nic_fast.encoders import load_encoder
    from nic_fast.slides import open_slide

    encoder32 = load_encoder(encoder_path).to("cuda", torch.float32)
    scale, offset = encoder32.spec.scale_offset()
    batch = torch.empty(batch_size, 3, PATCH_PX, PATCH_PX)
    filled = 0
    with open_slide(slide, backend="cucim") as reader:
        for plan in plans:
            pixels = reader.read_region(level, plan.y0, plan.x0, plan.height, plan.width)
            count = min(plan.n_cells, batch_size - filled)
            kernels.patchify(pixels, plan.level_px[:count], batch[filled : filled + count], scale=scale,
                             offset=offset, downsample=DOWNSAMPLE)
            filled += count
            if filled == batch_size:
                break
    x = batch[:filled].cuda()
    reference = encoder32(x).float()
    errors: dict[str, Any] = {"sample_patches": filled}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = load_encoder(encoder_path).to("cuda", dtype)
        error = half(x).float() - reference
        errors[name] = {"relative_l2_error": float(error.norm() / reference.norm()),
                        "max_abs_error": float(error.abs().max())}
    return errors


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


def naive_baseline(slide: Path, store_path: Path, encoder_path: Path, batch_size: int, n_patches: int,
                   workers: int) -> float:
    """Patches/s of the naive loader + the same fp16 encoder on the GPU, writing the same grid."""
    from nic_fast import open_store
    from nic_fast.encoders import load_encoder

    store = open_store(store_path)
    cells = np.argwhere(store.tissue)[:n_patches]
    encoder = load_encoder(encoder_path).to("cuda", torch.float16)
    scale, offset = (torch.tensor(v, device="cuda").view(1, -1, 1, 1) for v in encoder.spec.scale_offset())
    loader = torch.utils.data.DataLoader(_NaivePatches(slide, cells), batch_size=batch_size, num_workers=workers,
                                         pin_memory=True)
    grid = np.zeros((*store.grid_shape, store.code_size), np.float16)
    t0 = time.perf_counter()
    for pixels, ij in loader:
        x = torch.nn.functional.avg_pool2d(pixels.cuda(non_blocking=True).float(), DOWNSAMPLE) * scale + offset
        grid[ij[:, 0], ij[:, 1]] = encoder(x).float().cpu().numpy().astype(np.float16)
    return len(cells) / (time.perf_counter() - t0)


def scaling(slide: Path, encoder: Path, workdir: Path, batch_size: int, max_gpus: int) -> dict[int, float]:
    """Aggregate patches/s of `--gpus` over n GPUs, n copies of the slide per run (one each)."""
    rates = {}
    for n in range(1, max_gpus + 1):
        copies = []
        for k in range(n):
            copy = workdir / "copies" / f"{slide.stem}_copy{k}{slide.suffix}"
            copy.parent.mkdir(exist_ok=True)
            if not copy.exists():
                os.link(slide, copy)
            copies.append(str(copy))
        gpus = ",".join(map(str, range(n)))
        summary, _ = run_cli([*copies, "--encoder", str(encoder), "--gpus", gpus, "--batch-size", str(batch_size)],
                             workdir / f"out-gpus{n}")
        devices = summary["devices"]
        rates[n] = sum(d["patches"] for d in devices) / max(d["wall_s"] for d in devices)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="slide side in px at 0.25 µm/px")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--baseline-patches", type=int, default=8192)
    parser.add_argument("--max-gpus", type=int, default=None, help="scale over 1..N GPUs [default: all]")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-gpu-work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-gpu")
    parser.add_argument("--h5", type=Path, default=SHARED / "nic-paper-encoders" / "encoder_bigan.h5",
                        help="the paper's BiGAN encoder (Keras HDF5)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU engine (see benchmarks/compress_cpu.py)")
    if not args.h5.exists():
        raise SystemExit(f"{args.h5} not found: pass --h5 with the paper's encoder_bigan.h5")
    cores = len(os.sched_getaffinity(0))
    args.out.mkdir(parents=True, exist_ok=True)
    encoder, slide = prepare(args.workdir, args.size, args.h5)
    results: dict[str, Any] = {"machine": machine(), "size_px": args.size, "batch_size": args.batch_size}

    summary, wall = run_cli([str(slide), "--encoder", str(encoder), "--device", "cuda", "--batch-size",
                             str(args.batch_size)], args.workdir / "out-e2e")
    store_path = args.workdir / "out-e2e" / f"{slide.stem}.zarr"
    attrs = json.loads((store_path / "zarr.json").read_text())["attributes"]["nic_fast"]
    (e2e,) = summary["slides"]
    results["end_to_end"] = {"patches_per_s": e2e["patches_per_s"], "patches": e2e["patches"],
                             "slide_s": e2e["seconds"], "process_wall_s": wall, "timings": attrs["timings"],
                             "decode": attrs["decode"], "precision": attrs["precision"]}
    print(f"end to end: {e2e['patches_per_s']:.0f} patches/s ({e2e['patches']} patches)", flush=True)

    plans, cells = region_plans(store_path)
    level = attrs["level"]
    results["tissue_fraction"] = attrs["tissue_fraction"]
    cpu_s = decode_cpu(slide, level, plans, cores)
    results["decode_cpu"] = {"patches_per_s": cells / cpu_s, "threads": cores}
    try:
        gpu_s = decode_gpu(slide, level, plans)
        results["decode_gpu"] = {"patches_per_s": cells / gpu_s}
    except Exception as exc:  # noqa: BLE001 - cuCIM without a GPU codec here: report why
        results["decode_gpu"] = {"unavailable": f"{type(exc).__name__}: {exc}"}
    print(f"decode ceiling: {results['decode_cpu']['patches_per_s']:.0f} patches/s on {cores} cores", flush=True)

    results["encoder_fp16"] = {"patches_per_s": encoder_ceiling(encoder, torch.float16, args.batch_size)}
    results["encoder_bf16"] = {"patches_per_s": encoder_ceiling(encoder, torch.bfloat16, args.batch_size)}
    results["precision"] = precision_errors(slide, encoder, plans, level, args.batch_size)
    results["naive"] = {"patches_per_s": naive_baseline(slide, store_path, encoder, args.batch_size,
                                                        args.baseline_patches, cores)}
    n_gpus = min(args.max_gpus or torch.cuda.device_count(), torch.cuda.device_count())
    results["scaling"] = scaling(slide, encoder, args.workdir, args.batch_size, n_gpus) if n_gpus > 1 else {}

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    decode = max(r["decode_cpu"]["patches_per_s"], r["decode_gpu"].get("patches_per_s", 0.0))
    encoder = r["encoder_fp16"]["patches_per_s"]
    e2e = r["end_to_end"]["patches_per_s"]
    naive = r["naive"]["patches_per_s"]
    gpu_decode = r["decode_gpu"].get("patches_per_s")
    rows = [
        ("(a) decode ceiling, cuCIM on the CPU", f"{r['decode_cpu']['patches_per_s']:,.0f} patches/s",
         f"{r['decode_cpu']['threads']} threads"),
        ("(a) decode ceiling, cuCIM on the GPU", f"{gpu_decode:,.0f} patches/s" if gpu_decode else "n/a",
         "" if gpu_decode else r["decode_gpu"]["unavailable"][:80]),
        ("(b) encoder ceiling, fp16, CUDA graph", f"{encoder:,.0f} patches/s", f"batch {r['batch_size']}"),
        ("(b) encoder ceiling, bf16, CUDA graph", f"{r['encoder_bf16']['patches_per_s']:,.0f} patches/s", ""),
        ("(c) nic-fast compress --device cuda", f"{e2e:,.0f} patches/s",
         f"{e2e / min(decode, encoder):.2f} x min(a, b) (target >= 0.8); decode on "
         f"{r['end_to_end']['decode']['device']}"),
        ("(e) naive: OpenSlide per patch + DataLoader", f"{naive:,.0f} patches/s", f"ours = {e2e / naive:.1f} x naive (target >= 5)"),
    ]
    for n, rate in sorted(r["scaling"].items()):
        rows.append((f"(d) --gpus over {n} GPU(s)", f"{rate:,.0f} patches/s",
                     f"{rate / r['scaling'][1]:.2f} x one GPU (target for 2: >= 1.8)"))
    if not r["scaling"]:
        rows.append(("(d) --gpus scaling", "n/a", f"{len(m['gpus'])} GPU on this machine"))
    p = r["precision"]
    for name in ("fp16", "bf16"):
        rows.append((f"(f) {name} vs fp32 embeddings, {p['sample_patches']} real patches",
                     f"{p[name]['relative_l2_error']:.2e}", f"relative L2; max abs {p[name]['max_abs_error']:.2e}"))
    t = r["end_to_end"]["timings"]
    waits = ", ".join(f"{k} {t[k]:.2f}" for k in ("read_wait_s", "batch_wait_s", "tile_wait_s") if k in t)
    lines = [f"GPU: {', '.join(m['gpus'])}; CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (CUDA {m['cuda']})",
             f"slide: {r['size_px']}² px at {SCANNED_MPP} µm/px → {WORKING_MPP} µm/px, "
             f"{r['end_to_end']['patches']} tissue patches ({r['tissue_fraction']:.0%} of cells), BiGAN encoder; "
             f"end-to-end waits (s): {waits}", "",
             "| measurement | result | note |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

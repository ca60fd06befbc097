"""CPU compression throughput, every figure measured in one run on one machine.

For the paper's BiGAN encoder on a generated slide with >= 20,000 tissue patches, prints:

* the encoder on ready tensors, as imported and after each step of the fast path
  (pool absorbed into patchify, BatchNorms folded, torch.compile, bf16 eager and compiled);
* a decode-only ceiling: the same tissue regions read with the same reader and threads
  as ``compress``, nothing encoded;
* ``nic-fast compress`` end to end (cold: the first compile; warm: inductor's cache and the
  ledger filled, as every later run), and end to end with ``--no-fast-path``;
* the two-stage bound ``1 / (1/decode + 1/encoder)`` (both stages share the same cores on
  a CPU box) and end to end's ratio to it;
* a naive baseline written the way common tools do it (OpenSlide ``read_region`` per patch
  inside a PyTorch DataLoader with 2 workers, the encoder as imported, fp32), and the same
  baseline given our fast encoder, so the pipeline's gain and the encoder's gain show apart;
* peak RSS of ``compress`` at two slide sizes (it must not grow with size);
* the CPU model and its bf16/AMX flags.

Usage: python benchmarks/compress_cpu.py [--size 28000] [--small-size 12000] [--workdir bench-work]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
READER_THREADS = 2  # what compress uses on a CPU run (nic_fast.compress.CPU_READER_THREADS)


def prepare(workdir: Path, size: int, small_size: int, h5: Path) -> tuple[Path, Path, Path]:
    from nic_fast.encoders.keras import import_keras
    from nic_fast.synthetic import write_synthetic_slide

    workdir.mkdir(parents=True, exist_ok=True)
    encoder = workdir / "bigan.pt"
    if not encoder.exists():
        import_keras(h5, encoder)
    slides = []
    for name, side in (("big", size), ("small", small_size)):
        path = workdir / f"{name}_{side}.tif"
        if not path.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(path, height=side, width=side, mpp=0.5, seed=7, lesion=True)
            print(f"generated {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        slides.append(path)
    return encoder, slides[0], slides[1]


# -- the encoder on ready tensors ------------------------------------------------------------


def rate(module: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, seconds: float) -> float:
    """patches/s over at least ``seconds`` (after three warm-up calls: TorchScript's profiling
    executor and inductor both settle there)."""
    with torch.inference_mode():
        for _ in range(3):
            module(batch)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            module(batch)
            done += len(batch)
    return done / (time.perf_counter() - t0)


def encoder_steps(encoder_path: Path, batch_size: int, seconds: float) -> tuple[list[tuple[str, float, str]], dict]:
    """The encoder as imported and after each fast-path step: (name, patches/s, note) rows."""
    from nic_fast.encoders import load_encoder
    from nic_fast.encoders.rewrite import rewrite_encoder

    def batch(px: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.rand(batch_size, 3, px, px) * 2 - 1).to(dtype).contiguous(memory_format=torch.channels_last)

    def channels_last(module, dtype=torch.float32):
        return module.to(dtype=dtype).to(memory_format=torch.channels_last)

    rows = []
    encoder = load_encoder(encoder_path)
    rows.append(("as imported (128 px, pool inside), fp32 eager", rate(channels_last(encoder.module), batch(128), seconds), ""))
    pooled = rewrite_encoder(load_encoder(encoder_path), fold_batchnorms=False)
    rows.append((f"+ pool into patchify ({pooled.input_px} px in)", rate(channels_last(pooled.module), batch(pooled.input_px), seconds), ""))
    full = rewrite_encoder(load_encoder(encoder_path))
    note = f"{full.rewrites.batchnorms_folded} folded, rel. error {full.rewrites.relative_error:.1g}"
    rows.append(("+ BatchNorms folded", rate(channels_last(full.module), batch(full.input_px), seconds), note))
    t0 = time.perf_counter()
    compiled = torch.compile(channels_last(full.module), dynamic=False)
    rate(compiled, batch(full.input_px), 0.0)
    compile_s = time.perf_counter() - t0
    rows.append(("+ torch.compile (inductor), fp32", rate(compiled, batch(full.input_px), seconds), f"compile {compile_s:.0f} s"))
    bf16_module = channels_last(copy.deepcopy(full.module), torch.bfloat16)  # the same rewrite, not captured again
    rows.append(("rewritten, bf16 eager", rate(bf16_module, batch(full.input_px, torch.bfloat16), seconds), ""))
    compiled16 = torch.compile(bf16_module, dynamic=False)
    rows.append(("rewritten, bf16 torch.compile", rate(compiled16, batch(full.input_px, torch.bfloat16), seconds), ""))
    x = batch(full.input_px)
    with torch.inference_mode():
        reference = compiled(x).double()
        error = float((compiled16(x.to(torch.bfloat16)).double() - reference).norm() / reference.norm())
    rows[-1] = (*rows[-1][:2], f"rel. L2 error vs fp32 {error:.1g}")
    return rows, {"compiled_fp32": compiled, "input_px": full.input_px}


# -- the pipeline ----------------------------------------------------------------------------


def run_compress(slide: Path, out: Path, encoder: Path, batch_size: int, *extra: str) -> dict:
    """`nic-fast compress` in a child process: its summary row plus peak RSS (MiB) and its store's attrs."""
    cmd = [sys.executable, "-m", "nic_fast", "compress", str(slide), "-o", str(out), "--encoder", str(encoder),
           "--batch-size", str(batch_size), "--overwrite", "--no-qc", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"compress failed: {' '.join(cmd)}")
    result = json.loads((out / "summary.json").read_text())["slides"][0]
    from nic_fast import open_store

    attrs = open_store(result["store"]).attrs
    return {**result, "rss_mib": usage.ru_maxrss / 1024, "attrs": attrs}


def decode_ceiling(slide: Path, store: Path, threads: int) -> float:
    """Tissue patches/s when the engine's region reads are all there is: the same tiles, tissue
    boxes, reader and thread count as compress, and no encoding."""
    from nic_fast import open_store
    from nic_fast.engine.base import RegionPlan
    from nic_fast.grid import GridGeometry
    from nic_fast.slides import open_slide

    compressed = open_store(store)
    attrs = compressed.attrs
    with open_slide(slide) as reader:
        level_h, level_w = reader.level_dims[attrs["level"]]
        grid = GridGeometry.over_level(level_h, level_w, patch_px=attrs["patch_px"], stride_px=attrs["stride_px"],
                                       downsample=attrs["downsample"])
        plans = []
        for tile in grid.tiles(attrs["tile_cells"]):
            block = compressed.tissue[tile.i0 : tile.i1, tile.j0 : tile.j1]
            cells = np.argwhere(block) + (tile.i0, tile.j0)
            if len(cells):
                plans.append(RegionPlan.of(grid, tile, cells))
        handles = [open_slide(slide) for _ in range(threads)]

        def read(k: int) -> int:
            plan = plans[k]
            handles[k % threads].read_region_checked(attrs["level"], plan.y0, plan.x0, plan.height, plan.width)
            return plan.n_cells

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            cells = sum(pool.map(read, range(len(plans))))
        seconds = time.perf_counter() - t0
        for handle in handles:
            handle.close()
    return cells / seconds


# -- the naive baseline ----------------------------------------------------------------------


class _NaivePatches(torch.utils.data.Dataset):
    """One OpenSlide read_region per patch, PIL → float tensor → normalise, as CLAM-style tools do."""

    def __init__(self, slide: Path, cells: np.ndarray, patch_px: int) -> None:
        self.slide_path, self.cells, self.patch_px = str(slide), cells, patch_px
        self.slide = None

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import openslide

        if self.slide is None:
            self.slide = openslide.OpenSlide(self.slide_path)
        i, j = self.cells[index]
        image = self.slide.read_region((int(j) * self.patch_px, int(i) * self.patch_px), 0,
                                       (self.patch_px, self.patch_px)).convert("RGB")
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        return (x - 0.5) / 0.5, torch.tensor([i, j])


def naive_baseline(slide: Path, store: Path, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                   n_patches: int, out_name: str) -> float:
    """Tissue patches/s of the naive loop (reads, encodes, writes the same grid as a Zarr array)."""
    import zarr

    from nic_fast import open_store

    compressed = open_store(store)
    cells = np.argwhere(compressed.tissue)[:n_patches]
    loader = torch.utils.data.DataLoader(_NaivePatches(slide, cells, 128), batch_size=batch_size, num_workers=2)
    grid = np.zeros((*compressed.grid_shape, 128), np.float16)
    t0 = time.perf_counter()
    for x, ij in loader:
        with torch.inference_mode():
            out = encode(x)
        grid[ij[:, 0], ij[:, 1]] = out.float().numpy().astype(np.float16)
    array = zarr.open_array(str(store.parent / out_name), mode="w", shape=grid.shape, dtype=grid.dtype,
                            chunks=(16, 16, 128), zarr_format=3)
    array[...] = grid
    return len(cells) / (time.perf_counter() - t0)


# -- the report ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=28000, help="side of the big slide in px (0.5 µm/px)")
    parser.add_argument("--small-size", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encoder-seconds", type=float, default=4.0, help="time per encoder measurement")
    parser.add_argument("--baseline-patches", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-work")
    parser.add_argument("--h5", type=Path, default=SHARED / "nic-paper-encoders" / "encoder_bigan.h5")
    args = parser.parse_args()
    if not args.h5.exists():
        raise SystemExit(f"{args.h5} not found: the benchmark uses the paper's BiGAN encoder")
    os.environ["NIC_FAST_CACHE_DIR"] = str(args.workdir / "cache")  # cold start on purpose, then warm
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.workdir / "cache" / "inductor")
    if (args.workdir / "cache").exists():
        import shutil

        shutil.rmtree(args.workdir / "cache")

    encoder, big, small = prepare(args.workdir, args.size, args.small_size, args.h5)
    print("timing the encoder steps", flush=True)
    steps, fast = encoder_steps(encoder, args.batch_size, args.encoder_seconds)
    print("compress: small slide, big slide twice, --compile on, --no-fast-path", flush=True)
    small_run = run_compress(small, args.workdir / "out-small", encoder, args.batch_size)
    cold = run_compress(big, args.workdir / "out-big", encoder, args.batch_size)
    warm = run_compress(big, args.workdir / "out-big", encoder, args.batch_size)
    forced = run_compress(big, args.workdir / "out-big", encoder, args.batch_size, "--compile", "on")
    plain = run_compress(big, args.workdir / "out-plain", encoder, args.batch_size, "--no-fast-path")
    store = Path(warm["store"])
    print("decode ceiling and naive baselines", flush=True)
    decode = decode_ceiling(big, store, READER_THREADS)
    from nic_fast.encoders import load_encoder

    imported = load_encoder(encoder).module
    naive = naive_baseline(big, store, imported, args.batch_size, args.baseline_patches, "naive.zarr")
    compiled, input_px = fast["compiled_fp32"], fast["input_px"]
    naive_fast = naive_baseline(big, store, lambda x: compiled(torch.nn.functional.avg_pool2d(x, 128 // input_px)
                                                               .contiguous(memory_format=torch.channels_last)),
                                args.batch_size, args.baseline_patches, "naive-fast.zarr")

    fast_path = warm["attrs"]["fast_path"]
    step_of = {("float32", False): "+ BatchNorms folded", ("float32", True): "+ torch.compile (inductor), fp32",
               ("bfloat16", False): "rewritten, bf16 eager", ("bfloat16", True): "rewritten, bf16 torch.compile"}
    configuration = (fast_path["precision"]["dtype"], bool(fast_path["compile"]["compiled"]))
    encoder_rate = {name: r for name, r, _ in steps}[step_of[configuration]]
    bound = 1.0 / (1.0 / decode + 1.0 / encoder_rate)
    ours = warm["patches_per_s"]
    has_bf16_units = bool({"amx_bf16", "avx512_bf16"} & set(_flags()))
    target = 4.0 if has_bf16_units else 2.0

    print(f"\nmachine: {describe_machine()}")
    print(f"slide: {big.name} ({warm['patches']} tissue patches), encoder: BiGAN (paper), batch {args.batch_size}\n")
    rows = [(name, f"{r:8.0f} patches/s", note) for name, r, note in steps]
    rows += [
        ("decode only (same regions, reader, 2 threads)", f"{decode:8.0f} patches/s", ""),
        (f"two-stage bound 1/(1/decode + 1/encoder [{configuration[0]}, {'compiled' if configuration[1] else 'eager'}])", f"{bound:8.0f} patches/s", ""),
        ("compress end to end, first run (precision trial)", f"{cold['patches_per_s']:8.0f} patches/s",
         _compile_note(cold["attrs"])),
        ("compress end to end, second run (ledger)", f"{ours:8.0f} patches/s",
         f"{ours / bound:.2f} x two-stage bound (target >= 0.8); {_compile_note(warm['attrs'])}"),
        ("compress end to end, --compile on", f"{forced['patches_per_s']:8.0f} patches/s",
         _compile_note(forced["attrs"])),
        ("compress end to end, --no-fast-path", f"{plain['patches_per_s']:8.0f} patches/s", ""),
        ("naive: OpenSlide per patch + DataLoader, as imported", f"{naive:8.0f} patches/s",
         f"ours = {ours / naive:.2f} x naive (target >= {target:g}: bf16 units {'yes' if has_bf16_units else 'no'})"),
        ("naive, given our fast encoder (fp32 compiled)", f"{naive_fast:8.0f} patches/s",
         f"ours = {ours / naive_fast:.2f} x (target >= 1.5)"),
        (f"peak RSS, {args.small_size}² px ({small_run['patches']} patches)", f"{small_run['rss_mib']:8.0f} MiB", ""),
        (f"peak RSS, {args.size}² px ({warm['patches']} patches)", f"{warm['rss_mib']:8.0f} MiB",
         f"{warm['rss_mib'] / small_run['rss_mib']:.2f} x small (flat = ~1)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value}  {ratio}")
    print(f"\nprecision chosen by compress: {json.dumps(fast_path['precision'])}")


def _compile_note(attrs: dict) -> str:
    compile_attrs = attrs["fast_path"]["compile"]
    if compile_attrs["compiled"]:
        return f"compiled in {compile_attrs['compile_s']:.1f} s, {compile_attrs['speedup']:.2f}x eager"
    return f"not compiled: {compile_attrs.get('why') or compile_attrs.get('note', '')}"


def _flags() -> list[str]:
    from nic_fast.devices import cpu_matrix_flags

    return cpu_matrix_flags()


if __name__ == "__main__":
    main()

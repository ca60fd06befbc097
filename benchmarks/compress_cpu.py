"""CPU compression throughput, all measured in one run on one machine.

Prints, for the paper's BiGAN encoder on a generated slide with >= 20,000 tissue
patches:
  * encoder-only patches/s on ready tensors (the ceiling on a CPU box);
  * end-to-end patches/s of `nic-fast compress` and its ratio to that ceiling;
  * a naive baseline written the way common tools do it (OpenSlide read_region per
    patch inside a PyTorch DataLoader with workers, same encoder, same cells, same
    output grid) and our ratio to it;
  * peak RSS of `nic-fast compress` on two slide sizes (it must not grow with size).

Usage: python benchmarks/compress_cpu.py [--size 28000] [--small-size 12000] [--workdir bench-work]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


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


def encoder_only(encoder_path: Path, batch_size: int, n_patches: int) -> float:
    from nic_fast.encoders import load_encoder

    encoder = load_encoder(encoder_path).to("cpu")
    batch = torch.randn(batch_size, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # TorchScript's profiling executor optimises after a few calls
        encoder(batch)
    t0 = time.perf_counter()
    done = 0
    while done < n_patches:
        encoder(batch)
        done += batch_size
    return done / (time.perf_counter() - t0)


def run_compress(slide: Path, out: Path, encoder: Path, batch_size: int) -> tuple[float, int, float]:
    """`nic-fast compress` in a child process: (patches/s, patches, peak RSS in MiB)."""
    cmd = [sys.executable, "-m", "nic_fast", "compress", str(slide), "-o", str(out), "--encoder", str(encoder),
           "--batch-size", str(batch_size), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"compress failed: {' '.join(cmd)}")
    result = json.loads((out / "summary.json").read_text())["slides"][0]
    return result["patches_per_s"], result["patches"], usage.ru_maxrss / 1024


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


def naive_baseline(slide: Path, store: Path, encoder_path: Path, batch_size: int, n_patches: int) -> float:
    import zarr

    from nic_fast import open_store
    from nic_fast.encoders import load_encoder

    compressed = open_store(store)
    cells = np.argwhere(compressed.tissue)[:n_patches]
    encoder = load_encoder(encoder_path)
    loader = torch.utils.data.DataLoader(_NaivePatches(slide, cells, 128), batch_size=batch_size, num_workers=2)
    grid = np.zeros((*compressed.grid_shape, 128), np.float16)
    t0 = time.perf_counter()
    for x, ij in loader:
        with torch.no_grad():
            out = encoder.module(x)
        grid[ij[:, 0], ij[:, 1]] = out.numpy().astype(np.float16)
    out = zarr.open_array(str(store.parent / "naive.zarr"), mode="w", shape=grid.shape, dtype=grid.dtype,
                          chunks=(16, 16, 128), zarr_format=3)
    out[...] = grid
    return len(cells) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=28000, help="side of the big slide in px (0.5 µm/px)")
    parser.add_argument("--small-size", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encoder-patches", type=int, default=4096)
    parser.add_argument("--baseline-patches", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-work")
    parser.add_argument("--h5", type=Path, default=SHARED / "nic-paper-encoders" / "encoder_bigan.h5")
    args = parser.parse_args()
    if not args.h5.exists():
        raise SystemExit(f"{args.h5} not found: the benchmark uses the paper's BiGAN encoder")

    encoder, big, small = prepare(args.workdir, args.size, args.small_size, args.h5)
    ceiling = encoder_only(encoder, args.batch_size, args.encoder_patches)
    ours, patches, rss_big = run_compress(big, args.workdir / "out-big", encoder, args.batch_size)
    _, patches_small, rss_small = run_compress(small, args.workdir / "out-small", encoder, args.batch_size)
    naive = naive_baseline(big, args.workdir / "out-big" / f"{big.stem}.zarr", encoder, args.batch_size,
                           args.baseline_patches)

    print(f"\nmachine: {describe_machine()}")
    print(f"slide: {big.name} ({patches} tissue patches), encoder: BiGAN (paper), batch {args.batch_size}\n")
    rows = [
        ("encoder only, ready tensors", f"{ceiling:8.0f} patches/s", ""),
        ("nic-fast compress, end to end", f"{ours:8.0f} patches/s", f"{ours / ceiling:.2f} x encoder-only (target >= 0.85)"),
        ("naive: OpenSlide per patch + DataLoader", f"{naive:8.0f} patches/s", f"ours = {ours / naive:.2f} x naive (target >= 2)"),
        (f"peak RSS, {args.small_size}² px ({patches_small} patches)", f"{rss_small:8.0f} MiB", ""),
        (f"peak RSS, {args.size}² px ({patches} patches)", f"{rss_big:8.0f} MiB", f"{rss_big / rss_small:.2f} x small (flat = ~1)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value}  {ratio}")


if __name__ == "__main__":
    main()

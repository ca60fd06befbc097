"""Training-loader throughput against the NIC CNN's own appetite, all measured in one run.

Prints crops/s of
  * the DALI loader (parallel external source workers; skipped when DALI is absent),
  * the PyTorch DataLoader fallback (same crops, same workers),
  * a naive loop that opens the store and reads each crop in the training process,
and the crops/s one CNN training step (forward + backward + Adam, batch 16) consumes on
this machine, with the PyTorch threads `nic-fast train` gives it (the cores the loader
workers leave free). A loader at or above the CNN's rate keeps training compute-bound.

The stores are written with nic-fast's own StoreWriter, as `compress --augment` lays
them out (A = 8, chunks of 16×16 cells × C), holding random float16 codes, which
compress as badly as learned embeddings do.

Usage: python benchmarks/loader.py [--code-size 128] [--crop-cells 128] [--grid 256] [--stores 4]
       [--workers N] [--batches 12] [--workdir bench-work/loader]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine
import zarr
from rich.console import Console
from rich.table import Table

from nic_fast.store import CellGeometry, StoreWriter
from nic_fast.train.fit import RunOptions
from nic_fast.train.loader import CropSource, DaliCropLoader, TorchCropLoader, dali_available, default_workers
from nic_fast.train.model import ModelConfig, NICNet, TrainedModel, parameter_groups
from nic_fast.train.sampler import StoreSampler, read_crop

BATCH = 16
TILE_CELLS = 16


def write_store(path: Path, grid: int, code_size: int, seed: int) -> Path:
    """An augmented store with a round tissue blob (70 % of the grid) and random codes."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((grid, grid))
    tissue = (rows - grid / 2) ** 2 + (cols - grid / 2) ** 2 < (0.47 * grid) ** 2
    geometry = CellGeometry(stride_px=128, patch_px=128, level0_px_per_px=1.0, level0_mpp=0.5,
                            thumbnail_downsample=128.0)
    writer = StoreWriter(path, variants=8, grid_shape=(grid, grid), code_size=code_size, tile_cells=TILE_CELLS,
                         thumbnail=np.full((grid, grid, 3), 255, np.uint8), tissue=tissue, geometry=geometry,
                         attrs={"background": "blank", "grid_shape": [grid, grid]}, config={"benchmark": seed})
    for row, i0 in enumerate(range(0, grid, TILE_CELLS)):
        for col, j0 in enumerate(range(0, grid, TILE_CELLS)):
            h, w = min(TILE_CELLS, grid - i0), min(TILE_CELLS, grid - j0)
            codes = rng.standard_normal((8, h, w, code_size), dtype=np.float32).astype(np.float16)
            codes[:, ~tissue[i0 : i0 + h, j0 : j0 + w]] = 1.0
            writer.write_tile(row, col, i0, j0, codes, np.ones((h, w), bool))
    return writer.publish({}, overwrite=True)


def cnn_crops_per_s(code_size: int, crop_px: int, steps: int, threads: int) -> float:
    """Training steps on ready crops, with the PyTorch threads `nic-fast train` would use."""
    torch.set_num_threads(threads)
    model = TrainedModel(NICNet(ModelConfig(in_channels=code_size, outputs=1)), "binary")
    optimizer = torch.optim.Adam(parameter_groups(model.network), lr=1e-3)
    x = torch.randn(BATCH, crop_px, crop_px, code_size).half()
    y = torch.randint(0, 2, (BATCH,)).float()
    model.network.train()

    def step() -> None:
        loss = model.loss(model.network(x.permute(0, 3, 1, 2).float()), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, oneDNN primitive creation
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - started)


def loader_crops_per_s(loader_class: type, source: CropSource, workers: int) -> float:
    """Crops/s over one epoch after the first batch (which pays for starting the workers)."""
    loader = loader_class(source, batch_size=BATCH, workers=workers, device=torch.device("cpu"))
    try:
        batches = loader.epoch(0)
        next(batches)
        started = time.perf_counter()
        count = sum(len(crops) for crops, _ in batches)
        return count / (time.perf_counter() - started)
    finally:
        loader.close()


def naive_crops_per_s(source: CropSource, crops: int) -> float:
    """The first thing one writes: open the store's Zarr array and read the crop, per crop, in-process."""
    started = time.perf_counter()
    for index in range(crops):
        slide = int(source.slide_order(0)[index])
        sampler = source.samplers[slide]
        embeddings = zarr.open_array(sampler.path / "embeddings", mode="r")
        spec = sampler.random_crop(np.random.default_rng([source.seed, 0, index]), source.crop_px)
        torch.from_numpy(read_crop(embeddings, spec, source.crop_px, sampler.background))
    return crops / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code-size", type=int, default=128, help="C (the paper's encoders: 128)")
    parser.add_argument("--crop-cells", "--crop-px", dest="crop_px", type=int, default=128,
                        help="crop side in grid cells (the paper: 400); --crop-px is the old name")
    parser.add_argument("--grid", type=int, default=256, help="store grid side in cells")
    parser.add_argument("--stores", type=int, default=4)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batches", type=int, default=12, help="batches of 16 per loader measurement")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work") / "loader",
                        help="scratch folder for the stores (deleted and rewritten)")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    paths = [write_store(args.workdir / f"store_{i}.zarr", args.grid, args.code_size, seed=i)
             for i in range(args.stores)]
    samplers = [StoreSampler.open(p) for p in paths]
    source = CropSource(samplers, np.arange(len(paths), dtype=np.float32) % 2, crop_px=args.crop_px, seed=0,
                        crops_per_epoch=args.batches * BATCH)
    crop_mb = args.crop_px**2 * args.code_size * 2 / 2**20
    console = Console()
    console.print(f"{describe_machine()}\n{args.stores} stores of {args.grid}² cells × C={args.code_size}, A=8; "
                  f"crops {args.crop_px}² cells ({crop_mb:.2f} MiB float16), batch {BATCH}, {args.workers} loader workers, "
                  f"{RunOptions(workers=args.workers).torch_threads()} PyTorch threads")

    threads = RunOptions(workers=args.workers).torch_threads()
    cnn = cnn_crops_per_s(args.code_size, args.crop_px, steps=max(2, args.batches // 3), threads=threads)
    rows = [("NIC CNN training step (demand)", cnn)]
    if dali_available():
        dali = loader_crops_per_s(DaliCropLoader, source, args.workers)
        rows.append(("DALI loader (parallel external source)", dali))
    else:
        console.print("DALI is not installed: its row is skipped")
    rows.append(("PyTorch DataLoader fallback", loader_crops_per_s(TorchCropLoader, source, args.workers)))
    rows.append(("naive per-crop Zarr read, in-process", naive_crops_per_s(source, args.batches * BATCH // 2)))

    table = Table(title="training crops per second")
    for column in ("", "crops/s", "MiB/s", "× CNN demand"):
        table.add_column(column, justify="right" if column else "left")
    for name, rate in rows:
        table.add_row(name, f"{rate:.1f}", f"{rate * crop_mb:.0f}", f"{rate / cnn:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()

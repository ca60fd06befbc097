"""Foundation-model presets: inference patches/s per size class on this machine, random weights.

One row per size class — ViT-S (kaiko-vits16), ViT-B (phikon), ViT-L (uni) — plus the
CNN baseline (resnet50-trunc) and CTransPath's Swin-T, each built from its preset with random
weights (the weights do not change the arithmetic), written to a TorchScript encoder file and
run the way ``compress`` runs it: ``load_encoder`` → ``Encoder`` on the CPU in float32, a
fixed batch. Measured in the same run for each: channels-last input (what ``Encoder`` feeds)
against contiguous input (weights as ``Encoder.to`` leaves them), and the batch ``suggest_batch_size`` picks for 8 GiB of activations.
The ratios are the point; absolute figures depend on the machine, printed beside them.

Usage: python benchmarks/presets.py [--batch 8] [--batches 3] [--threads N] [--only uni,phikon]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from machine import describe as describe_machine
from rich.console import Console
from rich.table import Table

from nic_fast.encoders import Encoder, load_encoder, save_encoder, suggest_batch_size
from nic_fast.encoders.presets import PRESETS, parameter_count

ROWS = ("kaiko-vits16", "phikon", "uni", "resnet50-trunc", "ctranspath")
ACTIVATION_BUDGET = 8 << 30


@dataclass
class Row:
    preset: str
    size_class: str
    parameters_m: float
    patches_per_s: float  # channels-last input, as Encoder feeds it
    contiguous_patches_per_s: float
    suggested_batch_8gib: int


def layout_patches_per_s(encoder: Encoder, batch: int, batches: int) -> tuple[float, float]:
    """(channels-last, contiguous) patches/s: the two layouts alternate batch by batch after a
    warm-up of each, and each figure is the median batch, so a neighbour's load on a shared
    machine hits both alike."""
    spec = encoder.spec
    x = torch.randn(batch, spec.channels, spec.input_px, spec.input_px)
    inputs = (x.contiguous(memory_format=torch.channels_last), x.contiguous())
    seconds: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for layout in inputs:
            encoder.module(layout)
        for _ in range(batches):
            for layout, times in zip(inputs, seconds):
                started = time.perf_counter()
                encoder.module(layout)
                times.append(time.perf_counter() - started)
    last, contiguous = (batch / statistics.median(times) for times in seconds)
    return last, contiguous


def measure(name: str, batch: int, batches: int, workdir: Path) -> Row:
    preset = PRESETS[name]
    torch.manual_seed(0)
    path = save_encoder(preset.build().eval(), preset.spec(), workdir / f"{name}.pt")
    encoder = load_encoder(path)
    channels_last, contiguous = layout_patches_per_s(encoder, batch, batches)
    return Row(name, preset.size_class, parameter_count(preset) / 1e6, channels_last, contiguous,
               suggest_batch_size(encoder, "cpu", ACTIVATION_BUDGET))


def table(rows: list[Row], batch: int) -> Table:
    base = rows[0].patches_per_s
    out = Table(title=f"preset encoders on the CPU, float32, batch {batch}, random weights")
    for column in ("preset", "class", "parameters", "patches/s", f"× {rows[0].preset}", "channels-last / contiguous",
                   "batch for 8 GiB"):
        out.add_column(column, justify="left" if column in ("preset", "class") else "right")
    for r in rows:
        out.add_row(r.preset, r.size_class, f"{r.parameters_m:,.1f} M", f"{r.patches_per_s:,.2f}",
                    f"{r.patches_per_s / base:.3f}", f"{r.patches_per_s / r.contiguous_patches_per_s:.2f}",
                    str(r.suggested_batch_8gib))
    return out


def markdown(rows: list[Row]) -> str:
    base = rows[0].patches_per_s
    lines = [f"| preset | class | parameters | patches/s | × {rows[0].preset} | channels-last / contiguous | "
             "batch for 8 GiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.preset} | {r.size_class} | {r.parameters_m:,.1f} M | {r.patches_per_s:,.2f} | "
              f"{r.patches_per_s / base:.3f} | {r.patches_per_s / r.contiguous_patches_per_s:.2f} | "
              f"{r.suggested_batch_8gib} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per layout, after one warm-up each")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated presets, first one is the ratio base")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    console.print(f"machine: {describe_machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.only.split(","):
            rows.append(measure(name, args.batch, args.batches, Path(workdir)))
            console.print(f"{name}: {rows[-1].patches_per_s:.2f} patches/s")
    Console(width=160).print(table(rows, args.batch))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "batch": args.batch,
                                         "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()

"""Encoder training benchmark: throughput per method and probe accuracy on 9-px MNIST digits.

Measured in one run on one machine:
  * training throughput (patches/s, validation excluded) of each method on the
    synthetic task's 9-px grayscale digits (C = 16) and on 128-px RGB patches sampled
    from generated slides (C = 128, the paper's setting);
  * the patch-level probe (dense 256 + BN + LeakyReLU + softmax on frozen codes) on
    held-out digits for the mean-pixel baseline, an untrained encoder (reference),
    VAE, contrastive, BiGAN and the supervised oracle, each trained for the same
    fixed budget of steps on the other half of the digits.

The paper's expectation: every unsupervised encoder beats the mean baseline and the
supervised encoder is the ceiling.

Usage: python benchmarks/encoders.py [--steps 600] [--threads 1] [--workdir bench-work/encoders]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine
from rich.console import Console
from rich.table import Table

from nic_fast.encoder_training.export import export_encoder, mean_pixel_encoder
from nic_fast.encoder_training.fit import TrainConfig, fit
from nic_fast.encoder_training.methods import METHODS
from nic_fast.encoder_training.models import VAE, EncoderArch
from nic_fast.encoder_training.patch_files import load_patch_set
from nic_fast.encoder_training.patches import PatchSet, SlideSampling, sample_slide_patches
from nic_fast.encoder_training.probe import ProbeConfig, probe
from nic_fast.encoder_training.reporting import RichReporter
from nic_fast.encoders import Encoder, EncoderSpec, load_encoder
from nic_fast.synthetic import write_synthetic_slides

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "mnist-10k.npz"
DIGIT_CODE_SIZE = 16
SLIDE_CODE_SIZE = 128
SLIDE_PATCH_PX = 128
SLIDE_BATCH = 16  # 64 at 128 px takes seconds per step on a CPU; throughput per patch barely depends on it


@dataclass
class Row:
    name: str
    code_size: int
    digits_patches_per_s: float | None = None
    slide_patches_per_s: float | None = None
    train_seconds: float | None = None
    probe_accuracy: float | None = None


def digit_halves(seed: int) -> tuple[PatchSet, PatchSet]:
    """Disjoint random halves of the 10,000 digits (the file is sorted by class)."""
    digits = load_patch_set(MNIST, mnist_9px=True)
    order = np.random.default_rng(seed).permutation(len(digits))
    half = len(digits) // 2
    return digits.subset(order[:half]), digits.subset(order[half:])


def untrained_encoder(seed: int) -> Encoder:
    """A freshly initialised VAE encoder: what the architecture gives before any training."""
    torch.manual_seed(seed)
    module = VAE(EncoderArch(9, 1, DIGIT_CODE_SIZE)).encoder.eval()
    spec = EncoderSpec(name="untrained", input_px=9, mpp=None, channels=1, mean=(0.5,), std=(0.5,),
                       code_size=DIGIT_CODE_SIZE, sha256="")
    return Encoder(spec, module, "untrained")


def train_on_digits(method: str, train: PatchSet, steps: int, workdir: Path, seed: int,
                    console: Console) -> tuple[Encoder, float, float]:
    """(encoder, patches/s, seconds) after ``steps`` mini-batches of 64 in 10 epochs."""
    config = TrainConfig(method, code_size=DIGIT_CODE_SIZE, epochs=10, steps_per_epoch=max(1, steps // 10),
                         upright=True, seed=seed)
    started = time.perf_counter()
    result = fit(config, train, workdir / f"digits-{method}", overwrite=True, reporter=RichReporter(console))
    seconds = time.perf_counter() - started
    export_encoder(result, workdir / f"digits-{method}.pt", mpp=None)
    return load_encoder(workdir / f"digits-{method}.pt"), result.patches_per_s, seconds


def slide_patches(workdir: Path, seed: int) -> PatchSet:
    slides = write_synthetic_slides(workdir / "slides", 2, size_px=2048, seed=seed)
    return sample_slide_patches([s.path for s in slides], SlideSampling(patch_px=SLIDE_PATCH_PX, patches_per_slide=64,
                                                                        seed=seed))


def slide_throughput(method: str, patches: PatchSet, steps: int, workdir: Path, seed: int) -> float:
    """Patches/s of the second epoch (the first pays for warm-up), 128-px RGB, C = 128."""
    config = TrainConfig(method, code_size=SLIDE_CODE_SIZE, epochs=2, steps_per_epoch=steps, batch_size=SLIDE_BATCH,
                         seed=seed)
    labelled = patches if method != "supervised" else _with_position_labels(patches)
    result = fit(config, labelled, workdir / f"slides-{method}", overwrite=True)
    return float(result.history[-1]["patches_per_s"])


def _with_position_labels(patches: PatchSet) -> PatchSet:
    """Throughput only needs some labels: the grid row's parity stands in for a patch class."""
    assert patches.cells is not None
    return PatchSet(images=patches.images, source=patches.source, sources=patches.sources, mpp=patches.mpp,
                    cells=patches.cells, labels=(patches.cells[:, 0] % 2).astype(np.int64),
                    class_names=["even row", "odd row"])


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def table(rows: list[Row], steps: int) -> Table:
    out = Table(title=f"encoder training: {steps} steps of 64 on 5,000 digits; probe on the other 5,000")
    for column in ("encoder", "C", "train patches/s, 9-px gray", f"train patches/s, {SLIDE_PATCH_PX}-px RGB",
                   "train s (digits)", "probe accuracy (MNIST 9-px)"):
        out.add_column(column, justify="left" if column == "encoder" else "right")

    for row in rows:
        out.add_row(row.name, str(row.code_size), _fmt(row.digits_patches_per_s, ",.0f"),
                    _fmt(row.slide_patches_per_s, ",.1f"), _fmt(row.train_seconds, ".0f"),
                    _fmt(row.probe_accuracy, ".1%"))
    return out


def markdown(rows: list[Row], steps: int) -> str:
    """The table as Markdown, for the README."""
    lines = [f"| encoder | C | train patches/s, 9-px gray | train patches/s, {SLIDE_PATCH_PX}-px RGB | "
             f"train s ({steps} steps) | probe accuracy, MNIST 9-px |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row.name} | {row.code_size} | {_fmt(row.digits_patches_per_s, ',.0f')} | "
                     f"{_fmt(row.slide_patches_per_s, ',.1f')} | {_fmt(row.train_seconds, '.0f')} | "
                     f"{_fmt(row.probe_accuracy, '.1%')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per encoder on the digits")
    parser.add_argument("--slide-steps", type=int, default=3, help="timed steps per encoder on 128-px patches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is steadier on a machine shared with other work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-work" / "encoders")
    args = parser.parse_args()
    if not MNIST.is_file():
        raise SystemExit(f"{MNIST} is missing: the benchmark probes on real MNIST digits (see ../shared/data)")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    console.print(f"machine: {describe_machine()}")
    train, held_out = digit_halves(args.seed)
    settings = ProbeConfig(seed=args.seed)
    module, spec = mean_pixel_encoder(9, 1, None)
    rows = [Row("mean pixel (baseline)", 1, probe_accuracy=probe(Encoder(spec, module, "mean"), held_out,
                                                                  settings).accuracy),
            Row("untrained encoder (reference)", DIGIT_CODE_SIZE,
                probe_accuracy=probe(untrained_encoder(args.seed), held_out, settings).accuracy)]
    slides = slide_patches(args.workdir, args.seed)
    for method in METHODS:
        encoder, rate, seconds = train_on_digits(method, train, args.steps, args.workdir, args.seed, console)
        name = "supervised (oracle)" if method == "supervised" else method
        rows.append(Row(name, DIGIT_CODE_SIZE, rate, slide_throughput(method, slides, args.slide_steps, args.workdir,
                                                                      args.seed), seconds,
                        probe(encoder, held_out, settings).accuracy))
        console.print(f"{name}: probe accuracy {rows[-1].probe_accuracy:.1%}")
    Console(width=160).print(table(rows, args.steps))
    print(markdown(rows, args.steps))
    results = {"machine": describe_machine(), "steps": args.steps, "seed": args.seed, "rows": [vars(r) for r in rows]}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"results: {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()

"""Tissue detection under marker ink: how much ink passes as tissue, how much tissue is lost.

Measured on the grid cells `compress` encodes (128-px patches at 0.5 µm/px, tissue from
the 8-px-per-cell thumbnail, cells with >= 10 % tissue), with and without the ink rule:

  * generated slides with blue, green and black marker strokes (`synth slides --ink`),
    each beside its clean twin (same seed, no strokes);
  * the real slide CMU-1-Small-Region.svs, as it is and with the same kind of strokes
    drawn over its level-0 pixels (`nic_fast.synthetic.draw_marker_ink`), at the
    generator's opacities and at fixed fainter ones.

"Under ink": cells whose whole footprint lies inside a stroke's nominal width (ground
truth from the generator); the figure is the share of them still called tissue.
"Real tissue kept": cells called tissue on the clean twin (or a clean copy of the CMU
slide written like the inked ones) with no ink in their footprint, and still called
tissue on the inked slide.

Usage: python benchmarks/tissue_ink.py [--slides 8] [--size 4096] [--workdir bench-work/tissue-ink]
                                       [--out benchmarks/results/tissue-ink]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine import describe as describe_machine
from PIL import Image
from scipy.ndimage import binary_dilation

from nic_fast import kernels
from nic_fast.grid import GridGeometry
from nic_fast.slides import open_slide
from nic_fast.synthetic import MASK_DOWNSAMPLE, draw_marker_ink, write_pyramid_tiff, write_synthetic_slide
from nic_fast.tissue import detect_tissue

ROOT = Path(__file__).resolve().parents[1]
CMU = Path(os.environ.get("NIC_FAST_SHARED_DATA", ROOT.parent / "shared" / "data")) / "slides" / "CMU-1-Small-Region.svs"
PATCH_PX = 128
THUMB_PX_PER_CELL = 8
MIN_TISSUE = 0.1


@dataclass
class Tally:
    under_ink: int = 0
    under_ink_tissue: int = 0  # of those, called tissue
    under_ink_on_tissue: int = 0  # under ink where the clean slide has tissue
    under_ink_on_tissue_called: int = 0
    real: int = 0
    real_kept: int = 0
    lost_near_ink: int = 0  # real tissue cells lost within two cells of a stroke
    seconds: list[float] = field(default_factory=list)

    def add(self, called: np.ndarray, coverage: np.ndarray, clean: np.ndarray) -> None:
        under = coverage >= 1.0
        real = clean & (coverage == 0)
        self.under_ink += int(under.sum())
        self.under_ink_tissue += int((called & under).sum())
        self.under_ink_on_tissue += int((under & clean).sum())
        self.under_ink_on_tissue_called += int((called & under & clean).sum())
        self.real += int(real.sum())
        self.real_kept += int((called & real).sum())
        near = binary_dilation(coverage > 0, iterations=2)
        self.lost_near_ink += int((real & ~called & near).sum())

    def row(self, name: str) -> str:
        def pct(a: int, b: int) -> str:
            return f"{100 * a / b:.1f} % ({a}/{b})" if b else "–"

        return (f"| {name} | {pct(self.under_ink_tissue, self.under_ink)} | "
                f"{pct(self.under_ink_on_tissue_called, self.under_ink_on_tissue)} | {pct(self.real_kept, self.real)} | "
                f"{self.lost_near_ink}/{self.real - self.real_kept} |")


def cells_of(slide_path: Path, *, remove_ink: bool, tally: Tally | None = None) -> tuple[np.ndarray, GridGeometry, float]:
    """Tissue cells as `compress` finds them at 0.5 µm/px (level 0 of these slides)."""
    with open_slide(slide_path) as reader:
        height, width = reader.level_dims[0]
        grid = GridGeometry.over_level(height, width, patch_px=PATCH_PX, stride_px=PATCH_PX, downsample=1)
        thumb_downsample = PATCH_PX / THUMB_PX_PER_CELL
        thumbnail = reader.thumbnail(thumb_downsample)
    t0 = time.perf_counter()
    tissue = detect_tissue(thumbnail, grid, thumb_px_per_level_px=1 / thumb_downsample, min_fraction=MIN_TISSUE,
                           remove_ink=remove_ink)
    if tally is not None:
        tally.seconds.append(time.perf_counter() - t0)
    return tissue.cells, grid, thumb_downsample


def coverage_of(ink: np.ndarray, grid: GridGeometry, ink_px_per_level_px: float) -> np.ndarray:
    stride = grid.level_stride_px * ink_px_per_level_px
    return kernels.cell_fraction(ink, grid.shape, stride_px=stride, size_px=stride)


def synthetic(workdir: Path, n: int, size: int) -> tuple[Tally, Tally, int, int]:
    """Inked slides with the rule and without it, and cells the rule changes on clean twins."""
    with_rule, without = Tally(), Tally()
    changed = total = 0
    for index in range(n):
        rng = np.random.default_rng([index, 7])
        height, width = 256 * round(size * rng.uniform(0.85, 1.0) / 256), 256 * round(size * rng.uniform(0.9, 1.15) / 256)
        inked = write_synthetic_slide(workdir / f"inked_{index}.tif", height=height, width=width, seed=1000 + index,
                                      lesion=index % 2 == 0, ink=True)
        clean = write_synthetic_slide(workdir / f"clean_{index}.tif", height=height, width=width, seed=1000 + index,
                                      lesion=index % 2 == 0, ink=False)
        clean_cells, grid, _ = cells_of(clean.path, remove_ink=False)
        clean_ruled, _, _ = cells_of(clean.path, remove_ink=True, tally=with_rule)
        changed += int((clean_cells != clean_ruled).sum())
        total += int(clean_cells.sum())
        assert inked.ink_mask_path is not None
        truth = np.asarray(Image.open(inked.ink_mask_path)) > 0
        coverage = coverage_of(truth, grid, 1 / MASK_DOWNSAMPLE)
        with_rule.add(cells_of(inked.path, remove_ink=True, tally=with_rule)[0], coverage, clean_cells)
        without.add(cells_of(inked.path, remove_ink=False, tally=without)[0], coverage, clean_cells)
        print(f"synthetic {index}: {height}x{width} px, ink on {inked.ink_fraction:.0%} of the slide", flush=True)
    return with_rule, without, changed, total


def cmu(workdir: Path, seeds: int, opacities: list[float | None]) -> tuple[int, int, int, dict]:
    """Clean CMU cells without and with the rule, and inked-CMU tallies per opacity."""
    original, grid, _ = cells_of(CMU, remove_ink=False)
    ruled, _, _ = cells_of(CMU, remove_ink=True)
    with open_slide(CMU) as reader:
        level0 = reader.read_region(0, 0, 0, *reader.level_dims[0])
        mpp = reader.mpp
    # The inked copies are re-encoded (JPEG Q90), which alone moves a few pale edge cells:
    # they are compared with a clean copy written the same way.
    write_pyramid_tiff(workdir / "cmu_clean.tif", level0, mpp=mpp)
    clean_cells, _, _ = cells_of(workdir / "cmu_clean.tif", remove_ink=False)
    results = {}
    for opacity in opacities:
        with_rule, without = Tally(), Tally()
        for seed in range(seeds):
            inked, truth = draw_marker_ink(level0, mpp=mpp, seed=seed, opacity=opacity)
            path = workdir / "cmu_inked.tif"
            write_pyramid_tiff(path, inked, mpp=mpp)
            coverage = coverage_of(truth, grid, 1.0)
            with_rule.add(cells_of(path, remove_ink=True, tally=with_rule)[0], coverage, clean_cells)
            without.add(cells_of(path, remove_ink=False, tally=without)[0], coverage, clean_cells)
        results[opacity] = (with_rule, without)
        print(f"CMU inked, opacity {opacity or 'as generated'}: done", flush=True)
    return int(original.sum()), int(ruled.sum()), int((original != ruled).sum()), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096, help="side of the generated slides at 0.5 µm/px")
    parser.add_argument("--cmu-seeds", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-work" / "tissue-ink")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    syn_rule, syn_plain, syn_changed, syn_total = synthetic(args.workdir, args.slides, args.size)
    lines = [
        "# Tissue detection under marker ink",
        "",
        f"Machine: {describe_machine()}. Command: `python benchmarks/tissue_ink.py --slides {args.slides} "
        f"--size {args.size} --cmu-seeds {args.cmu_seeds}`.",
        "",
        "| slides | under ink, called tissue | under ink over tissue, called tissue | real tissue kept | "
        "lost cells within 2 cells of ink |",
        "| --- | ---: | ---: | ---: | ---: |",
        syn_rule.row(f"generated ({args.slides}, ~{args.size} px), ink rule"),
        syn_plain.row("generated, saturation only (before)"),
    ]
    if CMU.exists():
        cmu_before, cmu_after, cmu_changed, inked = cmu(args.workdir, args.cmu_seeds, [None, 0.9, 0.8, 0.7, 0.6])
        for opacity, (rule, plain) in inked.items():
            name = "as generated (0.8-0.95)" if opacity is None else f"{opacity:g}"
            lines.append(rule.row(f"CMU-1-Small-Region + strokes, opacity {name}, ink rule"))
            if opacity is None:
                lines.append(plain.row("CMU-1-Small-Region + strokes, saturation only (before)"))
        lines += ["", f"Clean CMU-1-Small-Region: {cmu_before} tissue cells without the ink rule, {cmu_after} with it "
                      f"({cmu_changed} cells differ, {100 * cmu_changed / max(cmu_before, 1):.1f} %)."]
    else:
        lines += ["", f"{CMU} is absent: the real-slide rows were not measured."]
    cost = np.median(syn_rule.seconds) / max(np.median(syn_plain.seconds), 1e-9)
    lines += [f"Clean generated twins: the ink rule changes {syn_changed} of {syn_total} tissue cells.",
              f"Cost: detect_tissue takes {1e3 * np.median(syn_rule.seconds):.1f} ms per thumbnail with the ink rule, "
              f"{1e3 * np.median(syn_plain.seconds):.1f} ms without ({cost:.2f} x), median over these slides.",
              f"Total {time.perf_counter() - t0:.0f} s."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(report)


if __name__ == "__main__":
    main()

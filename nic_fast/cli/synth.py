"""`nic-fast synth`: generate synthetic data sets with known ground truth."""
from __future__ import annotations

from pathlib import Path

import click

from nic_fast.synthetic import REFERENCE_MPP, SyntheticSlide, write_synthetic_slides


@click.group()
def synth() -> None:
    """Generate synthetic data sets with known ground truth."""


@synth.command("slides")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="Number of slides.")
@click.option(
    "--size",
    "size_px",
    default=8192,
    show_default=True,
    type=click.IntRange(min=256),
    help="Approximate side in px at 0.5 µm/px (sides vary by about ±15 %).",
)
@click.option(
    "--mpp",
    default=REFERENCE_MPP,
    show_default=True,
    type=click.FloatRange(min=0.1, max=10.0),
    help="Scanned µm/px; 0.25 gives 40x slides of the same tissue, twice the px per side.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same slides.")
def slides(out_dir: Path, n: int, size_px: int, mpp: float, seed: int) -> None:
    """H&E-like pyramidal TIFF slides, about half with a lesion, plus labels.csv.

    Each slide_NNN.tif gets slide_NNN_mask.png beside it (255 = lesion, at 1/16 of
    level 0); labels.csv has columns slide,label (1 = lesion).
    """

    def report(slide: SyntheticSlide) -> None:
        click.echo(
            f"{slide.path}  {slide.height}x{slide.width} px  {slide.mpp:g} µm/px  label={slide.label}  "
            f"tissue={slide.tissue_fraction:.0%}  lesion={slide.lesion_fraction:.1%} of tissue"
        )

    write_synthetic_slides(out_dir, n, size_px=size_px, mpp=mpp, seed=seed, on_slide=report)
    click.echo(f"labels: {out_dir / 'labels.csv'}")

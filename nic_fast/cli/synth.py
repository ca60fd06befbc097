"""`nic-fast synth`: generate synthetic data sets with known ground truth."""
from __future__ import annotations

from pathlib import Path

import click

from nic_fast.cli.options import output_option
from nic_fast.synthetic import REFERENCE_MPP, SyntheticSlide, write_synthetic_slides
from nic_fast.synthetic_mnist import (
    DEFAULT_DIGITS,
    MnistCanvas,
    load_digits,
    write_mnist_rectangles,
)


@click.group()
def synth() -> None:
    """Generate synthetic data sets with known ground truth."""


@synth.command("slides")
@output_option("out_dir", file_okay=False, old_names=("--out",), help="Output folder.")
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
@click.option("--ink/--no-ink", default=False, show_default=True,
              help="Draw blue, green and black marker strokes over slides 0, 2, 4, ... (slide_NNN_ink.png: where).")
def slides(out_dir: Path, n: int, size_px: int, mpp: float, seed: int, ink: bool) -> None:
    """H&E-like pyramidal slides (Aperio SVS layout, .tif), about half with a lesion, plus labels.csv.

    Each slide_NNN.tif gets slide_NNN_mask.png beside it (255 = lesion, at 1/16 of
    level 0); labels.csv has columns slide,label (1 = lesion). With --ink, inked slides
    also get slide_NNN_ink.png (255 = marker ink, same scale).
    """

    def report(slide: SyntheticSlide) -> None:
        inked = f"  ink={slide.ink_fraction:.0%} of the slide" if slide.ink_mask_path else ""
        click.echo(
            f"{slide.path}  {slide.height}x{slide.width} px  {slide.mpp:g} µm/px  label={slide.label}  "
            f"tissue={slide.tissue_fraction:.0%}  lesion={slide.lesion_fraction:.1%} of tissue{inked}"
        )

    write_synthetic_slides(out_dir, n, size_px=size_px, mpp=mpp, seed=seed, ink=ink, on_slide=report)
    click.echo(f"labels: {out_dir / 'labels.csv'}")


@synth.command("mnist-rectangles")
@output_option("out_dir", file_okay=False, old_names=("--out",), help="Output folder.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--canvas-px", default=3600, show_default=True, type=click.IntRange(min=180), help="Canvas side in px.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same images.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which disjoint half of the digits to draw from.")
@click.option("--digits", "digits_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DIGITS,
              show_default=True, help="MNIST digits: an .npz (images, labels) or an IDX image file.")
@click.option("--digit-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The IDX label file, when --digits is an IDX image file.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores, at most 8].")
def mnist_rectangles(out_dir: Path, n: int, canvas_px: int, seed: int, split: str, digits_path: Path,
                     digit_labels: Path | None, workers: int | None) -> None:
    """The paper's synthetic task: MNIST digits on a canvas, labelled by a tilted rectangle.

    Writes <split>_NNNNN.png (grayscale), <split>_NNNNN_mask.png (1 = tilted rectangle,
    2 = the axis-aligned one), <split>_NNNNN_cells.png (one pixel per 9-px cell: the
    class of the digit centred in it, 255 where none) and labels.csv (image,label,...;
    label = the class of the digits inside the tilted rectangle).
    """
    try:
        digits = load_digits(digits_path, digit_labels)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    def report(canvas: MnistCanvas) -> None:
        click.echo(f"{canvas.image_path}  label={canvas.label}  tilted={canvas.tilted_fraction:.1%} of the canvas")

    write_mnist_rectangles(out_dir, n, digits=digits, canvas_px=canvas_px, seed=seed, split=split, workers=workers,
                           on_image=report)
    click.echo(f"labels: {out_dir / 'labels.csv'}")

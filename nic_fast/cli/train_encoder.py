"""`nic-fast train-encoder`: train a patch encoder without labels (or with, for the baseline) and export it."""
from __future__ import annotations

from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from nic_fast.cli.options import device_option, output_option
from nic_fast.encoder_training.export import export_encoder
from nic_fast.encoder_training.fit import FitResult, TrainConfig, TrainingError, fit
from nic_fast.encoder_training.methods import METHODS
from nic_fast.encoder_training.patch_files import (
    is_patch_set,
    load_patch_set,
    save_patch_cache,
)
from nic_fast.encoder_training.patches import (
    PatchSet,
    SlideSampling,
    sample_labelled_points,
    sample_slide_patches,
)
from nic_fast.encoder_training.reporting import RichReporter
from nic_fast.encoders import EncoderError
from nic_fast.slides import SlideError

DEFAULT_CODE_SIZE = 128
MNIST_CODE_SIZE = 16


def _load_inputs(inputs: tuple[Path, ...], sampling: SlideSampling, labels_csv: Path | None, mnist_9px: bool,
                 console: Console) -> PatchSet:
    """One patch set as given, or patches sampled from the given slides."""
    sets = [path for path in inputs if is_patch_set(path)]
    if sets:
        if len(inputs) != 1:
            raise click.UsageError("give either one patch set (.zarr cache, .npz, class folder) or slide files, "
                                   f"not {len(inputs)} inputs with patch sets among them")
        return load_patch_set(sets[0], mnist_9px=mnist_9px)
    if mnist_9px:
        raise click.UsageError("--mnist-9px applies to an MNIST .npz, not to slides")
    if labels_csv is not None:
        return sample_labelled_points(labels_csv, list(inputs), sampling)

    def report(path: Path, n: int) -> None:
        console.print(f"sampled {n} patches from {path.name}")

    return sample_slide_patches(list(inputs), sampling, on_slide=report)


def _summary(result: FitResult, output: Path, patches: PatchSet, sha256: str) -> Table:
    table = Table(title=f"nic-fast train-encoder {result.method}")
    for column in ("encoder", "patches", "epochs", "kept", "patches/s", "sha256"):
        table.add_column(column)
    table.add_row(str(output), str(len(patches)), str(len(result.history)), str(result.kept_epoch),
                  f"{result.patches_per_s:.0f}", sha256[:12] + "…")
    return table


@click.command("train-encoder")
@click.argument("method", type=click.Choice(METHODS))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@output_option("output", dir_okay=False,
               help="Encoder file to write (.pt TorchScript or .pt2 torch.export), ready for `compress --encoder`.")
@click.option("--code-size", type=click.IntRange(1), default=None,
              help=f"Code size C [default: {DEFAULT_CODE_SIZE}; {MNIST_CODE_SIZE} with --mnist-9px].")
@click.option("--patch-px", default=128, show_default=True, type=click.IntRange(4),
              help="Patch side at the working resolution, for slides (patch sets bring their own).")
@click.option("--mpp", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Working resolution in µm/px, for slides.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Mini-batches per epoch [default: one pass over the training patches].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(2))
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Initial learning rate [default: 1e-3 VAE, 1e-2 contrastive/supervised, 2e-4 BiGAN].")
@device_option("Where the encoder trains.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed and inputs, same encoder.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint, metrics.csv/json and PNG grids [default: OUTPUT with '.run' added].")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again even if --run-dir holds a run.")
@click.option("--patches-per-slide", default=256, show_default=True, type=click.IntRange(1))
@click.option("--min-tissue", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Tissue fraction a sampled patch needs.")
@click.option("--slide-mpp", type=float, default=None, help="Scanned µm/px for all slides (overrides metadata).")
@click.option("--slide-mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV with columns slide,mpp giving each slide's scanned µm/px.")
@click.option("--mask-suffix", default=None,
              help="Patch labels from a mask beside each slide, <stem><suffix> (e.g. _mask.png); supervised.")
@click.option("--labels-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labelled points, columns slide,x,y,label (level-0 px of the patch centre); supervised.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the sampled patches to this .zarr; give it as input next time to skip sampling.")
@click.option("--mnist-9px", is_flag=True,
              help="The input .npz holds 28-px MNIST digits: train on the synthetic task's binarised 9-px glyphs.")
@click.option("--upright/--any-orientation", default=None,
              help="Whether patches have an orientation (no turns or mirrors in augmentation) "
                   "[default: upright with --mnist-9px, any orientation otherwise].")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                      max_open=True))
@click.option("--name", default=None, help="Encoder name in its spec [default: the output file stem].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for PyTorch [default: PyTorch's]; 1 is faster on a busy machine.")
def train_encoder(method: str, inputs: tuple[Path, ...], output: Path, code_size: int | None, patch_px: int,
                  mpp: float, epochs: int, steps: int | None, batch_size: int, learning_rate: float | None,
                  device: str, seed: int, run_dir: Path | None, resume: bool, overwrite: bool,
                  patches_per_slide: int, min_tissue: float, slide_mpp: float | None, slide_mpp_csv: Path | None,
                  mask_suffix: str | None, labels_csv: Path | None, cache: Path | None, mnist_9px: bool,
                  upright: bool | None, val_fraction: float, name: str | None, threads: int | None) -> None:
    """Train a METHOD encoder on INPUTS (slides, or one patch set) and write it to OUTPUT.

    Slides are sampled like `compress` reads them: tissue patches at --mpp, each with an
    adjacent patch for the contrastive task. A patch set is a .zarr cache from --cache,
    an .npz (images, optional labels) or a folder with one sub-folder of images per class.
    """
    if output.suffix not in (".pt", ".pt2"):
        raise click.BadParameter(f"must end in .pt or .pt2, got {output.name!r}", param_hint="-o")
    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    sampling = SlideSampling(patch_px=patch_px, mpp=mpp, patches_per_slide=patches_per_slide, seed=seed,
                             min_tissue=min_tissue, slide_mpp=slide_mpp, slide_mpp_csv=slide_mpp_csv,
                             mask_suffix=mask_suffix)
    config = TrainConfig(method=method, code_size=code_size or (MNIST_CODE_SIZE if mnist_9px else DEFAULT_CODE_SIZE),
                         epochs=epochs, steps_per_epoch=steps, batch_size=batch_size, learning_rate=learning_rate,
                         val_fraction=val_fraction, seed=seed, device=device,
                         upright=mnist_9px if upright is None else upright)
    try:
        patches = _load_inputs(inputs, sampling, labels_csv, mnist_9px, console)
        if cache is not None:
            console.print(f"patch cache: {save_patch_cache(patches, cache)}")
        result = fit(config, patches, run_dir or output.with_name(output.name + ".run"), resume=resume,
                     overwrite=overwrite, reporter=RichReporter(console))
        spec = export_encoder(result, output, name=name, mpp=patches.mpp)
    except (TrainingError, SlideError, EncoderError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(_summary(result, output, patches, spec.sha256))

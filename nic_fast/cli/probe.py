"""`nic-fast probe`: the patch-level probe of an encoder on labelled patches (the paper's Table 1)."""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from nic_fast.cli.options import device_option, output_option
from nic_fast.encoder_training.patch_files import load_patch_set
from nic_fast.encoder_training.probe import ProbeConfig, ProbeReport, probe
from nic_fast.encoders import EncoderError, load_encoder


def _table(report: ProbeReport) -> Table:
    table = Table(title=f"probe of {report.encoder['name']}",
                  caption=f"test accuracy {report.accuracy:.1%} on {report.n_test} patches")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, accuracy in report.per_class.items():
        table.add_row(name, "no test patch" if accuracy is None else f"{accuracy:.1%}")
    return table


@click.command("probe")
@click.argument("encoder")
@click.argument("patches", type=click.Path(exists=True, path_type=Path))
@output_option("output", dir_okay=False,
               help="JSON report: accuracy overall and per class, confusion matrix, split sizes.")
@click.option("--mnist-9px", is_flag=True, help="PATCHES is an MNIST .npz: probe on the binarised 9-px glyphs.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1), help="Head training epochs.")
@click.option("--test-fraction", default=0.3, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                       max_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@device_option("Where the encoder and the head run.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for PyTorch [default: PyTorch's]; 1 is faster on a busy machine.")
def probe_command(encoder: str, patches: Path, output: Path, mnist_9px: bool, epochs: int, test_fraction: float,
                  seed: int, device: str, threads: int | None) -> None:
    """Train a dense-256 softmax head on ENCODER's frozen codes of PATCHES; report test accuracy.

    PATCHES is an .npz (images, labels, optional class_names), a folder with one
    sub-folder of images per class, or a labelled .zarr patch cache.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        loaded = load_encoder(encoder, device=device)
        labelled = load_patch_set(patches, mnist_9px=mnist_9px)
        report = probe(loaded, labelled, ProbeConfig(epochs=epochs, test_fraction=test_fraction, seed=seed,
                                                     device=device))
    except (EncoderError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.to_json(), indent=2))
    Console(stderr=True).print(_table(report))
    click.echo(f"{report.encoder['name']}: accuracy {report.accuracy:.4f} on {report.n_test} test patches; "
               f"report {output}")

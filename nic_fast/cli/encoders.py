"""`nic-fast encoders`: built-ins, foundation-model presets, importing weights, Keras conversion, specs."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from nic_fast.encoders.builtin import builtin_encoders
from nic_fast.encoders.files import SUFFIXES, load_encoder
from nic_fast.encoders.spec import EncoderError


@click.group()
def encoders() -> None:
    """Patch encoders: built-ins, encoder files (.pt, .pt2) and Keras import."""


@encoders.command("list")
def list_encoders() -> None:
    """Table of the built-in encoders."""
    table = Table(title="built-in encoders")
    for column in ("name", "C", "input px", "µm/px", "description"):
        table.add_column(column, justify="right" if column in ("C", "input px", "µm/px") else "left")
    for name, spec in builtin_encoders().items():
        mpp = "pixels" if spec.mpp is None else f"{spec.mpp:g}"
        table.add_row(name, str(spec.code_size), str(spec.input_px), mpp, spec.description)
    Console().print(table)


@encoders.command("import-keras")
@click.argument("h5_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Encoder file to write: .pt (TorchScript) or .pt2 (torch.export).")
@click.option("--name", default=None, help="Encoder name (default: the file stem without 'encoder_').")
def import_keras_command(h5_file: Path, output: Path, name: str | None) -> None:
    """Convert a NIC paper Keras encoder (HDF5) to a nic-fast encoder file."""
    from nic_fast.encoders.keras import import_keras

    if output.suffix not in SUFFIXES:
        raise click.BadParameter(f"must end in {' or '.join(SUFFIXES)}, got {output.name!r}", param_hint="-o")
    try:
        spec = import_keras(h5_file, output, name)
    except EncoderError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {output}: {spec.name}, C = {spec.code_size}, {spec.input_px} px at {spec.mpp} µm/px, "
               f"sha256 {spec.sha256[:12]}…")


@encoders.command("show")
@click.argument("file_or_name")
def show(file_or_name: str) -> None:
    """Print the spec (JSON) of a built-in encoder or an encoder file."""
    try:
        encoder = load_encoder(file_or_name)
    except EncoderError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(encoder.spec.to_json(), indent=2, ensure_ascii=False))


@encoders.command("presets")
def presets() -> None:
    """Table of the foundation-model presets `encoders import` builds (weights not included)."""
    from nic_fast.encoders.presets import PRESETS, parameter_count

    table = Table(title="foundation-model presets (bring your own weights: nic-fast encoders import)")
    for column in ("name", "model", "architecture", "C", "px", "µm/px", "parameters", "licence"):
        table.add_column(column, justify="right" if column in ("C", "px", "µm/px", "parameters") else "left")
    for name, preset in PRESETS.items():
        table.add_row(name, preset.title, preset.architecture, str(preset.code_size), str(preset.input_px),
                      f"{preset.mpp:g}", f"{parameter_count(preset) / 1e6:,.1f} M", preset.licence)
    Console(width=160).print(table)


@encoders.command("import")
@click.argument("preset")
@click.option("--weights", "weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The model's published weights file (.safetensors, .bin, .pth), obtained under its licence.")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Encoder file to write: .pt (TorchScript) or .pt2 (torch.export).")
@click.option("--name", default=None, help="Encoder name in the spec (default: the preset's name).")
def import_command(preset: str, weights: Path, output: Path, name: str | None) -> None:
    """Build PRESET's architecture, load its weights from a local file, write an encoder file.

    Nothing is downloaded: get the weights from the model's card under its licence. Every key
    and shape is checked against the architecture first; a file that does not fit is refused.
    """
    from nic_fast.encoders.importer import import_preset

    if output.suffix not in SUFFIXES:
        raise click.BadParameter(f"must end in {' or '.join(SUFFIXES)}, got {output.name!r}", param_hint="-o")
    try:
        result = import_preset(preset, weights, output, name)
    except EncoderError as exc:
        raise click.ClickException(str(exc)) from exc
    spec = result.spec
    click.echo(f"wrote {output}: {spec.name} ({result.preset.title}), C = {spec.code_size}, {spec.input_px} px at "
               f"{spec.mpp:g} µm/px, {result.parameters / 1e6:,.1f} M parameters")
    click.echo(f"weights {weights.name}: sha256 {result.weights_file_sha256}")
    click.echo(f"licence: {result.preset.licence} — terms on {result.preset.card}; the weights are yours to "
               "obtain and use under them")

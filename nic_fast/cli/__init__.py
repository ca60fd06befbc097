"""The `nic-fast` command line: one module per command, this file only assembles them.

Commands are imported only when invoked: their modules pull in torch, zarr, scipy and
the rest, which took about 5 s, so `nic-fast --help` (and shell completion) would pay
for every command. :data:`COMMANDS` names each command's module and carries the
one-line help `nic-fast --help` shows (a test checks it against the command's own
docstring). Adding a command is one entry there.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Mapping

import click

from nic_fast import __version__

__all__ = ["COMMANDS", "LazyGroup", "main"]

# name: ("module:attribute", first sentence of the command's docstring)
COMMANDS: dict[str, tuple[str, str]] = {
    "cluster": ("nic_fast.cli.cluster:cluster", "Job files for clusters: Slurm job arrays, Dask workers on Slurm."),
    "compress": ("nic_fast.cli.compress:compress",
                 "Compress whole-slide images into latent grids, one Zarr store per slide."),
    "encoders": ("nic_fast.cli.encoders:encoders",
                 "Patch encoders: built-ins, encoder files (.pt, .pt2) and Keras import."),
    "heatmap": ("nic_fast.cli.heatmap:heatmap",
                "Grad-CAM on the first conv layer over STORE's whole grid, drawn on the slide it came from."),
    "info": ("nic_fast.cli.info:info", "Print a compressed store's metadata, grid shape and tissue fraction."),
    "predict": ("nic_fast.cli.predict:predict",
                "Predict stores with a trained run: P(label 1), the class and its probabilities, or the value."),
    "probe": ("nic_fast.cli.probe:probe_command",
              "Train a dense-256 softmax head on ENCODER's frozen codes of PATCHES; report test accuracy."),
    "summarize": ("nic_fast.cli.summarize:summarize",
                  "Rebuild OUT/summary.json from OUT/records (newest outcome per slide, every run and host)."),
    "synth": ("nic_fast.cli.synth:synth", "Generate synthetic data sets with known ground truth."),
    "train": ("nic_fast.cli.train:train",
              "Cross-validated training on compressed stores listed in CSV (columns store,label[,fold])."),
    "verify": ("nic_fast.cli.verify:verify",
               "Verify compressed stores (or every *.zarr in a folder): exit 1 if any is damaged."),
    "train-encoder": ("nic_fast.cli.train_encoder:train_encoder",
                      "Train a METHOD encoder on INPUTS (slides, or one patch set) and write it to OUTPUT."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; help lists them without importing."""

    def __init__(self, *args: object, lazy_commands: Mapping[str, tuple[str, str]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, name: str) -> click.Command:
        """Import one command; a missing third-party package is a one-line error naming it."""
        module_name, attribute = self.lazy_commands[name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "nic_fast":
                raise
            raise click.ClickException(f"`nic-fast {name}` needs the Python package {exc.name!r}, which is not "
                                       f"installed here; install it (pip install ...) and run again") from exc
        command = getattr(module, attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Click's command list, with the registered help lines of commands not imported yet."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                if self.commands[name].hidden:
                    continue
                rows.append((name, self.commands[name]))
            else:
                rows.append((name, click.Command(name, help=self.lazy_commands[name][1])))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])


@click.group(cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nic-fast")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Neural Image Compression of gigapixel whole-slide images."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # torch.jit is deprecated upstream; users of encoder files should not see that noise.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)

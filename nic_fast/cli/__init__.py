"""The `nic-fast` command line: one module per command, this file only assembles them."""
from __future__ import annotations

import logging
import warnings

import click

from nic_fast import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nic-fast")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Neural Image Compression of gigapixel whole-slide images."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # torch.jit is deprecated upstream; users of encoder files should not see that noise.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)


def _register() -> None:
    from nic_fast.cli import compress, encoders, info, summarize, synth, verify

    main.add_command(compress.compress)
    main.add_command(summarize.summarize)
    main.add_command(verify.verify)
    main.add_command(encoders.encoders)
    main.add_command(info.info)
    main.add_command(synth.synth)

    from nic_fast.cli import probe, train_encoder

    main.add_command(train_encoder.train_encoder)
    main.add_command(probe.probe_command)

    from nic_fast.cli import heatmap, predict, train

    main.add_command(train.train)
    main.add_command(predict.predict)
    main.add_command(heatmap.heatmap)


_register()

"""`nic-fast summarize`: rebuild OUT/summary.json from the per-slide records of every run."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(exists=True, file_okay=False, path_type=Path))
def summarize(out_dir: Path) -> None:
    """Rebuild OUT/summary.json from OUT/records (newest outcome per slide, every run and host).

    Also rewrites OUT/report.html from it.
    """
    from nic_fast.batch.records import SummaryBuilder, SummaryError
    from nic_fast.report import write_report

    try:
        summary = SummaryBuilder(out_dir).write()
        write_report(out_dir, summary)
    except SummaryError as exc:
        raise click.ClickException(str(exc)) from exc
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items() if n) or "no slides recorded"
    click.echo(f"{out_dir / 'summary.json'}: {counts} ({len(summary['runs'])} run(s))")

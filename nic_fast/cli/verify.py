"""`nic-fast verify`: check every chunk of stores (present, decodable, checksum), a line per damaged store."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-v", "--verbose", "show_all", is_flag=True, help="List every damaged chunk, not only the first few.")
def verify(stores: tuple[Path, ...], show_all: bool) -> None:
    """Verify compressed stores (or every *.zarr in a folder): exit 1 if any is damaged.

    Reads every chunk of every array: a deleted, truncated or overwritten chunk is reported
    with the array and the grid cells it covers. Recompress a damaged store with
    `nic-fast compress SLIDE -o OUT --overwrite`.
    """
    from nic_fast.store import StoreError, verify_store

    paths = [p for s in stores for p in (sorted(s.glob("**/*.zarr")) if s.is_dir() and s.suffix != ".zarr" else [s])]
    if not paths:
        raise click.UsageError(f"no stores (*.zarr) found in {', '.join(map(str, stores))}")
    damaged = 0
    for path in paths:
        try:
            problems = verify_store(path)
        except StoreError as exc:
            damaged += 1
            click.echo(f"damaged {path}: {exc}")
            continue
        if not problems:
            click.echo(f"ok {path}")
            continue
        damaged += 1
        arrays = sorted({p.array for p in problems})
        shown = problems if show_all else problems[:3]
        more = "" if show_all or len(problems) <= 3 else f"; and {len(problems) - 3} more (-v lists all)"
        click.echo(f"damaged {path}: {len(problems)} chunk(s) in {', '.join(arrays)}: "
                   + "; ".join(p.describe() for p in shown) + more)
    click.echo(f"{len(paths) - damaged} ok, {damaged} damaged", err=True)
    sys.exit(1 if damaged else 0)

"""`nic-fast info`: what a store holds, without loading its embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from nic_fast.store import StoreError, open_store


def _resolution(attrs: dict) -> str:
    """Working and scanned µm/px, or "pixel units" for plain images compressed with --mpp none."""
    if attrs.get("mpp") is None:
        return f"pixel units (level {attrs['level']}, ×{attrs['downsample']} box downsample)"
    return (f"{attrs['mpp']:.4g} (level {attrs['level']}, ×{attrs['downsample']} box downsample; "
            f"scanned {attrs['scanned_mpp']:.4g})")


def _invalid(attrs: dict) -> str:
    """Not-valid cells with why, e.g. " (181 cells not valid: corrupt JPEG tile ...)"."""
    reasons = attrs.get("invalid_reasons") or {}
    if not reasons:
        return ""
    top = max(reasons, key=reasons.get)
    return f" ({sum(reasons.values())} cells not valid, {reasons[top]} of them: {top})"


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full nic_fast attributes as JSON.")
def info(store: Path, as_json: bool) -> None:
    """Print a compressed store's metadata, grid shape and tissue fraction."""
    try:
        slide = open_store(store)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(slide.attrs, indent=2))
        return
    a = slide.attrs
    table = Table(title=str(store), show_header=False)
    rows = [
        ("source", f"{a['source']['name']} ({a['source']['reader']})"),
        ("grid (H' × W')", f"{slide.grid_shape[0]} × {slide.grid_shape[1]}"),
        ("variants A", str(slide.variants)),
        ("code size C", str(slide.code_size)),
        ("encoder", f"{a['encoder']['name']} ({a['encoder']['sha256'][:12]})"),
        ("µm/px", _resolution(a)),
        ("patch / stride px", f"{a['patch_px']} / {a['stride_px']}"),
        ("tissue fraction", f"{a['tissue_fraction']:.1%} ({int(slide.tissue.sum())} cells)"),
        ("valid fraction", f"{slide.valid.mean():.1%}" + _invalid(a)),
        ("format", f"{a.get('format_version', 1)}" + (" (chunks checksummed)" if a.get("format_version", 1) >= 2 else
                                                     "")),
        ("thumbnail", "×".join(map(str, slide.thumbnail.shape))),
        ("encoder ran as", _fast_path(a)),
        ("seconds", f"{a['timings']['total_s']:.2f}"),
        ("status", a["status"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _fast_path(attrs: dict) -> str:
    """Precision, rewrites and compilation in one line (stores made before the fast path: precision only)."""
    precision = attrs.get("precision", {}).get("dtype", "float32")
    fast = attrs.get("fast_path")
    if not fast:
        return precision
    rewrites = fast["rewrites"]
    done = [f"pool {rewrites['pool_px']}×{rewrites['pool_px']} into patchify"] if rewrites.get("pool_px", 1) > 1 else []
    if rewrites.get("batchnorms_folded"):
        done.append(f"{rewrites['batchnorms_folded']} BatchNorms folded")
    done.append("compiled" if fast["compile"].get("compiled") else "eager")
    return f"{precision}, " + ", ".join(done)

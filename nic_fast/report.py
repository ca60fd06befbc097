"""What a lab looks at after a batch: one QC image per slide and one HTML page for the run.

``OUT/qc/<stem>.png`` (:func:`write_qc_image`) is a store's thumbnail with what
``compress`` did on it: the outline of the tissue it found, the cells it encoded, the
cells it could not read (not ``valid``), a legend and a scale bar in mm (in level-0
pixels for plain images, which have no µm/px). It is drawn with Pillow and NumPy, not
matplotlib: it runs once per slide in batches of thousands, and is bounded in size
(:data:`QC_MAX_PX` on the long side) so a folder of them stays browsable.

``OUT/report.html`` (:func:`write_report`) is one self-contained page (inline CSS, no
script, no server) built from the ``summary.json`` dict: the counts, one row per slide
with its QC image, status and reason, tissue, patches, time and speed and invalid cells,
failed slides first, then the settings, runs and workers. The QC images stay beside the
page as relative links (loaded lazily), not embedded: embedded, thousands of slides
would make a page of hundreds of MB that a browser cannot open.

The tissue outline is recomputed with the detector compress used
(:func:`nic_fast.tissue.detect_tissue`), because a store keeps the per-cell result only:
on the stored thumbnail where it is at most the QC image's size (the very mask compress
found, the detector being deterministic), on the shrunk image of larger thumbnails (the
same detector at the resolution drawn, at a sixteenth of the cost for the largest).
"""
from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nic_fast.grid import GridGeometry
from nic_fast.store import CompressedSlide, open_store
from nic_fast.tissue import TissueMap, detect_tissue

__all__ = ["QC_DIR", "QC_MAX_PX", "QC_MIN_PX", "REPORT_NAME", "STATUS_ORDER", "qc_path", "write_qc_image",
           "write_report"]

QC_DIR = "qc"
REPORT_NAME = "report.html"
QC_MAX_PX = 1024  # long side of the slide image in a QC PNG: larger thumbnails are shrunk
QC_MIN_PX = 512  # smaller ones (8 px per cell) are enlarged, so cell marks stay visible
STATUS_ORDER = ("failed", "stale", "skipped", "ok")  # the report's row order: what needs attention first

# (R, G, B) of each mark; the alpha is how much of the thumbnail a filled cell hides.
TISSUE_RGB = (0, 90, 255)
ENCODED_RGB = (0, 170, 60)
INVALID_RGB = (235, 0, 40)
ENCODED_ALPHA = 0.22
INVALID_ALPHA = 0.6
_LEGEND_MIN_WIDTH_PX = 520
_FONT_PX = 13
_PNG_COMPRESS_LEVEL = 3  # zlib level: 3.5x faster than the default 6 on a 1024² QC image, 12 % larger


def qc_path(out_dir: str | os.PathLike[str], store: str | os.PathLike[str]) -> Path:
    """Where the QC image of ``store`` goes: ``OUT/qc/<its path below OUT, without .zarr>.png``.

    Store names may have folders (``compress --store-names relative``, for slides that
    share a file name), so the QC images mirror them; a store outside OUT goes by its name.
    """
    out_dir, store = Path(out_dir), Path(store)
    if store.is_relative_to(out_dir):  # as written: no system calls (a report has thousands)
        relative = store.relative_to(out_dir)
    elif store.resolve().is_relative_to(out_dir.resolve()):
        relative = store.resolve().relative_to(out_dir.resolve())
    else:
        relative = Path(store.name)
    return out_dir / QC_DIR / relative.with_name(relative.name.removesuffix(".zarr") + ".png")


# -- the QC image ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """Where the grid lies on the QC image, and what one of its pixels measures."""

    size: tuple[int, int]  # (width, height) of the slide image in the PNG
    cell_px: float  # QC pixels per grid stride
    um_per_px: float | None  # µm per QC pixel; None for plain images (pixel units)
    level0_px_per_px: float  # level-0 pixels per QC pixel

    @classmethod
    def of(cls, slide: CompressedSlide, max_px: int) -> _Scale:
        attrs = slide.attrs
        thumb_h, thumb_w = slide.thumbnail.shape[:2]
        long_px = max(thumb_h, thumb_w)
        factor = min(max_px, max(QC_MIN_PX, long_px)) / long_px
        size = (max(1, round(thumb_w * factor)), max(1, round(thumb_h * factor)))
        level0_px_per_px = attrs["thumbnail_downsample"] * thumb_w / size[0]
        scanned_mpp = attrs.get("scanned_mpp")
        return cls(size, _level0_px_per_cell(attrs) / level0_px_per_px,
                   scanned_mpp * level0_px_per_px if scanned_mpp else None, level0_px_per_px)


def _level0_px_per_cell(attrs: Mapping[str, Any]) -> float:
    """Level-0 pixels per grid stride: the stride at the working µm/px scaled to the scan's
    (plain images: level 0 read as it is, so only the box downsample scales it)."""
    if attrs.get("mpp") and attrs.get("scanned_mpp"):
        return attrs["stride_px"] * attrs["mpp"] / attrs["scanned_mpp"]
    return attrs["stride_px"] * attrs.get("downsample", 1)


def _tissue_map(slide: CompressedSlide, image: np.ndarray | None = None) -> TissueMap | None:
    """The tissue detection compress ran, on the thumbnail or on ``image`` (the thumbnail
    resized); None for grayscale images, where compress encodes every cell (saturation
    finds no stain on them)."""
    thumbnail = slide.thumbnail if image is None else image
    if (thumbnail[..., 0] == thumbnail[..., 1]).all() and (thumbnail[..., 1] == thumbnail[..., 2]).all():
        return None
    image_px_per_thumb_px = thumbnail.shape[1] / slide.thumbnail.shape[1]
    attrs = slide.attrs
    downsample = int(attrs.get("downsample", 1))
    height, width = slide.grid_shape
    grid = GridGeometry(height, width, attrs["patch_px"], attrs["stride_px"], downsample)
    level0_px_per_level_px = _level0_px_per_cell(attrs) / (attrs["stride_px"] * downsample)
    image_px_per_level_px = level0_px_per_level_px / attrs["thumbnail_downsample"] * image_px_per_thumb_px
    return detect_tissue(thumbnail, grid, thumb_px_per_level_px=image_px_per_level_px,
                         min_fraction=attrs.get("min_tissue", 0.1))


def _cell_map(cells: np.ndarray, size: tuple[int, int], cell_px: float) -> np.ndarray:
    """A bool (H', W') grid drawn at QC resolution: each pixel takes its cell's value
    (False past the grid, whose edge cells compress dropped)."""
    width, height = size
    if cells.size == 0:
        return np.zeros((height, width), bool)
    rows = (np.arange(height) / cell_px).astype(np.int64)
    cols = (np.arange(width) / cell_px).astype(np.int64)
    inside = (rows[:, None] < cells.shape[0]) & (cols[None, :] < cells.shape[1])
    return cells[np.minimum(rows, cells.shape[0] - 1)[:, None], np.minimum(cols, cells.shape[1] - 1)[None, :]] & inside


def _outline(mask: np.ndarray, width_px: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width_px`` of its edge (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width_px):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _blend(image: Image.Image, where: np.ndarray, rgb: tuple[int, int, int], alpha: float) -> None:
    """Paint ``rgb`` over ``image`` at ``alpha`` where ``where`` is True (Pillow's C compositing)."""
    image.paste(rgb, (0, 0), Image.fromarray(where.astype(np.uint8) * round(255 * alpha)))


def _font(px: int = _FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (a scalable one where Pillow has FreeType)."""
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _nice_length(target: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``target`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(target))
    return max(step * power for step in (1, 2, 5) if step * power <= target)


def _scale_bar(scale: _Scale) -> tuple[int, str]:
    """Length in QC pixels and label of a round scale bar about a fifth of the image wide."""
    target_px = max(scale.size[0] / 5, 20)
    if scale.um_per_px is None:
        length = _nice_length(target_px * scale.level0_px_per_px)
        return max(1, round(length / scale.level0_px_per_px)), f"{length:g} px (level 0)"
    length_mm = _nice_length(target_px * scale.um_per_px / 1000)
    return max(1, round(length_mm * 1000 / scale.um_per_px)), f"{length_mm:g} mm"


def _legend(slide: CompressedSlide, scale: _Scale, width: int, has_outline: bool) -> Image.Image:
    """The strip under the image: what the slide is, what each colour marks, the scale bar."""
    font = _font()
    line_px = _FONT_PX + 7
    strip = Image.new("RGB", (width, 3 * line_px + 8), "white")
    draw = ImageDraw.Draw(strip)
    attrs = slide.attrs
    encoded, invalid = int(slide.tissue.sum()), int((~slide.valid).sum())
    height, width_cells = slide.grid_shape
    source = (attrs.get("source") or {}).get("name", slide.path.name)
    draw.text((6, 4), f"{source}: grid {height} x {width_cells} cells, {attrs.get('tissue_fraction', 0):.0%} tissue",
              fill="black", font=font)
    entries = [(TISSUE_RGB, "tissue outline")] if has_outline else []
    entries += [(ENCODED_RGB, f"encoded cells ({encoded})"), (INVALID_RGB, f"invalid cells ({invalid})")]
    x, y = 6, 4 + line_px
    for rgb, label in entries:
        draw.rectangle((x, y + 2, x + 14, y + 14), fill=rgb, outline="black")
        draw.text((x + 20, y), label, fill="black", font=font)
        x += 28 + round(draw.textlength(label, font=font))
    bar_px, bar_label = _scale_bar(scale)
    y = 4 + 2 * line_px + 6
    draw.rectangle((6, y, 6 + bar_px, y + 4), fill="black")
    draw.text((12 + bar_px, y - 6), bar_label, fill="black", font=font)
    if not has_outline:
        draw.text((12 + bar_px + 20 + round(draw.textlength(bar_label, font=font)), y - 6),
                  "grayscale: every cell encoded", fill="black", font=font)
    return strip


def write_qc_image(store_path: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
                   max_px: int = QC_MAX_PX) -> Path:
    """Draw the QC image of a complete store to ``out_png`` (written atomically).

    The thumbnail, resized to between :data:`QC_MIN_PX` and ``max_px`` on its long side, with the tissue outline
    (blue), the encoded cells (green tint and outline) and the invalid cells (red), above
    a legend with a scale bar.
    """
    slide = open_store(store_path)
    scale = _Scale.of(slide, max_px)
    thumbnail = Image.fromarray(slide.thumbnail)
    shrunk = scale.size[0] < thumbnail.width
    # reducing_gap=1: an integer box reduction first, the same box average 3x faster on a 4096² thumbnail.
    image = (thumbnail.resize(scale.size, Image.Resampling.BOX, reducing_gap=1.0) if shrunk
             else thumbnail.resize(scale.size, Image.Resampling.BILINEAR))
    # Tissue is found again where it costs least: on a shrunk image rather than a thumbnail
    # of up to 4096² px (1.7 s at that size), else on the thumbnail itself (the exact mask).
    tissue = _tissue_map(slide, np.array(image) if shrunk else None)
    line_px = max(1, round(max(scale.size) / 512))
    encoded = _cell_map(slide.tissue, scale.size, scale.cell_px)
    invalid = _cell_map(~slide.valid, scale.size, scale.cell_px)
    _blend(image, encoded, ENCODED_RGB, ENCODED_ALPHA)
    _blend(image, _outline(encoded, line_px), ENCODED_RGB, 1.0)
    _blend(image, invalid, INVALID_RGB, INVALID_ALPHA)
    _blend(image, _outline(invalid, line_px), INVALID_RGB, 1.0)
    if tissue is not None:
        mask = Image.fromarray(tissue.mask).resize(scale.size, Image.Resampling.NEAREST)
        _blend(image, _outline(np.asarray(mask), line_px), TISSUE_RGB, 1.0)
    width = max(scale.size[0], _LEGEND_MIN_WIDTH_PX)
    legend = _legend(slide, scale, width, has_outline=tissue is not None)
    canvas = Image.new("RGB", (width, scale.size[1] + legend.height), "white")
    canvas.paste(image, (0, 0))
    canvas.paste(legend, (0, scale.size[1]))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(f"{out_png.name}.{os.getpid()}.partial")
    canvas.save(partial, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    os.replace(partial, out_png)
    return out_png


# -- the report -----------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta { color: #666; margin-top: 0; }
.counts span { display: inline-block; padding: 0.2em 0.7em; margin-right: 0.4em; border-radius: 0.8em; }
table { border-collapse: collapse; } th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.qc img { max-width: 160px; max-height: 120px; display: block; }
td.reason { max-width: 40em; } code { font-size: 0.9em; word-break: break-all; }
.failed { background: #fde2e2; } .stale { background: #fdf0d5; }
.counts .skipped, tr.skipped td.status { background: #eef2f7; } .counts .ok, tr.ok td.status { background: #e3f4e6; }
tr.failed td.status, tr.stale td.status { font-weight: bold; }
details { margin: 0.5em 0; } summary { cursor: pointer; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _sorted_slides(slides: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rank = {status: index for index, status in enumerate(STATUS_ORDER)}
    return sorted(slides, key=lambda s: (rank.get(s.get("status", ""), len(rank)), str(s.get("slide", ""))))


def _qc_cell(out_dir: Path, slide: Mapping[str, Any]) -> str:
    store = slide.get("store")
    if not store:
        return '<td class="qc">–</td>'
    # A record's store name is its path below OUT: exact even where the store path was
    # written relative to another working directory.
    name = slide.get("name")
    image = out_dir / QC_DIR / f"{name}.png" if isinstance(name, str) and name else qc_path(out_dir, store)
    if not image.is_file():
        return '<td class="qc">no QC image</td>'
    href = quote(image.relative_to(out_dir).as_posix())
    return (f'<td class="qc"><a href="{href}"><img src="{href}" loading="lazy" '
            f'alt="QC of {_e(Path(store).name)}"></a></td>')


def _invalid_text(slide: Mapping[str, Any]) -> str:
    count = slide.get("invalid_cells") or 0
    reasons = slide.get("invalid_reasons") or {}
    detail = "; ".join(f"{reason}: {cells}" for reason, cells in reasons.items())
    return f"{count}" + (f" ({_e(detail)})" if detail else "")


def _slide_row(out_dir: Path, slide: Mapping[str, Any]) -> str:
    status = str(slide.get("status", "unknown"))
    path = str(slide.get("slide", ""))
    patches = slide.get("patches") or 0
    tissue = slide.get("tissue_fraction")
    grid = slide.get("grid_shape")
    cells = [
        _qc_cell(out_dir, slide),
        f'<td><span title="{_e(path)}">{_e(Path(path).name)}</span><br><code>{_e(path)}</code></td>',
        f'<td class="status">{_e(status)}</td>',
        f'<td class="reason">{_e(slide.get("reason", ""))}</td>',
        f'<td class="num">{"–" if tissue is None else f"{100 * tissue:.1f} %"}</td>',
        f'<td class="num">{"×".join(map(str, grid)) if grid else "–"}</td>',
        f'<td class="num">{patches}</td>',
        f'<td class="num">{_number(slide.get("seconds"), ".1f")}</td>',
        f'<td class="num">{_number(slide.get("patches_per_s") if patches else None, ".0f")}</td>',
        f'<td class="num">{_invalid_text(slide)}</td>',
        f'<td>{_e(slide.get("device", ""))}</td>',
        f'<td class="num">{_e(slide.get("attempts", ""))}</td>',
        f'<td>{_e(slide.get("host", ""))}</td>',
    ]
    return f'<tr class="{_e(status)}" data-slide="{_e(path)}">' + "".join(cells) + "</tr>"


_SLIDE_COLUMNS = ("QC", "slide", "status", "reason", "tissue", "grid", "patches", "seconds", "patches/s",
                  "invalid cells", "device", "attempts", "host")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _settings_section(runs: Sequence[Mapping[str, Any]]) -> str:
    """One options table per distinct set of options, naming the runs that used it."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.get("options", {}), sort_keys=True), []).append(run)
    if not groups:
        return "<p>No run recorded its settings.</p>"
    parts = []
    for key, members in groups.items():
        options = json.loads(key)
        ids = ", ".join(str(r.get("run_id", "?")) for r in members)
        parts.append(f"<p>{len(members)} run(s): <code>{_e(ids)}</code></p>")
        parts.append(_table(("option", "value"), ((name, json.dumps(value)) for name, value in options.items())))
    return "".join(parts)


def _details(title: str, count: int, content: str) -> str:
    opened = " open" if count <= 20 else ""
    return f"<details{opened}><summary>{_e(title)} ({count})</summary>{content}</details>"


def write_report(out_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``OUT/report.html`` for a run's summary (the ``summary.json`` dict), atomically.

    QC images are linked where ``OUT/qc/<stem>.png`` exists; slides without one (failed,
    or compressed before QC images existed) say so.
    """
    out_dir = Path(out_dir)
    slides = _sorted_slides(summary.get("slides", []))
    runs = summary.get("runs", [])
    workers = summary.get("workers", [])
    counts = summary.get("counts", {})
    badges = "".join(f'<span class="{_e(status)}">{_e(status)} {counts.get(status, 0)}</span>'
                     for status in STATUS_ORDER if status in counts)
    total_patches = sum(s.get("patches") or 0 for s in slides)
    total_seconds = sum(s.get("seconds") or 0.0 for s in slides)
    run_rows = ((r.get("run_id", ""), r.get("host", ""), r.get("pid", ""), r.get("started_at", ""),
                 r.get("finished_at") or "running or interrupted", r.get("command", "")) for r in runs)
    worker_rows = ((w.get("run_id", ""), w.get("host", ""), w.get("device", ""), w.get("slides", 0),
                    _number(w.get("busy_s"), ".1f"), _number(w.get("patches_per_s"), ".0f"), w.get("restarts", 0))
                   for w in workers)
    title = f"nic-fast report: {out_dir.resolve().name}"
    page = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta"><code>{_e(summary.get("out_dir", out_dir))}</code> · updated '
        f'{_e(summary.get("updated_at", ""))} · nic-fast {_e(summary.get("nic_fast_version", ""))}</p>',
        f'<p class="counts">{badges} · {len(slides)} slides, {total_patches} patches, '
        f"{total_seconds:.0f} s of compression</p>",
        "<h2>Slides</h2>",
        '<table class="slides"><thead><tr>' + "".join(f"<th>{c}</th>" for c in _SLIDE_COLUMNS) + "</tr></thead>",
        "<tbody>" + "\n".join(_slide_row(out_dir, s) for s in slides) + "</tbody></table>",
        "<h2>Settings</h2>", _settings_section(runs),
        "<h2>Runs and workers</h2>",
        _details("runs", len(runs), _table(("run", "host", "pid", "started", "finished", "command"), run_rows)),
        _details("workers", len(workers), _table(("run", "host", "device", "slides", "busy s", "patches/s",
                                                  "restarts"), worker_rows)),
        "</body></html>\n",
    ]
    path = out_dir / REPORT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text("".join(page), encoding="utf-8")
    os.replace(partial, path)
    return path

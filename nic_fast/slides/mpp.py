"""Scanned µm/px: read it from vendor metadata, or take it from the user's overrides.

The embedding grid is only comparable across slides when every slide is read at the
same physical resolution, so a slide whose µm/px is missing or implausible is refused
with a message that says exactly how to supply it, never silently guessed.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from nic_fast.slides.base import SlideError

MPP_MIN = 0.1
MPP_MAX = 10.0
OVERRIDE_HINT = (
    "pass --slide-mpp VALUE (applies to all given slides) "
    "or --slide-mpp-csv FILE (columns slide,mpp, one row per slide)"
)
_UM_PER_CM = 1e4
_UM_PER_INCH = 25400.0
# x and y µm/px that differ by more than this are non-square pixels, which the grid
# cannot represent; below it they are rounding in the vendor's rationals.
_ANISOTROPY_TOLERANCE = 0.01


class MppError(SlideError):
    """The µm/px of a slide is missing, implausible, or an override for it is malformed."""


class MppEvidence(NamedTuple):
    """One metadata source's µm/px: what was found (for messages) and the value, if usable."""

    found: str
    mpp: float | None


def parse_mpp(text: object) -> float | None:
    """A metadata value as a positive finite number, or None when it is not one."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def evidence_from_aperio(value: object | None) -> MppEvidence:
    """The ``MPP`` field of an Aperio ImageDescription (None when the field is absent)."""
    if value is None:
        return MppEvidence("no Aperio MPP field", None)
    return MppEvidence(f"Aperio MPP = {value!s}", parse_mpp(value))


def evidence_from_xy(source: str, mpp_x: object | None, mpp_y: object | None) -> MppEvidence:
    """A pair of per-axis µm/px values, e.g. OpenSlide's ``openslide.mpp-x``/``-y``."""
    if mpp_x is None and mpp_y is None:
        return MppEvidence(f"no {source} µm/px", None)
    found = f"{source} µm/px x = {mpp_x}, y = {mpp_y}"
    return MppEvidence(found, _square_pixel_mpp(parse_mpp(mpp_x), parse_mpp(mpp_y)))


def evidence_from_tiff_resolution(x_resolution: object, y_resolution: object, unit: object) -> MppEvidence:
    """TIFF XResolution/YResolution (pixels per unit) with ResolutionUnit.

    ``unit`` may be the TIFF code (2 inch, 3 centimetre) or a backend's name for it
    ("inch", "centimeter", "cm"). Without a physical unit the tags say nothing about
    µm/px (tifffile and many scanners write 1/1 with no unit), so they are not used.
    """
    if x_resolution is None and y_resolution is None:
        return MppEvidence("no TIFF resolution tags", None)
    um_per_unit = _um_per_resolution_unit(unit)
    if um_per_unit is None:
        return MppEvidence(f"TIFF resolution {x_resolution} x {y_resolution} with no physical unit", None)
    found = f"TIFF resolution {x_resolution} x {y_resolution} px per {unit}"
    res_x, res_y = parse_mpp(x_resolution), parse_mpp(y_resolution)
    mpp_x = um_per_unit / res_x if res_x else None
    mpp_y = um_per_unit / res_y if res_y else None
    return MppEvidence(found, _square_pixel_mpp(mpp_x, mpp_y))


def _um_per_resolution_unit(unit: object) -> float | None:
    name = str(unit).strip().lower()
    if name in {"3", "centimeter", "centimetre", "cm", "resunit.centimeter"}:
        return _UM_PER_CM
    if name in {"2", "inch", "in", "resunit.inch"}:
        return _UM_PER_INCH
    return None


def _square_pixel_mpp(mpp_x: float | None, mpp_y: float | None) -> float | None:
    if mpp_x is None or mpp_y is None:
        return mpp_x if mpp_y is None else mpp_y
    if abs(mpp_x - mpp_y) > _ANISOTROPY_TOLERANCE * max(mpp_x, mpp_y):
        return None
    return (mpp_x + mpp_y) / 2


def scanned_mpp(slide_path: Path, evidence: Sequence[MppEvidence]) -> float:
    """The first usable µm/px among ``evidence`` (most trusted first), checked for plausibility.

    Raises MppError naming the file, everything that was found and both overrides.
    """
    for item in evidence:
        if item.mpp is not None:
            if not MPP_MIN <= item.mpp <= MPP_MAX:
                raise MppError(
                    f"{slide_path}: implausible scanned µm/px {item.mpp:g} ({item.found}); "
                    f"expected {MPP_MIN:g}-{MPP_MAX:g} µm/px. If you know the right value, {OVERRIDE_HINT}."
                )
            return item.mpp
    found = "; ".join(item.found for item in evidence) or "no metadata"
    raise MppError(
        f"{slide_path}: no usable scanned µm/px in its metadata ({found}). "
        f"nic-fast needs it to read every slide at the same magnification; {OVERRIDE_HINT}."
    )


def check_override_mpp(mpp: float, *, source: str) -> float:
    """A user-supplied µm/px, refused when outside the plausible range."""
    if not (math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX):
        raise MppError(f"{source}: µm/px {mpp:g} is implausible; expected {MPP_MIN:g}-{MPP_MAX:g} µm/px")
    return float(mpp)


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a ``--slide-mpp-csv`` table: columns ``slide`` and ``mpp``, other columns ignored.

    ``slide`` may be a file name, a file name without extension, or a path. Every
    problem is reported with the CSV's name and line, since a wrong µm/px silently
    changes the magnification of everything computed from that slide.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MppError(f"--slide-mpp-csv {path}: cannot read it ({exc.strerror or exc})") from exc
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    missing = [name for name in ("slide", "mpp") if name not in header]
    if missing:
        raise MppError(
            f"--slide-mpp-csv {path}: missing column {' and '.join(repr(m) for m in missing)} "
            f"(header is {', '.join(reader.fieldnames or []) or 'empty'}); expected columns slide,mpp"
        )
    reader.fieldnames = header
    table: dict[str, float] = {}
    for row in reader:
        where = f"--slide-mpp-csv {path}, line {reader.line_num}"
        slide = (row.get("slide") or "").strip()
        text_mpp = (row.get("mpp") or "").strip()
        if not slide and not text_mpp:
            continue
        if not slide:
            raise MppError(f"{where}: empty slide name")
        mpp = parse_mpp(text_mpp)
        if mpp is None:
            raise MppError(f"{where}: mpp {text_mpp!r} for slide {slide!r} is not a positive number")
        check_override_mpp(mpp, source=f"{where} (slide {slide!r})")
        if slide in table and table[slide] != mpp:
            raise MppError(f"{where}: slide {slide!r} is listed twice with different µm/px ({table[slide]:g} and {mpp:g})")
        table[slide] = mpp
    return table


def resolve_slide_mpp(
    slide_path: str | Path, slide_mpp: float | None, mpp_table: Mapping[str, float] | None
) -> float | None:
    """The override µm/px for one slide, or None to use the slide's own metadata.

    A CSV row for this slide is the most specific statement and wins; otherwise
    ``slide_mpp`` (``--slide-mpp``) applies to every slide.
    """
    slide_path = Path(slide_path)
    if mpp_table:
        key = _table_key(slide_path, mpp_table)
        if key is not None:
            return check_override_mpp(mpp_table[key], source=f"--slide-mpp-csv entry {key!r}")
    if slide_mpp is not None:
        return check_override_mpp(slide_mpp, source="--slide-mpp")
    return None


def _table_key(slide_path: Path, mpp_table: Mapping[str, float]) -> str | None:
    """The table key naming this slide: file name, name without extension(s), or path."""
    name = slide_path.name
    for key in (name, slide_path.stem, name.split(".", 1)[0], str(slide_path)):
        if key in mpp_table:
            return key
    resolved = slide_path.resolve()
    for key in mpp_table:
        if ("/" in key or "\\" in key) and Path(key).expanduser().resolve() == resolved:
            return key
    return None

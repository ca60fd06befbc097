"""Which slides a batch holds and what each store is called, decided before any work starts.

Inputs are files, folders (slides found inside by extension, recursively on request) and
list files (one path per line). Every slide maps to one store name; two slides that
would share a name are refused up front with the option that tells them apart, never
resolved later by skipping one or overwriting the other.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_EXTENSIONS",
    "NAMING",
    "InputError",
    "SlideInput",
    "collect_slides",
    "name_stores",
    "read_slide_list",
]

# Whole-slide formats cuCIM or OpenSlide read, plus plain images for --mpp none.
DEFAULT_EXTENSIONS = ("svs", "tif", "tiff", "ndpi", "vms", "vmu", "mrxs", "scn", "svslide", "bif", "czi", "dcm")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp")
NAMING = ("stem", "relative")


class InputError(ValueError):
    """The command line names no usable slides, or slides that would collide; the message says the fix."""


@dataclass(frozen=True)
class SlideInput:
    """One slide of the batch and the name of its store (``OUT/<name>.zarr``; may hold '/')."""

    path: Path
    name: str


def read_slide_list(list_file: Path) -> list[Path]:
    """Paths from a list file: one per line; blank lines and ``#`` comments skipped; relative
    paths are relative to the list file's folder (so a list travels with its slides)."""
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise InputError(f"{list_file}: cannot read the slide list ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_file}: is not a UTF-8 text file with one slide path per line") from exc
    paths = []
    for line in lines:
        text = line.strip()
        if text and not text.startswith("#"):
            path = Path(text).expanduser()
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def collect_slides(inputs: Iterable[Path], *, recursive: bool = False,
                   extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Files as given; folders replaced by the slides inside them (sorted), matched by extension.

    A path that does not exist is kept: it fails as that slide's own error, so one typo in a
    list of thousands costs one slide, not the batch. A folder with no slide is an error.
    """
    suffixes = {"." + ext.lower().lstrip(".") for ext in extensions}
    slides: list[Path] = []
    seen: set[Path] = set()
    for path in inputs:
        found = _slides_in(path, recursive, suffixes) if path.is_dir() else [path]
        if path.is_dir() and not found:
            where = "in or below" if recursive else "in"
            hint = "" if recursive else "; add --recursive to search sub-folders"
            raise InputError(f"{path}: no slides {where} this folder with extensions {', '.join(sorted(suffixes))} "
                             f"(use --ext to add others{hint})")
        for slide in found:
            key = slide.resolve() if slide.exists() else slide.absolute()
            if key not in seen:  # the same file given twice is one slide
                seen.add(key)
                slides.append(slide)
    return slides


def _slides_in(folder: Path, recursive: bool, suffixes: set[str]) -> list[Path]:
    """Slide files in ``folder``; a MIRAX slide's data folder is not descended into."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        stems = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        dirs[:] = [d for d in dirs if d not in stems] if recursive else []
        found.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in suffixes)
    return found


def name_stores(slides: Sequence[Path], naming: str = "stem") -> list[SlideInput]:
    """Each slide with its store name; raises :class:`InputError` listing any clash.

    ``stem``: the file name without extension. ``relative``: the path below the slides'
    common folder, without extension, so ``a/x.svs`` and ``b/x.svs`` become ``a/x`` and ``b/x``.
    """
    if naming not in NAMING:
        raise InputError(f"store naming must be one of {', '.join(NAMING)}, got {naming!r}")
    if naming == "stem":
        names = [path.stem for path in slides]
    else:
        names = _relative_names(slides)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for path, name in zip(slides, names):
        by_name[name.lower()].append(path)  # case-insensitive: stores may land on a case-insensitive share
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clashes:
        shown = "; ".join(f"{', '.join(map(str, paths))} → {name}.zarr" for name, paths in list(clashes.items())[:3])
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        fix = ("--store-names relative (mirror each slide's path below their common folder)" if naming == "stem"
               else "rename the slides or compress them into separate output folders")
        raise InputError(f"{len(clashes)} store name(s) would be shared by several slides: {shown}{more}; use {fix}")
    return [SlideInput(path, name) for path, name in zip(slides, names)]


def _relative_names(slides: Sequence[Path]) -> list[str]:
    absolute = [path.absolute() for path in slides]
    if not absolute:
        return []
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return [str(p.relative_to(root).with_suffix("")).replace(os.sep, "/") for p in absolute]

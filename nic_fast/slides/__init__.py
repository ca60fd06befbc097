"""Whole-slide image readers: one interface, the backend picked per file.

``open_slide`` picks the backend per file, so a batch that mixes SVS, NDPI, MRXS and
odd TIFFs needs no flags: cuCIM for the JPEG and uncompressed tiled TIFFs it decodes
fast, the tifffile backend for the other TIFFs (cuCIM crashes on some and decodes others
wrongly: the choice is made from the TIFF tags, before any reader sees the file, see
:mod:`nic_fast.slides.tiff_support`), OpenSlide for the vendor formats and the rest.
Every backend offers :meth:`SlideReader.read_region_checked`, which checks each
compressed tile before it becomes pixels and isolates what cannot be read.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nic_fast.slides.base import BadRegion, RegionCheck, RegionRead, SlideError, SlideReader
from nic_fast.slides.levels import LevelChoice, choose_level
from nic_fast.slides.mpp import MppError, check_override_mpp, load_mpp_csv, resolve_slide_mpp

__all__ = [
    "BACKENDS",
    "BadRegion",
    "LevelChoice",
    "MppError",
    "RegionCheck",
    "RegionRead",
    "SlideError",
    "SlideReader",
    "choose_level",
    "load_mpp_csv",
    "open_slide",
    "resolve_slide_mpp",
]

# What open_slide(..., backend=...) accepts; "auto" picks one of the next three per file.
BACKENDS = ("auto", "cucim", "tifffile", "openslide", "image")
# Only TIFF-based files go to cuCIM or the tifffile backend; anything else goes straight
# to OpenSlide rather than risk a TIFF reader opening, say, an NDPI as a plain TIFF.
_TIFF_SUFFIXES = frozenset({".svs", ".tif", ".tiff"})
_PROBE_PX = 16
_NAMES = {"cucim": "cuCIM", "tifffile": "tifffile", "openslide": "OpenSlide"}
SUPPORTED_FORMATS = (
    "Aperio .svs and tiled, stripped or pyramidal .tif/.tiff (cuCIM, tifffile or OpenSlide); "
    "Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, Philips .tiff, Sakura .svslide, "
    "Ventana .bif, Zeiss .czi and DICOM WSI (OpenSlide)"
)


def open_slide(path: str | Path, *, slide_mpp: float | None = None, backend: str | None = None) -> SlideReader:
    """Open a whole-slide image.

    ``slide_mpp`` overrides the scanned µm/px from the metadata (see
    :func:`resolve_slide_mpp` to get it from ``--slide-mpp``/``--slide-mpp-csv``).
    ``backend`` is one of :data:`BACKENDS`: "auto" (default); "cucim" (tiled JPEG or
    uncompressed TIFF, SVS); "tifffile" (any TIFF tifffile and imagecodecs decode, read
    tile by tile); "openslide" (vendor formats: NDPI, MRXS, DICOM, ...); or "image" (a
    plain image in pixel units, µm/px None, grayscale kept as one channel). In auto mode a TIFF-based file goes to the
    backends :func:`nic_fast.slides.tiff_support.auto_backends` lists, in order, each
    kept when it opens the file, finds its µm/px and a small probe read decodes; other
    files go to OpenSlide. A forced cuCIM or OpenSlide refuses files it is known to
    crash on or decode wrongly, naming the backend to use.
    """
    path = Path(path)
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file (for MIRAX give the .mrxs file)")
    if slide_mpp is not None:
        check_override_mpp(slide_mpp, source=f"{path}: --slide-mpp")
    if backend == "image":
        from nic_fast.slides.image_reader import ImageReader

        return ImageReader(path)
    if backend != "auto":
        return _OPENERS[backend](path, slide_mpp, False)
    return _open_auto(path, slide_mpp)


def _open_cucim(path: Path, slide_mpp: float | None, vetted: bool) -> SlideReader:
    try:
        from nic_fast.slides.cucim_reader import CucimReader

        return CucimReader(path, slide_mpp=slide_mpp, vetted=vetted)
    except ImportError as exc:
        raise SlideError(
            f"{path}: the cuCIM backend was requested but cuCIM is not installed "
            f"(pip install nic-fast[cucim], or use the tifffile or openslide backend)"
        ) from exc


def _open_tifffile(path: Path, slide_mpp: float | None, vetted: bool) -> SlideReader:
    from nic_fast.slides.tiff_reader import TiffReader

    return TiffReader(path, slide_mpp=slide_mpp)


def _open_openslide(path: Path, slide_mpp: float | None, vetted: bool) -> SlideReader:
    from nic_fast.slides.openslide_reader import OpenSlideReader

    return OpenSlideReader(path, slide_mpp=slide_mpp, vetted=vetted)


_OPENERS: dict[str, Callable[[Path, float | None, bool], SlideReader]] = {
    "cucim": _open_cucim, "tifffile": _open_tifffile, "openslide": _open_openslide,
}


def _open_auto(path: Path, slide_mpp: float | None) -> SlideReader:
    if path.suffix.lower() in _TIFF_SUFFIXES:
        from nic_fast.slides.tiff_support import auto_backends

        order, why = auto_backends(path)
    else:
        order, why = ["openslide"], "not a TIFF-based file"
    errors: dict[str, SlideError] = {}
    for i, backend in enumerate(order):
        try:
            reader = _OPENERS[backend](path, slide_mpp, True)
            # the last candidate has no fallback: its own errors are the answer
            return _probed(reader) if i < len(order) - 1 else reader
        except SlideError as exc:
            errors[backend] = exc
    raise _auto_failure(path, errors, why)


def _auto_failure(path: Path, errors: dict[str, SlideError], why: str) -> SlideError:
    """The one error to report when no backend could serve ``path``.

    A µm/px problem means a backend did open the file, and its message (which names the
    overrides) is the useful one; otherwise report each backend's reason (for cuCIM,
    when it was not tried, why not).
    """
    for error in reversed(errors.values()):
        if isinstance(error, MppError):
            return error
    reasons = {} if "cucim" in errors else {"cucim": f"not tried, {why}"}
    reasons.update({name: str(error) for name, error in errors.items()})
    names = [_NAMES[name] for name in _NAMES if name in reasons]
    readers = " nor ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} nor {names[-1]}"
    tried = "; ".join(f"{_NAMES[name]}: {reasons[name]}" for name in _NAMES if name in reasons)
    return SlideError(f"{path}: neither {readers} can read this file ({tried}). Supported formats: {SUPPORTED_FORMATS}.")


def _probed(reader: SlideReader) -> SlideReader:
    """``reader`` after a small read proved its codec works, else closed and SlideError."""
    height, width = reader.level_dims[0]
    try:
        reader.read_region(0, height // 2, width // 2, min(_PROBE_PX, height), min(_PROBE_PX, width))
    except SlideError:
        reader.close()
        raise
    return reader

"""Whole-slide image readers: one interface, cuCIM first, OpenSlide for everything else.

``open_slide`` picks the backend per file, so a batch that mixes SVS, NDPI and MRXS
slides needs no flags: cuCIM where it can decode the file, OpenSlide where it cannot.
"""
from __future__ import annotations

from pathlib import Path

from nic_fast.slides.base import SlideError, SlideReader
from nic_fast.slides.levels import LevelChoice, choose_level
from nic_fast.slides.mpp import MppError, check_override_mpp, load_mpp_csv, resolve_slide_mpp

__all__ = [
    "BACKENDS",
    "LevelChoice",
    "MppError",
    "SlideError",
    "SlideReader",
    "choose_level",
    "load_mpp_csv",
    "open_slide",
    "resolve_slide_mpp",
]

BACKENDS = ("auto", "cucim", "openslide", "image")
# cuCIM reads TIFF-based files only; anything else goes straight to OpenSlide rather
# than risk cuCIM opening, say, an NDPI as a plain TIFF and decoding it wrongly.
_CUCIM_SUFFIXES = frozenset({".svs", ".tif", ".tiff"})
_PROBE_PX = 16
SUPPORTED_FORMATS = (
    "Aperio .svs and generic tiled pyramidal .tif/.tiff (cuCIM or OpenSlide); "
    "Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, Philips .tiff, Sakura .svslide, "
    "Ventana .bif, Zeiss .czi and DICOM WSI (OpenSlide)"
)


def open_slide(path: str | Path, *, slide_mpp: float | None = None, backend: str | None = None) -> SlideReader:
    """Open a whole-slide image.

    ``slide_mpp`` overrides the scanned µm/px from the metadata (see
    :func:`resolve_slide_mpp` to get it from ``--slide-mpp``/``--slide-mpp-csv``).
    ``backend`` is "auto" (default), "cucim", "openslide" or "image" (a plain image in
    pixel units, µm/px None, grayscale kept as one channel). In auto mode cuCIM is used
    when it is installed, the file is TIFF-based, cuCIM opens it, finds its µm/px and a
    small probe read decodes; otherwise OpenSlide.
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
    if backend == "cucim":
        return _open_cucim(path, slide_mpp)
    if backend == "openslide":
        return _open_openslide(path, slide_mpp)
    if backend == "image":
        from nic_fast.slides.image_reader import ImageReader

        return ImageReader(path)
    return _open_auto(path, slide_mpp)


def _open_cucim(path: Path, slide_mpp: float | None) -> SlideReader:
    try:
        from nic_fast.slides.cucim_reader import CucimReader

        return CucimReader(path, slide_mpp=slide_mpp)
    except ImportError as exc:
        raise SlideError(
            f"{path}: the cuCIM backend was requested but cuCIM is not installed "
            f"(pip install nic-fast[cucim], or use the openslide backend)"
        ) from exc


def _open_openslide(path: Path, slide_mpp: float | None) -> SlideReader:
    from nic_fast.slides.openslide_reader import OpenSlideReader

    return OpenSlideReader(path, slide_mpp=slide_mpp)


def _open_auto(path: Path, slide_mpp: float | None) -> SlideReader:
    cucim_error: SlideError | None = None
    if path.suffix.lower() in _CUCIM_SUFFIXES:
        try:
            return _probed(_open_cucim(path, slide_mpp))
        except SlideError as exc:
            cucim_error = exc
    try:
        return _open_openslide(path, slide_mpp)
    except SlideError as openslide_error:
        raise _auto_failure(path, cucim_error, openslide_error) from openslide_error


def _auto_failure(path: Path, cucim_error: SlideError | None, openslide_error: SlideError) -> SlideError:
    """The one error to report when no backend could serve ``path``.

    A µm/px problem means a backend did open the file, and its message (which names the
    overrides) is the useful one; otherwise report both backends' reasons.
    """
    if isinstance(openslide_error, MppError):
        return openslide_error
    if isinstance(cucim_error, MppError):
        return cucim_error
    tried = f"cuCIM: {cucim_error}; " if cucim_error else ""
    return SlideError(
        f"{path}: neither cuCIM nor OpenSlide can read this file ({tried}OpenSlide: {openslide_error}). "
        f"Supported formats: {SUPPORTED_FORMATS}."
    )


def _probed(reader: SlideReader) -> SlideReader:
    """``reader`` after a small read proved its codec works, else closed and SlideError."""
    height, width = reader.level_dims[0]
    try:
        reader.read_region(0, height // 2, width // 2, min(_PROBE_PX, height), min(_PROBE_PX, width))
    except SlideError:
        reader.close()
        raise
    return reader

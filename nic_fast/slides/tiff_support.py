"""Which reader copes with which TIFF: measured once, then decided from the TIFF tags,
so that a file a reader is known to crash on never reaches that reader.

Measured on tifffile-written files (200x300 px, 64-px tiles or 32-row strips), each
cuCIM and OpenSlide read in its own subprocess, pixels compared with tifffile's decode
(cuCIM 26.10 ``cucim-cu13``, OpenSlide 4.0.1 ``openslide-bin``, tifffile 2026.3):

=====================================================  ==========================  =====================
file                                                   cuCIM                       OpenSlide
=====================================================  ==========================  =====================
Deflate (8, 32946), Zstd or LZMA with a predictor      **crashes** (SIGSEGV)       reads Deflate, Zstd
Deflate without a predictor, tiled                     right                       right
YCbCr without JPEG compression                         **wrong** (YCbCr as RGB)    right
16-bit grayscale                                       **wrong** right-edge tiles  **wrong** (same)
Zstd, WebP, JPEG 2000, PackBits, LZMA, JPEG XL, LERC   refuses                     refuses most
JPEG (RGB; YCbCr 4:2:0, 4:2:2, 4:4:4), uncompressed    right                       right (tiled only)
LZW (with or without predictor), big-endian, BigTIFF   right                       right (little-endian)
gray, palette, CMYK, RGBA, planar, 16-bit RGB          right (libtiff slow path)   right
stripped (any codec)                                   right where it decodes      refuses
=====================================================  ==========================  =====================

So cuCIM gets what it decodes on its fast path and the tile checks fully guard: tiled,
8-bit RGB or YCbCr, interleaved samples, JPEG or uncompressed. The tifffile backend
(:mod:`nic_fast.slides.tiff_reader`) gets every other TIFF it decodes (its decode
surfaces codec errors, and zlib checks Deflate's checksum), OpenSlide the rest (Aperio
JPEG 2000, whose YCbCr handling is OpenSlide's). A forced backend refuses the files it
crashes on or decodes wrongly, with the backend to use instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

_NONE, _LZW, _JPEG, _ADOBE_DEFLATE, _DEFLATE, _ZSTD, _LZMA = 1, 5, 7, 8, 32946, 50000, 34925
_OLD_JPEG = 6
_APERIO_JPEG2000 = (33003, 33005)
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _SEPARATED, _YCBCR = 0, 1, 2, 3, 5, 6
_UINT = 1
# libtiff codecs cuCIM's build lacks: with a predictor its libtiff path dereferences a
# codec that is not there.
_CUCIM_UNCONFIGURED = {_ADOBE_DEFLATE: "Deflate", _DEFLATE: "Deflate", _ZSTD: "Zstd", _LZMA: "LZMA"}


def cucim_fault(page: Any) -> str | None:
    """Why cuCIM must not read a page (it crashes, or returns wrong pixels), or None."""
    compression, photometric = int(page.compression), int(page.photometric)
    if page.predictor != 1 and compression in _CUCIM_UNCONFIGURED:
        return f"crashes (SIGSEGV) on {_CUCIM_UNCONFIGURED[compression]} tiles with a predictor (TIFF tag 317)"
    if photometric == _YCBCR and compression not in (_JPEG, _OLD_JPEG):
        return "returns the YCbCr samples of a TIFF without JPEG compression as RGB"
    if _gray16(page):
        return "decodes the right-edge tiles of 16-bit grayscale wrongly (libtiff's RGBA path)"
    return None


def openslide_fault(page: Any) -> str | None:
    """Why OpenSlide must not read a page (wrong pixels), or None."""
    if _gray16(page):
        return "decodes the right-edge tiles of 16-bit grayscale wrongly (libtiff's RGBA path)"
    return None


def _gray16(page: Any) -> bool:
    return page.bitspersample == 16 and int(page.photometric) in (_MINISBLACK, _MINISWHITE)


def cucim_preferred(page: Any) -> bool:
    """True for what cuCIM decodes on its fast path and the tile checks fully guard."""
    return (
        page.is_tiled
        and int(page.compression) in (_NONE, _JPEG)
        and int(page.photometric) in (_RGB, _YCBCR)
        and (int(page.photometric) == _RGB or int(page.compression) == _JPEG)
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.planarconfig == 1
        and page.sampleformat == _UINT
        and page.predictor == 1
    )


def tifffile_problem(page: Any) -> str | None:
    """Why the tifffile backend cannot turn a page into RGB, or None when it can."""
    from tifffile import TIFF

    compression, photometric = int(page.compression), int(page.photometric)
    if compression in _APERIO_JPEG2000:
        return "Aperio JPEG 2000 (OpenSlide reads it)"
    if compression == _OLD_JPEG:
        return "old-style JPEG (compression 6)"
    if compression not in TIFF.DECOMPRESSORS:
        return f"compression {compression} has no decoder"
    if page.imagedepth != 1:
        return "a volume (ImageDepth > 1)"
    if page.sampleformat != _UINT or page.bitspersample not in (1, 8, 16):
        return f"{page.bitspersample}-bit samples of format {page.sampleformat} (1-, 8- or 16-bit unsigned needed)"
    color = page.samplesperpixel - len(page.extrasamples)
    if photometric in (_MINISBLACK, _MINISWHITE, _PALETTE) and color == 1:
        return None
    if photometric == _RGB and color == 3:
        return None
    if photometric == _YCBCR and color == 3:
        return None if compression == _JPEG else "YCbCr without JPEG compression (OpenSlide reads it)"
    if photometric == _SEPARATED and color == 4 and page.tags.valueof(332, 1) == 1:
        return None
    return f"photometric {page.photometric.name} with {page.samplesperpixel} samples"


def auto_backends(path: Path) -> tuple[list[str], str]:
    """The backends to try for a TIFF-based file, in order, and why (for the log).

    Every level must suit a backend for it to come first. A file tifffile cannot parse
    goes to OpenSlide alone: a malformed TIFF is what native readers crash on.
    """
    import tifffile

    from nic_fast.slides.tiles import pyramid_pages

    try:
        with tifffile.TiffFile(path) as tif:
            pages = pyramid_pages(tif)
            faults = [cucim_fault(page) for page in pages]
            preferred = bool(pages) and all(cucim_preferred(page) for page in pages)
            readable = bool(pages) and not any(tifffile_problem(page) for page in pages)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a malformed file
        return ["openslide"], f"tifffile cannot parse it ({exc})"
    fault = next((f for f in faults if f), None)
    if preferred:  # OpenSlide next: it knows the vendor variants (Philips, Leica, ...) cuCIM may refuse
        return ["cucim", "openslide", "tifffile"], "cuCIM's fast path"
    if readable:
        return ["tifffile", "openslide"], f"cuCIM {fault}" if fault else "not on cuCIM's fast path"
    if fault:
        return ["openslide"], f"cuCIM {fault}"
    return ["cucim", "openslide"], "neither cuCIM's fast path nor the tifffile backend"


def forced_fault(path: Path, backend: str) -> str | None:
    """Why a backend the user forced must not read ``path``, or None (also when the file is
    not a TIFF tifffile can parse: then the backend's own checks decide)."""
    import tifffile

    from nic_fast.slides.tiles import pyramid_pages

    fault_of = cucim_fault if backend == "cucim" else openslide_fault
    try:
        with tifffile.TiffFile(path) as tif:
            return next((fault for fault in map(fault_of, pyramid_pages(tif)) if fault), None)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile parses: nothing known against the backend
        return None

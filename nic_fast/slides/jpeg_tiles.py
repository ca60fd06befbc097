"""A TIFF level's JPEG tiles as self-contained streams, and where each lands in a region.

What a decoder that reads the compressed tiles itself needs (nvImageCodec on the GPU's
JPEG engines, see :mod:`nic_fast.engine.tile_decode`); pure Python and NumPy, so that the
splicing is tested on the CPU against tifffile's decode of the same tiles.

* **Abbreviated streams.** TIFF JPEG tiles (compression 7) usually hold only the frame
  and scan; the quantisation and Huffman tables live once in the JPEGTables tag (itself
  SOI, tables, EOI). A stand-alone stream is SOI + the tables + the tile after its SOI.
* **RGB-coded tiles.** Aperio writes tiles whose components are R, G and B (photometric
  RGB, no colour transform) with component ids 0, 1, 2 and no marker saying so, so a
  decoder assumes YCbCr and converts them (tifffile tells libjpeg out of band). An Adobe
  APP14 segment with transform 0 says "no transform" in band: libjpeg, Pillow and
  nvImageCodec then keep the samples. It is added only when the stream lacks one.
* **Placement.** Tiles are stored whole (edge tiles padded); each decoded tile's part
  inside the region is copied to its place, and what no tile covers (outside the level,
  zero-length tiles) stays white.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nic_fast.slides.tiles import JPEG, TileGrid, tiles_of

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
_SOS = 0xDA
_APP14 = 0xEE
# Adobe APP14: length 14, "Adobe", version 100, flags0 0, flags1 0, transform 0 (none)
ADOBE_NO_TRANSFORM = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6

Rect = tuple[int, int, int, int]  # (y0, x0, y1, x1), ends exclusive


class JpegStreamError(ValueError):
    """A tile's bytes or the JPEGTables tag are not the JPEG segments they should be."""


def splice(tile: bytes, tables: bytes = b"", *, rgb: bool = False) -> bytes:
    """One self-contained JPEG stream from a TIFF tile and the level's JPEGTables
    (``b""`` when the tiles carry their own), with an APP14 "no transform" marker when
    the samples are ``rgb``-coded and the tile does not say so itself."""
    if not tile.startswith(SOI):
        raise JpegStreamError(f"tile does not start with a JPEG SOI marker (starts {tile[:2].hex(' ')})")
    head = SOI
    if rgb and not _has_app14(tile):
        head += ADOBE_NO_TRANSFORM
    if tables:
        if not (tables.startswith(SOI) and tables.endswith(EOI)):
            raise JpegStreamError("JPEGTables is not an SOI ... EOI table stream")
        head += tables[2:-2]
    return head + tile[2:]


def _has_app14(stream: bytes) -> bool:
    """True when the header segments (up to the first scan) include an APP14."""
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == _SOS:
            return False
        if marker == _APP14:
            return True
        i += 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
    return False


@dataclass(frozen=True)
class TilePiece:
    """One tile's part of a region: where it is in the file, in the decoded tile and in
    the region array."""

    row: int
    col: int
    segment: int  # index into the grid's offsets/counts
    src: Rect  # inside the decoded (tile_h, tile_w) tile
    dst: Rect  # inside the region array


class JpegLevel:
    """A JPEG-tiled level of an open TIFF: its tiles' bytes as stand-alone streams.

    Reads with ``os.pread`` on a shared descriptor, so one instance serves every decoder
    thread of a slide.
    """

    def __init__(self, fd: int, grid: TileGrid, *, rgb: bool) -> None:
        self.fd, self.grid, self.rgb = fd, grid, rgb

    @classmethod
    def of(cls, tiles: Any, level: int) -> JpegLevel | None:
        """The level of a :class:`~nic_fast.slides.tiles.TiffTiles` as JPEG tiles, or None
        when its tiles are not 8-bit, 3-sample, interleaved JPEG in RGB or YCbCr."""
        grid = tiles.grid(level)
        if grid is None or jpeg_problem(tiles, grid) is not None:
            return None
        photometric = int(tiles.tif.pages[grid.page_index].photometric)
        return cls(tiles.fd, grid, rgb=photometric == _PHOTOMETRIC_RGB)

    def pieces(self, y: int, x: int, height: int, width: int, skip: Sequence[tuple[int, int]] = ()) -> list[TilePiece]:
        """The tiles a region of level pixels [y, y+height) x [x, x+width) needs, except
        zero-length ones and those in ``skip`` (corrupt: the caller whitens them)."""
        grid = self.grid
        y1, x1 = min(y + height, grid.height), min(x + width, grid.width)
        y0, x0 = max(y, 0), max(x, 0)
        if y1 <= y0 or x1 <= x0:
            return []
        skipped = set(skip)
        out = []
        for row, col in tiles_of(grid, y0, x0, y1, x1):
            (segment,) = grid.indices(row, col)
            if (row, col) in skipped or grid.counts[segment] == 0:
                continue
            ty0, tx0, ty1, tx1 = grid.rect(row, col)
            iy0, ix0, iy1, ix1 = max(ty0, y0), max(tx0, x0), min(ty1, y1), min(tx1, x1)
            out.append(TilePiece(row, col, segment, (iy0 - ty0, ix0 - tx0, iy1 - ty0, ix1 - tx0),
                                 (iy0 - y, ix0 - x, iy1 - y, ix1 - x)))
        return out

    def covers(self, pieces: Sequence[TilePiece], height: int, width: int) -> bool:
        """True when ``pieces`` fill the whole (height, width) region (no white needed)."""
        return sum((d[2] - d[0]) * (d[3] - d[1]) for d in (p.dst for p in pieces)) == height * width

    def streams(self, pieces: Sequence[TilePiece]) -> list[bytes]:
        """Each piece's tile as a stand-alone JPEG stream."""
        grid = self.grid
        out = []
        for piece in pieces:
            count, offset = int(grid.counts[piece.segment]), int(grid.offsets[piece.segment])
            data = os.pread(self.fd, count, offset)
            if len(data) < count:
                raise JpegStreamError(f"the file ends inside tile (row {piece.row}, col {piece.col})")
            out.append(splice(data, grid.jpegtables, rgb=self.rgb))
        return out


def jpeg_problem(tiles: Any, grid: TileGrid | None) -> str | None:
    """Why a level's tiles cannot be decoded as stand-alone JPEG streams, or None."""
    if grid is None:
        return "no TIFF tile grid behind this level"
    if grid.compression != JPEG:
        return f"{grid.codec} tiles, not JPEG"
    page = tiles.tif.pages[grid.page_index]
    if grid.planes != 1 or grid.components != 3 or page.bitspersample != 8:
        return f"{grid.components}-sample, {page.bitspersample}-bit JPEG tiles in {grid.planes} plane(s), not 8-bit RGB"
    if int(page.photometric) not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return f"photometric {page.photometric.name} JPEG tiles"
    return None


def place(region: Any, pieces: Sequence[TilePiece], decoded: Sequence[Any]) -> None:
    """Copy each decoded (tile_h, tile_w, 3) tile's piece into ``region`` (a NumPy array or
    a torch tensor, host or device alike: plain slicing)."""
    for piece, tile in zip(pieces, decoded, strict=True):
        sy0, sx0, sy1, sx1 = piece.src
        dy0, dx0, dy1, dx1 = piece.dst
        region[dy0:dy1, dx0:dx1] = tile[sy0:sy1, sx0:sx1]

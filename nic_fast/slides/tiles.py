"""Where a TIFF level's compressed tiles lie, and whether each tile's bytes are intact.

Decoders do not reliably refuse corrupt data: libjpeg (inside cuCIM and imagecodecs)
only warns on a damaged JPEG scan and returns grey or garbled pixels, which a store
would then encode as tissue. So every tile a region read touches is checked from its
bytes first, whichever backend decodes it (see :meth:`TileGrid.inspect`):

* its byte range must lie inside the file; a zero-length tile is *absent*, not corrupt
  (scanners leave unscanned tiles empty; OpenSlide draws them transparent), and reads
  as white;
* JPEG (compression 7): the extension's stream walker (``nic_fast._C.check_jpeg_tiles``)
  follows the Huffman-coded data of a sequential JPEG and checks the MCU count, codes,
  coefficient indices, restart markers and EOI; other JPEG processes (progressive,
  lossless) get the marker-level check only;
* JPEG 2000: the codestream's SOC/SIZ at the start and EOC at the end;
* Deflate: zlib's own Adler-32 checksum, by inflating the tile (``verify_deflate``; the
  tifffile backend gets this from its decode instead);
* uncompressed: the byte count must cover the tile;
* other codecs: their decoder's errors.

The level → TIFF page rule (:func:`pyramid_pages`) is OpenSlide's, which cuCIM follows
on every file both open: page 0 is level 0, the other levels are the tiled pages of
the main IFD chain marked reduced-resolution (every tiled page for Aperio SVS), largest
first. SubIFDs are not levels, for neither reader uses them.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

JPEG = 7
DEFLATE = (8, 32946)
JPEG2000 = (33003, 33004, 33005, 34712)
UNCOMPRESSED = 1
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_CODEC_NAMES = {UNCOMPRESSED: "uncompressed", 5: "LZW", 32773: "PackBits", 34925: "LZMA", 50000: "Zstd",
                50001: "WebP", 50002: "JPEG XL"}
_REDUCED_RESOLUTION = 1  # NewSubfileType bit


@dataclass
class TileReport:
    """The outcome of checking some tiles: corrupt ones with a reason, and absent ones."""

    bad: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, col) -> why
    absent: set[tuple[int, int]] = field(default_factory=set)  # zero-length: no data, white


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles (or strips: full-width tiles) of the TIFF page behind one reader level.

    ``offsets`` and ``counts`` are indexed ``plane * rows * cols + row * cols + col``
    (one plane unless samples are stored planar-separate).
    """

    page_index: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    planes: int
    offsets: np.ndarray
    counts: np.ndarray
    compression: int
    jpegtables: bytes
    components: int  # samples in each tile's stream
    sample_bytes: int  # bytes per sample when uncompressed (0: not whole bytes)
    tiled: bool

    @property
    def codec(self) -> str:
        """The codec's name, for messages ("corrupt JPEG tile ...")."""
        if self.compression == JPEG:
            return "JPEG"
        if self.compression in JPEG2000:
            return "JPEG 2000"
        if self.compression in DEFLATE:
            return "Deflate"
        return _CODEC_NAMES.get(self.compression, f"compression-{self.compression}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    def span(self, y0: int, x0: int, y1: int, x1: int) -> tuple[int, int, int, int]:
        """Tile rows [r0, r1) and columns [c0, c1) that level pixels [y0, y1) x [x0, x1) touch."""
        return (y0 // self.tile_h, -(-y1 // self.tile_h), x0 // self.tile_w, -(-x1 // self.tile_w))

    def rect(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a tile in level pixels, clipped to the level."""
        y0, x0 = row * self.tile_h, col * self.tile_w
        return y0, x0, min(y0 + self.tile_h, self.height), min(x0 + self.tile_w, self.width)

    def indices(self, row: int, col: int) -> list[int]:
        """Positions of one tile's segments (one per plane) in ``offsets``/``counts``."""
        base = row * self.cols + col
        return [plane * self.rows * self.cols + base for plane in range(self.planes)]

    def inspect(self, fd: int, file_size: int, tiles: Sequence[tuple[int, int]], *, verify_deflate: bool,
                threads: int = 1) -> TileReport:
        """Check the given (row, col) tiles' bytes in the open file ``fd`` (see the module doc)."""
        report = TileReport()
        segments: list[tuple[tuple[int, int], int]] = []
        for tile in tiles:
            indices = self.indices(*tile)
            if all(self.counts[i] == 0 for i in indices):
                report.absent.add(tile)
                continue
            for i in indices:
                segments.append((tile, i))
        checkable: list[tuple[tuple[int, int], int]] = []
        for tile, i in segments:
            why = self._range_problem(int(self.offsets[i]), int(self.counts[i]), file_size)
            if why:
                report.bad.setdefault(tile, why)
            elif tile not in report.bad:
                checkable.append((tile, i))
        for (tile, _), why in zip(checkable, self._codec_problems(fd, checkable, verify_deflate, threads)):
            if why:
                report.bad.setdefault(tile, why)
        return report

    def _range_problem(self, offset: int, count: int, file_size: int) -> str:
        if count == 0:
            return "zero-length tile in a tile that has data in another plane"
        if offset < 0 or count < 0 or offset + count > file_size:
            return f"its bytes {offset}..{offset + count} lie outside the file ({file_size} bytes)"
        return ""

    def _codec_problems(self, fd: int, segments: list[tuple[tuple[int, int], int]], verify_deflate: bool,
                        threads: int) -> list[str]:
        if not segments:
            return []
        if self.compression == JPEG:
            return self._jpeg_problems(fd, segments, threads)
        if self.compression in JPEG2000:
            return [_jpeg2000_problem(_pread(fd, self, i)) for _, i in segments]
        if self.compression in DEFLATE and verify_deflate:
            return [_deflate_problem(_pread(fd, self, i)) for _, i in segments]
        if self.compression == UNCOMPRESSED and self.sample_bytes:
            return [self._uncompressed_problem(tile, int(self.counts[i])) for tile, i in segments]
        return ["" for _ in segments]

    def _jpeg_problems(self, fd: int, segments: list[tuple[tuple[int, int], int]], threads: int) -> list[str]:
        from nic_fast import _C

        index = np.fromiter((i for _, i in segments), np.int64, len(segments))
        clip = np.empty((len(segments), 2), np.int32)
        for k, ((row, col), _) in enumerate(segments):
            y0, x0, y1, x1 = self.rect(row, col)
            clip[k] = (y1 - y0, x1 - x0)
        return _C.check_jpeg_tiles(fd, np.ascontiguousarray(self.offsets[index]), np.ascontiguousarray(self.counts[index]),
                                   clip, (self.tile_h, self.tile_w), self.components, self.jpegtables, threads)

    def _uncompressed_problem(self, tile: tuple[int, int], count: int) -> str:
        y0, _, y1, _ = self.rect(*tile)
        rows = self.tile_h if self.tiled else y1 - y0
        needed = rows * self.tile_w * self.components * self.sample_bytes
        return "" if count >= needed else f"{count} bytes, an uncompressed tile of this size needs {needed}"


def _pread(fd: int, grid: TileGrid, i: int) -> bytes:
    return os.pread(fd, int(grid.counts[i]), int(grid.offsets[i]))


def _jpeg2000_problem(data: bytes) -> str:
    if data.startswith(_JP2_SIGNATURE):
        return "" if b"jp2c" in data[:4096] else "JP2 file without a codestream box"
    if not data.startswith(b"\xff\x4f\xff\x51"):
        return f"does not start with a JPEG 2000 codestream header (starts {data[:4].hex(' ')})"
    if not data.endswith(b"\xff\xd9"):
        return "JPEG 2000 codestream does not end with EOC (truncated?)"
    return ""


def _deflate_problem(data: bytes) -> str:
    try:
        inflater = zlib.decompressobj()
        inflater.decompress(data)
        if not inflater.eof:
            return "Deflate stream ends early (truncated)"
    except zlib.error as exc:
        return f"Deflate stream is corrupt ({exc})"
    return ""


def pyramid_pages(tif: Any) -> list[Any]:
    """The TIFF pages behind reader levels 0..N (OpenSlide's rule, see the module doc)."""
    pages = list(tif.pages)
    if not pages:
        return []
    base = pages[0]
    if tif.is_svs:
        others = [page for page in pages[1:] if page.is_tiled]
    else:
        others = [page for page in pages[1:] if page.is_tiled and page.subfiletype & _REDUCED_RESOLUTION]
    others.sort(key=lambda page: -page.imagewidth)  # stable: file order among equals
    return [base, *others]


def grid_of(page: Any) -> TileGrid | None:
    """The tile grid of a TIFF page, or None for what has no 2-d grid of segments
    (volumes, or strips and tiles tifffile cannot locate)."""
    if page.imagedepth != 1 or page.tiledepth != 1:
        return None
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    tiled = bool(page.is_tiled)
    tile_h = page.tilelength if tiled else min(page.rowsperstrip, page.imagelength)
    tile_w = page.tilewidth if tiled else page.imagewidth
    planes = page.samplesperpixel if page.planarconfig == 2 else 1
    grid = TileGrid(
        page_index=page.index if isinstance(page.index, int) else -1,
        height=page.imagelength, width=page.imagewidth, tile_h=tile_h, tile_w=tile_w, planes=planes,
        offsets=offsets, counts=counts, compression=int(page.compression), jpegtables=bytes(page.jpegtables or b""),
        components=1 if planes > 1 else page.samplesperpixel,
        sample_bytes=page.bitspersample // 8 if page.bitspersample % 8 == 0 else 0, tiled=tiled,
    )
    if len(offsets) != grid.planes * grid.rows * grid.cols or len(counts) != len(offsets):
        return None
    return grid


def tiles_of(grid: TileGrid, y0: int, x0: int, y1: int, x1: int) -> Iterator[tuple[int, int]]:
    """Every (row, col) of the tiles touching level pixels [y0, y1) x [x0, x1)."""
    r0, r1, c0, c1 = grid.span(y0, x0, y1, x1)
    for row in range(r0, r1):
        for col in range(c0, c1):
            yield row, col


class TiffTiles:
    """Tile access for one reader handle: one open file, parsed once, and each level's
    grid built on first use.

    With ``level_dims`` (a reader that decodes through another library: cuCIM,
    OpenSlide) a level gets a grid only when a tiled page of exactly its size backs it
    (the page :func:`pyramid_pages` assigns, else the first tiled page of that size), so
    a reader whose levels do not come from TIFF pages gets none and its regions rely on
    the backend's own errors. Without, the levels are :func:`pyramid_pages` themselves,
    and ``strips`` lets stripped pages have (full-width) grids too.
    """

    def __init__(self, path: str | os.PathLike[str], level_dims: Sequence[tuple[int, int]] | None = None, *,
                 strips: bool = False) -> None:
        import tifffile

        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), with the reader handle
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self._tif = tifffile.TiffFile(self._file)
            self.pages = pyramid_pages(self._tif)
        except Exception:
            self._file.close()
            raise
        self.level_dims = list(level_dims) if level_dims is not None else [
            (page.imagelength, page.imagewidth) for page in self.pages]
        self._strips = strips
        self._grids: dict[int, TileGrid | None] = {}

    @property
    def tif(self) -> Any:
        return self._tif

    @property
    def fd(self) -> int:
        return self._file.fileno()

    def grid(self, level: int) -> TileGrid | None:
        if level not in self._grids:
            self._grids[level] = self._build(level)
        return self._grids[level]

    def _build(self, level: int) -> TileGrid | None:
        height, width = self.level_dims[level]
        candidates = [self.pages[level]] if level < len(self.pages) else []
        candidates += [page for page in self._tif.pages if page.is_tiled]
        for page in candidates:
            if (page.is_tiled or self._strips) and (page.imagelength, page.imagewidth) == (height, width):
                return grid_of(page)
        return None

    def close(self) -> None:
        self._tif.close()
        self._file.close()

"""Fast window reads from a store's embeddings, the loaders' hot path.

Zarr-python 3 decodes every chunk through its asyncio machinery (one event-loop round
trip per read plus a thread hand-off per chunk), about 0.5 ms per chunk: a 64×64-cell
crop touching 16 chunks costs ~10 ms, which starves the CNN. For the layout
``compress`` writes (a local directory store, little-endian bytes + Zstd, no sharding)
this reader opens and decodes the chunk files itself (~40 µs each), verifying each
chunk's CRC-32C where the store has one (format 2); any other layout is read through
Zarr unchanged. Zarr's metadata still says where each chunk lives. A format-2 store
writes every chunk, so a missing one is damage (:class:`StoreError`); a format-1 store
skipped chunks holding only the fill value, which is what a missing one holds there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from nic_fast.store import StoreError

__all__ = ["EmbeddingReader"]

_ZSTD = Zstd()


def _direct_root(array: zarr.Array) -> tuple[Path, bool] | None:
    """(the array's folder, whether chunks end in a CRC-32C) when its chunks are Zstd-compressed
    files this reader can decode."""
    codecs = list(getattr(array.metadata, "codecs", ()))
    checksummed = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if checksummed:
        codecs = codecs[:-1]
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], ZstdCodec):
        return None
    endian = codecs[0].endian
    little = endian is None or getattr(endian, "value", endian) == "little"
    whole_codes = array.chunks[-1] == array.shape[-1]
    if not little or not whole_codes or not isinstance(array.store, LocalStore):
        return None
    return Path(array.store.root) / array.path, checksummed


class EmbeddingReader:
    """A store's (A, H', W', C) embeddings, indexable as ``reader[k, i0:i1, j0:j1, :]``.

    Only that form (what crops read) takes the fast path; any other index goes to Zarr.
    Opened per process: the loaders' workers each make their own.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.array = zarr.open_array(Path(store_path) / "embeddings", mode="r")
        self.shape: tuple[int, ...] = tuple(self.array.shape)
        self.chunks: tuple[int, ...] = tuple(self.array.chunks)
        self.dtype = np.dtype(self.array.dtype).newbyteorder("<")
        direct = _direct_root(self.array)
        self._root, self._checksummed = direct if direct else (None, False)
        self._fill = self.array.metadata.fill_value

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._root is None or not self._is_window(key):
            return np.asarray(self.array[key])
        variant, rows, cols, _ = key
        return self._window(self._root, int(variant), rows.start, rows.stop, cols.start, cols.stop)

    def _is_window(self, key: Any) -> bool:
        if not (isinstance(key, tuple) and len(key) == 4 and isinstance(key[0], (int, np.integer))):
            return False
        variant, rows, cols, channels = key
        if not all(isinstance(s, slice) and s.step in (None, 1) for s in (rows, cols, channels)):
            return False
        return (channels == slice(None) and 0 <= variant < self.shape[0]
                and rows.start is not None and rows.stop is not None and 0 <= rows.start < rows.stop <= self.shape[1]
                and cols.start is not None and cols.stop is not None and 0 <= cols.start < cols.stop <= self.shape[2])

    def _window(self, root: Path, variant: int, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        chunk_a, chunk_h, chunk_w, _ = self.chunks
        out = np.empty((i1 - i0, j1 - j0, self.shape[3]), self.dtype)
        for ci in range(i0 // chunk_h, (i1 - 1) // chunk_h + 1):
            r0, r1 = max(i0, ci * chunk_h), min(i1, (ci + 1) * chunk_h)
            for cj in range(j0 // chunk_w, (j1 - 1) // chunk_w + 1):
                c0, c1 = max(j0, cj * chunk_w), min(j1, (cj + 1) * chunk_w)
                chunk = self._chunk(root, (variant // chunk_a, ci, cj, 0))[variant % chunk_a]
                out[r0 - i0 : r1 - i0, c0 - j0 : c1 - j0] = \
                    chunk[r0 - ci * chunk_h : r1 - ci * chunk_h, c0 - cj * chunk_w : c1 - cj * chunk_w]
        return out

    def _chunk(self, root: Path, coords: tuple[int, ...]) -> np.ndarray:
        path = root / self.array.metadata.encode_chunk_key(coords)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if self._checksummed:
                raise StoreError(f"{root.parent}: embeddings chunk {coords} is missing: the store is damaged; run "
                                 f"`nic-fast verify {root.parent}`, then recompress the slide") from None
            return np.full(self.chunks, self._fill, self.dtype)  # format 1 skipped chunks of fill values
        if self._checksummed:
            data, stored = data[:-4], data[-4:]
            if np.uint32(google_crc32c.value(data)).tobytes() != stored:
                raise StoreError(f"{root.parent}: embeddings chunk {coords} is damaged (checksum mismatch); run "
                                 f"`nic-fast verify {root.parent}`, then recompress the slide")
        return np.frombuffer(_ZSTD.decode(data), self.dtype).reshape(self.chunks)

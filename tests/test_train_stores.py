"""Stores as the training layer reads them: the fast chunk reader and the background embedding.

Also home of ``write_store``, which the other test_train_* modules import to build small
stores with known contents through nic-fast's own StoreWriter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from nic_fast.store import CellGeometry, StoreError, StoreWriter, open_store
from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.sampler import background_embedding

TILE_CELLS = 16


def write_store(path: Path, embeddings: np.ndarray, tissue: np.ndarray, *, valid: np.ndarray | None = None,
                background: str = "blank", encoder_source: str = "builtin:mean-rgb",
                encoder_name: str = "mean-rgb", encoder_sha256: str = "ab" * 32, stride_px: int = 128,
                patch_px: int | None = None, mpp: float | None = 0.5, scanned_mpp: float | None = 0.5,
                thumbnail_downsample: float = 16.0) -> Path:
    """A complete store holding exactly ``embeddings`` (A, H, W, C) and the given masks
    (µm/px None: a plain image in pixel units, as ``compress --mpp none`` writes; patch_px
    None: the stride)."""
    variants, height, width, code_size = embeddings.shape
    valid = np.ones((height, width), bool) if valid is None else valid
    thumb_cells = stride_px * (mpp / scanned_mpp if mpp and scanned_mpp else 1) / thumbnail_downsample
    thumbnail = np.full((max(1, round(height * thumb_cells)), max(1, round(width * thumb_cells)), 3), 230, np.uint8)
    attrs = {"background": background, "stride_px": stride_px, "patch_px": patch_px or stride_px, "mpp": mpp,
             "scanned_mpp": scanned_mpp, "downsample": 1, "thumbnail_downsample": thumbnail_downsample,
             "grid_shape": [height, width],
             "encoder": {"source": encoder_source, "name": encoder_name, "sha256": encoder_sha256,
                         "code_size": code_size}}
    geometry = CellGeometry(stride_px=stride_px, patch_px=patch_px or stride_px, level0_px_per_px=(mpp / scanned_mpp
                            if mpp and scanned_mpp else 1.0), level0_mpp=scanned_mpp if mpp else None,
                            thumbnail_downsample=thumbnail_downsample)
    writer = StoreWriter(path, variants=variants, grid_shape=(height, width), code_size=code_size,
                         tile_cells=TILE_CELLS, thumbnail=thumbnail, tissue=tissue, geometry=geometry, attrs=attrs,
                         config={})
    for row, i0 in enumerate(range(0, height, TILE_CELLS)):
        for col, j0 in enumerate(range(0, width, TILE_CELLS)):
            i1, j1 = min(i0 + TILE_CELLS, height), min(j0 + TILE_CELLS, width)
            writer.write_tile(row, col, i0, j0, embeddings[:, i0:i1, j0:j1], valid[i0:i1, j0:j1])
    return writer.publish({}, overwrite=True)


def random_store(path: Path, *, shape: tuple[int, int, int, int] = (8, 40, 37, 5), seed: int = 0,
                 background_value: float = 0.75) -> Path:
    """Random codes on a disc of tissue; background cells hold ``background_value``."""
    rng = np.random.default_rng(seed)
    _, height, width, _ = shape
    rows, cols = np.indices((height, width))
    tissue = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (0.4 * min(height, width)) ** 2
    codes = rng.standard_normal(shape).astype(np.float16)
    codes[:, ~tissue] = background_value
    return write_store(path, codes, tissue)


def test_reader_matches_zarr_on_every_kind_of_window(tmp_path: Path) -> None:
    store = random_store(tmp_path / "s.zarr")
    reader = EmbeddingReader(store)
    array = zarr.open_array(store / "embeddings", mode="r")
    assert reader.shape == array.shape
    rng = np.random.default_rng(1)
    windows = [(0, 0, 40, 0, 37), (7, 15, 17, 15, 17), (3, 16, 32, 16, 32), (5, 39, 40, 36, 37)]
    for _ in range(40):
        i0, i1 = sorted(rng.choice(41, 2, replace=False))
        j0, j1 = sorted(rng.choice(38, 2, replace=False))
        windows.append((int(rng.integers(8)), int(i0), int(i1), int(j0), int(j1)))
    for k, i0, i1, j0, j1 in windows:
        np.testing.assert_array_equal(reader[k, i0:i1, j0:j1, :], array[k, i0:i1, j0:j1, :])


def test_reader_reads_chunks_of_fill_values_and_refuses_damaged_ones(tmp_path: Path) -> None:
    codes = np.zeros((1, 40, 40, 3), np.float16)  # zero = the fill value: format 2 still writes such chunks
    codes[0, 20:24, 20:24] = 2.0
    store = write_store(tmp_path / "s.zarr", codes, np.ones((40, 40), bool))
    chunk = store / "embeddings" / "c" / "0" / "0" / "0" / "0"
    assert chunk.exists()
    np.testing.assert_array_equal(EmbeddingReader(store)[0, 0:40, 0:40, :], codes[0])
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match="checksum mismatch"):
        EmbeddingReader(store)[0, 0:16, 0:16, :]
    chunk.unlink()
    with pytest.raises(StoreError, match="missing"):
        EmbeddingReader(store)[0, 0:16, 0:16, :]


def test_reader_passes_other_indexing_to_zarr(tmp_path: Path) -> None:
    store = random_store(tmp_path / "s.zarr")
    reader = EmbeddingReader(store)
    np.testing.assert_array_equal(reader[2, 5, :, 1], zarr.open_array(store / "embeddings")[2, 5, :, 1])


def test_background_embedding_is_read_from_a_background_cell(tmp_path: Path) -> None:
    slide = open_store(random_store(tmp_path / "s.zarr", background_value=0.75))
    np.testing.assert_array_equal(background_embedding(slide), np.full(5, 0.75, np.float16))


def test_background_embedding_of_an_all_tissue_store_reencodes_a_white_patch(tmp_path: Path) -> None:
    codes = np.full((1, 8, 8, 3), 0.5, np.float16)
    slide = open_store(write_store(tmp_path / "s.zarr", codes, np.ones((8, 8), bool)))
    np.testing.assert_array_equal(background_embedding(slide), np.ones(3, np.float16))  # mean-rgb of white


def test_background_zero_stores_pad_with_zeros(tmp_path: Path) -> None:
    codes = np.full((1, 8, 8, 3), 0.5, np.float16)
    slide = open_store(write_store(tmp_path / "s.zarr", codes, np.ones((8, 8), bool), background="zero"))
    np.testing.assert_array_equal(background_embedding(slide), np.zeros(3, np.float16))


def test_missing_encoder_for_an_all_tissue_store_says_what_to_do(tmp_path: Path) -> None:
    from nic_fast.store import StoreError

    codes = np.full((1, 8, 8, 3), 0.5, np.float16)
    slide = open_store(write_store(tmp_path / "s.zarr", codes, np.ones((8, 8), bool),
                                   encoder_source=str(tmp_path / "gone.pt")))
    with pytest.raises(StoreError, match="--background zero"):
        background_embedding(slide)

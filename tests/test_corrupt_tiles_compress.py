"""A corrupt tile in a real slide, end to end: the cells whose patches touch it are not valid,
every other cell is the clean slide's store bit for bit; and a user's tissue mask (the
store's own GeoJSON, as QuPath would hand it back) reproduces the automatic tissue cells."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_tile_integrity import TILE_RECT, _damage

from nic_fast.batch import compress_slides
from nic_fast.job import CompressOptions
from nic_fast.store import open_store

OPTIONS = dict(batch_size=64, workers=1)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    from conftest import SHARED_DATA

    svs = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
    if not svs.exists():
        pytest.skip(f"reference data {svs} is absent")
    out = tmp_path_factory.mktemp("clean")
    (result,) = compress_slides([svs], out, CompressOptions(**OPTIONS)).results
    assert result.status == "ok" and result.invalid_cells == 0
    return out / "CMU-1-Small-Region.zarr"


def touching(shape: tuple[int, int], rect: tuple[int, int, int, int], cell_px: int = 128) -> np.ndarray:
    """Cells (level 0 = working resolution here) whose patch overlaps the level-px rectangle."""
    y0, x0, y1, x1 = rect
    rows, cols = np.indices(shape)
    return (rows * cell_px < y1) & (rows * cell_px + cell_px > y0) & (cols * cell_px < x1) & (cols * cell_px + cell_px > x0)


@pytest.mark.parametrize("kind", ["zeroed", "ff", "mid-scan"])
def test_a_corrupt_tile_costs_exactly_the_cells_touching_it(cmu_svs, clean_store, tmp_path, kind):
    damaged = _damage(cmu_svs, tmp_path / "CMU-1-Small-Region.svs", kind)
    (result,) = compress_slides([damaged], tmp_path / "out", CompressOptions(**OPTIONS)).results
    assert result.status == "ok", result.reason
    store, clean = open_store(tmp_path / "out" / "CMU-1-Small-Region.zarr"), open_store(clean_store)
    hit = touching(store.grid_shape, TILE_RECT)
    assert hit.sum() == 9
    # unknown pixels count as tissue: every cell on the tile is read and found unreadable
    np.testing.assert_array_equal(store.valid, ~hit)
    assert result.invalid_cells == store.attrs["invalid_cells"] == 9
    assert all("corrupt JPEG tile (row 4, col 3)" in reason for reason in result.invalid_reasons)
    others = ~hit
    np.testing.assert_array_equal(store.tissue[others], clean.tissue[others])
    np.testing.assert_array_equal(store.load()[others], clean.load()[others])


def test_the_stores_tissue_geojson_read_back_as_a_mask_gives_the_same_cells(cmu_svs, clean_store, tmp_path):
    geojson = clean_store.with_name("CMU-1-Small-Region.tissue.geojson")
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    assert all(f["properties"]["classification"]["name"] == "Tissue" for f in collection["features"])
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "CMU-1-Small-Region.geojson").write_text(geojson.read_text())  # as exported from QuPath
    (result,) = compress_slides([cmu_svs], tmp_path / "out", CompressOptions(tissue_masks=masks, **OPTIONS)).results
    assert result.status == "ok", result.reason
    store = open_store(tmp_path / "out" / "CMU-1-Small-Region.zarr")
    np.testing.assert_array_equal(store.tissue, open_store(clean_store).tissue)
    assert store.attrs["tissue_detection"] == "mask file CMU-1-Small-Region.geojson"
    (masks / "CMU-1-Small-Region.geojson").write_text("{not json")
    (bad,) = compress_slides([cmu_svs], tmp_path / "bad", CompressOptions(tissue_masks=masks, **OPTIONS)).results
    assert bad.status == "failed" and "CMU-1-Small-Region.geojson" in bad.reason and "\n" not in bad.reason

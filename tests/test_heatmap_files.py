"""Heatmap files: the overlay drawn on the slide (or the thumbnail when it is gone), GeoJSON
contours where the heatmap is, and a float32 TIFF whose tags carry its µm/px."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from test_train_stores import write_store

from nic_fast.annotations import read_tissue_mask
from nic_fast.cli import main
from nic_fast.store import open_store
from nic_fast.synthetic import write_synthetic_slide
from nic_fast.train.gradcam import lesion_cells
from nic_fast.train.heatmap_files import (
    cell_origin_level0_px,
    heatmap_geojson,
    save_overlay,
    slide_background,
    write_heatmap_tiff,
)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated slide at 0.25 µm/px, compressed at 0.5 µm/px (level 0 box-downsampled by 2)."""
    folder = tmp_path_factory.mktemp("heatmap")
    slide = write_synthetic_slide(folder / "s.tif", height=2048, width=3072, mpp=0.25, seed=2, lesion=True).path
    result = CliRunner().invoke(main, ["compress", str(slide), "-o", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out" / "s.zarr"


def _square(shape: tuple[int, int]) -> np.ndarray:
    square = np.zeros(shape, bool)
    square[4:9, 10:18] = True
    return square


def test_overlay_is_drawn_on_the_slide_at_2_um_per_px(compressed: Path, tmp_path: Path) -> None:
    slide = open_store(compressed)
    background = slide_background(slide)
    assert background.source == "slide" and not background.note
    assert background.mpp == pytest.approx(2.0) and background.level0_px_per_px == pytest.approx(8.0)
    assert background.image.shape == (256, 384, 3)  # 2048 x 3072 px at 0.25 µm/px, read at 2 µm/px
    assert background.image.std() > 10, "slide pixels, not a blank"
    small = slide_background(slide, max_px=256)
    assert max(small.image.shape[:2]) <= 256 and small.mpp == pytest.approx(3.0)
    assert slide.grid_shape == (8, 12)
    heat = np.zeros((8, 12), np.float32)
    heat[1:4, 8:12] = 1.0  # tissue cells, all of them
    out = save_overlay(tmp_path / "h.png", background, slide, heat, predicted=heat > 0.5, truth=heat > 0.5,
                       title="test")
    with Image.open(out) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    assert rgb.shape[1] > 384 and rgb.shape[0] > 256, "the slide image at 1:1 plus the colour bar and title"
    # The heatmap colours its cells (viridis' yellow at the maximum) and leaves the rest as the slide.
    cell = 128 * 2 / 8  # 0.5 µm/px cells of 128 px, in 2 µm/px pixels
    top = rgb.shape[0] - 256  # the image sits at the bottom left, under the title
    assert slide.tissue[1:4, 8:12].all()
    inside = rgb[top + int(2.5 * cell), int(10 * cell)]
    assert inside[0] > 120 and inside[1] > 120 and inside[2] < 150, inside
    far = (int(0.5 * cell), int(1.5 * cell))  # cell (0, 1): no heat, no legend or scale bar there
    np.testing.assert_allclose(rgb[top + far[0], far[1]], background.image[far].astype(int), atol=3)


def test_overlay_falls_back_to_the_thumbnail_when_the_slide_is_gone(compressed: Path, tmp_path: Path) -> None:
    moved = tmp_path / "s.zarr"
    shutil.copytree(compressed, moved)
    source = Path(open_store(moved).attrs["source"]["path"])
    hidden = source.with_name("hidden.tif")
    source.rename(hidden)
    try:
        background = slide_background(open_store(moved))
    finally:
        hidden.rename(source)
    assert background.source == "thumbnail" and "no such file" in background.note and "\n" not in background.note
    np.testing.assert_array_equal(background.image, open_store(moved).thumbnail)
    assert background.level0_px_per_px == open_store(moved).attrs["thumbnail_downsample"]


def test_contours_land_on_the_heatmap_in_level0_px(tmp_path: Path) -> None:
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 12, 24, 3), np.float16), np.ones((12, 24), bool)))
    heat = _square((12, 24)).astype(np.float32)
    heat[6, 14] = 2.0  # the peak: alone above 75 %
    collection = heatmap_geojson(slide, heat)
    by_class = {f["properties"]["classification"]["name"]: f for f in collection["features"]}
    assert set(by_class) == {"Grad-CAM ≥ 25%", "Grad-CAM ≥ 50%", "Grad-CAM ≥ 75%"}
    assert all(f["properties"]["objectType"] == "annotation" for f in collection["features"])
    ring = np.array(by_class["Grad-CAM ≥ 25%"]["geometry"]["coordinates"][0])
    cell = 128  # level-0 px per cell: stride 128 at 0.5 µm/px on a 0.5 µm/px scan
    np.testing.assert_allclose(ring.min(axis=0), (10 * cell + cell / 4, 4 * cell + cell / 4))
    np.testing.assert_allclose(ring.max(axis=0), (18 * cell - cell / 4, 9 * cell - cell / 4))
    peak = np.array(by_class["Grad-CAM ≥ 75%"]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(peak.mean(axis=0)[::-1], ((6 + 0.5) * cell, (14 + 0.5) * cell), atol=cell / 4)
    # Read back as a mask at the grid's scale, the scored level is exactly the post-processed heatmap.
    path = tmp_path / "c.geojson"
    path.write_text(json.dumps(collection))
    scored = read_tissue_mask(path, mask_shape=(12, 24), level0_px_per_mask_px=cell, level0_shape=(12 * cell, 24 * cell),
                              classes=["Grad-CAM ≥ 50%"])
    np.testing.assert_array_equal(scored, lesion_cells(heat, slide.tissue))


def test_cells_wider_than_their_stride_are_centred_on_their_patch(tmp_path: Path) -> None:
    path = write_store(tmp_path / "s.zarr", np.zeros((1, 6, 6, 3), np.float16), np.ones((6, 6), bool), stride_px=64)
    attrs_file = path / "zarr.json"
    meta = json.loads(attrs_file.read_text())
    meta["attributes"]["nic_fast"]["patch_px"] = 128  # patches of 128 px every 64 px
    attrs_file.write_text(json.dumps(meta))
    slide = open_store(path)
    assert cell_origin_level0_px(slide) == 32.0
    heat = np.zeros((6, 6), np.float32)
    heat[0, 0] = 1.0
    ring = np.array(heatmap_geojson(slide, heat)["features"][0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring.min(axis=0), (32 + 16, 32 + 16))  # the square of cell (0, 0), a quarter inside


def test_heatmap_tiff_carries_its_um_per_px(tmp_path: Path) -> None:
    tissue = np.ones((12, 24), bool)
    tissue[:, :2] = False
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 12, 24, 3), np.float16), tissue))
    heat = np.random.default_rng(0).random((12, 24)).astype(np.float32)
    mpp = write_heatmap_tiff(tmp_path / "h.tif", slide, heat)
    assert mpp == 64.0  # 128 px at 0.5 µm/px per cell
    with tifffile.TiffFile(tmp_path / "h.tif") as tif:
        page = tif.pages[0]
        values = page.asarray()
        x_num, x_den = page.tags["XResolution"].value
        unit = page.tags["ResolutionUnit"].value
        description = json.loads(page.description)
    assert values.dtype == np.float32 and values.shape == (12, 24)
    np.testing.assert_array_equal(values[:, 2:], heat[:, 2:])
    assert not values[:, :2].any(), "0 outside tissue"
    assert unit == tifffile.RESUNIT.CENTIMETER and 1e4 / (x_num / x_den) == pytest.approx(64.0)
    assert description["level0_px_per_px"] == 128.0 and description["origin_level0_px_xy"] == [0.0, 0.0]
    plain = open_store(write_store(tmp_path / "p.zarr", np.zeros((1, 4, 4, 1), np.float16), np.ones((4, 4), bool),
                                   stride_px=9, mpp=None, scanned_mpp=None, thumbnail_downsample=9 / 8))
    assert write_heatmap_tiff(tmp_path / "p.tif", plain, np.ones((4, 4), np.float32)) is None
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert json.loads(tif.pages[0].description)["level0_px_per_px"] == 9

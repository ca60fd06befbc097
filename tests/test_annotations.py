"""QuPath GeoJSON and mask files: exact round trips, QuPath's conventions, and bad files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from nic_fast.annotations import (
    TISSUE_CLASS,
    MaskFileError,
    find_mask_for,
    mask_polygons,
    read_tissue_mask,
    tissue_geojson,
    write_geojson,
)
from nic_fast.grid import GridGeometry
from nic_fast.slides import open_slide
from nic_fast.tissue import detect_tissue, tissue_from_mask


def _round_trip(mask: np.ndarray, downsample: float, tmp_path: Path) -> np.ndarray:
    path = write_geojson(tmp_path / "m.geojson", tissue_geojson(mask, downsample, min_area_mask_px=0))
    level0 = (int(mask.shape[0] * downsample), int(mask.shape[1] * downsample))
    return read_tissue_mask(path, mask_shape=mask.shape, level0_px_per_mask_px=downsample, level0_shape=level0)


@pytest.mark.parametrize("downsample", [16.0, 15.7, 1.0])
def test_any_mask_survives_geojson_exactly(tmp_path: Path, downsample: float) -> None:
    """Holes, islands in holes, diagonal pinches and single pixels all come back."""
    rng = np.random.default_rng(int(downsample * 10))
    for trial in range(20):
        if trial % 2:
            mask = rng.random((21, 27)) > 0.5
        else:
            mask = ndimage.gaussian_filter(rng.random((48, 64)), 1.5) > 0.5
        np.testing.assert_array_equal(_round_trip(mask, downsample, tmp_path), mask)


def test_geojson_is_qupath_annotations_in_level0_px(tmp_path: Path) -> None:
    mask = np.zeros((40, 50), bool)
    mask[5:25, 10:40] = True
    mask[10:20, 20:30] = False  # a hole
    mask[12:18, 22:28] = True  # an island in the hole (36 px)
    mask[35, 45] = True  # a 1-px speck
    collection = tissue_geojson(mask, 16.0, name="slide.svs")
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == 2, "the blob (with its hole) and the island; the speck is dropped"
    for feature in features:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == TISSUE_CLASS
        color = props["classification"]["color"]
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    blob = max(features, key=lambda f: len(f["geometry"]["coordinates"]))
    outer, hole = np.array(blob["geometry"]["coordinates"][0]), np.array(blob["geometry"]["coordinates"][1])
    assert len(blob["geometry"]["coordinates"]) == 2
    # A quarter of a mask pixel (4 level-0 px) inside the pixel edges, in level-0 px.
    np.testing.assert_allclose(outer.min(axis=0), (10 * 16 + 4, 5 * 16 + 4))
    np.testing.assert_allclose(outer.max(axis=0), (40 * 16 - 4, 25 * 16 - 4))
    assert hole.min(axis=0)[0] < 20 * 16 < hole.max(axis=0)[0] < 30 * 16 + 8
    again = tissue_geojson(mask, 16.0, name="slide.svs")
    assert json.dumps(again) == json.dumps(collection), "same mask, same file (ids included)"
    assert tissue_geojson(mask, 16.0, name="other.svs")["features"][0]["id"] != features[0]["id"]
    assert [p.area for p in mask_polygons(np.zeros((4, 4), bool), level0_px_per_mask_px=2)] == []


def test_real_slide_mask_through_geojson_gives_the_same_cells(cmu_svs: Path, tmp_path: Path) -> None:
    with open_slide(cmu_svs) as reader:
        level0_shape = reader.level_dims[0]
        grid = GridGeometry.over_level(*level0_shape, patch_px=128, stride_px=128, downsample=1)
        thumbnail = reader.thumbnail(16)
    automatic = detect_tissue(thumbnail, grid, thumb_px_per_level_px=1 / 16)
    path = write_geojson(tmp_path / "CMU-1-Small-Region.tissue.geojson",
                         tissue_geojson(automatic.mask, 16, name=cmu_svs.name))
    mask = read_tissue_mask(path, mask_shape=automatic.mask.shape, level0_px_per_mask_px=16,
                            level0_shape=level0_shape)
    given = tissue_from_mask(mask, grid, thumb_px_per_level_px=1 / 16, method=f"mask file {path.name}")
    np.testing.assert_array_equal(given.cells, automatic.cells)
    np.testing.assert_array_equal(mask, automatic.mask)
    assert find_mask_for(cmu_svs, tmp_path) == path


def _feature(geometry: dict, name: str | None = None, object_type: str = "annotation", **extra: object) -> dict:
    props: dict = {"objectType": object_type, **extra}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _square(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def test_qupath_export_classes_holes_and_ignore(tmp_path: Path) -> None:
    """Tissue and unclassified annotations count, Ignore* is cut out, other classes,
    detections and points are left out; MultiPolygon holes are kept."""
    donut = {"type": "MultiPolygon", "coordinates": [[_square(0, 0, 320), _square(80, 80, 160)], [_square(400, 0, 80)]]}
    features = [
        _feature(donut, TISSUE_CLASS),
        _feature({"type": "Polygon", "coordinates": [_square(0, 400, 160)]}),  # unclassified
        _feature({"type": "Polygon", "coordinates": [_square(320, 400, 160)]}, "Tumor"),
        _feature({"type": "Polygon", "coordinates": [_square(0, 400, 80)]}, "Ignore*"),
        _feature({"type": "Polygon", "coordinates": [_square(480, 480, 80)]}, TISSUE_CLASS, "detection"),
        _feature({"type": "Point", "coordinates": [600, 600]}, TISSUE_CLASS),
    ]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    mask = read_tissue_mask(path, mask_shape=(40, 40), level0_px_per_mask_px=16, level0_shape=(640, 640))
    expected = np.zeros((40, 40), bool)
    expected[0:20, 0:20] = True
    expected[5:15, 5:15] = False  # the donut's hole
    expected[0:5, 25:30] = True  # the MultiPolygon's second part
    expected[25:35, 0:10] = True  # unclassified
    expected[25:30, 0:5] = False  # Ignore*
    np.testing.assert_array_equal(mask, expected)
    tumour = read_tissue_mask(path, mask_shape=(40, 40), level0_px_per_mask_px=16, level0_shape=(640, 640),
                              classes=["Tumor"])
    assert tumour.sum() == 100
    # A bare list of features (QuPath's export without FEATURE_COLLECTION) and derived classes read too.
    features[0]["properties"]["classification"] = {"names": ["Tissue"], "color": [0, 0, 0]}
    path.write_text(json.dumps(features))
    again = read_tissue_mask(path, mask_shape=(40, 40), level0_px_per_mask_px=16, level0_shape=(640, 640))
    np.testing.assert_array_equal(again, expected)


def test_image_masks_at_any_size(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:30] = True
    big = np.kron(mask, np.ones((5, 5), bool))  # 150x200: a mask exported at another resolution
    Image.fromarray(big.astype(np.uint8) * 255).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", np.repeat(big[..., None], 3, axis=2).astype(np.uint8))
    for name in ("a.png", "b.tif"):
        got = read_tissue_mask(tmp_path / name, mask_shape=(30, 40), level0_px_per_mask_px=16, level0_shape=(480, 640))
        np.testing.assert_array_equal(got, mask)
    # The thumbnail may overhang the slide by part of a pixel (ceil): the last row/column is then empty.
    got = read_tissue_mask(tmp_path / "a.png", mask_shape=(31, 41), level0_px_per_mask_px=16, level0_shape=(480, 640))
    np.testing.assert_array_equal(got[:30, :40], mask)
    assert not got[30].any() and not got[:, 40].any()


@pytest.mark.parametrize(("content", "found"), [
    (b"{not json", "not a readable JSON file"),
    (json.dumps({"type": "Topology"}).encode(), "not GeoJSON"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [_square(0, 0, 10)]}, "Tumor")]).encode(),
     "annotation classes found: 'Tumor'"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [_square(0, 0, 5000)]})]).encode(), "beyond the slide"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1]]]})]).encode(), "cannot be read"),
])
def test_bad_geojson_is_one_line_naming_the_file(tmp_path: Path, content: bytes, found: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    with pytest.raises(MaskFileError) as info:
        read_tissue_mask(path, mask_shape=(40, 40), level0_px_per_mask_px=16, level0_shape=(640, 640))
    message = str(info.value)
    assert found in message and str(path) in message and "\n" not in message


def test_bad_image_masks(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 40), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "mask.bmp").write_bytes(b"BM")
    for name, found in (("wide.png", "aspect ratios differ"), ("broken.png", "cannot be read as an image"),
                        ("mask.bmp", "unknown mask format"), ("absent.png", "no such mask file")):
        with pytest.raises(MaskFileError, match=found) as info:
            read_tissue_mask(tmp_path / name, mask_shape=(30, 40), level0_px_per_mask_px=16, level0_shape=(480, 640))
        assert name in str(info.value)


def test_find_mask_for(tmp_path: Path) -> None:
    slide = Path("/data/slides/case_7.svs")
    assert find_mask_for(slide, tmp_path) is None
    (tmp_path / "case_7.svs.geojson").write_text("{}")
    assert find_mask_for(slide, tmp_path) == tmp_path / "case_7.svs.geojson"
    (tmp_path / "case_7.png").write_bytes(b"")
    with pytest.raises(MaskFileError, match="several masks for case_7.svs"):
        find_mask_for(slide, tmp_path)
    (tmp_path / "case_7.svs.geojson").unlink()
    assert find_mask_for(slide, tmp_path) == tmp_path / "case_7.png"
    assert find_mask_for(Path("case_70.svs"), tmp_path) is None
    with pytest.raises(MaskFileError, match="not a folder"):
        find_mask_for(slide, tmp_path / "case_7.png")

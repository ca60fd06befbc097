"""Tissue detection: marker ink is not tissue (generated and real slides), pale tissue stays,
the method is recorded, and a given mask yields its cells like the automatic one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nic_fast import kernels
from nic_fast.grid import GridGeometry
from nic_fast.slides import open_slide
from nic_fast.synthetic import MASK_DOWNSAMPLE, draw_marker_ink, write_pyramid_tiff, write_synthetic_slide
from nic_fast.tissue import METHOD_SATURATION, METHOD_SATURATION_INK, detect_tissue, tissue_from_mask

PATCH_PX = 128
THUMB_DOWNSAMPLE = 16  # 8 thumbnail px per 128-px cell, as compress does at level 0


def _cells(path: Path, *, remove_ink: bool) -> tuple[np.ndarray, GridGeometry]:
    with open_slide(path) as reader:
        grid = GridGeometry.over_level(*reader.level_dims[0], patch_px=PATCH_PX, stride_px=PATCH_PX, downsample=1)
        thumbnail = reader.thumbnail(THUMB_DOWNSAMPLE)
    tissue = detect_tissue(thumbnail, grid, thumb_px_per_level_px=1 / THUMB_DOWNSAMPLE, remove_ink=remove_ink)
    assert tissue.method == (METHOD_SATURATION_INK if remove_ink else METHOD_SATURATION)
    assert (tissue.ink is not None) == remove_ink
    return tissue.cells, grid


def _coverage(ink: np.ndarray, grid: GridGeometry, ink_px_per_level_px: float) -> np.ndarray:
    stride = PATCH_PX * ink_px_per_level_px
    return kernels.cell_fraction(ink, grid.shape, stride_px=stride, size_px=stride)


def _scores(inked: Path, coverage: np.ndarray, clean_cells: np.ndarray, *, remove_ink: bool) -> tuple[float, float]:
    """Share of the cells wholly under ink still called tissue, and of the real tissue
    cells (tissue on the clean slide, no ink in the footprint) still called tissue."""
    called, _ = _cells(inked, remove_ink=remove_ink)
    under, real = coverage >= 1.0, clean_cells & (coverage == 0)
    assert under.sum() >= 10 and real.sum() >= 50, "the fixture must have cells of both kinds to measure"
    return float(called[under].mean()), float(called[real].mean())


@pytest.fixture(scope="module")
def inked_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path, Path]]:
    folder = tmp_path_factory.mktemp("ink")
    pairs = []
    for seed in (1000, 1004):
        inked = write_synthetic_slide(folder / f"inked_{seed}.tif", height=2560, width=2816, seed=seed, lesion=True,
                                      ink=True)
        clean = write_synthetic_slide(folder / f"clean_{seed}.tif", height=2560, width=2816, seed=seed, lesion=True)
        assert inked.ink_mask_path is not None and clean.ink_mask_path is None
        pairs.append((inked.path, clean.path, inked.ink_mask_path))
    return pairs


def test_marker_ink_on_generated_slides_is_not_tissue(inked_pairs: list[tuple[Path, Path, Path]]) -> None:
    for inked, clean, ink_png in inked_pairs:
        clean_cells, grid = _cells(clean, remove_ink=False)
        np.testing.assert_array_equal(_cells(clean, remove_ink=True)[0], clean_cells)  # no ink: nothing changes
        coverage = _coverage(np.asarray(Image.open(ink_png)) > 0, grid, 1 / MASK_DOWNSAMPLE)
        under_ink, kept = _scores(inked, coverage, clean_cells, remove_ink=True)
        assert under_ink <= 0.05 and kept >= 0.95, (inked.name, under_ink, kept)
        before, _ = _scores(inked, coverage, clean_cells, remove_ink=False)
        assert before >= 0.5, "saturation alone takes the ink for tissue (else this test measures nothing)"


def test_real_slide_keeps_its_tissue_and_loses_drawn_ink(cmu_svs: Path, tmp_path: Path) -> None:
    """CMU-1-Small-Region: the ink rule leaves its tissue cells (pale pink and its blue-green
    margin dye included) within 1 %, and strokes drawn over it are not tissue."""
    before, grid = _cells(cmu_svs, remove_ink=False)
    after, _ = _cells(cmu_svs, remove_ink=True)
    assert abs(int(after.sum()) - int(before.sum())) <= 0.01 * before.sum()
    assert (after != before).sum() <= 0.01 * before.sum()
    with open_slide(cmu_svs) as reader:
        level0 = reader.read_region(0, 0, 0, *reader.level_dims[0])
        mpp = reader.mpp
    inked, truth = draw_marker_ink(level0, mpp=mpp, seed=1)
    path, clean = tmp_path / "cmu_inked.tif", tmp_path / "cmu_clean.tif"
    write_pyramid_tiff(path, inked, mpp=mpp)
    write_pyramid_tiff(clean, level0, mpp=mpp)  # re-encoded alike: compared like with like
    clean_cells, _ = _cells(clean, remove_ink=False)
    under_ink, kept = _scores(path, _coverage(truth, grid, 1.0), clean_cells, remove_ink=True)
    assert under_ink <= 0.05 and kept >= 0.95


def test_tissue_from_a_given_mask_counts_cells_like_the_automatic_one() -> None:
    rng = np.random.default_rng(3)
    thumbnail = np.full((64, 96, 3), 240, np.uint8)
    thumbnail[8:40, 16:80] = (220, 120, 190)
    thumbnail[rng.random((64, 96)) < 0.02] = (220, 120, 190)  # specks the automatic mask drops
    grid = GridGeometry.over_level(1024, 1536, patch_px=128, stride_px=128, downsample=1)
    automatic = detect_tissue(thumbnail, grid, thumb_px_per_level_px=1 / 16)
    given = tissue_from_mask(automatic.mask, grid, thumb_px_per_level_px=1 / 16, method="mask file x.geojson")
    np.testing.assert_array_equal(given.fraction, automatic.fraction)
    np.testing.assert_array_equal(given.cells, automatic.cells)
    assert given.method == "mask file x.geojson" and given.threshold == 0 and given.ink is None
    with pytest.raises(ValueError, match="2-d"):
        tissue_from_mask(np.zeros((4, 4, 3), bool), grid, thumb_px_per_level_px=1 / 16, method="x")

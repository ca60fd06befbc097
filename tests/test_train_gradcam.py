"""Grad-CAM: a network whose evidence is known, the inverse transforms, masks on the grid, Jaccard."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from test_train_stores import write_store

from nic_fast.grid import dihedral
from nic_fast.store import open_store
from nic_fast.train.gradcam import (
    grad_cam,
    inverse_dihedral,
    jaccard,
    lesion_cells,
    mask_to_grid,
    slide_heatmap,
)
from nic_fast.train.model import ModelConfig, NICNet, TrainedModel


def _brightness_network() -> TrainedModel:
    """A NIC CNN wired so its output grows with the brightest input cell, and every
    first-layer filter is a copy of the input: Grad-CAM must return the input itself."""
    network = NICNet(ModelConfig(in_channels=1, outputs=1)).eval()
    with torch.no_grad():
        for index, block in enumerate(network.features):
            block.depthwise.weight.zero_()
            block.depthwise.weight[:, 0, 1, 1] = 1.0
            block.pointwise.weight.zero_()
            if index == 0:
                block.pointwise.weight[:, 0, 0, 0] = 1.0
            else:
                block.pointwise.weight[:, :, 0, 0] = torch.eye(128)
        linear, _, _ = network.dense
        linear.weight.fill_(1 / 128)
        network.head.weight.fill_(1.0)
        network.head.bias.zero_()
    return TrainedModel(network, "binary")


def _square_store(path: Path) -> tuple[Path, np.ndarray]:
    square = np.zeros((40, 40), bool)
    square[8:18, 22:30] = True  # off-centre, so a wrong transform would miss it
    codes = square[None, :, :, None].astype(np.float16)
    return write_store(path, codes, np.ones((40, 40), bool)), square


def test_grad_cam_of_a_known_network_is_its_evidence(tmp_path: Path) -> None:
    path, square = _square_store(tmp_path / "s.zarr")
    model = _brightness_network()
    heatmap = grad_cam(model, open_store(path).load(0))
    assert heatmap.shape == (40, 40) and heatmap.dtype == np.float32
    assert square[np.unravel_index(heatmap.argmax(), heatmap.shape)]
    assert heatmap[~square].max() < heatmap.max()
    assert jaccard(lesion_cells(heatmap, np.ones((40, 40), bool)), square) > 0.7


def test_the_8_transform_heatmap_lands_back_on_the_evidence(tmp_path: Path) -> None:
    path, square = _square_store(tmp_path / "s.zarr")
    heatmap = slide_heatmap([_brightness_network()], open_store(path))
    assert jaccard(lesion_cells(heatmap, np.ones((40, 40), bool)), square) > 0.7


@pytest.mark.parametrize("k", range(8))
def test_inverse_dihedral_undoes_each_transform(k: int) -> None:
    array = np.arange(15 * 2).reshape(3, 5, 2)
    np.testing.assert_array_equal(inverse_dihedral(dihedral(array, k), k), array)


def test_lesion_cells_keep_tissue_at_half_the_peak() -> None:
    heatmap = np.array([[0.0, 0.4, 1.0], [0.6, 2.0, 0.2]])
    tissue = np.array([[True, True, True], [True, False, True]])
    np.testing.assert_array_equal(lesion_cells(heatmap, tissue), [[False, False, True], [True, False, False]])
    assert not lesion_cells(np.zeros((2, 3)), tissue).any()


def test_smoothing_turns_sparse_evidence_into_its_region() -> None:
    region = np.zeros((40, 40), bool)
    region[10:30, 10:30] = True
    heatmap = np.zeros((40, 40))
    rng = np.random.default_rng(0)
    dots = rng.random((40, 40)) < 0.16  # one hot cell per "digit", as a first-layer map gives
    heatmap[dots & region] = 1.0
    tissue = np.ones((40, 40), bool)
    raw = jaccard(lesion_cells(heatmap, tissue), region)
    smoothed = jaccard(lesion_cells(heatmap, tissue, smooth_cells=3.0), region)
    assert raw < 0.2 and smoothed > 0.6
    np.testing.assert_array_equal(lesion_cells(heatmap, tissue, smooth_cells=0.0), lesion_cells(heatmap, tissue))
    with pytest.raises(ValueError, match="smooth_cells"):
        lesion_cells(heatmap, tissue, smooth_cells=-1.0)


def test_jaccard() -> None:
    a = np.array([1, 1, 0, 0], bool)
    assert jaccard(a, np.array([0, 1, 1, 0], bool)) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0 and jaccard(~a, a) == 0.0 and jaccard(a & ~a, a & ~a) == 1.0


def _mask_png(path: Path, mask: np.ndarray, downsample: int | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if downsample is not None:
        info.add_text("downsample", str(downsample))
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("with_text", [True, False])
def test_masks_are_resampled_onto_the_grid(tmp_path: Path, with_text: bool) -> None:
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 10, 12, 3), np.float16),
                                   np.ones((10, 12), bool)))
    # 128 level-0 px per cell, mask at 1/16 of level 0: 8 mask px per cell (the thumbnail has the same scale)
    mask = np.zeros((80, 96), bool)
    mask[16:40, 24:48] = True  # cells rows 2-4, cols 3-5
    mask[56:60, 0:8] = True  # half of cell (7, 0): counts
    mask[64:67, 8:16] = True  # 3/8 of cell (8, 1): does not
    grid = mask_to_grid(_mask_png(tmp_path / "m.png", mask, 16 if with_text else None), slide)
    expected = np.zeros((10, 12), bool)
    expected[2:5, 3:6] = True
    expected[7, 0] = True
    np.testing.assert_array_equal(grid, expected)


def test_a_mask_of_another_slide_is_refused(tmp_path: Path) -> None:
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 10, 12, 3), np.float16),
                                   np.ones((10, 12), bool)))
    with pytest.raises(ValueError, match="does not cover"):
        mask_to_grid(_mask_png(tmp_path / "m.png", np.ones((20, 20), bool), 16), slide)


def test_masks_of_plain_image_stores_use_pixel_units(tmp_path: Path) -> None:
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 4, 4, 1), np.float16), np.ones((4, 4), bool),
                                   stride_px=9, mpp=None, scanned_mpp=None, thumbnail_downsample=9 / 8))
    mask = np.zeros((36, 36), bool)
    mask[9:18, 27:36] = True  # cell (1, 3) at 9 px per cell
    expected = np.zeros((4, 4), bool)
    expected[1, 3] = True
    np.testing.assert_array_equal(mask_to_grid(_mask_png(tmp_path / "m.png", mask, 1), slide), expected)


def test_a_mask_value_picks_one_region_of_a_labelled_mask(tmp_path: Path) -> None:
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 4, 4, 1), np.float16), np.ones((4, 4), bool),
                                   stride_px=9, mpp=None, scanned_mpp=None, thumbnail_downsample=9 / 8))
    mask = np.zeros((36, 36), np.uint8)
    mask[0:9, 0:9] = 1  # cell (0, 0): the tilted rectangle
    mask[27:36, 27:36] = 2  # cell (3, 3): the distractor
    path = tmp_path / "m.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("downsample", "1")
    Image.fromarray(mask).save(path, pnginfo=info)
    np.testing.assert_array_equal(np.argwhere(mask_to_grid(path, slide)), [[0, 0], [3, 3]])
    np.testing.assert_array_equal(np.argwhere(mask_to_grid(path, slide, lesion_value=1)), [[0, 0]])
    np.testing.assert_array_equal(np.argwhere(mask_to_grid(path, slide, lesion_value=2)), [[3, 3]])

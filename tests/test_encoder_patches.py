"""Training patches: sampling from slides as compress reads them, contrastive pairs, the Zarr
cache, labelled patch files, and the binarised 9-px MNIST glyphs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions
from nic_fast.encoder_training.mnist import MNIST_PATCH_PX, binarised_mnist_patches, load_mnist_npz
from nic_fast.encoder_training.patch_files import load_patch_set, save_patch_cache
from nic_fast.encoder_training.patches import (
    PatchSet,
    SlideSampling,
    _draw_cells,
    contrastive_pairs,
    sample_labelled_points,
    sample_slide_patches,
)
from nic_fast.slides import open_slide
from nic_fast.store import open_store
from nic_fast.synthetic import write_synthetic_slide

PATCH_PX = 128


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Two small H&E-like slides at 0.5 µm/px (8×8 and 8×9 cells of 128 px) with lesion masks."""
    folder = tmp_path_factory.mktemp("slides")
    return [write_synthetic_slide(folder / f"s{k}.tif", height=1024, width=1024 + 128 * k, seed=20 + k,
                                  lesion=True).path for k in range(2)]


def patch_set(n: int, sources: int = 1, neighbours: bool = False) -> PatchSet:
    """Patch k holds k in its first two pixels and 0 in its third (its neighbour: 1 there),
    so partners can be traced back with :func:`trace`."""
    images = np.zeros((n, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    beside = images.copy()
    beside[:, 0, 2, 0] = 1
    return PatchSet(images=images, source=(np.arange(n) % sources).astype(np.int32),
                    sources=[f"s{k}" for k in range(sources)], mpp=None, neighbours=beside if neighbours else None)


def trace(partners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patch index, is a neighbour patch) of each partner."""
    index = partners[:, 0, 0, 0].astype(int) + 256 * partners[:, 0, 1, 0].astype(int)
    return index, partners[:, 0, 2, 0] == 1


# --------------------------------------------------------------------------- slides


@pytest.mark.parametrize("scanned_mpp", [0.5, 0.25])
def test_sampled_patches_are_what_compress_encodes(tmp_path, scanned_mpp):
    """Each patch's mean colour equals the mean-rgb code compress stores for its cell, at 20x
    and at 40x (where both box-average a finer level by 2)."""
    side = 1024 if scanned_mpp == 0.5 else 2048
    slide = write_synthetic_slide(tmp_path / "s.tif", height=side, width=side, mpp=scanned_mpp, seed=3,
                                  lesion=False).path
    patches = sample_slide_patches([slide], SlideSampling(patch_px=PATCH_PX, patches_per_slide=10, min_tissue=0.5))
    compress_slides([slide], tmp_path / "out", CompressOptions(encoder="mean-rgb", min_tissue=0.1))
    grid = open_store(tmp_path / "out" / "s.zarr").load()
    assert patches.cells is not None and len(patches) == 10
    for image, (i, j) in zip(patches.images, patches.cells):
        np.testing.assert_allclose(image.mean(axis=(0, 1)) / 255, grid[i, j].astype(np.float32), atol=2e-3)


def test_slide_sampling_shapes_sources_and_seed(slides):
    sampling = SlideSampling(patch_px=PATCH_PX, patches_per_slide=6, seed=1)
    patches = sample_slide_patches(slides, sampling)
    assert patches.images.shape == (12, PATCH_PX, PATCH_PX, 3) and patches.images.dtype == np.uint8
    assert patches.neighbours is not None and patches.neighbours.shape == patches.images.shape
    assert np.bincount(patches.source).tolist() == [6, 6]
    assert patches.mpp == 0.5 and patches.sources == [str(s) for s in slides]
    assert patches.images.mean() < 235, "tissue patches, not glass"
    again = sample_slide_patches(slides, sampling)
    np.testing.assert_array_equal(again.images, patches.images)
    other = sample_slide_patches(slides, SlideSampling(patch_px=PATCH_PX, patches_per_slide=6, seed=2))
    assert not np.array_equal(other.cells, patches.cells)


def test_neighbour_is_the_adjacent_patch(slides):
    """The neighbour patch is exactly the slide's pixels one cell away from the anchor."""
    patches = sample_slide_patches(slides[:1], SlideSampling(patch_px=PATCH_PX, patches_per_slide=4))
    with open_slide(slides[0]) as reader:
        for image, neighbour, (i, j) in zip(patches.images, patches.neighbours, patches.cells):
            assert np.array_equal(image, reader.read_region(0, i * PATCH_PX, j * PATCH_PX, PATCH_PX, PATCH_PX))
            matches = [np.array_equal(neighbour, reader.read_region(0, (i + di) * PATCH_PX, (j + dj) * PATCH_PX,
                                                                     PATCH_PX, PATCH_PX))
                       for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))]
            assert sum(matches) >= 1


def test_draw_cells_picks_tissue_cells_with_an_adjacent_tissue_cell():
    cells = np.zeros((6, 6), bool)
    cells[1:3, 1:4] = True
    cells[5, 5] = True  # isolated: never an anchor, since it has no neighbour
    anchors, partners = _draw_cells(cells, 100, np.random.default_rng(0))
    assert len(anchors) == 6 and len({tuple(a) for a in anchors}) == 6
    assert cells[anchors[:, 0], anchors[:, 1]].all() and cells[partners[:, 0], partners[:, 1]].all()
    assert (np.abs(anchors - partners).sum(axis=1) == 1).all()


def test_too_little_tissue_is_a_clear_error(slides):
    with pytest.raises(ValueError, match="min-tissue"):
        sample_slide_patches(slides[:1], SlideSampling(patch_px=1024, patches_per_slide=4))


def test_mask_labels_are_the_majority_mask_value(tmp_path, slides):
    """A hand-made mask (left half 0, right half 255) at 1/16 of level 0 labels cells by column."""
    slide = tmp_path / "m.tif"
    slide.symlink_to(slides[0])
    Image.fromarray(np.repeat(np.array([[0] * 32 + [255] * 32], np.uint8), 64, axis=0)).save(tmp_path / "m_mask.png")
    sampling = SlideSampling(patch_px=PATCH_PX, patches_per_slide=40, mask_suffix="_mask.png")
    patches = sample_slide_patches([slide], sampling)
    assert patches.class_names == ["0", "255"]
    np.testing.assert_array_equal(patches.labels, (patches.cells[:, 1] >= 4).astype(int))


def test_missing_mask_names_the_file_and_the_fix(slides):
    with pytest.raises(FileNotFoundError, match=r"s0_lesion\.png.*--mask-suffix"):
        sample_slide_patches(slides[:1], SlideSampling(patch_px=PATCH_PX, patches_per_slide=2,
                                                       mask_suffix="_lesion.png"))


def test_labelled_points_are_centred_patches(tmp_path, slides):
    table = tmp_path / "points.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("slide", "x", "y", "label"), ("s0", 300, 200, "tumour"),
                                 ("s1.tif", 640, 512, "normal")])
    patches = sample_labelled_points(table, slides, SlideSampling(patch_px=PATCH_PX))
    assert patches.class_names == ["normal", "tumour"] and patches.labels.tolist() == [1, 0]
    with open_slide(slides[0]) as reader:
        expected = reader.read_region(0, 200 - PATCH_PX // 2, 300 - PATCH_PX // 2, PATCH_PX, PATCH_PX)
    np.testing.assert_array_equal(patches.images[0], expected)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,x,y,label\nnope,1,2,a\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: slide 'nope'"):
        sample_labelled_points(bad, slides, SlideSampling(patch_px=PATCH_PX))


# --------------------------------------------------------------------------- pairs


def test_pairs_half_same_and_different_from_neighbours_or_other_slides():
    anchors = np.arange(400).repeat(5)
    partners, same = contrastive_pairs(patch_set(400, sources=2, neighbours=True), anchors, np.random.default_rng(0))
    index, is_neighbour = trace(partners)
    assert 0.45 < same.mean() < 0.55
    assert (index[same == 1] == anchors[same == 1]).all() and not is_neighbour[same == 1].any()
    different = same == 0
    assert 0.7 < is_neighbour[different].mean() < 0.8
    assert (index[different & is_neighbour] == anchors[different & is_neighbour]).all(), "the anchor's own neighbour"
    other = different & ~is_neighbour
    assert (index[other] % 2 != anchors[other] % 2).all(), "the other 25 % come from the other slide"


def test_pairs_without_neighbours_or_second_slide_use_any_other_patch():
    anchors = np.arange(50).repeat(4)
    partners, same = contrastive_pairs(patch_set(50), anchors, np.random.default_rng(1))
    index, _ = trace(partners)
    assert (index[same == 0] != anchors[same == 0]).all()
    assert len(np.unique(index[same == 0])) > 25


# --------------------------------------------------------------------------- files


def test_zarr_cache_round_trip(tmp_path, slides):
    sampling = SlideSampling(patch_px=PATCH_PX, patches_per_slide=3, mask_suffix="_mask.png")
    patches = sample_slide_patches(slides, sampling)
    path = save_patch_cache(patches, tmp_path / "cache.zarr")
    loaded = load_patch_set(path)
    for name in ("images", "source", "neighbours", "cells", "labels"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(patches, name))
    assert (loaded.sources, loaded.mpp, loaded.class_names) == (patches.sources, 0.5, patches.class_names)
    assert not (tmp_path / "cache.zarr.partial").exists()
    save_patch_cache(patches.subset(np.arange(2)), path)  # replaced, not merged
    assert len(load_patch_set(path)) == 2


def test_npz_and_class_folders(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]),
             class_names=np.array(["a", "b", "c"]))
    from_npz = load_patch_set(tmp_path / "set.npz")
    assert from_npz.images.shape == (6, 8, 8, 1) and from_npz.class_names == ["a", "b", "c"] and from_npz.mpp is None
    for k, image in enumerate(images):
        folder = tmp_path / "folders" / ("cat" if k % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([image] * 3, axis=-1)).save(folder / f"{k}.png")
    from_folders = load_patch_set(tmp_path / "folders")
    assert from_folders.images.shape == (6, 8, 8, 3) and from_folders.class_names == ["cat", "dog"]
    assert from_folders.labels.tolist() == [0, 0, 0, 1, 1, 1]  # cat: images 1, 3, 5; dog: 0, 2, 4
    np.testing.assert_array_equal(from_folders.images[:, :, :, 0], images[[1, 3, 5, 0, 2, 4]])


def test_patch_file_errors_name_the_fix(tmp_path):
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no 'images' array"):
        load_patch_set(tmp_path / "x.npz")
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "f" / "a" / "1.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "f" / "a" / "2.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_patch_set(tmp_path / "f")
    with pytest.raises(ValueError, match="--mnist-9px"):
        load_patch_set(tmp_path / "f", mnist_9px=True)
    (tmp_path / "c.zarr").mkdir()
    with pytest.raises(ValueError, match="not a nic-fast patch cache"):
        load_patch_set(tmp_path / "c.zarr")


# --------------------------------------------------------------------------- MNIST


def test_binarised_mnist_glyph_geometry():
    digit = np.zeros((1, 28, 28), np.uint8)
    digit[0, 4:13, 14] = 200  # a one-pixel stroke: rows 4-12 fall in glyph rows 1-3, column 14 in glyph column 4
    digit[0, 20, 2] = 60  # faint: not ink
    digit[0, 0, :] = 255  # row 0 is outside the blocks
    glyph = binarised_mnist_patches(digit)
    assert glyph.shape == (1, MNIST_PATCH_PX, MNIST_PATCH_PX) and set(np.unique(glyph)) == {0, 255}
    expected = np.zeros((9, 9), np.uint8)
    expected[1:4, 4] = 255
    np.testing.assert_array_equal(glyph[0], expected)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        binarised_mnist_patches(np.zeros((2, 27, 27), np.uint8))


def test_real_mnist_glyphs(mnist_npz):
    images, labels = load_mnist_npz(mnist_npz)
    glyphs = binarised_mnist_patches(images)
    assert glyphs.shape == (10000, 9, 9) and len(labels) == 10000
    ink = (glyphs > 0).mean(axis=(1, 2))
    assert 0.1 < ink.mean() < 0.4 and ink.min() > 0, "every digit keeps some ink"
    assert ink[labels == 1].mean() < ink[labels == 0].mean(), "a 1 has less ink than a 0"
    patches = load_patch_set(mnist_npz, mnist_9px=True)
    assert patches.images.shape == (10000, 9, 9, 1) and patches.class_names == [str(k) for k in range(10)]

"""Crop sampling: centres follow the distance map, windows are padded, transforms index the right variant."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_train_stores import random_store, write_store

from nic_fast.grid import dihedral
from nic_fast.store import open_store
from nic_fast.train.sampler import CropSpec, StoreSampler, distance_map, read_crop


def test_distance_map_counts_the_grid_border_as_background() -> None:
    usable = np.zeros((9, 9), bool)
    usable[2:7, 2:7] = True
    distance = distance_map(usable)
    assert distance[4, 4] == 3.0 and distance[2, 2] == 1.0 and distance[0, 0] == 0.0
    assert distance_map(np.ones((5, 5), bool))[2, 2] == 3.0  # all tissue: the border is the background


def test_crop_centres_follow_the_distance_map(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr", shape=(1, 12, 10, 2)))
    rng = np.random.default_rng(0)
    draws = 40_000
    counts = np.zeros(sampler.grid_shape)
    for _ in range(draws):
        counts[sampler.random_centre(rng)] += 1
    expected = sampler.distance / sampler.distance.sum() * draws
    assert counts[sampler.distance == 0].sum() == 0
    inside = expected > 0
    chi2 = (((counts - expected) ** 2)[inside] / expected[inside]).sum()
    dof = inside.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), f"chi² {chi2:.0f} on {dof} degrees of freedom"


def test_crops_past_the_edge_are_padded_with_the_background_embedding(tmp_path: Path) -> None:
    path = random_store(tmp_path / "s.zarr", shape=(1, 20, 16, 3), background_value=0.25)
    sampler = StoreSampler.open(path)
    grid = open_store(path).load(0)
    crop = read_crop(grid[None], CropSpec(top=-3, left=10, variant=0), 8, sampler.background)
    assert crop.shape == (8, 8, 3) and crop.dtype == np.float16
    np.testing.assert_array_equal(crop[3:, :6], grid[0:5, 10:16])
    assert (crop[:3] == 0.25).all() and (crop[:, 6:] == 0.25).all()
    far = read_crop(grid[None], CropSpec(top=50, left=50, variant=3), 4, sampler.background)
    assert (far == 0.25).all()


@pytest.mark.parametrize("k", range(8))
def test_crop_of_variant_k_is_the_window_of_the_transformed_grid(tmp_path: Path, k: int) -> None:
    path = random_store(tmp_path / "s.zarr", shape=(8, 13, 11, 2), seed=k)
    slide = open_store(path)
    sampler = StoreSampler(slide)
    transformed = dihedral(slide.load(k), k)
    crop = read_crop(slide.embeddings, CropSpec(top=2, left=3, variant=k), 6, sampler.background)
    # T_k maps the identity window rows 2..7, cols 3..8 onto some window of the transformed grid:
    marker = np.zeros((13, 11), int)
    marker[2:8, 3:9] = 1
    rows, cols = np.nonzero(dihedral(marker, k))
    np.testing.assert_array_equal(crop, transformed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])


def test_stores_without_variants_are_transformed_on_the_fly(tmp_path: Path) -> None:
    path = random_store(tmp_path / "s.zarr", shape=(1, 10, 10, 2))
    slide = open_store(path)
    sampler = StoreSampler(slide)
    crop = read_crop(slide.embeddings, CropSpec(top=0, left=0, variant=5), 10, sampler.background)
    np.testing.assert_array_equal(crop, dihedral(slide.load(0), 5))


def test_random_crops_use_every_transform_and_stay_on_tissue(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr"))
    rng = np.random.default_rng(3)
    specs = [sampler.random_crop(rng, 10) for _ in range(400)]
    assert {s.variant for s in specs} == set(range(8))
    assert all(sampler.usable[s.top + 5, s.left + 5] for s in specs)


def test_a_store_that_fits_in_the_crop_is_never_cut(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr", shape=(1, 10, 30, 2)))
    rng = np.random.default_rng(4)
    exact = [sampler.random_crop(rng, 30) for _ in range(400)]  # 30 cells: rows fit, columns exactly
    assert {(s.left) for s in exact} == {0} and {s.top for s in exact} == set(range(-20, 1))
    larger = [sampler.random_crop(rng, 12) for _ in range(200)]  # rows fit with 2 to spare, columns do not
    assert {s.top for s in larger} == {-2, -1, 0}
    # columns still follow the tissue: the crop's middle column crosses it
    assert all(sampler.usable[:, s.left + 6].any() for s in larger) and len({s.left for s in larger}) > 3


def test_test_centres_spread_over_the_tissue(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr", shape=(1, 60, 60, 2)))
    centres = sampler.spread_centres(10)
    assert len(centres) == 10 and all(sampler.usable[i, j] for i, j in centres)
    spacing = min(np.hypot(*(a - b)) for n, a in enumerate(centres) for b in centres[n + 1 :])
    assert spacing > 5  # a disc of radius 24 cells: 10 evenly spread centres are far apart
    np.testing.assert_array_equal(centres, sampler.spread_centres(10))


def test_a_store_without_tissue_still_gives_crops(tmp_path: Path) -> None:
    empty = write_store(tmp_path / "s.zarr", np.ones((1, 6, 6, 2), np.float16), np.zeros((6, 6), bool))
    sampler = StoreSampler.open(empty)
    assert sampler.random_crop(np.random.default_rng(0), 4).variant in range(8)
    np.testing.assert_array_equal(sampler.spread_centres(10), [[3, 3]])

"""The loaders: DALI and the PyTorch fallback give the same crops for a seed, epoch after epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_stores import random_store

from nic_fast.train.loader import CropSource, DaliCropLoader, TorchCropLoader, dali_available, make_loader
from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.sampler import StoreSampler, read_crop

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def samplers(tmp_path_factory: pytest.TempPathFactory) -> list[StoreSampler]:
    folder = tmp_path_factory.mktemp("stores")
    return [StoreSampler.open(random_store(folder / f"s{i}.zarr", shape=(8, 30 + i, 26, 4), seed=i))
            for i in range(3)]


def _source(samplers: list[StoreSampler], seed: int = 5, first_epoch: int = 0) -> CropSource:
    return CropSource(samplers, np.array([1, 0, 1], np.float32), crop_px=12, seed=seed, crops_per_epoch=24,
                      first_epoch=first_epoch)


def _epochs(loader_class: type, source: CropSource, epochs: range, workers: int) -> list[list[tuple]]:
    loader = loader_class(source, batch_size=8, workers=workers, device=CPU)
    try:
        return [[(c.clone(), l.clone()) for c, l in loader.epoch(e)] for e in epochs]
    finally:
        loader.close()


def _assert_same(a: list[list[tuple]], b: list[list[tuple]]) -> None:
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b) == 3
        for (crops_a, labels_a), (crops_b, labels_b) in zip(epoch_a, epoch_b):
            assert crops_a.dtype == torch.float16 and crops_a.shape == (8, 12, 12, 4)
            assert torch.equal(crops_a, crops_b) and torch.equal(labels_a, labels_b)


def test_a_sample_is_the_crop_its_seed_epoch_and_index_name(samplers: list[StoreSampler]) -> None:
    source = _source(samplers)
    crop, label = source.sample(epoch=1, index=4)
    slide = int(source.slide_order(1)[4])
    spec = samplers[slide].random_crop(np.random.default_rng([5, 1, 4]), 12)
    expected = read_crop(EmbeddingReader(samplers[slide].path), spec, 12, samplers[slide].background)
    np.testing.assert_array_equal(crop, expected)
    assert label.tolist() == [float(source.labels[slide])]


def test_each_epoch_visits_the_slides_evenly_in_a_new_order(samplers: list[StoreSampler]) -> None:
    source = _source(samplers)
    orders = [source.slide_order(e) for e in range(3)]
    for order in orders:
        assert np.bincount(order).tolist() == [8, 8, 8]
    assert not np.array_equal(orders[0], orders[1])


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_and_the_fallback_give_the_same_crops_for_a_seed(samplers: list[StoreSampler]) -> None:
    dali = _epochs(DaliCropLoader, _source(samplers), range(2), workers=2)
    torch_loader = _epochs(TorchCropLoader, _source(samplers), range(2), workers=1)
    _assert_same(dali, torch_loader)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_a_resumed_dali_loader_continues_the_epoch_sequence(samplers: list[StoreSampler]) -> None:
    full = _epochs(DaliCropLoader, _source(samplers), range(3), workers=1)
    resumed = _epochs(DaliCropLoader, _source(samplers, first_epoch=2), range(2, 3), workers=1)
    _assert_same(full[2:], resumed)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_the_dali_loader_refuses_epochs_out_of_order(samplers: list[StoreSampler]) -> None:
    loader = DaliCropLoader(_source(samplers), batch_size=8, workers=1, device=CPU)
    try:
        with pytest.raises(ValueError, match="epochs are read in order"):
            next(loader.epoch(1))
    finally:
        loader.close()


def test_fallback_crops_do_not_depend_on_workers_and_change_with_the_seed(samplers: list[StoreSampler]) -> None:
    in_process = _epochs(TorchCropLoader, _source(samplers), range(1, 2), workers=0)
    _assert_same(in_process, _epochs(TorchCropLoader, _source(samplers), range(1, 2), workers=2))
    other_seed = _epochs(TorchCropLoader, _source(samplers, seed=6), range(1, 2), workers=0)
    assert not torch.equal(in_process[0][0][0], other_seed[0][0][0])


def test_make_loader_picks_a_backend_and_checks_the_batch(samplers: list[StoreSampler]) -> None:
    loader = make_loader(_source(samplers), batch_size=8, workers=0, device=CPU, backend="torch")
    assert isinstance(loader, TorchCropLoader)
    loader.close()
    with pytest.raises(ValueError, match="multiple of the batch size"):
        make_loader(_source(samplers), batch_size=7, workers=0, device=CPU, backend="torch")
    with pytest.raises(ValueError, match="auto, dali or torch"):
        make_loader(_source(samplers), batch_size=8, workers=0, device=CPU,
                    backend="tensorflow")  # type: ignore[arg-type]


def test_stores_with_different_code_sizes_are_refused(tmp_path: Path, samplers: list[StoreSampler]) -> None:
    odd = StoreSampler.open(random_store(tmp_path / "odd.zarr", shape=(1, 20, 20, 7)))
    with pytest.raises(ValueError, match="same encoder"):
        CropSource([samplers[0], odd], np.zeros(2, np.float32), crop_px=8, seed=0, crops_per_epoch=8)

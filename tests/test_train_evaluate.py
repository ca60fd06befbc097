"""Metrics, bootstrap intervals and test-time augmentation."""
from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_stores import random_store

from nic_fast.train.evaluate import (
    auc,
    bootstrap_metric,
    metric,
    predict_store,
    store_outputs,
    tta_specs,
)
from nic_fast.train.model import ModelConfig, NICNet, TrainedModel
from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.sampler import StoreSampler, read_crop


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    wins = [1.0 if p > n else 0.5 if p == n else 0.0
            for p, n in product(scores[labels == 1], scores[labels == 0])]
    return float(np.mean(wins))


def test_auc_counts_ordered_pairs_with_ties_as_half() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 30)
        scores = rng.integers(0, 6, 30).astype(float)  # many ties
        if 0 < labels.sum() < 30:
            assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
    assert np.isnan(auc(np.ones(4), np.arange(4.0)))


def test_metrics_of_each_task() -> None:
    assert metric("multiclass", np.array([0, 2, 1]), np.eye(3)[[0, 2, 2]]) == pytest.approx(2 / 3)
    values = np.array([10.0, 20.0, 40.0, 30.0])
    assert metric("regression", np.array([1.0, 2.0, 3.0, 4.0]), values) == pytest.approx(0.8)


def test_bootstrap_interval_brackets_the_value_and_narrows_with_more_slides() -> None:
    rng = np.random.default_rng(1)

    def result(n: int):
        labels = rng.integers(0, 2, n)
        return bootstrap_metric("binary", labels, labels + rng.normal(0, 0.8, n), resamples=500, seed=2)

    small, large = result(30), result(600)
    assert small.low <= small.value <= small.high and large.low <= large.value <= large.high
    assert large.high - large.low < 0.5 * (small.high - small.low)
    assert "95% CI" in str(small)


def test_perfect_separation_has_a_degenerate_interval() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    result = bootstrap_metric("binary", labels, labels * 0.5 + 0.1, resamples=200)
    assert (result.value, result.low, result.high) == (1.0, 1.0, 1.0)


def test_tta_uses_t_centres_under_all_8_transforms(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr", shape=(8, 50, 50, 3)))
    specs = tta_specs(sampler, crop_px=16, crops=5)
    assert len(specs) == 40
    assert {s.variant for s in specs} == set(range(8))
    centres = {(s.top + 8, s.left + 8) for s in specs}
    assert len(centres) == 5 and all(sampler.usable[c] for c in centres)


def test_slide_prediction_is_the_mean_over_crops_and_networks(tmp_path: Path) -> None:
    sampler = StoreSampler.open(random_store(tmp_path / "s.zarr", shape=(8, 30, 30, 3)))
    torch.manual_seed(0)
    models = [TrainedModel(NICNet(ModelConfig(3, 1)).eval(), "binary") for _ in range(2)]
    reader = EmbeddingReader(sampler.path)
    by_hand = []
    for model in models:
        for spec in tta_specs(sampler, crop_px=12, crops=3):
            crop = torch.from_numpy(read_crop(reader, spec, 12, sampler.background)).permute(2, 0, 1)[None].float()
            by_hand.append(torch.sigmoid(model.network(crop))[0, 0].item())
    prediction = predict_store(models, sampler, crop_px=12, crops=3)
    assert prediction.shape == () and float(prediction) == pytest.approx(np.mean(by_hand), abs=1e-5)
    assert store_outputs(models[0].network, sampler, crop_px=12, crops=3).shape == (24, 1)

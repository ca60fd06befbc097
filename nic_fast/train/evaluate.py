"""Slide-level predictions with test-time augmentation, and metrics with bootstrap intervals.

A slide is predicted from T crops (default 10) centred on tissue cells spread evenly
over its tissue, each under the 8 dihedral transforms: 8·T predictions, averaged as
probabilities (or values), as in the paper. Metrics: AUC for binary labels, accuracy
for classes, Spearman's ρ for regression, each with a percentile bootstrap 95 % interval
over slides.

scipy.stats is imported where a metric is computed: it takes about a second to import,
which `predict` and `heatmap` (no metric) would otherwise pay.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nic_fast.grid import DIHEDRAL
from nic_fast.train.model import TrainedModel
from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.sampler import CropSpec, StoreSampler, read_crop

__all__ = ["DEFAULT_TTA_CROPS", "METRIC_NAMES", "MetricResult", "auc", "bootstrap_metric", "metric", "predict_store",
           "store_outputs", "tta_specs"]

METRIC_NAMES = {"binary": "AUC", "multiclass": "accuracy", "regression": "Spearman"}
DEFAULT_TTA_CROPS = 10


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN with one class."""
    from scipy.stats import rankdata

    labels = np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def metric(task: str, labels: np.ndarray, predictions: np.ndarray) -> float:
    """The task's metric; ``predictions`` are P(1) (binary), (N, K) probabilities, or values."""
    labels, predictions = np.asarray(labels, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    if task == "binary":
        return auc(labels, predictions)
    if task == "multiclass":
        return float(np.mean(predictions.argmax(axis=1) == labels))
    if len(labels) < 3 or np.ptp(labels) == 0 or np.ptp(predictions) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(labels, predictions).statistic)


@dataclass(frozen=True)
class MetricResult:
    """A metric on n slides with its bootstrap interval."""

    name: str
    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.name} {self.value:.3f} ({self.level:.0%} CI {self.low:.3f}-{self.high:.3f}, n={self.n})"


def bootstrap_metric(task: str, labels: np.ndarray, predictions: np.ndarray, *, resamples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> MetricResult:
    """The metric and its percentile bootstrap interval (slides resampled with replacement).

    Resamples on which the metric is undefined (one class only, for AUC) are left out.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(len(labels), size=len(labels))
        value = metric(task, labels[pick], predictions[pick])
        if np.isfinite(value):
            values.append(value)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) if values else (float("nan"), float("nan"))
    return MetricResult(METRIC_NAMES[task], metric(task, labels, predictions), float(low), float(high), len(labels),
                        level)


def tta_specs(sampler: StoreSampler, crop_px: int, crops: int = DEFAULT_TTA_CROPS) -> list[CropSpec]:
    """The test crops of one store: ``crops`` centres spread over tissue × the 8 transforms."""
    return [CropSpec(top=int(i) - crop_px // 2, left=int(j) - crop_px // 2, variant=k)
            for i, j in sampler.spread_centres(crops) for k in DIHEDRAL]


@torch.no_grad()
def store_outputs(network: torch.nn.Module, sampler: StoreSampler, *, crop_px: int, crops: int = DEFAULT_TTA_CROPS,
                  batch_size: int = 16, device: str | torch.device = "cpu") -> torch.Tensor:
    """Raw outputs (8·T, outputs) of an eval-mode network on the store's test crops."""
    embeddings = EmbeddingReader(sampler.path)
    specs = tta_specs(sampler, crop_px, crops)
    parts = []
    for start in range(0, len(specs), batch_size):
        batch = np.stack([read_crop(embeddings, spec, crop_px, sampler.background)
                          for spec in specs[start : start + batch_size]])
        parts.append(network(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()))
    return torch.cat(parts)


def predict_store(models: Sequence[TrainedModel], sampler: StoreSampler, *, crop_px: int,
                  crops: int = DEFAULT_TTA_CROPS, device: str | torch.device = "cpu") -> np.ndarray:
    """The slide's prediction: the mean over ``models`` and the 8·T test crops.

    Returns P(1) as a 0-d array (binary), (K,) class probabilities, or the value.
    """
    per_model = [model.predictions(store_outputs(model.network, sampler, crop_px=crop_px, crops=crops, device=device))
                 for model in models]
    return torch.cat(per_model).mean(dim=0).cpu().numpy()

"""The patch-level probe (the paper's Table 1 protocol): how much label information a frozen code keeps.

Every labelled patch is embedded once by the frozen encoder; a small head (dense 256 +
BN + LeakyReLU + softmax) is trained on the codes of one part of the set, its epoch
chosen on a second part, and its accuracy reported on a third, overall and per class.
Codes are standardised with the training part's statistics first, so a 1-number
baseline and a 128-number code meet the head on the same footing.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nic_fast.encoder_training.models import HEAD_UNITS, LEAK
from nic_fast.encoder_training.patches import PatchSet
from nic_fast.encoders import Encoder, EncoderError

EMBED_BATCH = 512

__all__ = ["ProbeConfig", "ProbeReport", "embed_patches", "probe"]


@dataclass(frozen=True)
class ProbeConfig:
    """Head training and the split of the labelled set (test, then validation from the rest)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-2  # as the paper's supervised heads; 1e-3 leaves small sets under-fitted
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "cpu"


@dataclass
class ProbeReport:
    """Test accuracy of the head on a frozen encoder's codes, overall and per class."""

    encoder: dict[str, Any]
    patches: list[str]
    class_names: list[str]
    n_train: int
    n_val: int
    n_test: int
    accuracy: float
    per_class: dict[str, float | None]  # None: no test patch of that class
    confusion: list[list[int]]  # rows: true class, columns: predicted
    best_epoch: int
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def embed_patches(encoder: Encoder, images: np.ndarray, batch_size: int = EMBED_BATCH) -> np.ndarray:
    """uint8 (N, P, P, C) patches → float32 (N, code_size) codes, normalised per the encoder's spec."""
    spec = encoder.spec
    if images.ndim != 4 or images.shape[1:] != (spec.input_px, spec.input_px, spec.channels):
        raise EncoderError(
            f"encoder {spec.name!r} takes {spec.input_px}×{spec.input_px} patches with {spec.channels} channel(s); "
            f"the patch set holds {'×'.join(map(str, images.shape[1:3]))} with {images.shape[-1]} "
            "(for MNIST digits and the 9-px encoders, pass --mnist-9px)"
        )
    scale, offset = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in spec.scale_offset())
    codes = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        x = (batch.float() * scale + offset).to(encoder.device)
        codes.append(encoder(x).float().cpu().numpy())
    return np.concatenate(codes) if codes else np.empty((0, spec.code_size), np.float32)


def _split(n: int, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng([config.seed, n]).permutation(n)
    n_test = max(1, round(n * config.test_fraction))
    n_val = max(1, round((n - n_test) * config.val_fraction))
    if n - n_test - n_val < 2:
        raise ValueError(f"{n} labelled patches are too few for the probe's train/validation/test split")
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _head(code_size: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(code_size, HEAD_UNITS), nn.BatchNorm1d(HEAD_UNITS), nn.LeakyReLU(LEAK),
                         nn.Linear(HEAD_UNITS, n_classes))


def _accuracy(head: nn.Module, codes: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        return float((head(codes).argmax(dim=1) == labels).float().mean())


def _train_head(codes: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], n_classes: int,
                config: ProbeConfig) -> tuple[nn.Module, int]:
    """Head with the best validation accuracy over ``config.epochs``, and that epoch."""
    torch.manual_seed(config.seed)
    head = _head(codes["train"].shape[1], n_classes).to(codes["train"].device)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(codes["train"])
    best, best_state, best_epoch = -1.0, copy.deepcopy(head.state_dict()), 0
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - 1, config.batch_size):  # n - 1: never a batch of one for BatchNorm
            index = order[start : start + config.batch_size].to(codes["train"].device)
            loss = nn.functional.cross_entropy(head(codes["train"][index]), labels["train"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy = _accuracy(head, codes["val"], labels["val"])
        if accuracy > best:
            best, best_state, best_epoch = accuracy, copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    return head.eval(), best_epoch


def probe(encoder: Encoder, patches: PatchSet, config: ProbeConfig | None = None) -> ProbeReport:
    """Train the probe head on ``encoder``'s frozen codes of ``patches``; report test accuracy."""
    config = config or ProbeConfig()
    if patches.labels is None or patches.class_names is None:
        raise ValueError(f"the probe needs labelled patches ({', '.join(patches.sources)} has no labels)")
    device = torch.device(config.device)
    embedded = embed_patches(encoder, patches.images)
    parts = dict(zip(("train", "val", "test"), _split(len(patches), config)))
    mean = embedded[parts["train"]].mean(axis=0)
    std = embedded[parts["train"]].std(axis=0) + 1e-6
    codes = {k: torch.from_numpy((embedded[v] - mean) / std).float().to(device) for k, v in parts.items()}
    labels = {k: torch.from_numpy(patches.labels[v]).to(device) for k, v in parts.items()}
    n_classes = len(patches.class_names)
    head, best_epoch = _train_head(codes, labels, n_classes, config)
    with torch.no_grad():
        predicted = head(codes["test"]).argmax(dim=1).cpu().numpy()
    truth = labels["test"].cpu().numpy()
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {name: float(confusion[k, k] / confusion[k].sum()) if confusion[k].sum() else None
                 for k, name in enumerate(patches.class_names)}
    spec = encoder.spec
    return ProbeReport(
        encoder={"name": spec.name, "source": encoder.source, "sha256": spec.sha256, "code_size": spec.code_size},
        patches=patches.sources, class_names=patches.class_names, n_train=len(parts["train"]),
        n_val=len(parts["val"]), n_test=len(parts["test"]), accuracy=float((predicted == truth).mean()),
        per_class=per_class, confusion=confusion.tolist(), best_epoch=best_epoch, config=asdict(config),
    )

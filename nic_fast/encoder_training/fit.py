"""The training protocol every encoder shares (the paper's appendix), with checkpoints and logs.

Adam, mini-batches of 64, the learning rate divided by 10 when the validation metric has
not improved for a few epochs, from 1e-3 (VAE) or 1e-2 (contrastive, supervised) down to
1e-5, after which a further plateau ends the run; the epoch with the best validation
metric is kept (the BiGAN trains at a fixed 2e-4 and keeps its last epoch).

Runs repeat: the weights are initialised from the seed, and every epoch draws its
batches, augmentations and noise from generators seeded by (seed, epoch). A checkpoint
holds everything else at each epoch's end (weights, optimiser and schedule state, best
weights, history), so ``resume=True`` continues an interrupted run to the same result
as an uninterrupted one. The run folder receives ``checkpoint.pt``, ``metrics.csv``,
``metrics.json`` and a PNG grid per epoch.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nic_fast.encoder_training.methods import DEFAULT_LEARNING_RATE, METHODS, Method, MethodSetup, build_method
from nic_fast.encoder_training.models import EncoderArch
from nic_fast.encoder_training.patches import PatchSet
from nic_fast.encoder_training.reporting import Reporter, SilentReporter, save_grid_png, write_metrics

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
PLATEAU_FACTOR = 0.1
MIN_VAL_PATCHES = 2
# Fields of a run that a resume must not change (epochs may grow, the device may move).
_RESUME_FIELDS = ("method", "code_size", "batch_size", "steps_per_epoch", "learning_rate", "min_learning_rate",
                  "plateau_patience", "val_fraction", "seed", "kl_weight", "upright")

log = logging.getLogger(__name__)

__all__ = ["FitResult", "TrainConfig", "TrainingError", "fit", "plateau_step", "split_patches"]


class TrainingError(Exception):
    """A run cannot start or resume; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run; the CLI maps its options one to one."""

    method: str
    code_size: int = 128
    epochs: int = 10
    steps_per_epoch: int | None = None  # default: one pass over the training patches
    batch_size: int = 64
    learning_rate: float | None = None  # default: the method's (1e-3 VAE, 1e-2 contrastive/supervised, 2e-4 BiGAN)
    min_learning_rate: float = 1e-5
    plateau_patience: int = 2  # epochs without improvement before the rate drops
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    kl_weight: float = 5e-5  # the VAE's γ
    upright: bool = False  # patches have an orientation (digits): no turns or mirrors in augmentation


@dataclass
class FitResult:
    """A finished run: the kept encoder (CPU, eval mode) and what happened."""

    encoder: nn.Module
    arch: EncoderArch
    method: str
    history: list[dict[str, Any]]
    kept_epoch: int
    run_dir: Path

    @property
    def patches_per_s(self) -> float:
        """Training throughput over the run's epochs (validation excluded)."""
        rates = [row["patches_per_s"] for row in self.history]
        return float(np.mean(rates)) if rates else 0.0


@dataclass
class _RunState:
    """What a checkpoint carries besides the networks and optimisers."""

    epoch: int = 0  # last completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = 0
    best_encoder: dict[str, torch.Tensor] | None = None
    epochs_since_best: int = 0  # since the best epoch or the last rate drop, whichever is later
    finished: bool = False


def split_patches(patches: PatchSet, val_fraction: float, seed: int) -> tuple[PatchSet, PatchSet]:
    """Random (train, validation) split; the validation part has at least 2 patches."""
    n = len(patches)
    n_val = max(MIN_VAL_PATCHES, round(n * val_fraction))
    if n - n_val < MIN_VAL_PATCHES:
        raise TrainingError(f"{n} patches are too few to train and validate on; sample more "
                            "(--patches-per-slide, more slides) or lower --val-fraction")
    order = np.random.default_rng([seed, n]).permutation(n)
    return patches.subset(np.sort(order[n_val:])), patches.subset(np.sort(order[:n_val]))


def fit(config: TrainConfig, patches: PatchSet, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
        reporter: Reporter | None = None) -> FitResult:
    """Train ``config.method`` on ``patches``, checkpointing into ``run_dir``; returns the kept encoder.

    A ``run_dir`` holding a checkpoint is continued with ``resume``, started afresh with
    ``overwrite``, and refused otherwise (a finished run is never lost by accident).
    """
    reporter = reporter or SilentReporter()
    _check_config(config)
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    checkpoint = _existing_checkpoint(checkpoint_path, resume=resume, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was given but PyTorch sees no CUDA device; use --device cpu")
    arch = EncoderArch(patches.patch_px, patches.channels, config.code_size)
    train, val = split_patches(patches, config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    method = build_method(config.method, MethodSetup(arch, train, val, _learning_rate(config), config.seed, device,
                                                     config.kl_weight, config.upright))
    fingerprint = _fingerprint(patches)
    state = _restore(checkpoint, config, fingerprint, method, checkpoint_path) if checkpoint else _RunState()
    steps = config.steps_per_epoch or max(1, len(train) // min(config.batch_size, len(train)))
    summary = {"config": asdict(config), "arch": asdict(arch), "patches": len(patches), "train_patches": len(train),
               "val_patches": len(val), "sources": patches.sources, "mpp": patches.mpp}
    reporter.start(config.method, state.epoch + 1, config.epochs, steps)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.finished:
            break
        row = _run_epoch(method, config, epoch, steps, reporter)
        _end_epoch(method, state, row, epoch, config, run_dir)
        _save_checkpoint(checkpoint_path, config, fingerprint, method, state)
        write_metrics(run_dir, state.history, {**summary, "kept_epoch": state.best_epoch, "finished": state.finished})
        reporter.epoch(row)
    encoder = _kept_encoder(method, state)
    reporter.finish(f"{config.method}: kept epoch {state.best_epoch} of {state.epoch}; logs in {run_dir}")
    return FitResult(encoder, arch, config.method, state.history, state.best_epoch, run_dir)


def _check_config(config: TrainConfig) -> None:
    if config.method not in METHODS:
        raise TrainingError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    steps_ok = config.steps_per_epoch is None or config.steps_per_epoch >= 1
    if config.epochs < 1 or config.batch_size < 2 or not steps_ok:
        raise TrainingError("epochs and steps per epoch must be at least 1, the batch size at least 2 "
                            f"(got {config.epochs}, {config.steps_per_epoch}, {config.batch_size})")
    if not 0 < config.val_fraction < 1:
        raise TrainingError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")


def _learning_rate(config: TrainConfig) -> float:
    return DEFAULT_LEARNING_RATE[config.method] if config.learning_rate is None else config.learning_rate


def plateau_step(rate: float, epochs_since_best: int, config: TrainConfig) -> tuple[float, bool]:
    """The learning rate for the next epoch, and whether the run ends.

    After more than ``plateau_patience`` epochs without a better validation metric the
    rate drops ÷10, never below ``min_learning_rate``; a plateau at that floor ends the run.
    """
    if epochs_since_best <= config.plateau_patience:
        return rate, False
    if rate <= config.min_learning_rate * (1 + 1e-9):
        return rate, True
    return max(rate * PLATEAU_FACTOR, config.min_learning_rate), False


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Seed torch's global generator (augmentations, noise, dropout) and return numpy's, both from (seed, epoch)."""
    sequence = np.random.SeedSequence([seed, epoch])
    torch.manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return np.random.default_rng(sequence)


def _epoch_batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches of patch indices, passing over the patches in shuffled order (repeating when needed)."""
    size = min(batch_size, n)
    passes = -(-steps * size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])
    return [order[k * size : (k + 1) * size] for k in range(steps)]


def _run_epoch(method: Method, config: TrainConfig, epoch: int, steps: int, reporter: Reporter) -> dict[str, Any]:
    rng = _epoch_rng(config.seed, epoch)
    method.set_train(True)
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for index in _epoch_batches(len(method.train), config.batch_size, steps, rng):
        losses = method.train_step(index, rng)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value
        reporter.step(losses)
    seconds = time.perf_counter() - started
    patches = steps * min(config.batch_size, len(method.train)) * method.patches_per_item
    optimizer = next(iter(method.optimizers.values()))
    return {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v / steps for k, v in sums.items()},
            "seconds": round(seconds, 3), "patches_per_s": patches / seconds if seconds > 0 else 0.0}


def _end_epoch(method: Method, state: _RunState, row: dict[str, Any], epoch: int, config: TrainConfig,
               run_dir: Path) -> None:
    """Validate, keep the best (or last) encoder, apply the plateau schedule, save the preview; updates ``state``."""
    method.set_train(False)
    scores = method.validate()
    row.update(scores)
    score = scores[method.metric]
    improved = state.best_score is None or (score > state.best_score if method.higher_is_better
                                            else score < state.best_score)
    if improved or not method.keeps_best:
        state.best_score, state.best_epoch = score, epoch
        state.best_encoder = {k: v.detach().cpu().clone() for k, v in method.encoder().state_dict().items()}
    state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
    if method.uses_plateau:
        groups = next(iter(method.optimizers.values())).param_groups
        rate, state.finished = plateau_step(groups[0]["lr"], state.epochs_since_best, config)
        if rate != groups[0]["lr"]:
            for group in groups:
                group["lr"] = rate
            state.epochs_since_best = 0
    preview = method.preview()
    save_grid_png(run_dir / f"epoch_{epoch:03d}_{preview.name}.png", preview.rows)
    state.epoch = epoch
    state.history.append(row)


def _kept_encoder(method: Method, state: _RunState) -> nn.Module:
    encoder = copy.deepcopy(method.encoder()).cpu()
    if state.best_encoder is not None:
        encoder.load_state_dict(state.best_encoder)
    return encoder.eval()


# --------------------------------------------------------------------------- checkpoints


def _fingerprint(patches: PatchSet) -> str:
    """Hash of the patch set (shape, a sample of patches, labels): a resume must train on the same data."""
    digest = hashlib.sha256(repr(patches.images.shape).encode())
    step = max(1, len(patches) // 64)
    digest.update(np.ascontiguousarray(patches.images[::step]).tobytes())
    if patches.labels is not None:
        digest.update(patches.labels.tobytes())
    return digest.hexdigest()


def _existing_checkpoint(path: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if resume:
            log.warning("%s does not exist: starting a new run", path)
        return None
    if overwrite:
        return None
    if not resume:
        raise TrainingError(f"{path.parent} already holds a training run; pass --resume to continue it, "
                            "--overwrite to start again, or choose another --run-dir")
    return torch.load(path, map_location="cpu", weights_only=False)


def _restore(checkpoint: dict[str, Any], config: TrainConfig, fingerprint: str, method: Method,
             path: Path) -> _RunState:
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: checkpoint format {checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT}; "
                            "start a new run with --overwrite")
    saved = checkpoint["config"]
    changed = [f"{name} ({saved[name]!r} → {getattr(config, name)!r})" for name in _RESUME_FIELDS
               if saved[name] != getattr(config, name)]
    if changed:
        raise TrainingError(f"{path}: cannot resume with changed settings: {', '.join(changed)}; "
                            "use the original settings, or --overwrite to start again")
    if checkpoint["fingerprint"] != fingerprint:
        raise TrainingError(f"{path}: the run was trained on other patches; give the same inputs and sampling "
                            "options (or a --cache of them), or --overwrite to start again")
    for name, module in method.modules.items():
        module.load_state_dict(checkpoint["modules"][name])
    for name, optimizer in method.optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    state = _RunState(**checkpoint["state"])
    if state.epoch >= config.epochs or state.finished:
        log.info("%s: the run already ended at epoch %d", path, state.epoch)
    return state


def _save_checkpoint(path: Path, config: TrainConfig, fingerprint: str, method: Method, state: _RunState) -> None:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "fingerprint": fingerprint,
        "modules": {name: module.state_dict() for name, module in method.modules.items()},
        "optimizers": {name: optimizer.state_dict() for name, optimizer in method.optimizers.items()},
        "state": asdict(state),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)

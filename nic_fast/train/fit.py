"""Training the NIC CNN with the paper's cross-validation, resumably, with CSV/JSON logs.

A run folder holds everything a run needs to continue or to be used later:

```
RUN/config.json            the fit settings, the slide table with folds and the stores' settings
                           (encoder, µm/px, patch, stride; checked on resume and for every store
                           predicted or explained later)
RUN/folds.csv              store, label, fold of every slide
RUN/rotation_<r>/log.csv   one row per epoch: losses, validation metric, learning rate, speed
RUN/rotation_<r>/last.pt   weights, optimiser and schedule after the last finished epoch
RUN/rotation_<r>/best.pt   the weights with the best validation score (a TrainedModel checkpoint)
RUN/rotation_<r>/done.json the rotation's test metric, once its test slides are predicted
RUN/predictions.csv        every slide's held-out prediction
RUN/metrics.json           per-rotation and pooled ("All") metrics with bootstrap intervals
```

Every random choice derives from the run seed, the rotation and the epoch (crops also
from their index), so an interrupted run that is started again continues from its last
finished epoch and ends with the weights an uninterrupted run would have had.

Run folders written before the stores' settings were recorded still load; their stores
are not checked (a warning says so).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic_fast.train.data import Rotation, SlideRecord, Task, assign_folds, class_count, rotations
from nic_fast.train.evaluate import DEFAULT_TTA_CROPS, MetricResult, bootstrap_metric, metric, store_outputs
from nic_fast.train.loader import Backend, Batch, CropSource, default_workers, make_loader
from nic_fast.train.model import (
    PAPER_STRIDES,
    ModelConfig,
    NICNet,
    TrainedModel,
    checked_dropout,
    checked_strides,
    parameter_groups,
)
from nic_fast.devices import check_device
from nic_fast.store import open_store
from nic_fast.train.sampler import StoreSampler
from nic_fast.train.settings import StoreSettings, consensus

__all__ = ["CrossValidation", "EpochLog", "FitConfig", "FitObserver", "RunError", "RunOptions", "TrainedRun",
           "cross_validate", "read_predictions", "train_rotation"]

log = logging.getLogger(__name__)

_LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_metric", "learning_rate", "seconds", "crops_per_s")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class FitConfig:
    """What a run computes; a resumed run must use the same (checked against config.json)."""

    task: Task = "binary"
    crop_px: int = 400  # side of a training crop, in grid cells (pixels of the compressed image)
    folds: int = 4
    epochs: int = 50
    batch_size: int = 16
    crops_per_slide: int = 16  # training crops per slide per epoch
    learning_rate: float = 1e-2
    min_learning_rate: float = 1e-5
    lr_patience: int = 4  # epochs without a better validation score before the learning rate ÷10
    stop_patience: int = 10  # epochs without a better validation score before training stops
    tta_crops: int = DEFAULT_TTA_CROPS
    seed: int = 0
    strides: tuple[int, ...] = PAPER_STRIDES  # the network's separable blocks (see nic_fast.train.model)
    dropout: float = 0.2
    filters: int = 128  # filters of every conv block and width of the dense layer (the paper's 128)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", checked_strides(self.strides))
        checked_dropout(self.dropout)
        if self.crop_px < 1 or self.epochs < 1 or self.batch_size < 2 or self.crops_per_slide < 1 or self.filters < 1:
            raise ValueError("crop_px, epochs, crops_per_slide and filters must be >= 1 and batch_size >= 2 "
                             "(batch normalisation needs two crops)")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"need 0 < min_learning_rate <= learning_rate, got {self.min_learning_rate} and "
                             f"{self.learning_rate}")


@dataclass(frozen=True)
class RunOptions:
    """How a run executes; free to change between a run and its resumption.

    ``threads`` (PyTorch's CPU threads) defaults to the cores the loader workers leave
    free: oversubscribed OpenMP threads spin-wait for each other, which made the small
    convolutions of the demo up to 25× slower on a busy 2-core machine.
    """

    device: str = "cpu"
    loader: Backend = "auto"
    workers: int = field(default_factory=default_workers)
    threads: int | None = None

    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) - self.workers)


@dataclass(frozen=True)
class EpochLog:
    """One row of a rotation's log.csv: ``seconds`` is the whole epoch with validation,
    ``crops_per_s`` the training steps only (loader and network together)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_metric: float
    learning_rate: float
    seconds: float
    crops_per_s: float


class FitObserver:
    """Hooks for a progress display; the default does nothing."""

    def rotation_started(self, rotation: Rotation, first_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        """Training of ``rotation`` starts (or resumes) at ``first_epoch``."""

    def step_done(self, rotation: Rotation, loss: float) -> None:
        """One optimiser step finished."""

    def epoch_done(self, rotation: Rotation, log: EpochLog) -> None:
        """An epoch finished and its checkpoint is written."""

    def rotation_done(self, rotation: Rotation, result: MetricResult) -> None:
        """The rotation's test slides are predicted."""


@dataclass
class _Schedule:
    """Learning rate ÷10 on a validation plateau, and early stopping; its state is checkpointed.

    The score is (metric, −loss), compared lexicographically: the metric decides, and the
    smooth loss breaks the frequent ties of AUC on a handful of validation slides (and
    decides alone when the validation slides hold one class and the metric is undefined).
    """

    learning_rate: float
    best_score: tuple[float, float] | None = None
    best_epoch: int = -1
    epochs_since_cut: int = 0

    def update(self, epoch: int, score: tuple[float, float], config: FitConfig) -> bool:
        """Record an epoch's score; True when it is the best so far."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.epochs_since_cut = score, epoch, 0
            return True
        self.epochs_since_cut += 1
        if self.epochs_since_cut >= config.lr_patience and self.learning_rate > config.min_learning_rate:
            self.learning_rate = max(self.learning_rate / 10, config.min_learning_rate)
            self.epochs_since_cut = 0
        return False

    def should_stop(self, epoch: int, config: FitConfig) -> bool:
        """Whether ``stop_patience`` epochs have passed since the best one."""
        return epoch - self.best_epoch >= config.stop_patience


@dataclass(frozen=True)
class CrossValidation:
    """A finished cross-validation: every slide's held-out prediction and the metrics."""

    records: list[SlideRecord]
    predictions: np.ndarray  # (N,) P(1) or values, or (N, K) class probabilities
    per_rotation: list[MetricResult]
    pooled: MetricResult


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _write_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a checkpoint."""
    partial = path.with_name(path.name + ".partial")
    save(partial)
    os.replace(partial, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def _input_statistics(samplers: list[StoreSampler]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the codes on the tissue of these stores."""
    count, total, squares = np.sum([s.channel_moments() for s in samplers], axis=0)
    if count[0] == 0:
        raise RunError("the training stores hold no tissue cells: check the tissue masks (nic-fast info STORE)")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _outputs_count(task: Task, records: list[SlideRecord]) -> int:
    return class_count(records) if task == "multiclass" else 1


class _RotationTrainer:
    """Trains one rotation's network, resuming from its last checkpoint, then tests it."""

    def __init__(self, rotation: Rotation, records: list[SlideRecord], samplers: dict[Path, StoreSampler],
                 config: FitConfig, options: RunOptions, folder: Path, observer: FitObserver) -> None:
        self.rotation, self.config, self.options = rotation, config, options
        self.folder, self.observer = folder, observer
        self.train, self.val, self.test = rotation.split(records)
        self.samplers = samplers
        self.device = torch.device(options.device)
        labels = np.array([r.label for r in self.train], dtype=np.float64)
        torch.manual_seed(_derived_seed(config.seed, rotation.index, 0))
        network = NICNet(ModelConfig(in_channels=samplers[records[0].store].code_size,
                                     outputs=_outputs_count(config.task, records), filters=config.filters,
                                     dense=config.filters, dropout=config.dropout,
                                     strides=config.strides)).to(self.device)
        if config.task == "regression":
            self.model = TrainedModel(network, config.task, float(labels.mean()), float(labels.std()) or 1.0)
        else:
            self.model = TrainedModel(network, config.task)
        network.set_input_statistics(*_input_statistics([samplers[r.store] for r in self.train]))
        self.optimizer = torch.optim.Adam(parameter_groups(network), lr=config.learning_rate)
        self.schedule = _Schedule(config.learning_rate)
        self.first_epoch = 0

    def run(self) -> MetricResult:
        done = self.folder / "done.json"
        if done.exists():
            return MetricResult(**json.loads(done.read_text())["test"])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._resume()
        self._trim_log()
        if not self._finished():
            self._train()
        result = self._test()
        _write_json(done, {"test": asdict(result), "best_epoch": self.schedule.best_epoch})
        self.observer.rotation_done(self.rotation, result)
        return result

    def _finished(self) -> bool:
        last = self.first_epoch - 1
        return self.first_epoch >= self.config.epochs or (last >= 0 and self.schedule.should_stop(last, self.config))

    def _resume(self) -> None:
        last = self.folder / "last.pt"
        if not last.exists():
            return
        state = torch.load(last, map_location=self.device, weights_only=True)
        self.model.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule = _Schedule(**state["schedule"])
        self.first_epoch = state["epoch"] + 1

    def _trim_log(self) -> None:
        """Drop log rows of epochs the checkpoint does not hold (written just before a crash)."""
        path = self.folder / "log.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        kept = [row for row in rows if int(row[0]) < self.first_epoch]
        if len(kept) < len(rows):
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(_LOG_FIELDS)
                writer.writerows(kept)

    def _train(self) -> None:
        config = self.config
        steps = math.ceil(len(self.train) * config.crops_per_slide / config.batch_size)
        source = CropSource([self.samplers[r.store] for r in self.train],
                            np.array([r.label for r in self.train], dtype=np.float32), crop_px=config.crop_px,
                            seed=_derived_seed(config.seed, self.rotation.index),
                            crops_per_epoch=steps * config.batch_size, first_epoch=self.first_epoch)
        loader = make_loader(source, batch_size=config.batch_size, workers=self.options.workers, device=self.device,
                             backend=self.options.loader)
        self.observer.rotation_started(self.rotation, self.first_epoch, config.epochs, steps)
        try:
            for epoch in range(self.first_epoch, config.epochs):
                log = self._epoch(epoch, loader.epoch(epoch), steps)
                self.observer.epoch_done(self.rotation, log)
                if self.schedule.should_stop(epoch, config):
                    break
        finally:
            loader.close()

    def _epoch(self, epoch: int, batches: Iterator[Batch], steps: int) -> EpochLog:
        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.learning_rate
        torch.manual_seed(_derived_seed(self.config.seed, self.rotation.index, epoch + 1))  # dropout
        network = self.model.network.train()
        losses = []
        for crops, labels in batches:
            x = crops.to(self.device).permute(0, 3, 1, 2).float()
            loss = self.model.loss(network(x), labels.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            self.observer.step_done(self.rotation, losses[-1])
        train_seconds = time.perf_counter() - started
        learning_rate = self.schedule.learning_rate
        val_loss, val_metric = self._validate()
        score = (val_metric if math.isfinite(val_metric) else 0.0, -val_loss)
        improved = self.schedule.update(epoch, score, self.config)
        log = EpochLog(epoch, float(np.mean(losses)), val_loss, val_metric, learning_rate,
                       time.perf_counter() - started, steps * self.config.batch_size / max(train_seconds, 1e-9))
        self._append_log(log)
        self._checkpoint(epoch, improved)
        return log

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        """Mean crop loss and the metric of the TTA-averaged slide predictions on the validation slides."""
        network = self.model.network.eval()
        losses, predictions = [], []
        for record in self.val:
            outputs = store_outputs(network, self.samplers[record.store], crop_px=self.config.crop_px,
                                    crops=self.config.tta_crops, device=self.device)
            labels = torch.full((len(outputs),), record.label, device=self.device)
            losses.append(self.model.loss(outputs, labels).item())
            predictions.append(self.model.predictions(outputs).mean(dim=0).cpu().numpy())
        labels = np.array([r.label for r in self.val])
        return float(np.mean(losses)), metric(self.config.task, labels, np.stack(predictions))

    def _checkpoint(self, epoch: int, improved: bool) -> None:
        if improved:
            _write_atomic(self.folder / "best.pt", lambda p: self.model.save(p, epoch=epoch))
        state = {"network": self.model.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": asdict(self.schedule), "epoch": epoch}
        _write_atomic(self.folder / "last.pt", lambda p: torch.save(state, p))

    def _append_log(self, log: EpochLog) -> None:
        path = self.folder / "log.csv"
        if not path.exists():
            path.write_text(",".join(_LOG_FIELDS) + "\n")
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow(f"{v:.6g}" if isinstance(v, float) else v for v in asdict(log).values())

    def _test(self) -> MetricResult:
        best = TrainedModel.load(self.folder / "best.pt", self.device)
        rows = []
        for record in self.test:
            outputs = store_outputs(best.network, self.samplers[record.store], crop_px=self.config.crop_px,
                                    crops=self.config.tta_crops, device=self.device)
            rows.append(best.predictions(outputs).mean(dim=0).cpu().numpy())
        _write_predictions(self.folder / "predictions.csv", self.test, np.stack(rows), self.config.task)
        labels = np.array([r.label for r in self.test])
        return bootstrap_metric(self.config.task, labels, np.stack(rows), seed=self.config.seed)


def _prediction_columns(task: Task, predictions: np.ndarray) -> tuple[list[str], list[list[float]]]:
    """Header and rows of the prediction part of a CSV: P(1), class + probabilities, or value."""
    if task == "multiclass":
        header = ["prediction"] + [f"p_{k}" for k in range(predictions.shape[1])]
        return header, [[int(p.argmax()), *map(float, p)] for p in predictions]
    return ["prediction"], [[float(p)] for p in predictions]


def _write_predictions(path: Path, records: list[SlideRecord], predictions: np.ndarray, task: Task) -> None:
    header, rows = _prediction_columns(task, predictions)

    def save(partial: Path) -> None:
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["slide", "store", "label", "fold", *header])
            for record, row in zip(records, rows):
                writer.writerow([record.name, str(record.store), f"{record.label:g}", record.fold,
                                 *(f"{v:.6g}" if isinstance(v, float) else v for v in row)])

    _write_atomic(path, save)


def read_predictions(path: str | Path, task: Task) -> dict[str, np.ndarray]:
    """Predictions by store path from a predictions.csv: P(1) or value, or the class probabilities."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if task == "multiclass":
        return {row["store"]: np.array([float(v) for k, v in row.items() if k.startswith("p_")]) for row in rows}
    return {row["store"]: np.array(float(row["prediction"])) for row in rows}


def _run_identity(config: FitConfig, records: list[SlideRecord], settings: StoreSettings) -> dict[str, Any]:
    return {"fit": asdict(config),
            "slides": [{"store": str(r.store.resolve()), "label": r.label, "fold": r.fold} for r in records],
            "stores": settings.to_json()}


def _same_run(stored: dict[str, Any], config: FitConfig, identity: dict[str, Any]) -> bool:
    """Whether a config.json describes the run ``config`` and ``identity`` do.

    The settings are compared as FitConfigs, not as JSON: JSON turns the strides tuple
    into a list, and a run written before a setting existed lacks its key (it used the
    default).
    """
    try:
        stored_config = FitConfig(**stored["fit"])
    except (KeyError, TypeError, ValueError):
        return False
    return stored_config == config and stored.get("slides") == identity["slides"]


def _start_or_resume(run_dir: Path, config: FitConfig, records: list[SlideRecord], settings: StoreSettings) -> None:
    """Write config.json, or check that the run there computes the same thing on the same kind of stores."""
    identity = _run_identity(config, records, settings)
    path = run_dir / "config.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if not _same_run(stored, config, identity):
            raise RunError(f"{run_dir} holds a run with other settings or slides (see {path}); resume it with the "
                           "same CSV and options, or train into a new folder")
        recorded = StoreSettings.from_json(stored["stores"]) if "stores" in stored else None
        if recorded is not None and recorded.differences(settings):
            raise RunError(f"{run_dir} was started on stores with {recorded.describe()}, but its stores now have "
                           f"{'; '.join(recorded.differences(settings))} (recompressed since?): train into a new "
                           "folder, or recompress the slides as they were")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, identity)
    with open(run_dir / "folds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["store", "label", "fold"])
        writer.writerows((str(r.store), f"{r.label:g}", r.fold) for r in records)


def _check_rotations(records: list[SlideRecord], config: FitConfig) -> None:
    """Every rotation needs validation slides and, for a classifier, every class to train on."""
    for rotation in rotations(config.folds):
        train, _, _ = rotation.split(records)
        if config.task != "regression" and len({r.label for r in train}) < len({r.label for r in records}):
            raise RunError(f"rotation {rotation.index} would train without some class (folds {rotation.train_folds} "
                           "lack it): add slides of the rare class, or give a 'fold' column that spreads them")


def _open_samplers(records: list[SlideRecord]) -> tuple[dict[Path, StoreSampler], StoreSettings]:
    """The stores' samplers and the settings they share; a store that differs is named."""
    samplers = {r.store: StoreSampler.open(r.store) for r in records}
    settings = consensus([s.settings for s in samplers.values()])
    for store, sampler in samplers.items():
        found = settings.differences(sampler.settings)
        if found:
            raise RunError(f"{store} has {'; '.join(found)}, unlike the run's other stores: compress every slide "
                           "of a run with the same encoder, --mpp, --patch-px and --stride-px")
    return samplers, settings


def train_rotation(rotation: Rotation, records: list[SlideRecord], config: FitConfig, folder: str | Path,
                   options: RunOptions | None = None, observer: FitObserver | None = None) -> MetricResult:
    """Train and test one fixed split into ``folder`` (rotation_<r>'s layout); resumable.

    For benchmarks with a given train/validation/test split: ``records`` carry their
    folds, and ``rotation`` names which fold plays which part.
    """
    options, observer = options or RunOptions(), observer or FitObserver()
    if any(r.fold is None for r in records):
        raise RunError("train_rotation needs every record's fold; use cross_validate to assign them")
    samplers, _ = _open_samplers(records)
    with _torch_threads(options.torch_threads()):
        return _RotationTrainer(rotation, records, samplers, config, options, Path(folder), observer).run()


def cross_validate(records: list[SlideRecord], config: FitConfig, run_dir: str | Path,
                   options: RunOptions | None = None, observer: FitObserver | None = None) -> CrossValidation:
    """Train one network per rotation and predict each slide with the network that never saw it.

    Starting again on the same folder resumes: finished rotations are read back, an
    unfinished one continues from its last epoch.
    """
    run_dir = Path(run_dir)
    options, observer = options or RunOptions(), observer or FitObserver()
    records = assign_folds(records, config.folds, config.seed)
    _check_rotations(records, config)
    samplers, settings = _open_samplers(records)
    _start_or_resume(run_dir, config, records, settings)
    per_rotation = []
    held_out: dict[str, np.ndarray] = {}
    with _torch_threads(options.torch_threads()):
        for rotation in rotations(config.folds):
            folder = run_dir / f"rotation_{rotation.index}"
            per_rotation.append(_RotationTrainer(rotation, records, samplers, config, options, folder, observer).run())
            held_out.update(read_predictions(folder / "predictions.csv", config.task))
    predictions = np.stack([held_out[str(r.store)] for r in records])
    labels = np.array([r.label for r in records])
    pooled = bootstrap_metric(config.task, labels, predictions, seed=config.seed)
    _write_predictions(run_dir / "predictions.csv", records, predictions, config.task)
    _write_json(run_dir / "metrics.json", {"metric": pooled.name, "all": asdict(pooled),
                                           "rotations": [asdict(m) for m in per_rotation]})
    return CrossValidation(records, predictions, per_rotation, pooled)


@dataclass(frozen=True)
class TrainedRun:
    """A finished run folder, for predicting new stores and drawing heatmaps.

    ``store_settings`` is what its training stores shared (None for a run folder written
    before runs recorded it): every store given to :meth:`models_for` must match it.
    """

    folder: Path
    config: FitConfig
    records: list[SlideRecord]
    store_settings: StoreSettings | None = None

    @classmethod
    def open(cls, folder: str | Path) -> TrainedRun:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise RunError(f"{folder} is not a training run (no config.json): train one with `nic-fast train`")
        identity = json.loads(path.read_text())
        config = FitConfig(**identity["fit"])
        missing = [r for r in rotations(config.folds) if not (folder / f"rotation_{r.index}" / "done.json").exists()]
        if missing:
            raise RunError(f"{folder} is unfinished (rotation {missing[0].index} has no done.json): run the same "
                           "`nic-fast train` command again to finish it")
        records = [SlideRecord(Path(s["store"]), s["label"], s["fold"]) for s in identity["slides"]]
        settings = StoreSettings.from_json(identity["stores"]) if "stores" in identity else None
        if settings is None:
            log.warning("%s was trained before runs recorded their stores' encoder, µm/px, patch and stride: the "
                        "stores given to it are not checked against them (train it again to record them)", folder)
        return cls(folder, config, records, settings)

    def check_store(self, store: str | Path) -> None:
        """Refuse a store compressed otherwise than the run's training stores, naming what differs."""
        if self.store_settings is None:
            return
        slide = open_store(store)
        found = self.store_settings.differences(StoreSettings.from_attrs(slide.attrs, slide.code_size))
        if found:
            raise RunError(f"{store} has {'; '.join(found)}, unlike the stores run {self.folder} was trained on: "
                           "compress the slide as those were (encoder, --mpp, --patch-px, --stride-px)")

    def models_for(self, store: str | Path, device: str | torch.device = "cpu") -> tuple[list[TrainedModel], str]:
        """The networks to apply to ``store``, and which they are, after checking the store and the device.

        A slide of the run gets the network of the rotation that tested it (one that never
        saw it), so its heatmap and prediction are honest; any other slide gets all of them.
        """
        device = check_device(device)
        self.check_store(store)
        key = Path(store).resolve()
        for record in self.records:
            if record.store == key:
                rotation = record.fold
                return [TrainedModel.load(self.folder / f"rotation_{rotation}" / "best.pt", device)], \
                    f"held-out network of rotation {rotation}"
        models = [TrainedModel.load(self.folder / f"rotation_{r.index}" / "best.pt", device)
                  for r in rotations(self.config.folds)]
        return models, f"mean of the {len(models)} rotation networks"

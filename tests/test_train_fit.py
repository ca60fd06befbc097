"""Cross-validated training: the loss falls, bookkeeping keeps test slides out, runs resume exactly,
and the network's strides and dropout reach it from `nic-fast train`."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train_stores import write_store

from nic_fast.cli import main
from nic_fast.train.data import Rotation, SlideRecord, rotations
from nic_fast.train.fit import (
    EpochLog,
    FitConfig,
    FitObserver,
    RunError,
    RunOptions,
    TrainedRun,
    cross_validate,
    train_rotation,
)
from nic_fast.train.model import PAPER_STRIDES, TrainedModel

OPTIONS = RunOptions(loader="torch", workers=0, threads=1)
CONFIG = FitConfig(crop_px=12, epochs=3, batch_size=8, crops_per_slide=16, tta_crops=2, seed=1)


def _lesion_store(path: Path, lesion: bool, seed: int) -> Path:
    """Tissue of noisy codes; a lesion slide has a block with channel 0 raised by 3."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(0.0, 0.3, (1, 16, 16, 2)).astype(np.float16)
    tissue = np.zeros((16, 16), bool)
    tissue[1:15, 1:15] = True
    codes[0, ~tissue] = 1.0
    if lesion:
        top, left = rng.integers(3, 9, 2)
        codes[0, top : top + 4, left : left + 4, 0] += 3.0
    return write_store(path, codes, tissue)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[SlideRecord]:
    folder = tmp_path_factory.mktemp("stores")
    return [SlideRecord(_lesion_store(folder / f"s{i}.zarr", lesion=i % 2 == 1, seed=i), float(i % 2))
            for i in range(12)]


@pytest.fixture(scope="module")
def run(records: list[SlideRecord], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "run"
    cross_validate(records, CONFIG, folder, OPTIONS)
    return folder


def _log(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_the_training_loss_falls(records: list[SlideRecord], tmp_path: Path) -> None:
    config = FitConfig(crop_px=12, epochs=6, batch_size=8, crops_per_slide=32, tta_crops=2, seed=2, folds=3)
    cross_validate(records, config, tmp_path / "run", OPTIONS)
    for rotation in rotations(3):
        losses = [float(row["train_loss"]) for row in _log(tmp_path / "run" / f"rotation_{rotation.index}")]
        assert np.mean(losses[-2:]) < 0.8 * losses[0], losses


def test_every_slide_is_predicted_once_by_a_network_that_never_saw_it(run: Path) -> None:
    folds = {row["store"]: int(row["fold"]) for row in _rows(run / "folds.csv")}
    seen = []
    for rotation in rotations(4):
        tested = _rows(run / f"rotation_{rotation.index}" / "predictions.csv")
        assert tested and all(folds[row["store"]] == rotation.test_fold for row in tested)
        assert rotation.test_fold not in rotation.train_folds and rotation.test_fold != rotation.val_fold
        seen += [row["store"] for row in tested]
    assert sorted(seen) == sorted(folds)
    pooled = _rows(run / "predictions.csv")
    assert sorted(row["store"] for row in pooled) == sorted(folds)
    assert all(0.0 <= float(row["prediction"]) <= 1.0 for row in pooled)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "AUC" and len(metrics["rotations"]) == 4
    assert metrics["all"]["low"] <= metrics["all"]["value"] <= metrics["all"]["high"]
    assert metrics["all"]["n"] == 12


def test_logs_have_one_row_per_epoch(run: Path) -> None:
    rows = _log(run / "rotation_0")
    assert list(rows[0]) == list(EpochLog.__dataclass_fields__)
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows))) and 1 <= len(rows) <= CONFIG.epochs


def test_a_run_resumes_and_ends_where_an_uninterrupted_one_does(records: list[SlideRecord], run: Path,
                                                               tmp_path: Path) -> None:
    class Interrupt(FitObserver):
        def epoch_done(self, rotation: Rotation, log: EpochLog) -> None:
            if rotation.index == 1 and log.epoch == 1:
                raise KeyboardInterrupt

    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        cross_validate(records, CONFIG, folder, OPTIONS, Interrupt())
    assert (folder / "rotation_0" / "done.json").exists() and not (folder / "rotation_1" / "done.json").exists()
    with open(folder / "rotation_1" / "log.csv", "a") as log:  # a row whose checkpoint a crash prevented
        log.write("2,9,9,0,0.01,1,1\n")
    cross_validate(records, CONFIG, folder, OPTIONS)
    for rotation in rotations(4):
        resumed = torch.load(folder / f"rotation_{rotation.index}" / "last.pt", weights_only=True)["network"]
        reference = torch.load(run / f"rotation_{rotation.index}" / "last.pt", weights_only=True)["network"]
        for name, tensor in reference.items():
            assert torch.equal(resumed[name], tensor), name
    assert (folder / "predictions.csv").read_text() == (run / "predictions.csv").read_text()
    assert [row["epoch"] for row in _log(folder / "rotation_1")] == [row["epoch"] for row in _log(run / "rotation_1")]
    assert all(row["train_loss"] != "9" for row in _log(folder / "rotation_1"))


def test_a_run_folder_refuses_other_settings(records: list[SlideRecord], run: Path) -> None:
    with pytest.raises(RunError, match="other settings or slides"):
        cross_validate(records, FitConfig(crop_px=12, epochs=3, batch_size=8, seed=99), run, OPTIONS)


def test_a_classifier_rotation_without_a_class_is_refused(tmp_path: Path, records: list[SlideRecord]) -> None:
    lopsided = [SlideRecord(r.store, r.label, fold=(3 if r.label else i % 3)) for i, r in enumerate(records)]
    with pytest.raises(RunError, match="without some class"):
        cross_validate(lopsided, CONFIG, tmp_path / "run", OPTIONS)


def test_a_trained_run_serves_held_out_and_ensemble_networks(run: Path, records: list[SlideRecord],
                                                             tmp_path: Path) -> None:
    trained = TrainedRun.open(run)
    folds = {row["store"]: int(row["fold"]) for row in _rows(run / "folds.csv")}
    store = records[5].store
    models, which = trained.models_for(store)
    assert len(models) == 1 and which == f"held-out network of rotation {folds[str(store)]}"
    outside = _lesion_store(tmp_path / "new.zarr", lesion=True, seed=50)
    models, which = trained.models_for(outside)
    assert len(models) == 4 and "mean of the 4" in which
    with pytest.raises(RunError, match="not a training run"):
        TrainedRun.open(tmp_path)


def test_one_fixed_split_trains_into_its_folder(run: Path, records: list[SlideRecord], tmp_path: Path) -> None:
    folds = {row["store"]: int(row["fold"]) for row in _rows(run / "folds.csv")}
    folded = [SlideRecord(r.store, r.label, folds[str(r.store)]) for r in records]
    result = train_rotation(rotations(4)[2], folded, CONFIG, tmp_path / "split", OPTIONS)
    assert result.n == 3 and (tmp_path / "split" / "best.pt").exists()
    assert (tmp_path / "split" / "predictions.csv").read_text() == (run / "rotation_2" / "predictions.csv").read_text()
    with pytest.raises(RunError, match="every record's fold"):
        train_rotation(rotations(4)[2], records, CONFIG, tmp_path / "other", OPTIONS)


@pytest.mark.parametrize(("task", "labels", "name", "columns"), [
    ("multiclass", [0.0, 1.0, 2.0], "accuracy", ["prediction", "p_0", "p_1", "p_2"]),
    ("regression", [10.0, 55.5, 80.0, 120.0], "Spearman", ["prediction"]),
])
def test_multiclass_and_regression_runs(records: list[SlideRecord], tmp_path: Path, task: str, labels: list[float],
                                        name: str, columns: list[str]) -> None:
    relabelled = [SlideRecord(r.store, labels[i % len(labels)]) for i, r in enumerate(records)]
    config = FitConfig(task=task, crop_px=12, epochs=1, batch_size=8,  # type: ignore[arg-type]
                       crops_per_slide=8, tta_crops=1, folds=3)
    result = cross_validate(relabelled, config, tmp_path / "run", OPTIONS)
    assert result.pooled.name == name and len(result.per_rotation) == 3
    rows = _rows(tmp_path / "run" / "predictions.csv")
    assert list(rows[0])[4:] == columns and len(rows) == 12
    if task == "multiclass":
        probabilities = np.array([[float(row[f"p_{k}"]) for k in range(3)] for row in rows])
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        assert [int(row["prediction"]) for row in rows] == probabilities.argmax(axis=1).tolist()
    else:  # standardised targets: predictions come back in label units, centred on the training labels
        assert 10.0 < np.mean([float(row["prediction"]) for row in rows]) < 120.0


@pytest.fixture(scope="module")
def cli_run(records: list[SlideRecord], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nic-fast train` with a 2-block, 8-filter network and no dropout, as small as a run gets."""
    folder = tmp_path_factory.mktemp("cli")
    table = folder / "slides.csv"
    table.write_text("store,label\n" + "".join(f"{r.store},{r.label:g}\n" for r in records))
    result = CliRunner().invoke(main, [
        "train", str(table), "-o", str(folder / "run"), "--strides", "1,2", "--dropout", "0", "--filters", "8", "--folds", "3",
        "--epochs", "1", "--crop-cells", "12", "--crops-per-slide", "2", "--batch-size", "4", "--tta-crops", "1",
        "--loader", "torch", "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_the_cli_builds_the_network_its_strides_and_dropout_describe(cli_run: Path) -> None:
    fit = json.loads((cli_run / "config.json").read_text())["fit"]
    assert fit["strides"] == [1, 2] and fit["dropout"] == 0.0
    assert TrainedRun.open(cli_run).config.strides == (1, 2)
    network = TrainedModel.load(cli_run / "rotation_0" / "best.pt").network
    assert [block.depthwise.stride[0] for block in network.features] == [1, 2]
    assert all(block.dropout.p == 0.0 for block in network.features)
    assert fit["filters"] == 8 and network.features[-1].pointwise.out_channels == network.dense[0].out_features == 8


def test_a_run_resumes_only_with_its_own_strides_and_dropout(cli_run: Path, records: list[SlideRecord]) -> None:
    config = FitConfig(**json.loads((cli_run / "config.json").read_text())["fit"])
    assert config.strides == (1, 2)
    cross_validate(records, config, cli_run, OPTIONS)  # the tuple matches the JSON list
    for other in (replace(config, strides=(2, 1)), replace(config, strides=PAPER_STRIDES),
                  replace(config, dropout=0.2), replace(config, filters=16)):
        with pytest.raises(RunError, match="other settings or slides"):
            cross_validate(records, other, cli_run, OPTIONS)


def test_a_run_from_before_strides_and_dropout_resumes_with_the_paper_network(run: Path, records: list[SlideRecord],
                                                                                tmp_path: Path) -> None:
    old = shutil.copytree(run, tmp_path / "old")
    identity = json.loads((old / "config.json").read_text())
    del identity["fit"]["strides"], identity["fit"]["dropout"]
    (old / "config.json").write_text(json.dumps(identity))
    cross_validate(records, CONFIG, old, OPTIONS)
    with pytest.raises(RunError, match="other settings or slides"):
        cross_validate(records, replace(CONFIG, strides=(1, 2)), old, OPTIONS)


@pytest.mark.parametrize(("strides", "message"), [("1,3", "1 or 2 for every block"), ("", "invalid literal"),
                                                  ("1,x", "invalid literal")])
def test_the_cli_refuses_strides_other_than_1_or_2(tmp_path: Path, strides: str, message: str) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("store,label\n")
    result = CliRunner().invoke(main, ["train", str(table), "-o", str(tmp_path / "run"), "--strides", strides])
    assert result.exit_code == 2 and "Invalid value for '--strides'" in result.output and message in result.output


def test_the_cli_refuses_dropout_of_one(tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("store,label\n")
    result = CliRunner().invoke(main, ["train", str(table), "-o", str(tmp_path / "run"), "--dropout", "1"])
    assert result.exit_code == 2 and "Invalid value for '--dropout'" in result.output


@pytest.mark.parametrize("fields", [{"strides": ()}, {"strides": (3,)}, {"dropout": 1.0}])
def test_fit_config_refuses_impossible_networks(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="strides|dropout"):
        FitConfig(**fields)  # type: ignore[arg-type]

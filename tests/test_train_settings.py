"""Runs refuse stores compressed otherwise than their training stores: in `train` (all stores of a
run agree, and still agree on resume), `predict` and `heatmap`, with a one-line error naming the
store and the setting; run folders that predate the record still load, unchecked, with a warning."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_stores import write_store

from nic_fast.cli import main
from nic_fast.devices import DeviceError
from nic_fast.train.data import SlideRecord
from nic_fast.train.fit import FitConfig, RunError, RunOptions, TrainedRun, cross_validate
from nic_fast.train.settings import MPP_TOLERANCE, StoreSettings, consensus

OPTIONS = RunOptions(loader="torch", workers=0, threads=1)
CONFIG = FitConfig(crop_px=6, folds=3, epochs=1, batch_size=4, crops_per_slide=2, tta_crops=1, seed=0)
OTHER_SHA = "cd" * 32

# One store setting changed per case: (write_store keywords or code size, words the error must hold)
MISMATCHES = {
    "encoder": ({"encoder_name": "bigan", "encoder_sha256": OTHER_SHA}, "encoder bigan (sha256 cdcdcdcdcdcd…"),
    "code size": ({"code_size": 4}, "C = 4 instead of 2"),
    "µm/px": ({"mpp": 1.0, "scanned_mpp": 0.25}, "1 µm/px instead of 0.5 µm/px"),
    "pixel units": ({"mpp": None, "scanned_mpp": None}, "pixel units (no µm/px) instead of 0.5 µm/px"),
    "patch": ({"patch_px": 256}, "patch 256 px instead of 128 px"),
    "stride": ({"stride_px": 64, "patch_px": 128}, "stride 64 px instead of 128 px"),
}


def _store(path: Path, label: int, seed: int, code_size: int = 2, **settings: object) -> Path:
    rng = np.random.default_rng(seed)
    codes = rng.normal(0.0, 0.3, (1, 8, 8, code_size)).astype(np.float16)
    codes[0, 2:6, 2:6, 0] += 3.0 * label
    tissue = np.zeros((8, 8), bool)
    tissue[1:7, 1:7] = True
    codes[0, ~tissue] = 1.0
    return write_store(path, codes, tissue, **settings)  # type: ignore[arg-type]


def _odd_store(path: Path, case: str) -> Path:
    settings = dict(MISMATCHES[case][0])
    code_size = int(settings.pop("code_size", 2))  # type: ignore[call-overload]
    return _store(path, 1, 99, code_size=code_size, **settings)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[SlideRecord]:
    folder = tmp_path_factory.mktemp("stores")
    return [SlideRecord(_store(folder / f"s{i}.zarr", i % 2, i), float(i % 2)) for i in range(6)]


@pytest.fixture(scope="module")
def run(records: list[SlideRecord], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "run"
    cross_validate(records, CONFIG, folder, OPTIONS)
    return folder


def _settings(**changes: object) -> StoreSettings:
    base = {"encoder_sha256": "ab" * 32, "encoder_name": "mean-rgb", "code_size": 3, "mpp": 0.5, "patch_px": 128,
            "stride_px": 128}
    return StoreSettings(**{**base, **changes})  # type: ignore[arg-type]


def test_differences_name_each_setting() -> None:
    run = _settings()
    assert run.differences(_settings()) == []
    assert run.differences(_settings(encoder_name="renamed")) == []  # same weights, another name
    assert run.differences(_settings(encoder_sha256=None, encoder_name="mean-rgb")) == []  # a store before hashes
    assert run.differences(_settings(encoder_sha256=None, encoder_name="other"))[0].startswith("encoder other")
    assert run.differences(_settings(encoder_sha256=OTHER_SHA)) == [
        f"encoder mean-rgb (sha256 {OTHER_SHA[:12]}…, C = 3) instead of mean-rgb (sha256 {'ab' * 6}…, C = 3)"]
    assert run.differences(_settings(code_size=8)) == ["C = 8 instead of 3"]
    assert run.differences(_settings(mpp=0.5025)) == []  # another scanner, same objective
    assert run.differences(_settings(mpp=0.5 * (1 + MPP_TOLERANCE) + 1e-3)) != []
    assert run.differences(_settings(mpp=0.25)) == ["0.25 µm/px instead of 0.5 µm/px"]
    assert run.differences(_settings(mpp=None)) == ["pixel units (no µm/px) instead of 0.5 µm/px"]
    assert _settings(mpp=None).differences(_settings(mpp=None)) == []
    assert run.differences(_settings(patch_px=64, stride_px=64)) == ["patch 64 px instead of 128 px",
                                                                      "stride 64 px instead of 128 px"]
    assert StoreSettings.from_json(json.loads(json.dumps(run.to_json()))) == run


def test_consensus_is_what_most_stores_share() -> None:
    stores = [_settings(mpp=0.499), _settings(mpp=0.5025), _settings(encoder_sha256=OTHER_SHA, mpp=0.25)]
    agreed = consensus(stores)
    assert agreed.encoder_sha256 == "ab" * 32 and agreed.mpp == pytest.approx(0.499)
    assert [bool(agreed.differences(s)) for s in stores] == [False, False, True]
    assert consensus([_settings(mpp=None), _settings(mpp=None), _settings()]).mpp is None


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_train_refuses_a_store_unlike_the_others(case: str, records: list[SlideRecord], tmp_path: Path) -> None:
    odd = _odd_store(tmp_path / "odd.zarr", case)
    mixed = [*records[:5], SlideRecord(odd, records[5].label)]
    with pytest.raises(RunError) as error:
        cross_validate(mixed, CONFIG, tmp_path / "run", OPTIONS)
    message = str(error.value)
    assert message.startswith(f"{odd} has ") and MISMATCHES[case][1] in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_cli_refuses_mixed_stores_in_one_line(records: list[SlideRecord], tmp_path: Path) -> None:
    odd = _odd_store(tmp_path / "odd.zarr", "encoder")
    table = tmp_path / "labels.csv"
    rows = [f"{r.store},{r.label:g}" for r in records[:5]] + [f"{odd},1"]
    table.write_text("store,label\n" + "\n".join(rows) + "\n")
    result = CliRunner().invoke(main, ["train", str(table), "-o", str(tmp_path / "run"), "--folds", "3",
                                       "--epochs", "1", "--loader", "torch", "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and f"{odd} has encoder bigan" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_resume_refuses_stores_recompressed_since(records: list[SlideRecord], tmp_path: Path) -> None:
    copies = [SlideRecord(_store(tmp_path / f"c{i}.zarr", int(r.label), i), r.label) for i, r in enumerate(records)]
    folder = tmp_path / "run"
    cross_validate(copies, CONFIG, folder, OPTIONS)  # the run is done (a resume reads it back), then the stores change
    for i, record in enumerate(copies):
        _store(record.store, int(record.label), i, stride_px=64, patch_px=64)
    with pytest.raises(RunError, match=r"now have patch 64 px instead of 128 px; stride 64 px instead of 128 px"):
        cross_validate(copies, CONFIG, folder, OPTIONS)


def test_run_records_its_stores_settings(run: Path) -> None:
    trained = TrainedRun.open(run)
    assert trained.store_settings == StoreSettings("ab" * 32, "mean-rgb", 2, 0.5, 128, 128)
    assert json.loads((run / "config.json").read_text())["stores"]["encoder_sha256"] == "ab" * 32


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_predict_and_heatmap_refuse_a_store_unlike_the_run(case: str, run: Path, tmp_path: Path) -> None:
    odd = _odd_store(tmp_path / "odd.zarr", case)
    runner = CliRunner()
    predicted = runner.invoke(main, ["predict", str(run), str(odd), "-o", str(tmp_path / "p.csv")])
    explained = runner.invoke(main, ["heatmap", str(run), str(odd), "-o", str(tmp_path / "h.png")])
    for result in (predicted, explained):
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert f"{odd} has " in result.output and MISMATCHES[case][1] in result.output
        assert f"unlike the stores run {run} was trained on" in result.output
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "h.png").exists()


def test_predict_takes_a_store_like_the_run(run: Path, tmp_path: Path) -> None:
    like = _store(tmp_path / "like.zarr", 1, 7, mpp=0.52, scanned_mpp=0.26)  # another scanner at 40x
    result = CliRunner().invoke(main, ["predict", str(run), str(like), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "like.zarr" in (tmp_path / "p.csv").read_text()


def test_an_older_run_loads_unchecked_with_a_warning(run: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    identity = json.loads((old / "config.json").read_text())
    del identity["stores"]
    (old / "config.json").write_text(json.dumps(identity))
    with caplog.at_level(logging.WARNING, logger="nic_fast.train.fit"):
        trained = TrainedRun.open(old)
    assert trained.store_settings is None
    assert "not checked" in caplog.text and str(old) in caplog.text
    odd = _odd_store(tmp_path / "odd.zarr", "patch")
    models, _ = trained.models_for(odd)
    assert len(models) == CONFIG.folds


def test_models_for_checks_the_device(run: Path, records: list[SlideRecord]) -> None:
    trained = TrainedRun.open(run)
    with pytest.raises(DeviceError, match="not one of cpu|cuda|cuda:N"):
        trained.models_for(records[0].store, "gpu0")
    models, which = trained.models_for(records[0].store, "CPU")
    assert which.startswith("held-out network") and len(models) == 1

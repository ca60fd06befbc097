"""The demo end to end (`make demo` at a small size), and `predict` on the run it leaves."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nic_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Runs the Makefile's demo recipe itself (its install prerequisite taken as done)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("demo")
    command = ["make", "--no-print-directory", "-o", "install", "demo", f"DEMO={out}", f"VENV={sys.prefix}",
               "DEMO_SLIDES=16", "DEMO_SIZE=2048", "DEMO_EPOCHS=3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.slow
def test_demo_reports_a_cross_validated_auc_and_a_scored_heatmap(demo: tuple[Path, str]) -> None:
    out, stdout = demo
    match = re.search(r"All: AUC (\d\.\d{3}) \(95% CI (\d\.\d{3})-(\d\.\d{3}), n=16\)", stdout)
    assert match, stdout[-2000:]
    value, low, high = map(float, match.groups())
    assert 0.0 <= low <= value <= high <= 1.0
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["all"]["value"] == pytest.approx(value, abs=5e-4)
    report = json.loads((out / "heatmap.json").read_text())
    assert 0.0 <= report["jaccard"] <= 1.0 and report["networks"].startswith("held-out network of rotation")
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert report["overlay"]["drawn_on"] == "slide" and report["overlay"]["mpp"] == pytest.approx(2.0)
    contours = json.loads((out / "heatmap.geojson").read_text())
    assert contours["type"] == "FeatureCollection" and contours["features"]
    assert report["files"]["map"] == str(out / "heatmap.tif") and report["map_mpp"] == pytest.approx(64.0)
    with open(out / "slides" / "labels.csv", newline="") as f:
        first_lesion = next(row["slide"] for row in csv.DictReader(f) if row["label"] == "1")
    assert Path(report["store"]).name == first_lesion.replace(".tif", ".zarr")
    raw = np.load(out / "heatmap.npy")
    assert raw.dtype == np.float32 and raw.ndim == 2 and (raw >= 0).all()


@pytest.mark.slow
def test_predict_gives_run_slides_their_cross_validated_prediction(demo: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = demo
    with open(out / "run" / "predictions.csv", newline="") as f:
        held_out = {Path(row["store"]).name: float(row["prediction"]) for row in csv.DictReader(f)}
    stores = [out / "compressed" / name for name in sorted(held_out)[:2]]
    outside = tmp_path / "copy.zarr"
    shutil.copytree(stores[0], outside)
    result = CliRunner().invoke(main, ["predict", str(out / "run"), *map(str, stores), str(outside),
                                       "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, store in zip(rows, stores):
        assert float(row["prediction"]) == pytest.approx(held_out[store.name], abs=1e-5)
        assert row["networks"].startswith("held-out")
    assert rows[2]["networks"] == "mean of the 4 rotation networks"


def test_train_refuses_a_table_without_stores_with_a_clear_message(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("slide,label\nslide_000.tif,1\n")
    result = CliRunner().invoke(main, ["train", str(table), "-o", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert f"{table} names slides, not stores" in result.output and "--stores DIR" in result.output


def test_heatmap_refuses_an_unfinished_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["heatmap", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "h.png")])
    assert result.exit_code != 0 and "not a training run" in result.output


@pytest.mark.slow
def test_heatmap_refuses_a_class_the_networks_do_not_have(demo: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = demo
    store = out / "compressed" / "slide_000.zarr"
    result = CliRunner().invoke(main, ["heatmap", str(out / "run"), str(store), "--class", "1",
                                       "-o", str(tmp_path / "h.png")])
    assert result.exit_code != 0 and "have 1 output(s), classes 0..0" in result.output


def test_heatmap_post_processing_options(demo: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = demo
    store = out / "compressed" / "slide_000.zarr"
    mask = out / "slides" / "slide_000_mask.png"
    args = ["heatmap", str(out / "run"), str(store), "--mask", str(mask)]
    result = CliRunner().invoke(main, [*args, "--smooth-cells", "1.5", "-o", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads((tmp_path / "h.json").read_text())["jaccard"] <= 1.0
    # synth's lesion masks hold 255: naming that value scores exactly as "any non-zero" does
    for name, extra in (("any", []), ("valued", ["--mask-value", "255"]), ("other", ["--mask-value", "1"])):
        result = CliRunner().invoke(main, [*args, *extra, "-o", str(tmp_path / f"{name}.png")])
        assert result.exit_code == 0, result.output
    scores = {name: json.loads((tmp_path / f"{name}.json").read_text())["jaccard"]
              for name in ("any", "valued", "other")}
    assert scores["valued"] == scores["any"] and scores["other"] == 0.0
    refused = CliRunner().invoke(main, [*args, "--smooth-cells", "-1", "-o", str(tmp_path / "r.png")])
    assert refused.exit_code == 2 and "--smooth-cells" in refused.output

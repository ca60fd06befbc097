"""The multi-GPU scheduler's process, queue and failure logic, run with CPU workers so that
it is tested on machines without a GPU: largest-first hand-out, per-device summary, a
worker killed mid-slide (retried on a fresh worker, or reported), `--gpus` without CUDA."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from nic_fast.cli import main
from nic_fast.batch import compress_slides
from nic_fast.batch.supervisor import SchedulerError, SchedulerEvent, cuda_devices, largest_first
from nic_fast.compress import CompressOptions
from nic_fast.store import open_store

PATCH_PX = 128
# Small tiles and batches: every slide is many batches, so a worker can be killed mid-slide.
OPTIONS = CompressOptions(tile_cells=2, batch_size=4, workers=1)


def write_slide(path: Path, cells_h: int, cells_w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = np.clip(np.array([200, 110, 170]) + rng.integers(-60, 60, size=(cells_h * PATCH_PX, cells_w * PATCH_PX, 3)),
                    0, 255).astype(np.uint8)
    desc = f"Aperio Image Library v12.0.0 \r\n{image.shape[1]}x{image.shape[0]} (128x128) RAW|AppMag = 20|MPP = 0.5"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", description=desc, photometric="rgb")
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    return [write_slide(folder / "small.tif", 2, 3, seed=1), write_slide(folder / "large.tif", 6, 5, seed=2),
            write_slide(folder / "medium.tif", 4, 4, seed=3)]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> Path:
    """The same slides compressed in this process: what the workers must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    results = compress_slides(slides, out, OPTIONS).results
    assert all(r.status == "ok" for r in results)
    return out


def test_largest_first_puts_missing_files_last(slides, tmp_path):
    order = largest_first([slides[0], tmp_path / "missing.svs", slides[1], slides[2]])
    assert order == [2, 3, 0, 1]


def test_gpus_without_cuda_says_to_use_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SchedulerError, match="--device cpu"):
        cuda_devices("0,1")
    result = CliRunner().invoke(main, ["compress", "x.svs", "-o", str(tmp_path / "out"), "--gpus", "all"])
    assert not (tmp_path / "out").exists()  # refused before anything is written
    assert result.exit_code != 0 and "sees no CUDA device" in result.output and "--device cpu" in result.output


def test_gpus_parsing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_devices("all") == ["cuda:0", "cuda:1"]
    assert cuda_devices("1") == ["cuda:1"]
    assert cuda_devices(" 0, 1 ") == ["cuda:0", "cuda:1"]
    with pytest.raises(SchedulerError, match="no device 2"):
        cuda_devices("0,2")
    with pytest.raises(SchedulerError, match="indices such as 0,1"):
        cuda_devices("gpu0")
    with pytest.raises(SchedulerError, match="distinct"):
        cuda_devices("1,1")


def assert_same_store(out: Path, reference: Path, name: str) -> None:
    np.testing.assert_array_equal(open_store(out / f"{name}.zarr").load(), open_store(reference / f"{name}.zarr").load())


def test_killed_worker_loses_only_its_slide_which_is_retried(slides, reference, tmp_path):
    events: list[SchedulerEvent] = []

    def kill_large_mid_slide(event: SchedulerEvent) -> None:
        events.append(event)
        if event.kind == "progress" and event.slide.name == "large.tif" and event.attempt == 1:
            if not any(e.kind == "died" for e in events):
                os.kill(event.pid, signal.SIGKILL)

    outcome = compress_slides(slides, tmp_path, OPTIONS, devices=["cpu", "cpu"], on_event=kill_large_mid_slide)
    results, devices = outcome.results, outcome.workers
    assert [r.status for r in results] == ["ok", "ok", "ok"], [r.reason for r in results]
    assert [r.attempts for r in results] == [1, 2, 1]
    for name in ("small", "large", "medium"):
        assert_same_store(tmp_path, reference, name)
    # handed out largest first: the large slide is the first one assigned
    assert next(e for e in events if e.kind == "assigned").slide.name == "large.tif"
    assert sum(d.restarts for d in devices) == 1
    assert any("SIGKILL" in reason for d in devices for reason in d.lost)
    assert sum(d.slides_ok for d in devices) == 3
    assert sum(d.patches for d in devices) == sum(r.patches for r in results)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [d["device"] for d in summary["workers"]] == ["cpu #0", "cpu #1"]
    assert all(d["patches_per_s"] > 0 for d in summary["workers"] if d["slides_ok"])
    assert summary["counts"]["ok"] == 3 and {s["name"]: s["attempts"] for s in summary["slides"]}["large"] == 2


def test_without_retries_the_lost_slide_is_reported_and_the_rest_finish(slides, reference, tmp_path):
    def kill_medium(event: SchedulerEvent) -> None:
        if event.kind == "progress" and event.slide.name == "medium.tif":
            os.kill(event.pid, signal.SIGKILL)

    outcome = compress_slides(slides, tmp_path, OPTIONS, devices=["cpu"], max_attempts=1, on_event=kill_medium)
    results, devices = outcome.results, outcome.workers
    status = {Path(r.slide).name: r for r in results}
    assert status["medium.tif"].status == "failed"
    assert "died (killed by SIGKILL)" in status["medium.tif"].reason and "rerun" in status["medium.tif"].reason
    assert status["large.tif"].status == status["small.tif"].status == "ok"
    assert_same_store(tmp_path, reference, "small")
    assert (tmp_path / "medium.zarr.partial").exists() and not (tmp_path / "medium.zarr").exists()
    assert devices[0].slides_failed == 1 and devices[0].restarts == 1
    # rerunning resumes the partial store and completes it
    (again,) = compress_slides([slides[2]], tmp_path, OPTIONS).results
    assert again.status == "ok"
    assert_same_store(tmp_path, reference, "medium")

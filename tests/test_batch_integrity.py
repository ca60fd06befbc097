"""Batch integrity at lab scale, end to end: a native crash, concurrent runs on one folder,
stale claims and sources, name clashes, summaries across runs, resumed counts, bad encoders,
and the one-line messages for bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from nic_fast.batch import compress_slides
from nic_fast.batch.claims import claim_path
from nic_fast.cli import main
from nic_fast.compress import CompressOptions, Compressor
from nic_fast.encoders import EncoderSpec, save_encoder
from nic_fast.engine import cpu as cpu_engine
from nic_fast.engine.base import EncoderOutputError
from nic_fast.store import open_store

PATCH_PX = 128
FAST = ["--batch-size", "8", "--workers", "1"]


def write_slide(path: Path, cells_h: int, cells_w: int, seed: int, mpp: float = 0.5) -> Path:
    rng = np.random.default_rng(seed)
    image = np.clip(np.array([200, 110, 170]) + rng.integers(-60, 60, size=(cells_h * PATCH_PX, cells_w * PATCH_PX, 3)),
                    0, 255).astype(np.uint8)
    desc = f"Aperio Image Library v12.0.0 \r\n{image.shape[1]}x{image.shape[0]} (128x128) RAW|AppMag = 20|MPP = {mpp}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", description=desc, photometric="rgb")
    return path


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("six")
    return [write_slide(folder / f"s{i}.tif", 2 + i % 3, 3, seed=i) for i in range(6)]


@pytest.fixture(scope="module")
def reference(six_slides, tmp_path_factory) -> Path:
    """The six slides compressed by one process, in this one."""
    out = tmp_path_factory.mktemp("reference")
    outcome = compress_slides(six_slides, out, CompressOptions(batch_size=8, workers=1))
    assert all(r.status == "ok" for r in outcome.results)
    return out


def same_store(a: Path, b: Path) -> None:
    np.testing.assert_array_equal(open_store(a).load(), open_store(b).load())
    np.testing.assert_array_equal(open_store(a).valid, open_store(b).valid)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nic_fast", *args], capture_output=True, text=True, timeout=600)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# -- a native crash costs one slide -------------------------------------------------------


SEGFAULT_HOOK = '''
import os, signal
from nic_fast.slides import base

_original = base.SlideReader.read_region_checked
_reads = [0]


def read_region_checked(self, level, y, x, height, width, **kwargs):  # the engine's tile reads
    if self.path.name == os.environ["NIC_FAST_TEST_SEGFAULT"]:
        _reads[0] += 1
        if _reads[0] == 2:  # mid-slide: after the thumbnail, at the first tile region (the store is started)
            os.kill(os.getpid(), signal.SIGSEGV)
    return _original(self, level, y, x, height, width, **kwargs)


base.SlideReader.read_region_checked = read_region_checked
'''


def test_a_worker_killed_by_a_segfault_costs_only_its_slide(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SEGFAULT_HOOK)  # loaded by the spawned workers only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("NIC_FAST_TEST_SEGFAULT", "crash.tif")
    slides = [write_slide(tmp_path / "good1.tif", 2, 2, 1), write_slide(tmp_path / "crash.tif", 3, 3, 2, ),
              write_slide(tmp_path / "good2.tif", 2, 3, 3)]
    result = CliRunner().invoke(main, ["compress", *map(str, slides), "-o", str(tmp_path / "out"), *FAST])
    assert result.exit_code == 1, result.output
    summary = summary_of(tmp_path / "out")
    status = {s["name"]: s for s in summary["slides"]}
    assert status["good1"]["status"] == status["good2"]["status"] == "ok"
    crash = status["crash"]
    assert crash["status"] == "failed" and crash["attempts"] == 2
    assert "killed by SIGSEGV" in crash["reason"] and "--reader" in crash["reason"]
    assert summary["workers"][0]["restarts"] == 2
    assert "worker died" in result.output
    assert (tmp_path / "out" / "crash.zarr.partial").exists()  # resumable: the first region was kept
    assert not claim_path(tmp_path / "out" / "crash.zarr").exists()  # the dead worker's claim was cleared


# -- one slide, one writer, however many runs ---------------------------------------------


def test_four_concurrent_runs_publish_every_slide_once(six_slides, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nic_fast", "compress", *map(str, six_slides), "-o", str(out), *FAST]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    outputs = []
    for p in processes:
        stdout, stderr = p.communicate(timeout=600)
        outputs.append(stdout + stderr)
    assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    published = sorted(r["name"] for r in records if r["status"] == "ok")
    assert published == [f"s{i}" for i in range(6)]  # each slide compressed and published by one process
    assert {r["status"] for r in records} <= {"ok", "skipped"}
    for i in range(6):
        same_store(out / f"s{i}.zarr", reference / f"s{i}.zarr")
    summary = summary_of(out)
    assert summary["counts"] == {"ok": 6, "skipped": 0, "failed": 0, "stale": 0} and len(summary["runs"]) == 4
    assert not list(out.glob("*.claim*")) and not list(out.glob("*.partial"))


def test_a_fresh_claim_is_respected_and_a_stale_one_taken_over(six_slides, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    claim = claim_path(out / "s0.zarr")
    claim.write_text(json.dumps({"host": "node-9", "pid": 77, "run_id": "other", "started_at": time.time(),
                                 "generation": 1, "token": "abc", "boot_id": "x"}))
    result = cli("compress", str(six_slides[0]), "-o", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    assert "being compressed by node-9:77" in result.stdout + result.stderr
    assert not (out / "s0.zarr").exists()
    old = time.time() - 30
    os.utime(claim, (old, old))
    result = cli("compress", str(six_slides[0]), "-o", str(out), *FAST, "--lease", "10")
    assert result.returncode == 0, result.stderr
    same_store(out / "s0.zarr", reference / "s0.zarr")
    assert not claim.exists()


# -- names and sources ---------------------------------------------------------------------


def test_inputs_that_share_a_store_name_are_refused_before_any_work(tmp_path):
    a = write_slide(tmp_path / "site1" / "x.tif", 2, 2, 1)
    b = write_slide(tmp_path / "site2" / "x.tif", 2, 2, 2)
    result = CliRunner().invoke(main, ["compress", str(a), str(b), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--store-names relative" in result.output and "site2/x.tif" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["compress", str(tmp_path), "--recursive", "--store-names", "relative",
                                       "-o", str(tmp_path / "out"), *FAST])
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "out" / "site1" / "x.zarr").grid_shape == (2, 2)
    assert open_store(tmp_path / "out" / "site2" / "x.zarr").grid_shape == (2, 2)


def test_a_store_made_from_another_file_is_stale_not_skipped(tmp_path):
    slide = write_slide(tmp_path / "a.tif", 2, 2, 1)
    options = CompressOptions(batch_size=8, workers=1)
    assert compress_slides([slide], tmp_path / "out", options).results[0].status == "ok"
    write_slide(slide, 3, 2, 9)  # another scan under the same name
    (result,) = compress_slides([slide], tmp_path / "out", options).results
    assert result.status == "stale" and "--overwrite" in result.reason
    assert open_store(tmp_path / "out" / "a.zarr").grid_shape == (2, 2)
    options.overwrite = True
    (result,) = compress_slides([slide], tmp_path / "out", options).results
    assert result.status == "ok" and open_store(tmp_path / "out" / "a.zarr").grid_shape == (3, 2)


def test_summary_covers_every_run_into_the_folder(six_slides, tmp_path):
    options = CompressOptions(batch_size=8, workers=1)
    compress_slides(six_slides[:2], tmp_path, options)
    compress_slides(six_slides[2:4], tmp_path, options)
    summary = summary_of(tmp_path)
    assert [s["name"] for s in summary["slides"]] == ["s0", "s1", "s2", "s3"] and len(summary["runs"]) == 2
    assert all(run["finished_at"] and not run["interrupted"] for run in summary["runs"])
    (tmp_path / "summary.json").unlink()
    result = CliRunner().invoke(main, ["summarize", str(tmp_path)])
    assert result.exit_code == 0 and "4 ok" in result.output
    assert summary_of(tmp_path)["counts"]["ok"] == 4


# -- resumed slides count the whole slide ----------------------------------------------------


def test_a_resumed_slide_counts_the_whole_slide(tmp_path, monkeypatch, fail_region_reads_at_origin):
    slide = write_slide(tmp_path / "s.tif", 6, 5, 5)
    options = CompressOptions(tile_cells=2, batch_size=4, workers=1)
    fail_region_reads_at_origin(512)  # the first region fails and, re-read tile by tile, costs its first cell
    calls = {"n": 0}
    original = cpu_engine.encode_to_host

    def crash_once(config, patches):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(config, patches)

    monkeypatch.setattr(cpu_engine, "encode_to_host", crash_once)
    (first,) = compress_slides([slide], tmp_path / "out", options).results
    assert first.status == "failed"
    (second,) = compress_slides([slide], tmp_path / "out", options).results
    assert second.status == "ok" and second.resumed
    store = open_store(tmp_path / "out" / "s.zarr")
    assert second.invalid_cells == store.attrs["invalid_cells"] == int((~store.valid).sum()) == 1
    assert store.attrs["valid_fraction"] == pytest.approx(1 - 1 / 30)
    assert second.patches == store.attrs["patches"] == 30 and store.attrs["runs"] == 2
    assert store.attrs["patches_encoded"] == 29  # the unreadable cell never reaches the encoder
    assert list(store.attrs["invalid_reasons"].values()) == [1]
    summary = summary_of(tmp_path / "out")
    assert summary["slides"][0]["invalid_cells"] == 1 and summary["slides"][0]["patches"] == 30


# -- encoders whose output cannot be stored ----------------------------------------------------


class _Constant(torch.nn.Module):
    def __init__(self, value: float, width: int) -> None:
        super().__init__()
        self.value = value
        self.width = width
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :1].expand(-1, self.width) * 0 + self.value * self.scale


@pytest.mark.parametrize("value, words", [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                          (1e6, "beyond float16's range")])
def test_an_encoder_returning_unstorable_values_fails_the_slide(tmp_path, value, words):
    spec = EncoderSpec(name="broken-enc", input_px=PATCH_PX, mpp=0.5, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                       code_size=4, sha256="")
    encoder = save_encoder(_Constant(value, 4), spec, tmp_path / "bad.pt")
    slide = write_slide(tmp_path / "s.tif", 2, 2, 1)
    options = CompressOptions(encoder=str(encoder), background="zero")
    (result,) = compress_slides([slide], tmp_path / "out", options).results
    assert result.status == "failed" and "broken-enc" in result.reason and f"16 {words}" in result.reason
    assert not (tmp_path / "out" / "s.zarr").exists()
    with pytest.raises(EncoderOutputError, match=f"broken-enc.*4 {words}"):  # its blank-patch embedding, at start
        Compressor(CompressOptions(encoder=str(encoder)))


def test_an_encoder_wider_than_its_spec_says_so(tmp_path):
    spec = EncoderSpec(name="wide", input_px=PATCH_PX, mpp=0.5, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                       code_size=3, sha256="")
    module = torch.jit.script(_Constant(0.5, 5))
    torch.jit.save(module, str(tmp_path / "wide.pt"), _extra_files={"nic_fast.json": json.dumps(spec.to_json())})
    slide = write_slide(tmp_path / "s.tif", 2, 2, 1)
    result = CliRunner().invoke(main, ["compress", str(slide), "-o", str(tmp_path / "out"),
                                       "--encoder", str(tmp_path / "wide.pt")])
    assert result.exit_code == 2, result.output
    assert "wide" in result.output and "code_size 3" in result.output and "Traceback" not in result.output


# -- messages for bad input ---------------------------------------------------------------------


def test_bad_input_gets_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    runner = CliRunner()
    tiny = tmp_path / "tiny.tif"
    tifffile.imwrite(tiny, np.full((100, 90, 3), 120, np.uint8), photometric="rgb",
                     description="Aperio Image Library v12.0.0 \r\n90x100 RAW|AppMag = 20|MPP = 0.5")
    out = tmp_path / "out"
    result = runner.invoke(main, ["compress", str(tiny), "-o", str(out), *FAST])
    assert result.exit_code == 1
    reason = summary_of(out)["slides"][0]["reason"]
    assert reason.startswith(str(tiny)) and "90×100 px at 0.5 µm/px, smaller than one 128-px patch" in reason

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["compress", str(empty), "-o", str(out)])
    assert result.exit_code == 2 and "no slides in this folder" in result.output

    csv = tmp_path / "mpp.csv"
    csv.write_text("name,mpp\nx,0.5\n")
    result = runner.invoke(main, ["compress", str(tiny), "-o", str(out), "--slide-mpp-csv", str(csv)])
    assert result.exit_code == 2 and "missing column 'slide'" in result.output and "Traceback" not in result.output

    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(main, ["compress", str(tiny), "-o", str(blocker / "sub")])
    assert result.exit_code == 2 and "is a file" in result.output

    for flag in ("--patch-px", "--stride-px"):
        result = runner.invoke(main, ["compress", str(tiny), "-o", str(out), flag, "0"])
        assert result.exit_code == 2 and flag in result.output

    result = runner.invoke(main, ["compress", "-o", str(out)])
    assert result.exit_code == 2 and "--slides-from" in result.output


def test_folders_and_slide_lists_and_one_line_per_slide_in_logs(tmp_path):
    folder = tmp_path / "cohort"
    write_slide(folder / "a.tif", 2, 2, 1)
    write_slide(folder / "deeper" / "b.tif", 2, 2, 2)
    listing = tmp_path / "list.txt"
    listing.write_text("# more\ncohort/deeper/b.tif\n")
    result = CliRunner().invoke(main, ["compress", str(folder), "--slides-from", str(listing), "-o",
                                       str(tmp_path / "out"), *FAST])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all(" ok " in line for line in lines)  # no terminal: a log line per slide
    assert {s["name"] for s in summary_of(tmp_path / "out")["slides"]} == {"a", "b"}


def test_a_full_disk_at_the_summary_is_reported_not_a_traceback(tmp_path, monkeypatch):
    import nic_fast.batch.records as records

    slide = write_slide(tmp_path / "a.tif", 2, 2, 1)
    original = records.atomic_write_json

    def full(path, payload):
        if path.name == "summary.json":
            raise records.SummaryError(28, f"cannot write {path}: No space left on device")
        original(path, payload)

    monkeypatch.setattr(records, "atomic_write_json", full)
    result = CliRunner().invoke(main, ["compress", str(slide), "-o", str(tmp_path / "out"), *FAST])
    assert result.exit_code == 1
    assert "could not write the summary" in result.output and "No space left" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "out" / "a.zarr").exists() and list((tmp_path / "out" / "records").glob("a.*.json"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_exits_with_its_code_and_leaves_a_true_summary(tmp_path, sig, code):
    slides = [write_slide(tmp_path / f"s{i}.tif", 8, 8, i) for i in range(3)]
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "nic_fast", "compress", *map(str, slides), "-o", str(out),
                                "--batch-size", "2", "--workers", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stdout + stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    summary = summary_of(out)
    assert summary["runs"][0]["interrupted"] and summary["runs"][0]["finished_at"]
    assert not list(out.glob("*.claim"))  # the next run does not wait for a lease

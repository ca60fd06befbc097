"""The cluster layer's parts on their own: lost owners and held claims, watching held slides
(--until-done), the `--dask` and `--until-done` options, and the error when the extra is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_batch_integrity import write_slide

from nic_fast.batch import claims, compress_slides
from nic_fast.batch.dask_cluster import ClusterError, local_gpus, parse_target
from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.slurm import in_array_task
from nic_fast.batch.watch import HeldSlides, poll_interval_s
from nic_fast.cli import main
from nic_fast.job import CompressOptions, SlideResult
from nic_fast.store import open_store

OPTIONS = CompressOptions(batch_size=8, workers=1)
# The --dask options only look for distributed (importing it here would make every exception pickle
# through tblib, which the DALI loader's workers refuse in later tests).
NEEDS_DASK = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="the cluster extra is not installed (pip install 'nic-fast[cluster]')")


def _foreign_claim(store: Path, *, host: str = "node-7", pid: int = 4242, age_s: float = 0.0) -> Path:
    path = claims.claim_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "run_id": "other", "started_at": time.time() - age_s,
                                "generation": 1, "token": "feedface", "boot_id": "other-boot"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


# -- claims of lost owners ------------------------------------------------------------------------


def test_a_lost_owner_s_claim_is_taken_over_at_once_and_only_that_owner_s(tmp_path):
    store = tmp_path / "a.zarr"
    _foreign_claim(store)
    assert isinstance(claims.acquire(store, run_id="r", lost_owner="node-7:9999"), claims.ClaimHeld)
    held = claims.held(store, lease_s=60)
    assert held is not None and held.info.owner == "node-7:4242" and claims.current(store).token == "feedface"
    taken = claims.acquire(store, run_id="r", lost_owner="node-7:4242")  # fresh, but its owner is known gone
    assert isinstance(taken, claims.Claim) and taken.info.generation == 2
    assert claims.held(store, lease_s=60) is not None  # held by us now
    taken.release()
    assert claims.held(store, lease_s=60) is None and claims.current(store) is None


def test_a_given_up_slide_s_claim_is_broken_only_when_the_lost_owner_holds_it(tmp_path):
    store = tmp_path / "a.zarr"
    path = _foreign_claim(store)
    assert not claims.break_lost(store, "node-7:1") and path.exists()
    assert claims.break_lost(store, "node-7:4242") and not path.exists()
    _foreign_claim(store, age_s=30)
    assert claims.held(store, lease_s=10) is None  # stale: could be claimed now


# -- watching held slides -------------------------------------------------------------------------


def test_held_slides_come_back_when_their_claim_goes_stale_or_their_store_is_complete(tmp_path):
    slides = [write_slide(tmp_path / f"h{i}.tif", 2, 2, seed=i) for i in range(2)]
    items = [SlideInput(s, s.stem) for s in slides]
    out = tmp_path / "out"
    for item in items:
        _foreign_claim(out / f"{item.name}.zarr")
    held = HeldSlides(out, items, lease_s=0.8, stall_s=60)
    assert held.poll_s == pytest.approx(0.2) and poll_interval_s(1000) == 30 and poll_interval_s(0.1) == 0.1
    for index, item in enumerate(items):
        held.add(index, SlideResult(str(item.path), "skipped", "held", held_by="node-7:4242"))
    assert held.due() == ([], []) and len(held) == 2  # not yet time to look
    compress_slides([slides[1]], out / "elsewhere", OPTIONS, qc=False)
    (out / "elsewhere" / "h1.zarr").rename(out / "h1.zarr")  # its holder published it
    time.sleep(held.poll_s)
    assert held.due() == ([1], []) and len(held) == 1
    os.utime(claims.claim_path(out / "h0.zarr"), (time.time() - 5, time.time() - 5))  # its holder went silent
    time.sleep(held.poll_s)
    assert held.due() == ([0], []) and not held


def test_a_holder_that_keeps_its_claim_but_writes_nothing_is_given_up_on(tmp_path):
    item = SlideInput(write_slide(tmp_path / "s.tif", 2, 2, seed=1), "s")
    path = _foreign_claim(tmp_path / "s.zarr")
    held = HeldSlides(tmp_path, [item], lease_s=0.4, stall_s=0.6)
    held.add(0, SlideResult(str(item.path), "skipped", "being compressed by node-7:4242", held_by="node-7:4242"))
    deadline = time.monotonic() + 10
    given_up = []
    while not given_up and time.monotonic() < deadline:
        os.utime(path)  # the claim stays fresh
        time.sleep(held.poll_s)
        ready, given_up = held.due()
        assert ready == []
    (index, result), = given_up
    assert index == 0 and "wrote nothing for" in result.reason and not held


def test_until_done_takes_over_a_slide_whose_holder_dies(tmp_path):
    """A process on another node holds a slide and keeps its claim fresh, then dies: a run with
    until_done skips the slide, compresses the others, and takes it over after the lease."""
    slides = [write_slide(tmp_path / f"u{i}.tif", 2, 2 + i, seed=10 + i) for i in range(3)]
    out = tmp_path / "out"
    path = _foreign_claim(out / "u2.zarr")
    alive = threading.Event()
    alive.set()

    def holder() -> None:
        while alive.is_set():
            os.utime(path)
            time.sleep(0.1)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        killer = threading.Timer(2.0, alive.clear)
        killer.start()
        started = time.monotonic()
        outcome = compress_slides(slides, out, OPTIONS, lease_s=1.5, until_done=True, qc=False)
        elapsed = time.monotonic() - started
    finally:
        alive.clear()
        thread.join(10)
    assert [r.status for r in outcome.results] == ["ok", "ok", "ok"]
    assert elapsed >= 3.0  # it waited for the holder's death and then the lease
    assert open_store(out / "u2.zarr").grid_shape == (2, 4)


# -- the command line -------------------------------------------------------------------------------


def test_dask_targets_are_parsed_and_bad_ones_refused():
    assert parse_target("local").kind == "local" and parse_target("local").n_workers is None
    assert parse_target("local:3").n_workers == 3
    assert parse_target("slurm").kind == "slurm"
    assert parse_target("tcp://10.1.2.3:8786").address == "tcp://10.1.2.3:8786"
    assert parse_target("sched.lab:8786").address == "tcp://sched.lab:8786"
    for bad in ("local:0", "lokal", "tcp//x"):
        with pytest.raises(ClusterError, match="--dask"):
            parse_target(bad)


def test_gpus_are_counted_without_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert local_gpus() == 0


@pytest.fixture
def captured_run(monkeypatch):
    """compress's call of run_batch, captured instead of run."""
    import nic_fast.batch.run as run

    calls = []

    def fake(options, items, out_dir, **kwargs):
        calls.append({"options": options, **kwargs})
        raise KeyboardInterrupt  # stops the command right there (exit 130)

    monkeypatch.setattr(run, "run_batch", fake)
    return calls


def test_until_done_is_the_default_inside_an_array_task(tmp_path, monkeypatch, captured_run):
    slide = write_slide(tmp_path / "s.tif", 2, 2, seed=1)
    args = ["compress", str(slide), "-o", str(tmp_path / "out")]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert not in_array_task() and in_array_task({"SLURM_ARRAY_TASK_ID": "7"})
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 130
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert runner.invoke(main, args).exit_code == 130
    assert runner.invoke(main, [*args, "--no-until-done"]).exit_code == 130
    assert [call["until_done"] for call in captured_run] == [False, True, False]
    assert all(call["dask"] is None for call in captured_run)


@NEEDS_DASK
def test_dask_options_reach_the_run_without_touching_cuda_here(tmp_path, captured_run):
    slide = write_slide(tmp_path / "s.tif", 2, 2, seed=1)
    args = ["compress", str(slide), "-o", str(tmp_path / "out")]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--device", "cuda", "--dask", "tcp://127.0.0.1:8786", "--dask-wait", "9"])
    assert result.exit_code == 130, result.output  # --device cuda is the workers' business, not this machine's
    target = captured_run[-1]["dask"]
    assert (target.kind, target.address, target.wait_s) == ("address", "tcp://127.0.0.1:8786", 9)
    assert captured_run[-1]["options"].device == "cuda" and captured_run[-1]["devices"] is None
    assert runner.invoke(main, [*args, "--dask", "slurm", "--jobs", "4", "--partition", "gpu"]).exit_code == 130
    target = captured_run[-1]["dask"]
    assert (target.kind, target.slurm.jobs, target.slurm.partition) == ("slurm", 4, "gpu")
    assert captured_run[-1]["options"].device == "cuda"  # --gpus-per-job 1 by default
    result = runner.invoke(main, [*args, "--dask", "tcp://127.0.0.1:8786", "--device", "cuda:1"])
    assert result.exit_code == 2 and "with --dask give cpu or cuda" in result.output
    result = runner.invoke(main, [*args, "--dask", "tcp://127.0.0.1:8786", "--gpus", "0"])
    assert result.exit_code == 2 and "--gpus picks GPUs of this machine" in result.output
    result = runner.invoke(main, [*args, "--dask", "slurm", "--gpus-per-job", "0", "--device", "cuda"])
    assert result.exit_code == 2 and "--gpus-per-job 1" in result.output
    result = runner.invoke(main, [*args, "--dask", "locale"])
    assert result.exit_code == 2 and "local:N" in result.output


@NEEDS_DASK
def test_dask_local_takes_this_machine_s_gpus_counted_without_cuda(tmp_path, monkeypatch, captured_run):
    slide = write_slide(tmp_path / "s.tif", 2, 2, seed=1)
    args = ["compress", str(slide), "-o", str(tmp_path / "out"), "--dask", "local"]
    runner = CliRunner()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert runner.invoke(main, [*args, "--gpus", "all"]).exit_code == 130
    assert captured_run[-1]["dask"].gpus == (0, 1) and captured_run[-1]["options"].device == "cuda"
    assert runner.invoke(main, [*args, "--gpus", "1"]).exit_code == 130
    assert captured_run[-1]["dask"].gpus == (1,)
    result = runner.invoke(main, [*args, "--gpus", "2"])
    assert result.exit_code == 2 and "this machine's 2 GPU(s)" in result.output
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = runner.invoke(main, [*args, "--gpus", "all"])
    assert result.exit_code == 2 and "no GPU found" in result.output


def test_without_the_cluster_extra_dask_says_which_to_install(tmp_path, monkeypatch):
    slide = write_slide(tmp_path / "s.tif", 2, 2, seed=1)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    result = CliRunner().invoke(main, ["compress", str(slide), "-o", str(tmp_path / "out"), "--dask", "local"])
    assert result.exit_code == 2 and "pip install 'nic-fast[cluster]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@NEEDS_DASK
def test_the_dask_options_only_look_for_dask():
    """Parsing --dask imports neither distributed nor torch (the CLI's parent stays light)."""
    check = ("import sys; from nic_fast.cli.cluster import dask_target; "
             "target = dask_target({'dask': 'local:2', 'dask_wait_s': 5.0}, gpus=None, device=None); "
             "print(target.kind, target.n_workers, 'distributed' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["local", "2", "False", "False"]

"""The Slurm-array pattern without Slurm: the generated sbatch file run by several processes at
once on one output folder, a killed task's slide taken over after a short lease, and the
job scripts of `nic-fast cluster slurm-script` and of `--dask slurm` (nothing is submitted)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cluster_support import assert_identical, hook_env, ok_records, records, stop, wait_for
from test_batch_integrity import write_slide

from nic_fast.batch import compress_slides
from nic_fast.batch.claims import claim_path
from nic_fast.cli import main
from nic_fast.job import CompressOptions

FAST = ["--batch-size", "8", "--workers", "1", "--no-qc"]


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("array")
    return [write_slide(folder / f"a{i}.tif", 2 + i % 3, 3, seed=60 + i) for i in range(6)]


@pytest.fixture(scope="module")
def reference(six_slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("array-reference")
    assert all(r.status == "ok" for r in compress_slides(six_slides, out, CompressOptions(batch_size=8, workers=1),
                                                         qc=False).results)
    return out


def _script(tmp_path: Path, slides: list[Path], out: Path, *extra: str, lease_s: float = 120) -> Path:
    listing = tmp_path / "slides.txt"
    listing.write_text("".join(f"{s}\n" for s in slides))
    result = CliRunner().invoke(main, ["cluster", "slurm-script", "--slides-from", str(listing), "-o", str(out),
                                       "--tasks", "3", "--gpus-per-task", "0", "--lease", str(lease_s), "--", *FAST,
                                       *extra])
    assert result.exit_code == 0, result.output
    script = tmp_path / "compress.sbatch"
    script.write_text(result.output)
    return script


def _task(script: Path, index: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One array task: the sbatch file run by bash, as Slurm would on a node (its own session, so
    that killing it kills what it started, as Slurm's cgroup does)."""
    env = {**(env or os.environ), "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "4242"}
    return subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def test_the_sbatch_file_runs_the_same_compress_in_every_task(tmp_path):
    listing = tmp_path / "slides.txt"
    result = CliRunner().invoke(main, ["cluster", "slurm-script", "--slides-from", str(listing), "-o",
                                       str(tmp_path / "out dir"), "--tasks", "32", "--concurrent", "16",
                                       "--partition", "gpu", "--walltime", "12:00:00", "--account", "lab",
                                       "--log-dir", str(tmp_path / "logs"), "--", "--encoder", "bigan.pt", "--augment"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == ["--job-name=nic-fast", "--array=0-31%16", "--gpus=1", "--cpus-per-task=8", "--mem=32G",
                          "--time=12:00:00", "--partition=gpu", "--account=lab",
                          f"--output={tmp_path / 'logs'}/%x-%A_%a.out"]
    command = lines[-1]
    assert command.startswith("exec ") and " -m nic_fast compress --slides-from " in command
    assert f"'{tmp_path / 'out dir'}'" in command  # quoted for the shell
    assert command.endswith("--device cuda --until-done --lease 120 --encoder bigan.pt --augment")
    result = subprocess.run(["bash", "-n"], input=result.output, text=True, capture_output=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr  # valid bash


@pytest.mark.slow
def test_three_array_tasks_compress_each_slide_once(six_slides, reference, tmp_path):
    out = tmp_path / "out"
    script = _script(tmp_path, six_slides, out)
    tasks = [_task(script, i) for i in range(3)]
    try:
        outputs = [t.communicate(timeout=300)[0] for t in tasks]
    finally:
        stop(tasks)
    assert [t.returncode for t in tasks] == [0, 0, 0], outputs
    published = ok_records(out)
    assert sorted(published) == [s.stem for s in six_slides] and all(len(v) == 1 for v in published.values())
    assert {r["status"] for r in records(out)} <= {"ok", "skipped"}
    for slide in six_slides:
        assert_identical(out / f"{slide.stem}.zarr", reference / f"{slide.stem}.zarr")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 6 and len(summary["runs"]) == 3
    assert not list(out.glob("*.claim*")) and not list(out.glob("*.partial"))


@pytest.mark.slow
def test_a_killed_tasks_slide_is_taken_over_after_the_lease(tmp_path):
    """Task 0 runs on "node-0" (a host name no other task can check a pid on) and is killed while it
    compresses the big slide; task 1 skips that slide while its claim is fresh, compresses the
    rest, waits (--until-done), and takes it over once the lease has passed."""
    lease_s = 4.0
    big = write_slide(tmp_path / "slides" / "big.tif", 4, 4, seed=70)
    small = [write_slide(tmp_path / "slides" / f"b{i}.tif", 2, 2, seed=71 + i) for i in range(3)]
    options = CompressOptions(batch_size=8, workers=1)
    reference = tmp_path / "reference"
    compress_slides([big, *small], reference, options, qc=False)
    out = tmp_path / "out"
    script = _script(tmp_path, [big, *small], out, lease_s=lease_s)
    doomed = _task(script, 0, hook_env(tmp_path, NIC_FAST_TEST_SLOW="big.tif=30", NIC_FAST_TEST_HOSTNAME="node-0"))
    survivor = None
    try:
        claim = claim_path(out / "big.zarr")
        wait_for(lambda: claim.exists() and "node-0" in claim.read_text(), 120, "task 0 to claim the big slide")
        survivor = _task(script, 1)
        wait_for(lambda: all((out / f"{s.stem}.zarr").exists() for s in small), 120, "task 1 to do the small slides")
        os.killpg(doomed.pid, signal.SIGKILL)  # the task and the worker process it started, as Slurm does
        doomed.wait(30)
        killed_at = time.monotonic()
        output, _ = survivor.communicate(timeout=300)
        taken_after_s = time.monotonic() - killed_at
    finally:
        stop([p for p in (doomed, survivor) if p is not None])
    assert survivor.returncode == 0, output
    published = ok_records(out)
    assert sorted(published) == ["b0", "b1", "b2", "big"] and all(len(v) == 1 for v in published.values())
    big_record = published["big"][0]
    assert big_record["host"] != "node-0" and big_record["attempts"] == 1
    assert taken_after_s >= lease_s * 0.5  # not at once: the claim of another host's process needs its lease
    assert_identical(out / "big.zarr", reference / "big.zarr")
    for slide in small:
        assert_identical(out / f"{slide.stem}.zarr", reference / f"{slide.stem}.zarr")
    assert not list(out.glob("*.claim*")) and not list(out.glob("*.partial"))


def _dask_slurm_script(*args: str) -> subprocess.CompletedProcess:
    """In a subprocess: dask-jobqueue imports distributed, which is kept out of the test process."""
    return subprocess.run([sys.executable, "-m", "nic_fast", "cluster", "dask-slurm-script", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is None,
                    reason="the cluster extra is not installed (pip install 'nic-fast[cluster]')")
def test_dask_slurm_job_script():
    result = _dask_slurm_script("--scheduler", "tcp://10.0.0.5:8786", "--gpus-per-job", "2", "--cpus-per-job", "16",
                                "--memory-per-job", "64GiB", "--partition", "gpu", "--walltime", "08:00:00",
                                "--account", "lab", "--interface", "ib0", "--job-extra=--constraint=a100")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == ["-J nic-fast-dask", "-p gpu", "-A lab", "-n 1", "--cpus-per-task=16", "--mem=64G",
                          "-t 08:00:00", "--gpus=2", "--constraint=a100"]
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://10.0.0.5:8786 ")
    for part in ("--nthreads 8", "--nworkers 2", "--nanny", "--resources GPU=1", "--interface ib0"):
        assert part in worker  # one worker per GPU, each with a GPU resource and half the job's cores
    cpu = _dask_slurm_script("--gpus-per-job", "0")
    assert cpu.returncode == 0 and "--gpus" not in cpu.stdout and "GPU=1" not in cpu.stdout

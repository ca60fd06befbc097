"""`compress --dask` on a real Dask cluster on loopback: a scheduler and two `dask worker`
processes (nanny + worker, fake GPU=1 resources) started as separate processes; stores
byte-identical to one process; a worker killed mid-slide (its nanny restarts it); a whole
node killed; two clients at once; a client that never imports torch; no socket of the
cluster on any address but 127.0.0.1.

Dask is never imported into the test process: importing distributed makes every exception
pickle through tblib, which the DALI loader's workers then refuse (tests/test_train_loader.py).
Clients, and the questions asked of the scheduler, run in subprocesses."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cluster_support import (CLIENT, assert_identical, hook_env, listening_addresses, ok_records, python, records,
                             stop, wait_for)
from test_batch_integrity import write_slide

from nic_fast.batch import compress_slides
from nic_fast.batch.claims import claim_path
from nic_fast.job import CompressOptions
from nic_fast.store import open_store

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                 reason="the cluster extra is not installed (pip install 'nic-fast[cluster]')")]

# Waits for N workers, then prints {worker name: worker process id}.
ASK = """
import json, os, sys
from distributed import Client
with Client(sys.argv[1], timeout=60) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=120)
    info = client.scheduler_info(n_workers=-1)["workers"]
    pids = client.run(os.getpid)
    print(json.dumps({str(w["name"]): pids[a] for a, w in info.items() if a in pids}))
"""

# A client of the batch API (several tiles per slide, which the command line does not set).
TILED_CLIENT = """
import sys
from pathlib import Path
from nic_fast.batch import compress_slides
from nic_fast.batch.dask_cluster import DaskTarget
from nic_fast.job import CompressOptions
address, out, *slides = sys.argv[1:]
outcome = compress_slides([Path(s) for s in slides], Path(out), CompressOptions(batch_size=4, workers=1, tile_cells=2),
                          dask=DaskTarget("address", address=address, wait_s=120), qc=False)
sys.exit(0 if all(r.status == "ok" for r in outcome.results) else 1)
"""

FAST = ["--batch-size", "8", "--workers", "1"]
OPTIONS = CompressOptions(batch_size=8, workers=1)
TILED = CompressOptions(batch_size=4, workers=1, tile_cells=2)  # a batch per tile: a kill leaves tiles done
LOOPBACK = {"127.0.0.1"}


class LoopbackCluster:
    """A `dask scheduler` and `dask worker` nodes (nanny + one worker process each) on 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        scheduler_file = folder / "scheduler.json"
        self.scheduler = self._start(python("-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                                            "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                                            str(scheduler_file)), "scheduler", dict(os.environ))
        wait_for(lambda: scheduler_file.exists() and scheduler_file.stat().st_size, 60, "the scheduler file")
        self.address = json.loads(scheduler_file.read_text())["address"]

    def _start(self, command: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.processes.append(process)
        return process

    def start_node(self, name: str) -> None:
        """A nanny and its worker, one task thread, a fake GPU, tile reads slowed down (the
        victim's most, so that it can be killed half-way) and one torch thread."""
        env = hook_env(self.folder, NIC_FAST_TEST_SLOW="victim.tif=1.2,*=0.2", OMP_NUM_THREADS="1")
        self.nodes[name] = self._start(python("-m", "dask", "worker", self.address, "--host", "127.0.0.1", "--name",
                                              name, "--nthreads", "1", "--resources", "GPU=1", "--memory-limit", "0",
                                              "--dashboard-address", "127.0.0.1:0", "--death-timeout", "60"),
                                       name, env)

    def worker_pids(self, n: int = 2) -> dict[str, int]:
        """Once n workers are there: worker process id by worker name (the nanny's process is
        the `dask worker` one)."""
        asked = subprocess.run(python("-c", ASK, self.address, str(n)), capture_output=True, text=True, timeout=300,
                               check=False)
        assert asked.returncode == 0, asked.stderr
        return json.loads(asked.stdout)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def close(self) -> None:
        stop(self.processes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask")
    cluster = LoopbackCluster(folder)
    try:
        cluster.start_node("node-a")
        cluster.start_node("node-b")
        cluster.worker_pids(2)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def eight_slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("eight")
    return [write_slide(folder / f"s{i}.tif", 2 + i % 3, 2 + i % 2, seed=i) for i in range(8)]


@pytest.fixture(scope="module")
def eight_reference(eight_slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eight-reference")
    assert all(r.status == "ok" for r in compress_slides(eight_slides, out, OPTIONS).results)
    return out


def client_command(report: Path, *args: str) -> list[str]:
    return python("-c", CLIENT, str(report), "compress", *args)


def test_eight_slides_through_two_workers_match_one_process_and_stay_on_loopback(cluster, eight_slides,
                                                                               eight_reference, tmp_path):
    out, report = tmp_path / "out", tmp_path / "torch.json"
    client = subprocess.Popen(client_command(report, *map(str, eight_slides), "-o", str(out), *FAST, "--dask",
                                             cluster.address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_for(lambda: list(out.glob("*.zarr.claim")), 120, "a slide to start")
        listening = listening_addresses([*cluster.pids(), client.pid])
        output, _ = client.communicate(timeout=300)
    finally:
        stop([client])
    assert client.returncode == 0, output
    assert listening and listening <= LOOPBACK, listening  # the scheduler, nannies and workers, nothing else
    assert json.loads(report.read_text()) == []  # the client never imported torch
    for slide in eight_slides:
        assert_identical(out / f"{slide.stem}.zarr", eight_reference / f"{slide.stem}.zarr")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 8
    rows = {row["name"]: row for row in summary["workers"]}
    assert set(rows) == {"node-a", "node-b"}
    assert sum(row["slides_ok"] for row in rows.values()) == 8
    assert all(row["host"] and row["busy_s"] > 0 and row["patches_per_s"] > 0 for row in rows.values())
    assert len([line for line in output.splitlines() if line.startswith("[")]) == 8  # a log line per slide


def test_two_clients_at_once_compress_each_slide_once(cluster, eight_slides, eight_reference, tmp_path):
    out = tmp_path / "out"
    reports = [tmp_path / "torch-1.json", tmp_path / "torch-2.json"]
    clients = [subprocess.Popen(client_command(report, *map(str, eight_slides), "-o", str(out), *FAST, "--dask",
                                               cluster.address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for report in reports]
    try:
        outputs = [c.communicate(timeout=300)[0] for c in clients]
    finally:
        stop(clients)
    assert [c.returncode for c in clients] == [0, 0], outputs
    assert [json.loads(r.read_text()) for r in reports] == [[], []]
    published = ok_records(out)
    assert sorted(published) == sorted(s.stem for s in eight_slides)
    assert all(len(found) == 1 for found in published.values())  # one client compressed each, the other skipped it
    assert {r["status"] for r in records(out)} <= {"ok", "skipped"}
    for slide in eight_slides:
        assert_identical(out / f"{slide.stem}.zarr", eight_reference / f"{slide.stem}.zarr")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 8 and len(summary["runs"]) == 2
    assert not list(out.glob("*.claim*")) and not list(out.glob("*.partial"))


def test_a_cuda_run_on_workers_without_cuda_is_refused_with_their_reason(cluster, eight_slides, tmp_path):
    result = subprocess.run(python("-m", "nic_fast", "compress", str(eight_slides[0]), "-o", str(tmp_path / "out"),
                                   "--device", "cuda", "--dask", cluster.address, "--dask-wait", "5"),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "could not start" in result.stderr and "CUDA" in result.stderr and "Traceback" not in result.stderr


def test_a_local_cluster_of_two_workers_from_the_command_line(eight_slides, eight_reference, tmp_path):
    """The README's `nic-fast compress --dask local:2 slides/*.tif -o out`: a scheduler and two
    nanny-supervised workers started by the client, on loopback, gone when it is done."""
    out, report = tmp_path / "out", tmp_path / "torch.json"
    slides = eight_slides[:3]
    client = subprocess.Popen(client_command(report, *map(str, slides), "-o", str(out), *FAST, "--dask", "local:2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(out.glob("*.zarr.claim")), 180, "a slide to start")
        listening = listening_addresses([client.pid])
        output, _ = client.communicate(timeout=300)
    finally:
        stop([client])
    assert client.returncode == 0, output
    assert listening and listening <= LOOPBACK, listening
    assert json.loads(report.read_text()) == []  # the scheduler runs in the client; torch only in the workers
    for slide in slides:
        assert_identical(out / f"{slide.stem}.zarr", eight_reference / f"{slide.stem}.zarr")
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["workers"]
    assert summary["counts"]["ok"] == 3 and sorted(row["name"] for row in rows) == ["0", "1"]
    # a worker Dask lost under load (missed heartbeats) may have published before it went: the
    # retry finds the store done and counts as that worker's skip, the summary keeps the ok
    lost = sum(len(row.get("lost", [])) for row in rows)
    assert 3 - lost <= sum(row["slides_ok"] for row in rows) <= 3


# -- workers and nodes lost mid-slide --------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_slides(tmp_path_factory) -> list[Path]:
    """A 4×4-cell victim (four 2×2 tiles, the largest file: it starts first) and seven small slides."""
    folder = tmp_path_factory.mktemp("tiled")
    return [write_slide(folder / "victim.tif", 4, 4, seed=40)] + \
        [write_slide(folder / f"t{i}.tif", 2 + i % 2, 2 + i % 3, seed=41 + i) for i in range(7)]


@pytest.fixture(scope="module")
def tiled_reference(tiled_slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiled-reference")
    assert all(r.status == "ok" for r in compress_slides(tiled_slides, out, TILED).results)
    return out


def _tiled_client(cluster: LoopbackCluster, slides: list[Path], out: Path) -> subprocess.Popen:
    return subprocess.Popen(python("-c", TILED_CLIENT, cluster.address, str(out), *map(str, slides)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _victim_half_done(out: Path, client: subprocess.Popen) -> int:
    """The pid that holds the victim's claim once one of its tiles is finished, else 0."""
    if client.poll() is not None:
        victim = [r for r in records(out) if r["name"] == "victim"]
        raise AssertionError(f"the run ended before the victim was half done: {client.communicate()[0]}; {victim}; "
                             f"{sorted(p.name for p in out.iterdir())}")
    done = out / "victim.zarr.partial" / "tiles_done.txt"
    try:
        if done.read_text().strip():
            return json.loads(claim_path(out / "victim.zarr").read_text())["pid"]
    except (FileNotFoundError, ValueError):  # not there yet, or being written
        pass
    return 0


def _check_resumed_once(out: Path, reference: Path, slides: list[Path]) -> tuple[dict, dict[str, dict]]:
    """(the victim's record, the run's workers rows by name) after checking every slide was
    published once, the victim resumed, and every store is identical to one process's."""
    published = ok_records(out)
    assert sorted(published) == sorted(s.stem for s in slides) and all(len(v) == 1 for v in published.values())
    victim = published["victim"][0]
    assert victim["attempts"] == 2 and victim["resumed"]
    attrs = open_store(out / "victim.zarr").attrs
    assert attrs["patches_encoded"] == attrs["patches"] == 16  # the first attempt's finished tiles were kept
    for slide in slides:
        assert_identical(out / f"{slide.stem}.zarr", reference / f"{slide.stem}.zarr")
    assert not list(out.glob("*.claim*")) and not list(out.glob("*.partial"))
    rows = {row["name"]: row for row in json.loads((out / "summary.json").read_text())["workers"]}
    return victim, rows


def test_a_worker_killed_mid_slide_loses_nothing_and_its_nanny_brings_it_back(cluster, tiled_slides,
                                                                            tiled_reference, tmp_path):
    out = tmp_path / "out"
    before = cluster.worker_pids()
    client = _tiled_client(cluster, tiled_slides, out)
    try:
        victim_pid = wait_for(lambda: _victim_half_done(out, client), 120, "the victim's first tile")
        assert victim_pid in before.values()
        os.kill(victim_pid, signal.SIGKILL)
        output, _ = client.communicate(timeout=300)
    finally:
        stop([client])
    assert client.returncode == 0, output
    victim, rows = _check_resumed_once(out, tiled_reference, tiled_slides)
    assert victim["pid"] != victim_pid
    killed = next(name for name, pid in before.items() if pid == victim_pid)
    assert rows[killed]["restarts"] == 1 and rows[killed]["pids"][0] == victim_pid
    assert str(victim_pid) in rows[killed]["lost"][0]
    restarted_pid = rows[killed]["pids"][1]
    assert any(r["pid"] == restarted_pid for found in ok_records(out).values() for r in found)  # it works again


def test_a_whole_node_lost_mid_slide_loses_nothing(cluster, tiled_slides, tiled_reference, tmp_path):
    out = tmp_path / "out"
    pids = cluster.worker_pids(2)
    client = _tiled_client(cluster, tiled_slides, out)
    try:
        victim_pid = wait_for(lambda: _victim_half_done(out, client), 120, "the victim's first tile")
        node = next(name for name, pid in pids.items() if pid == victim_pid)
        nanny = cluster.nodes[node]
        nanny.send_signal(signal.SIGKILL)  # the nanny first, so that nothing restarts the worker
        os.kill(victim_pid, signal.SIGKILL)
        nanny.wait(30)
        output, _ = client.communicate(timeout=300)
    finally:
        stop([client])
    assert client.returncode == 0, output
    victim, rows = _check_resumed_once(out, tiled_reference, tiled_slides)
    survivor = next(pid for name, pid in pids.items() if name != node)
    assert victim["pid"] == survivor
    assert rows[node]["restarts"] == 0 and rows[node]["lost"]

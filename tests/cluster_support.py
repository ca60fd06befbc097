"""What the cluster tests share: generated slides, stores compared byte for byte, hooks that
slow reads down or fake a host name in the processes they start, and the listening sockets
of those processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

HOOK = '''
import os, time
from nic_fast.slides import base

# NIC_FAST_TEST_SLOW="victim.tif=1.5,*=0.3": seconds each tile read of that slide (or of any) sleeps
_delays = dict(item.split("=") for item in os.environ.get("NIC_FAST_TEST_SLOW", "").split(",") if "=" in item)


def _slowed(read):
    def slowed(self, level, y, x, height, width, **kwargs):
        delay = _delays.get(self.path.name, _delays.get("*"))
        if delay and height >= 128:  # tile reads, not the thumbnail
            time.sleep(float(delay))
        return read(self, level, y, x, height, width, **kwargs)
    return slowed


for _name in ("read_region", "read_region_checked"):
    if hasattr(base.SlideReader, _name):
        setattr(base.SlideReader, _name, _slowed(getattr(base.SlideReader, _name)))
if os.environ.get("NIC_FAST_TEST_HOSTNAME"):  # claims of this process look like another node's
    import socket
    socket.gethostname = lambda: os.environ["NIC_FAST_TEST_HOSTNAME"]
'''

# Runs the CLI, then writes which torch modules the process had imported: a client must have none.
CLIENT = '''
import atexit, json, sys
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(m for m in sys.modules
                                                                    if m == "torch" or m.startswith("torch.")))))
from nic_fast.cli import main
main(sys.argv[2:], prog_name="nic-fast")
'''


def hook_env(folder: Path, **variables: str) -> dict[str, str]:
    """The environment of a process that loads :data:`HOOK` (as sitecustomize) with ``variables``."""
    hook = folder / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, **variables}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    return env


def store_chunks(store: Path) -> dict[str, bytes]:
    """Every file of a store except the metadata (which holds timings and run ids), by path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def assert_identical(store: Path, reference: Path) -> None:
    mine, theirs = store_chunks(store), store_chunks(reference)
    assert mine.keys() == theirs.keys(), f"{store}: other chunks than {reference}"
    differing = [name for name in mine if mine[name] != theirs[name]]
    assert not differing, f"{store}: chunks differ from {reference}: {differing[:5]}"


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


def ok_records(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in records(out):
        if record["status"] == "ok":
            found.setdefault(record["name"], []).append(record)
    return found


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.1):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def family(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes ``pids`` and all their descendants that are still there."""
    found = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found[process.pid] = process
            for child in process.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def listening_addresses(pids: Iterable[int]) -> set[str]:
    """IP addresses on which the processes ``pids`` (and their children) listen."""
    addresses = set()
    for process in family(pids):
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def stop(processes: Iterable[subprocess.Popen]) -> None:
    """Stop each process and whatever it started, by pid: SIGTERM, then SIGKILL after 15 s."""
    processes = list(processes)
    children = family(p.pid for p in processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue


def python(*args: str) -> list[str]:
    return [sys.executable, *args]

"""Per-slide outcome records and the summary rebuilt from them.

Every slide's outcome is its own small JSON file, ``OUT/records/<store name>.<run id>.json``,
and every run's description is ``OUT/runs/<run id>.json``. ``OUT/summary.json`` is never
edited in place: it is rebuilt from all records in the folder, so several runs, hosts
or cluster workers writing into one folder never overwrite each other's truth, and a
run killed half-way leaves records of every slide it finished.

Per slide (store name) the summary shows the newest record that says what happened to
the slide — ``ok``, ``failed`` or ``stale`` — and a ``skipped`` record only where
nothing else is known: a run that skipped a slide because another process was
compressing it, or because its store was complete, does not hide that slide's outcome.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nic_fast import __version__

__all__ = [
    "RECORDS_DIR",
    "RUNS_DIR",
    "STATUSES",
    "RunInfo",
    "SummaryBuilder",
    "SummaryError",
    "atomic_write_json",
    "iso_time",
    "write_record",
]

RECORDS_DIR = "records"
RUNS_DIR = "runs"
SUMMARY = "summary.json"
STATUSES = ("ok", "skipped", "failed", "stale")
_INFORMATIVE = frozenset({"ok", "failed", "stale"})


class SummaryError(OSError):
    """The summary (or a record) could not be written: a full or read-only disk, say."""


def iso_time(seconds: float | None = None) -> str:
    """UTC time as ISO 8601 with seconds, e.g. 2026-12-01T20:15:03Z."""
    moment = dt.datetime.fromtimestamp(time.time() if seconds is None else seconds, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    """Sortable by start time, unique across hosts: 20261201T201503-3f9a1c."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class RunInfo:
    """One ``compress`` invocation (or one cluster client, or one Slurm array task)."""

    run_id: str = field(default_factory=new_run_id)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: str = field(default_factory=iso_time)
    started_epoch: float = field(default_factory=time.time)
    finished_at: str | None = None
    command: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)  # one row per worker: device, slides, busy s, ...
    interrupted: bool = False


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON next to ``path`` under a unique temporary name, then rename over it.

    Readers see the old file or the new one, never half of one; concurrent writers never
    share a temporary file; a failed write (full disk) leaves no temporary behind and
    raises :class:`SummaryError` naming the file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SummaryError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


def record_path(out_dir: Path, name: str, run_id: str) -> Path:
    return out_dir / RECORDS_DIR / f"{name}.{run_id}.json"


def write_record(out_dir: Path, name: str, run_id: str, record: dict[str, Any]) -> Path:
    """The outcome of one slide in one run (a retry in the same run replaces it)."""
    path = record_path(out_dir, name, run_id)
    atomic_write_json(path, {"name": name, **record})
    return path


def write_run(out_dir: Path, run: RunInfo) -> Path:
    path = out_dir / RUNS_DIR / f"{run.run_id}.json"
    atomic_write_json(path, asdict(run))
    return path


class SummaryBuilder:
    """Rebuilds ``summary.json`` from the folder's records.

    Files are cached by (mtime, size), so rebuilding after every slide of a long batch
    re-reads only what changed: a directory scan plus the new records.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._cache: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}

    def build(self) -> dict[str, Any]:
        records = self._load_all(self.out_dir / RECORDS_DIR)
        runs = sorted(self._load_all(self.out_dir / RUNS_DIR), key=lambda r: r.get("started_at", ""))
        newest: dict[str, dict[str, Any]] = {}
        for record in sorted(records, key=_finished):
            name = record.get("name")
            if not isinstance(name, str):
                continue
            current = newest.get(name)
            if current is None or record.get("status") in _INFORMATIVE or current.get("status") not in _INFORMATIVE:
                newest[name] = record
        slides = sorted(newest.values(), key=lambda r: r["name"])
        counts = {status: sum(r.get("status") == status for r in slides) for status in STATUSES}
        workers = [{"run_id": run.get("run_id"), **worker} for run in runs for worker in run.get("workers", [])]
        return {"nic_fast_version": __version__, "updated_at": iso_time(), "out_dir": str(self.out_dir.resolve()),
                "counts": counts, "runs": runs, "workers": workers, "slides": slides}

    def write(self) -> dict[str, Any]:
        """Rebuild and write ``OUT/summary.json`` atomically; returns the summary."""
        summary = self.build()
        atomic_write_json(self.out_dir / SUMMARY, summary)
        return summary

    def _load_all(self, folder: Path) -> list[dict[str, Any]]:
        loaded = []
        for path in _json_files(folder):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(path)
            if cached is None or cached[0] != key:
                cached = (key, _read_json(path))
                self._cache[path] = cached
            if cached[1] is not None:
                loaded.append(cached[1])
        return loaded


def _finished(record: dict[str, Any]) -> tuple[float, str]:
    """Sort key of records: when the slide finished (seconds since the epoch, ISO text for
    records written without them)."""
    epoch = record.get("finished_epoch")
    return (float(epoch) if isinstance(epoch, (int, float)) else 0.0, str(record.get("finished_at", "")))


def _json_files(folder: Path) -> list[Path]:
    """Every ``*.json`` below ``folder`` (store names may hold sub-folders), skipping temporaries."""
    found = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.name.endswith(".json") and not entry.name.startswith("."):
                found.append(Path(entry.path))
    return found


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None

"""Multi-GPU compression: one worker process per device, slides handed out largest first.

The parent process holds the queue of slides (largest file first, so the long slides
start early and the run does not end waiting on one) and gives the next slide to
whichever worker is idle; it therefore always knows which slide each worker holds.
Each worker talks to the parent over its own pipes: a worker killed in the middle of a
message takes only its own channel down (a queue shared by all workers would stay
locked for the others).
A worker that dies (a killed process, a GPU fault, a decoder crash) loses only that
slide: it is retried on a fresh worker up to ``max_attempts`` times (the store resumes
from its finished tiles), else reported as failed with the reason. Workers are started
with ``spawn``: each builds its own CUDA context, encoder and pipeline.

Devices are torch device strings, so the same scheduler runs CPU workers (as the tests
do, on machines without a GPU).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from nic_fast.compress import CompressOptions, Compressor, SlideResult, available_cpus, write_summary

__all__ = ["DeviceSummary", "Scheduler", "SchedulerError", "SchedulerEvent", "cuda_devices", "largest_first"]

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent checks that its workers are alive
STOP_TIMEOUT_S = 30.0


class SchedulerError(Exception):
    """The devices asked for cannot be used; the message says what to do instead."""


def cuda_devices(gpus: str) -> list[str]:
    """Torch device strings for ``--gpus``: ``all`` or a comma-separated list of indices."""
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SchedulerError(f"--gpus {gpus}: PyTorch {torch.__version__} ({build}) sees no CUDA device; "
                             "compress on the CPU with --device cpu (and leave out --gpus)")
    count = torch.cuda.device_count()
    if gpus.strip().lower() == "all":
        return [f"cuda:{i}" for i in range(count)]
    try:
        indices = [int(part) for part in gpus.split(",") if part.strip()]
    except ValueError as exc:
        raise SchedulerError(f"--gpus {gpus!r}: give 'all' or device indices such as 0,1") from exc
    if not indices or len(set(indices)) != len(indices):
        raise SchedulerError(f"--gpus {gpus!r}: give 'all' or distinct device indices such as 0,1")
    missing = [i for i in indices if not 0 <= i < count]
    if missing:
        raise SchedulerError(f"--gpus {gpus}: no device {', '.join(map(str, missing))}; this machine has "
                             f"{count} (indices 0..{count - 1}, or --gpus all)")
    return [f"cuda:{i}" for i in indices]


def largest_first(slides: Sequence[Path]) -> list[int]:
    """Indices of ``slides`` by file size, largest first (missing files last: they fail fast)."""

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return -1

    return sorted(range(len(slides)), key=lambda i: -size(slides[i]))


@dataclass
class SchedulerEvent:
    """What the scheduler reports as it goes (for progress displays and for tests)."""

    kind: str  # assigned | planned | progress | done | died
    device: str
    pid: int
    slide: Path | None = None
    attempt: int = 0
    patches: int = 0  # planned: the slide's patches; progress: patches just encoded
    result: SlideResult | None = None  # done
    reason: str = ""  # died


@dataclass
class DeviceSummary:
    """One device's share of a run."""

    device: str
    slides_ok: int = 0
    slides_failed: int = 0
    slides_skipped: int = 0
    patches: int = 0
    busy_s: float = 0.0  # seconds spent compressing slides
    wall_s: float = 0.0  # from the start of the run to the device's last slide
    patches_per_s: float = 0.0  # patches / busy_s
    restarts: int = 0  # workers that died and were replaced
    lost: list[str] = field(default_factory=list)  # why workers on it died

    def add(self, result: SlideResult, elapsed_s: float) -> None:
        if result.status == "ok":
            self.slides_ok += 1
            self.patches += result.patches
        elif result.status == "failed":
            self.slides_failed += 1
        else:
            self.slides_skipped += 1
        self.busy_s += result.seconds
        self.wall_s = elapsed_s
        self.patches_per_s = self.patches / self.busy_s if self.busy_s > 0 else 0.0


# -- the worker process -----------------------------------------------------------------------


def _worker_main(device: str, options: CompressOptions, out_dir: Path, cpu_threads: int, tasks: Connection,
                 events: Connection) -> None:
    """A worker: build a compressor for ``device``, then compress the slides it is handed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    if device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        compressor = Compressor(replace(options, device=device))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which gives up on this device
        events.send(("init_failed", f"{type(exc).__name__}: {exc}"))
        return
    events.send(("ready", None))
    while (task := tasks.recv()) is not None:
        index, path, attempt = task
        result = compressor.compress_slide(
            Path(path), out_dir,
            on_start=lambda _slide, patches: events.send(("planned", patches)),
            progress=lambda n: events.send(("progress", n)))
        result.attempts = attempt
        events.send(("done", (index, asdict(result))))


@dataclass
class _Worker:
    device: str
    label: str  # the device, or "device #rank" where several workers share one
    process: BaseProcess
    tasks: Connection  # parent → worker: (slide index, path, attempt), None to stop
    events: Connection  # worker → parent: (kind, payload)
    ready: bool = False
    task: tuple[int, int] | None = None  # (slide index, attempt)


class Scheduler:
    """Runs ``Compressor``s in one worker process per device over a list of slides."""

    def __init__(self, options: CompressOptions, devices: Sequence[str], *, max_attempts: int = 2,
                 max_restarts: int = 2, on_event: Callable[[SchedulerEvent], None] | None = None) -> None:
        if not devices:
            raise SchedulerError("no devices to run on")
        self.options = options
        self.devices = list(devices)
        self.max_attempts = max(1, max_attempts)
        self.max_restarts = max_restarts
        self.on_event = on_event or (lambda event: None)
        self.cpu_threads = max(1, available_cpus() // len(self.devices))
        if options.workers is None:  # the machine's cores are shared between the workers
            self.options = replace(options, workers=self.cpu_threads)
        self._context = mp.get_context("spawn")

    def run(self, slides: Sequence[Path], out_dir: Path) -> tuple[list[SlideResult], list[DeviceSummary]]:
        """Compress every slide; write ``OUT/summary.json`` with per-device figures."""
        slides = [Path(s) for s in slides]
        out_dir.mkdir(parents=True, exist_ok=True)
        results: dict[int, SlideResult] = {}
        labels = self._labels()
        summaries = {rank: DeviceSummary(label) for rank, label in enumerate(labels)}
        pending: deque[tuple[int, int]] = deque((i, 1) for i in largest_first(slides))
        workers = {rank: self._start(rank, out_dir) for rank in range(len(self.devices))}
        started = time.perf_counter()
        try:
            while pending or any(w.task for w in workers.values()):
                self._assign(workers, pending, slides)
                if not workers:
                    self._fail_all(pending, slides, results, summaries)
                    break
                received, closed = self._receive(workers)
                for rank, (kind, payload) in received:
                    if rank in workers:  # else: a worker given up on by an earlier message
                        self._handle(kind, payload, rank, workers, slides, results, summaries, started)
                if closed or not received:
                    self._reap(workers, pending, slides, results, summaries, out_dir, started)
        except BaseException:  # Ctrl-C or a bug here: stop at once, partial stores stay resumable
            _terminate(workers.values())
            raise
        self._stop(workers)
        ordered = [results[i] for i in range(len(slides))]
        device_list = list(summaries.values())
        write_summary(out_dir, ordered, self.options, devices=[asdict(s) for s in device_list])
        return ordered, device_list

    # -- workers --------------------------------------------------------------------------
    def _labels(self) -> list[str]:
        shared = len(set(self.devices)) < len(self.devices)
        return [f"{device} #{rank}" if shared else device for rank, device in enumerate(self.devices)]

    def _start(self, rank: int, out_dir: Path) -> _Worker:
        device = self.devices[rank]
        task_reader, task_writer = self._context.Pipe(duplex=False)
        event_reader, event_writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main, name=f"nic-fast-worker-{rank}", daemon=True,
            args=(device, self.options, out_dir, self.cpu_threads, task_reader, event_writer))
        process.start()
        task_reader.close()  # the worker's ends: closed here, so a dead worker reads as end of file
        event_writer.close()
        return _Worker(device, self._labels()[rank], process, task_writer, event_reader)

    @staticmethod
    def _receive(workers: dict[int, _Worker]) -> tuple[list[tuple[int, tuple[str, Any]]], bool]:
        """Messages that arrive within POLL_S, with the rank that sent each, and whether a
        pipe was closed (a worker died: the caller reaps it)."""
        by_connection = {id(w.events): rank for rank, w in workers.items()}
        messages, closed = [], False
        for connection in wait([w.events for w in workers.values()], timeout=POLL_S):
            try:
                messages.append((by_connection[id(connection)], connection.recv()))
            except (EOFError, OSError):
                closed = True
        return messages, closed

    def _assign(self, workers: dict[int, _Worker], pending: deque[tuple[int, int]], slides: list[Path]) -> None:
        for worker in workers.values():
            if worker.ready and worker.task is None and pending:
                index, attempt = pending.popleft()
                worker.task = (index, attempt)
                worker.tasks.send((index, str(slides[index]), attempt))
                self.on_event(SchedulerEvent("assigned", worker.label, worker.process.pid or 0, slides[index], attempt))

    def _handle(self, kind: str, payload: Any, rank: int, workers: dict[int, _Worker], slides: list[Path],
                results: dict[int, SlideResult], summaries: dict[int, DeviceSummary], started: float) -> None:
        worker = workers[rank]
        pid = worker.process.pid or 0
        slide = slides[worker.task[0]] if worker.task else None
        attempt = worker.task[1] if worker.task else 0
        if kind == "ready":
            worker.ready = True
        elif kind == "init_failed":  # a device that cannot even load the encoder will not recover
            summaries[rank].lost.append(f"could not start: {payload}")
            log.error("worker for %s could not start: %s", worker.label, payload)
            worker.process.join(STOP_TIMEOUT_S)
            worker.tasks.close()
            worker.events.close()
            del workers[rank]
        elif kind == "planned":
            self.on_event(SchedulerEvent("planned", worker.label, pid, slide, attempt, patches=int(payload)))
        elif kind == "progress":
            self.on_event(SchedulerEvent("progress", worker.label, pid, slide, attempt, patches=int(payload)))
        elif kind == "done":
            index, fields = payload
            result = SlideResult(**{**fields, "grid_shape": tuple(fields["grid_shape"]) if fields["grid_shape"] else None})
            results[index] = result
            summaries[rank].add(result, time.perf_counter() - started)
            worker.task = None
            self.on_event(SchedulerEvent("done", worker.label, pid, slides[index], result.attempts, result=result))

    def _reap(self, workers: dict[int, _Worker], pending: deque[tuple[int, int]], slides: list[Path],
              results: dict[int, SlideResult], summaries: dict[int, DeviceSummary], out_dir: Path,
              started: float) -> None:
        """Find dead workers: retry or fail the slide each held, and replace the worker."""
        for rank, worker in list(workers.items()):
            if worker.process.is_alive():
                continue
            worker.tasks.close()
            worker.events.close()
            reason = _exit_reason(worker.process.exitcode)
            summary = summaries[rank]
            summary.lost.append(reason)
            log.warning("worker for %s %s", worker.label, reason)
            if worker.task is not None:
                index, attempt = worker.task
                self.on_event(SchedulerEvent("died", worker.label, worker.process.pid or 0, slides[index], attempt,
                                             reason=reason))
                if attempt < self.max_attempts:
                    pending.appendleft((index, attempt + 1))
                else:
                    result = SlideResult(str(slides[index]), "failed",
                                         f"the worker on {worker.label} {reason} while compressing it (attempt {attempt} of "
                                         f"{self.max_attempts}); rerun to retry: the store resumes from its finished "
                                         "tiles", device=worker.device, attempts=attempt)
                    results[index] = result
                    summary.add(result, time.perf_counter() - started)
                    self.on_event(SchedulerEvent("done", worker.label, worker.process.pid or 0, slides[index], attempt,
                                                 result=result))
            if summary.restarts < self.max_restarts:
                summary.restarts += 1
                workers[rank] = self._start(rank, out_dir)
            else:
                del workers[rank]

    def _fail_all(self, pending: deque[tuple[int, int]], slides: list[Path], results: dict[int, SlideResult],
                  summaries: dict[int, DeviceSummary]) -> None:
        lost = "; ".join(f"{s.device}: {', '.join(s.lost)}" for s in summaries.values() if s.lost)
        while pending:
            index, attempt = pending.popleft()
            results[index] = SlideResult(str(slides[index]), "failed", f"no worker left to compress it ({lost})",
                                         attempts=attempt)

    def _stop(self, workers: dict[int, _Worker]) -> None:
        for worker in workers.values():
            if worker.process.is_alive():
                try:
                    worker.tasks.send(None)
                except OSError:  # it died just now
                    continue
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
        _terminate(workers.values())


def _terminate(workers: Iterable[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"died (killed by {name})"
    return f"died (exit code {exitcode})"

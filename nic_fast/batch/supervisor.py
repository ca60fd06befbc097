"""Worker supervision: slides compressed in worker processes, so a native crash costs one slide.

The parent process holds the queue of slides (largest file first, so long slides start
early and the run does not end waiting on one) and gives the next slide to whichever
worker is idle; it therefore always knows which slide each worker holds. Each worker
talks to the parent over its own pipes: a worker killed in the middle of a message
takes only its own channel down.

A worker that dies (a segfault in a reader, a GPU fault, SIGKILL, out of memory) or
stops making progress (stuck inside a native call) loses only its slide: the slide is
retried on a fresh worker up to ``max_attempts`` times — the store resumes from its
finished tiles and the dead worker's claim is taken over at once — then reported failed
with the reason. After a slide fails on a GPU whose CUDA context is broken (a sticky
error), the worker exits and is replaced rather than reused. Workers are started with
``spawn``: each builds its own compressor (encoder, CUDA context, buffers) once; a GPU
worker sees only its own device (``CUDA_VISIBLE_DEVICES``), because cuCIM and nvJPEG
never call ``cudaSetDevice``.

Devices are torch device strings, so the same supervisor runs CPU workers (as the tests
do, and as ``compress --device cpu`` does).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from nic_fast.batch.claims import clear_if_owner_dead
from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.slide import BatchSettings, process_slide, record_result
from nic_fast.batch.watch import HeldSlides
from nic_fast.job import CompressOptions, SlideResult, available_cpus
from nic_fast.store import store_path

__all__ = ["DeviceSummary", "Scheduler", "SchedulerError", "SchedulerEvent", "cuda_devices", "largest_first"]

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent checks that its workers are alive
HEARTBEAT_S = 2.0  # how often a worker reports how long ago it last made progress
DEFAULT_STUCK_S = 600.0  # no progress for this long: the worker is killed and its slide retried
STOP_TIMEOUT_S = 30.0
EXIT_CUDA_BROKEN = 75  # a worker whose CUDA context cannot be used any more


class SchedulerError(Exception):
    """The devices asked for cannot be used; the message says what to do instead."""


def cuda_devices(gpus: str) -> list[str]:
    """Torch device strings for ``--gpus``: ``all`` or a comma-separated list of indices."""
    import torch

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
    """What the supervisor reports as it goes (for progress displays and for tests)."""

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
    """One worker slot's share of a run (a row of the summary's ``workers``)."""

    device: str
    host: str = ""
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
        elif result.status in ("failed", "stale"):
            self.slides_failed += result.status == "failed"
            self.slides_skipped += result.status == "stale"
        else:
            self.slides_skipped += 1
        self.busy_s += result.seconds
        self.wall_s = elapsed_s
        self.patches_per_s = self.patches / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def label(self) -> str:
        """How displays name the row."""
        return self.device

    @property
    def slides(self) -> int:
        return self.slides_ok + self.slides_failed + self.slides_skipped

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "slides": self.slides}


# -- the worker process -----------------------------------------------------------------------


def _worker_main(device: str, options: CompressOptions, settings: BatchSettings, cpu_threads: int,
                 tasks: Connection, events: Connection) -> None:
    """A worker: build a compressor for ``device``, then compress the slides it is handed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    import torch

    from nic_fast.compress import Compressor, failure_reason

    if device == "cpu":
        torch.set_num_threads(cpu_threads)
    lock = threading.Lock()

    def send(message: tuple[str, Any]) -> None:
        with lock:  # the heartbeat thread shares the pipe
            events.send(message)

    try:
        compressor = Compressor(replace(options, device=device))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which gives up on this device
        send(("init_failed", failure_reason(exc)))
        return
    send(("ready", None))
    with _heartbeat(send) as touch:
        while (task := tasks.recv()) is not None:
            index, path, name, attempt = task
            touch()

            def progress(n: int) -> None:
                touch()
                send(("progress", n))

            result = process_slide(compressor, SlideInput(Path(path), name), settings, attempt=attempt,
                                   on_start=lambda _slide, patches: send(("planned", patches)), progress=progress)
            send(("done", (index, asdict(result))))
            if result.status == "failed" and device.startswith("cuda") and not _cuda_usable(torch):
                log.error("CUDA context on %s is broken after %s; this worker is replaced", device, path)
                os._exit(EXIT_CUDA_BROKEN)


@contextlib.contextmanager
def _heartbeat(send: Callable[[tuple[str, Any]], None]) -> Iterator[Callable[[], None]]:
    """Report every HEARTBEAT_S how long ago the worker last made progress (``touch``)."""
    last = [time.monotonic()]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                send(("heartbeat", time.monotonic() - last[0]))
            except OSError:
                return

    thread = threading.Thread(target=beat, name="nic-fast-heartbeat", daemon=True)
    thread.start()
    try:
        yield lambda: last.__setitem__(0, time.monotonic())
    finally:
        stop.set()


def _cuda_usable(torch: Any) -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception:  # noqa: BLE001 - a sticky CUDA error surfaces as any of several types
        return False
    return True


@dataclass
class _Worker:
    device: str
    label: str  # the device, or "device #rank" where several workers share one
    process: BaseProcess
    tasks: Connection  # parent → worker: (slide index, path, name, attempt), None to stop
    events: Connection  # worker → parent: (kind, payload)
    ready: bool = False
    task: tuple[int, int] | None = None  # (slide index, attempt)
    idle_s: float = 0.0  # seconds since its last progress, as the worker last reported
    heard_at: float = field(default_factory=time.monotonic)  # when the parent last heard from it
    stuck: str = ""  # why the parent killed it


class Scheduler:
    """Runs compressors in one worker process per device over a list of slides."""

    def __init__(self, options: CompressOptions, devices: Sequence[str], *, max_attempts: int = 2,
                 max_restarts: int = 2, stuck_s: float = DEFAULT_STUCK_S, until_done: bool = False,
                 on_event: Callable[[SchedulerEvent], None] | None = None,
                 on_result: Callable[[SlideResult], None] | None = None) -> None:
        if not devices:
            raise SchedulerError("no devices to run on")
        self.options = options
        self.devices = list(devices)
        self.max_attempts = max(1, max_attempts)
        self.max_restarts = max_restarts
        self.stuck_s = stuck_s
        self.until_done = until_done  # watch slides held by other processes until they are done
        self.on_event = on_event or (lambda event: None)
        self.on_result = on_result or (lambda result: None)
        self.cpu_threads = max(1, available_cpus() // len(self.devices))
        if options.workers is None:  # the machine's cores are shared between the workers
            self.options = replace(options, workers=self.cpu_threads)
        self._context = mp.get_context("spawn")

    def run(self, items: Sequence[SlideInput], settings: BatchSettings,
            ) -> tuple[list[SlideResult], list[DeviceSummary]]:
        """Compress every slide; every outcome is recorded as it happens."""
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        results: dict[int, SlideResult] = {}
        labels = self._labels()
        summaries = {rank: DeviceSummary(label, host=settings.run.host) for rank, label in enumerate(labels)}
        pending: deque[tuple[int, int]] = deque((i, 1) for i in largest_first([it.path for it in items]))
        workers = {rank: self._start(rank, settings) for rank in range(len(self.devices))}
        held = HeldSlides(settings.out_dir, items, settings.lease_s, self.stuck_s) if self.until_done else None
        run = _Run(items, settings, results, summaries, time.perf_counter(), held)
        try:
            while pending or any(w.task for w in workers.values()) or held:
                if held:
                    self._take_back(held, pending, run)
                self._assign(workers, pending, items)
                if not workers:
                    if not run.any_ready:  # nothing was tried: a set-up problem, not the slides' fault
                        lost = "; ".join(reason for s in summaries.values() for reason in s.lost)
                        raise SchedulerError(f"no worker could start ({lost})")
                    self._fail_all(pending, run)
                    break
                received, closed = self._receive(workers)
                for rank, (kind, payload) in received:
                    if rank in workers:  # else: a worker given up on by an earlier message
                        self._handle(kind, payload, rank, workers, run)
                self._kill_stuck(workers)
                if closed or not received:
                    self._reap(workers, pending, run)
        except BaseException:  # Ctrl-C, SIGTERM or a bug here: stop at once, partial stores stay resumable
            _terminate(workers.values())
            for worker in workers.values():
                if worker.task is not None:
                    run.clear_claim(worker.task[0])
            raise
        self._stop(workers)
        return [results[i] for i in range(len(items))], list(summaries.values())

    # -- workers --------------------------------------------------------------------------
    def _labels(self) -> list[str]:
        shared = len(set(self.devices)) < len(self.devices)
        return [f"{device} #{rank}" if shared else device for rank, device in enumerate(self.devices)]

    def _start(self, rank: int, settings: BatchSettings) -> _Worker:
        device = self.devices[rank]
        task_reader, task_writer = self._context.Pipe(duplex=False)
        event_reader, event_writer = self._context.Pipe(duplex=False)
        worker_device, visible = _visible_device(device)
        process = self._context.Process(
            target=_worker_main, name=f"nic-fast-worker-{rank}", daemon=True,
            args=(worker_device, self.options, settings, self.cpu_threads, task_reader, event_writer))
        with _environment(visible):
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
            rank = by_connection[id(connection)]
            try:
                while True:  # drain: a busy worker sends many progress messages per poll
                    messages.append((rank, connection.recv()))
                    workers[rank].heard_at = time.monotonic()
                    if not connection.poll():
                        break
            except (EOFError, OSError):
                closed = True
        return messages, closed

    def _assign(self, workers: dict[int, _Worker], pending: deque[tuple[int, int]], items: Sequence[SlideInput]) -> None:
        for worker in workers.values():
            if worker.ready and worker.task is None and worker.process.is_alive() and pending:
                index, attempt = pending.popleft()
                item = items[index]
                try:
                    worker.tasks.send((index, str(item.path), item.name, attempt))
                except OSError:  # it died just now (BrokenPipeError): the reaper retries nothing, it held nothing
                    pending.appendleft((index, attempt))
                    worker.ready = False
                    continue
                worker.task = (index, attempt)
                worker.idle_s, worker.heard_at = 0.0, time.monotonic()
                self.on_event(SchedulerEvent("assigned", worker.label, worker.process.pid or 0, item.path, attempt))

    def _handle(self, kind: str, payload: Any, rank: int, workers: dict[int, _Worker], run: _Run) -> None:
        worker = workers[rank]
        pid = worker.process.pid or 0
        slide = run.items[worker.task[0]].path if worker.task else None
        attempt = worker.task[1] if worker.task else 0
        if kind == "ready":
            worker.ready = run.any_ready = True
        elif kind == "heartbeat":
            worker.idle_s = float(payload)
        elif kind == "init_failed":  # a device that cannot even load the encoder will not recover
            run.summaries[rank].lost.append(f"could not start: {payload}" if run.any_ready else str(payload))
            log.error("worker for %s could not start: %s", worker.label, payload)
            worker.process.join(STOP_TIMEOUT_S)
            worker.tasks.close()
            worker.events.close()
            del workers[rank]
        elif kind == "planned":
            worker.idle_s = 0.0
            self.on_event(SchedulerEvent("planned", worker.label, pid, slide, attempt, patches=int(payload)))
        elif kind == "progress":
            worker.idle_s = 0.0
            self.on_event(SchedulerEvent("progress", worker.label, pid, slide, attempt, patches=int(payload)))
        elif kind == "done":
            index, fields = payload
            result = SlideResult(**{**fields, "grid_shape": tuple(fields["grid_shape"]) if fields["grid_shape"] else None})
            worker.task = None
            if run.held is not None and result.held_by:  # another process has it: look again later
                run.held.add(index, result)
                return
            run.finish(index, rank, result)
            self.on_result(result)
            self.on_event(SchedulerEvent("done", worker.label, pid, run.items[index].path, result.attempts, result=result))

    def _kill_stuck(self, workers: dict[int, _Worker]) -> None:
        """A worker that reports no progress, or nothing at all, for ``stuck_s`` is killed."""
        now = time.monotonic()
        for worker in workers.values():
            if worker.task is None or not worker.process.is_alive():
                continue
            silent_s = now - worker.heard_at
            if worker.idle_s >= self.stuck_s or silent_s >= self.stuck_s:
                worker.stuck = (f"made no progress for {max(worker.idle_s, silent_s):.0f} s (stuck inside a reader "
                                "or the GPU) and was killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid or 0, signal.SIGKILL)

    def _reap(self, workers: dict[int, _Worker], pending: deque[tuple[int, int]], run: _Run) -> None:
        """Find dead workers: retry or fail the slide each held, and replace the worker."""
        for rank, worker in list(workers.items()):
            if worker.process.is_alive():
                continue
            worker.process.join()
            worker.tasks.close()
            worker.events.close()
            reason = worker.stuck or _exit_reason(worker.process.exitcode)
            summary = run.summaries[rank]
            summary.lost.append(reason)
            log.warning("worker for %s %s", worker.label, reason)
            if worker.task is not None:
                self._retry_or_fail(worker, reason, pending, run, rank)
            if summary.restarts < self.max_restarts:
                summary.restarts += 1
                workers[rank] = self._start(rank, run.settings)
            else:
                del workers[rank]

    def _retry_or_fail(self, worker: _Worker, reason: str, pending: deque[tuple[int, int]], run: _Run,
                       rank: int) -> None:
        assert worker.task is not None
        index, attempt = worker.task
        item = run.items[index]
        self.on_event(SchedulerEvent("died", worker.label, worker.process.pid or 0, item.path, attempt, reason=reason))
        if attempt < self.max_attempts:
            pending.appendleft((index, attempt + 1))  # to the front: it holds a claim and a partial store
            return
        run.clear_claim(index)
        hint = _crash_hint(worker.process.exitcode, worker.stuck)
        result = SlideResult(str(item.path), "failed",
                             f"the worker on {worker.label} {reason} while compressing it (attempt {attempt} of "
                             f"{self.max_attempts}); {hint}", device=worker.device, attempts=attempt)
        record_result(run.settings, item, result)
        run.finish(index, rank, result)
        self.on_result(result)
        self.on_event(SchedulerEvent("done", worker.label, worker.process.pid or 0, item.path, attempt, result=result))

    def _take_back(self, held: HeldSlides, pending: deque[tuple[int, int]], run: _Run) -> None:
        """Held slides whose store is complete or whose claim went stale go back to the front of
        the queue (a partial store waits there); those whose holder stalled are given up on."""
        ready, given_up = held.due()
        for index in ready:
            pending.appendleft((index, 1))
        for index, result in given_up:
            record_result(run.settings, run.items[index], result)
            run.results[index] = result
            self.on_result(result)
            self.on_event(SchedulerEvent("done", "", 0, run.items[index].path, result.attempts, result=result))

    def _fail_all(self, pending: deque[tuple[int, int]], run: _Run) -> None:
        lost = "; ".join(f"{s.device}: {', '.join(s.lost)}" for s in run.summaries.values() if s.lost)
        for index, result in run.held.drain() if run.held is not None else []:
            run.results[index] = result  # still held elsewhere: its skip stands (and is recorded)
            self.on_result(result)
        while pending:
            index, attempt = pending.popleft()
            item = run.items[index]
            result = SlideResult(str(item.path), "failed", f"no worker left to compress it ({lost})", attempts=attempt)
            record_result(run.settings, item, result)
            run.results[index] = result
            self.on_result(result)

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


@dataclass
class _Run:
    """The state of one supervised run."""

    items: Sequence[SlideInput]
    settings: BatchSettings
    results: dict[int, SlideResult]
    summaries: dict[int, DeviceSummary]
    started: float
    held: HeldSlides | None = None  # slides other processes hold, watched until done (until_done)
    any_ready: bool = False  # some worker finished its set-up

    def finish(self, index: int, rank: int, result: SlideResult) -> None:
        self.results[index] = result
        self.summaries[rank].add(result, time.perf_counter() - self.started)

    def clear_claim(self, index: int) -> None:
        """Drop the claim a dead or stopped worker held on slide ``index``."""
        clear_if_owner_dead(store_path(self.settings.out_dir, self.items[index].name))


def _visible_device(device: str) -> tuple[str, str | None]:
    """(the device the worker uses, its CUDA_VISIBLE_DEVICES): each GPU worker sees one GPU as cuda:0."""
    if not device.startswith("cuda"):
        return device, None
    index = device.partition(":")[2] or "0"
    return "cuda:0", index


@contextlib.contextmanager
def _environment(cuda_visible: str | None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` for a child started inside (spawn copies the environment)."""
    if cuda_visible is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if before:  # indices are relative to what this process may use
        visible = before.split(",")
        cuda_visible = visible[int(cuda_visible)] if int(cuda_visible) < len(visible) else cuda_visible
    os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _terminate(workers: Any) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"died (killed by {name})"
    if exitcode == EXIT_CUDA_BROKEN:
        return "exited: its CUDA context was broken by the previous slide"
    return f"died (exit code {exitcode})"


def _crash_hint(exitcode: int | None, stuck: str) -> str:
    """What to try after a slide killed its worker every time."""
    if stuck:
        return "try another reader (--reader openslide or --reader tifffile) or a larger --stuck-timeout"
    if exitcode == -signal.SIGSEGV or exitcode == -signal.SIGBUS or exitcode == -signal.SIGABRT:
        return ("a native reader crashed on this file: try another reader (--reader openslide or --reader tifffile); "
                "the store resumes from its finished tiles")
    if exitcode == -signal.SIGKILL:
        return "it was killed (out of memory?): try a smaller --batch-size or fewer --workers; rerun to resume"
    return "rerun to retry: the store resumes from its finished tiles"

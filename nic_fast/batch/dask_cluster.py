"""Slides on a Dask cluster: ``nic-fast compress --dask ADDRESS|local[:N]|slurm``.

This process is the client. It keeps nic-fast's own queue, as the local supervisor
does: slides largest first, each handed to one idle worker at a time (a task pinned to
that worker), so it always knows which worker holds which slide. Dask runs the slides
(:mod:`nic_fast.batch.dask_worker`: one compressor per worker, built once; one slide at
a time; a worker with a ``GPU`` resource gets one slide in flight) and reports workers
that leave — killed, out of memory, their node lost. A slide lost with its worker goes
back to the front of the queue, naming the lost worker's process so that the next
worker takes over its claim at once and resumes the partial store from its finished
tiles; after ``max_attempts`` it is reported failed with the reason. A worker whose
nanny restarts it is used again.

Every worker goes through the per-slide claim and writes the same records as a plain
``compress``, so two clients on one cluster, clients on two clusters, and a Dask run
beside a plain run never compress a slide twice, and ``summary.json`` merges them all.
The client writes the run record with one ``workers`` row per Dask worker.

The client never imports torch or touches CUDA: GPUs of ``--dask local`` are counted
with ``nvidia-smi`` (or ``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nic_fast.batch import claims
from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.slide import BatchSettings, record_result
from nic_fast.batch.supervisor import DeviceSummary, SchedulerError, SchedulerEvent, largest_first
from nic_fast.batch.watch import HeldSlides
from nic_fast.job import CompressOptions, SlideResult, available_cpus
from nic_fast.store import store_path

__all__ = ["CLUSTER_EXTRA", "ClusterError", "DaskScheduler", "DaskTarget", "DaskWorkerSummary", "local_gpus",
           "parse_target", "require_distributed"]

log = logging.getLogger(__name__)

CLUSTER_EXTRA = "pip install 'nic-fast[cluster]'"
POLL_S = 0.2  # how long the client waits for an event or a finished slide per turn
REFRESH_S = 0.5  # how often it asks the scheduler which workers there are
CONNECT_TIMEOUT_S = 30.0
DEFAULT_WAIT_S = 300.0  # for the first worker (Slurm jobs may queue), and for a replacement when all left
RESULT_TIMEOUT_S = 60.0
LOOPBACK = "127.0.0.1"


class ClusterError(SchedulerError):
    """The cluster cannot be used (extra missing, scheduler unreachable, no worker); one line with the fix."""


def require_distributed() -> None:
    """A one-line error naming the extra when Dask distributed is not installed. Looks without
    importing it: importing distributed changes how every exception pickles in this process
    (tblib), which only the client of a Dask run should have to live with."""
    blocked = "distributed" in sys.modules and sys.modules["distributed"] is None
    if blocked or ("distributed" not in sys.modules and importlib.util.find_spec("distributed") is None):
        raise ClusterError(f"--dask needs Dask distributed, which is not installed; install it with {CLUSTER_EXTRA}")


def _import_distributed() -> Any:
    require_distributed()
    try:
        import distributed
    except ImportError as exc:  # installed but broken (a missing dependency of its own)
        raise ClusterError(f"--dask: Dask distributed cannot be imported ({exc}); reinstall it with "
                           f"{CLUSTER_EXTRA}") from exc
    return distributed


@dataclass(frozen=True)
class DaskTarget:
    """Where a run's Dask workers come from."""

    kind: str  # "address": a running scheduler; "local": a LocalCluster here; "slurm": dask-jobqueue jobs
    address: str = ""
    n_workers: int | None = None  # local: worker processes (default: one per GPU with --device cuda, else 1)
    gpus: tuple[int, ...] = ()  # local: the GPUs (indices into what this process may use), one worker each
    slurm: Any = None  # a nic_fast.batch.slurm.SlurmJobs for kind "slurm"
    wait_s: float = DEFAULT_WAIT_S

    def describe(self) -> str:
        if self.kind == "address":
            return self.address
        if self.kind == "local":
            return f"a local cluster of {self.n_workers or 'default'} worker(s)"
        return "Slurm jobs"


def parse_target(text: str) -> DaskTarget:
    """``--dask``: ``tcp://host:8786`` (or ``host:8786``), ``local``, ``local:N`` or ``slurm``."""
    value = text.strip()
    if value == "slurm":
        return DaskTarget("slurm")
    match = re.fullmatch(r"local(?::(\d+))?", value)
    if match:
        n = int(match.group(1)) if match.group(1) else None
        if n is not None and n < 1:
            raise ClusterError(f"--dask {text}: give at least one worker (local:1)")
        return DaskTarget("local", n_workers=n)
    if re.fullmatch(r"(?:[a-z]+://)?[^\s/:]+:\d+", value) or re.fullmatch(r"[a-z]+://\S+", value):
        return DaskTarget("address", address=value if "://" in value else f"tcp://{value}")
    raise ClusterError(f"--dask {text!r}: give a scheduler address (tcp://host:8786), local, local:N or slurm")


def local_gpus() -> int:
    """GPUs this process may use, counted without CUDA: ``CUDA_VISIBLE_DEVICES`` if set, else
    ``nvidia-smi -L`` (0 when neither finds one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        return 0 if not entries or entries[0] == "-1" else len(entries)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.splitlines())


@dataclass
class DaskWorkerSummary(DeviceSummary):
    """One Dask worker's share of a run; a worker restarted by its nanny keeps its row."""

    worker: str = ""  # the nanny's address (stable across restarts), else the worker's
    name: str = ""  # the worker's Dask name
    pids: list[int] = field(default_factory=list)  # worker processes seen, the first and each restart

    @property
    def label(self) -> str:
        return f"{self.host} {self.name} ({self.device})"


@dataclass
class _Worker:
    address: str
    slot: str  # key of its DaskWorkerSummary
    hostname: str
    pid: int
    gpu: bool  # has a GPU resource: its slides ask for it
    task: str | None = None  # key of the slide it holds
    unusable: bool = False

    @property
    def owner(self) -> str:
        """What its claims say: host:pid."""
        return f"{self.hostname}:{self.pid}"


@dataclass
class _Task:
    index: int
    attempt: int
    address: str
    future: Any


class DaskScheduler:
    """Runs a batch's slides on Dask workers; the same contract as :class:`~nic_fast.batch.supervisor.Scheduler`."""

    def __init__(self, options: CompressOptions, target: DaskTarget, *, max_attempts: int = 2,
                 until_done: bool = False, stuck_s: float = 600.0,
                 on_event: Callable[[SchedulerEvent], None] | None = None,
                 on_result: Callable[[SlideResult], None] | None = None) -> None:
        self.options = options
        self.target = target
        self.max_attempts = max(1, max_attempts)
        self.until_done = until_done
        self.stuck_s = stuck_s
        self.on_event = on_event or (lambda event: None)
        self.on_result = on_result or (lambda result: None)

    def run(self, items: Sequence[SlideInput], settings: BatchSettings,
            ) -> tuple[list[SlideResult], list[DeviceSummary]]:
        _import_distributed()
        from nic_fast.batch.dask_worker import CompressorPlugin

        _quiet_dask_logs()
        with self._client() as (client, options, cpu_threads, gpu_from_name):
            plugin = CompressorPlugin(options, _plugin_name(options, cpu_threads, gpu_from_name),
                                      cpu_threads=cpu_threads, gpu_from_name=gpu_from_name)
            client.register_plugin(plugin)
            session = _Session(self, client, plugin.name, items, settings)
            return session.run()

    @contextlib.contextmanager
    def _client(self) -> Iterator[tuple[Any, CompressOptions, int | None, bool]]:
        """(client, the options workers use, torch threads per CPU worker, GPU picked by name)."""
        from distributed import Client

        target = self.target
        if target.kind == "address":
            try:
                client = Client(target.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"--dask {target.address}: cannot reach a Dask scheduler there ({exc}); start "
                                   f"one with `dask scheduler` and workers with `dask worker {target.address}`, or "
                                   "use --dask local") from exc
            with client:
                yield client, self.options, None, False
            return
        if target.kind == "local":
            cluster, options, cpu_threads = self._local_cluster()
            with cluster, Client(cluster, set_as_default=False) as client:
                yield client, options, cpu_threads, False
            return
        from nic_fast.batch.slurm import open_slurm_cluster

        cluster, options = open_slurm_cluster(target.slurm, self.options)
        with cluster, Client(cluster, set_as_default=False) as client:
            yield client, options, None, target.slurm.gpus_per_job > 1

    def _local_cluster(self) -> tuple[Any, CompressOptions, int]:
        """A scheduler and N nanny-supervised workers on 127.0.0.1; one GPU each on a GPU run."""
        from distributed import Nanny, Scheduler, SpecCluster

        target, options = self.target, self.options
        gpu = options.device.startswith("cuda")
        if gpu:
            count = local_gpus()
            if count == 0:
                raise ClusterError("--dask local --device cuda: no GPU found (nvidia-smi, CUDA_VISIBLE_DEVICES); "
                                   "use --device cpu")
            gpus = target.gpus or tuple(range(target.n_workers or count))
            missing = [g for g in gpus if g >= count]
            if missing:
                raise ClusterError(f"--dask local: asked for GPU {', '.join(map(str, missing))}, this machine has "
                                   f"{count} (indices 0..{count - 1})")
        n = len(gpus) if gpu else (target.n_workers or 1)
        cpu_threads = max(1, available_cpus() // n)
        if options.workers is None:  # the machine's cores are shared between the workers, as with --gpus
            options = replace(options, workers=cpu_threads)
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        workers = {}
        for rank in range(n):
            worker: dict[str, Any] = {"host": LOOPBACK, "nthreads": 1, "memory_limit": 0,
                                      "silence_logs": logging.WARNING, "dashboard_address": f"{LOOPBACK}:0"}
            if gpu:
                worker["resources"] = {"GPU": 1}
                worker["env"] = {"CUDA_VISIBLE_DEVICES": visible[gpus[rank]] if visible else str(gpus[rank])}
            workers[rank] = {"cls": Nanny, "options": worker}
        scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
        with _scheduler_handles_retries():
            cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING,
                                  name="nic-fast")
        return cluster, options, cpu_threads


def _quiet_dask_logs() -> None:
    """Dask's own INFO lines (every worker registered, every connection) only with -vv."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("distributed").setLevel(logging.WARNING)


@contextlib.contextmanager
def _scheduler_handles_retries() -> Iterator[None]:
    """A scheduler this process starts leaves retries of lost slides to the client's queue."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        yield


def _plugin_name(options: CompressOptions, cpu_threads: int | None, gpu_from_name: bool) -> str:
    """Clients with the same options share a worker's compressor; others get their own."""
    import hashlib
    import json

    from nic_fast.batch.run import options_json

    text = json.dumps([options_json(options), cpu_threads, gpu_from_name], sort_keys=True)
    return "nic-fast-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class _Session:
    """One client run: the queue, the workers seen, the slides in flight."""

    def __init__(self, owner: DaskScheduler, client: Any, plugin_name: str, items: Sequence[SlideInput],
                 settings: BatchSettings) -> None:
        self.owner = owner
        self.client = client
        self.plugin_name = plugin_name
        self.items = items
        self.settings = settings
        self.gpu = owner.options.device.startswith("cuda")
        self.topic = f"nic-fast-{settings.run.run_id}-{secrets.token_hex(3)}"
        self.pending: deque[tuple[int, int, str | None]] = deque(
            (i, 1, None) for i in largest_first([it.path for it in items]))
        self.tasks: dict[str, _Task] = {}
        self.workers: dict[str, _Worker] = {}
        self.gone: dict[str, _Worker] = {}  # workers that left, by address (their claims name them)
        self.rows: dict[str, DaskWorkerSummary] = {}
        self.lost_slots: set[str] = set()  # rows whose worker left: one that comes back is a restart
        self.results: dict[int, SlideResult] = {}
        self.held = HeldSlides(settings.out_dir, items, settings.lease_s, owner.stuck_s) if owner.until_done else None
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()  # finished futures, slide and cluster events
        self.started = time.perf_counter()
        self.refreshed_at = 0.0
        self.alone_since: float | None = time.monotonic()  # since when no usable worker is known
        self.any_ran = False

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> tuple[list[SlideResult], list[DeviceSummary]]:
        self.client.subscribe_topic(self.topic, lambda event: self.events.put(("slide", event[1])))
        self.client.subscribe_topic("all", lambda event: self.events.put(("cluster", event[1])))
        try:
            while self.pending or self.tasks or self.held:
                self._refresh_workers()
                if self.held:
                    self._take_back()
                self._assign()
                self._drain_events(POLL_S)
                if self._abandoned():
                    break
        except BaseException:  # Ctrl-C, SIGTERM: queued slides never start; running ones finish on their worker
            with contextlib.suppress(Exception):
                self.client.cancel([task.future for task in self.tasks.values()])
            raise
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone (that may be why we stop)
                self.client.unsubscribe_topic(self.topic)
                self.client.unsubscribe_topic("all")
        return [self.results[i] for i in range(len(self.items))], list(self.rows.values())

    # -- workers --------------------------------------------------------------------------
    def _refresh_workers(self, force: bool = False) -> None:
        """Learn workers that joined and notice those that left (also when no event said so)."""
        if not force and time.monotonic() - self.refreshed_at < REFRESH_S:
            return
        self.refreshed_at = time.monotonic()
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        for address in [a for a in self.workers if a not in info]:
            self._lost_worker(address, "left the cluster (killed, out of memory, or its node was lost)")
        for address, worker_info in info.items():
            if address not in self.workers:
                self._joined(address, worker_info)
        if any(not w.unusable and (w.gpu or not self.gpu) for w in self.workers.values()):
            self.alone_since = None
        elif self.alone_since is None:
            self.alone_since = time.monotonic()

    def _joined(self, address: str, info: dict[str, Any]) -> None:
        from nic_fast.batch.dask_worker import identify

        gpu = float((info.get("resources") or {}).get("GPU", 0)) >= 1
        if self.gpu and not gpu:
            return  # a CPU-only worker takes no slides of a GPU run
        try:
            who = self.client.run(identify, workers=[address])[address]
        except Exception as exc:  # noqa: BLE001 - it left already, or cannot run functions: not ours to use
            log.debug("worker %s could not be identified: %s", address, exc)
            return
        slot = info.get("nanny") or address
        row = self.rows.get(slot)
        if row is None:
            row = self.rows[slot] = DaskWorkerSummary(self.owner.options.device, host=who["hostname"], worker=slot,
                                                      name=str(info.get("name", address)))
        elif slot in self.lost_slots:
            row.restarts += 1
            self.lost_slots.discard(slot)
        row.pids.append(int(who["pid"]))
        self.workers[address] = _Worker(address, slot, who["hostname"], int(who["pid"]), gpu)

    def _lost_worker(self, address: str, reason: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is None:
            return
        self.gone[address] = worker
        row = self.rows[worker.slot]
        row.lost.append(f"{worker.owner} {reason}")
        self.lost_slots.add(worker.slot)
        log.warning("Dask worker %s (%s) %s", address, worker.owner, reason)
        if worker.task is not None:
            self._lose_task(worker.task, reason)

    def _lose_task(self, key: str, reason: str) -> None:
        """The slide of task ``key`` was lost with its worker: retry it or report it failed."""
        task = self.tasks.pop(key, None)
        if task is None:
            return
        worker = self.workers.get(task.address) or self.gone.get(task.address)
        if worker is not None and worker.task == key:
            worker.task = None
        with contextlib.suppress(Exception):  # the scheduler may have forgotten it already
            task.future.cancel()
        self._retry_or_fail(task, worker, reason)

    def _assign(self) -> None:
        from nic_fast.batch.dask_worker import compress_on_worker

        for worker in self.workers.values():
            if not self.pending:
                return
            if worker.task is not None or worker.unusable:
                continue
            index, attempt, lost_owner = self.pending.popleft()
            item = self.items[index]
            key = f"nic-fast-{self.settings.run.run_id}-{index}-{attempt}-{secrets.token_hex(3)}"
            future = self.client.submit(
                compress_on_worker, self.plugin_name, str(item.path), item.name, attempt, self.settings, lost_owner,
                self.topic, key, key=key, workers=[worker.address], allow_other_workers=False, pure=False,
                resources={"GPU": 1} if worker.gpu else None)
            self.tasks[key] = _Task(index, attempt, worker.address, future)
            worker.task = key
            future.add_done_callback(lambda done: self.events.put(("done", done)))  # wakes the loop at once
            self.owner.on_event(SchedulerEvent("assigned", self.rows[worker.slot].label, worker.pid, item.path,
                                               attempt))

    # -- what comes back ------------------------------------------------------------------
    def _drain_events(self, timeout_s: float) -> None:
        """Handle what arrived, waiting up to ``timeout_s`` for the first thing."""
        try:
            kind, message = self.events.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            if kind == "done":
                self._finished(message)
            elif kind == "slide":
                self._slide_event(message)
            elif isinstance(message, dict) and message.get("action") == "remove-worker":
                self._lost_worker(str(message.get("worker")), "left the cluster (killed, out of memory, or its node "
                                                               "was lost)")
            try:
                kind, message = self.events.get_nowait()
            except queue.Empty:
                return

    def _slide_event(self, message: dict[str, Any]) -> None:
        task = self.tasks.get(str(message.get("key")))
        worker = self.workers.get(task.address) if task else None
        if task is None or worker is None:
            return
        label = self.rows[worker.slot].label
        self.owner.on_event(SchedulerEvent(str(message["kind"]), label, worker.pid, self.items[task.index].path,
                                           task.attempt, patches=int(message.get("patches", 0))))

    def _finished(self, future: Any) -> None:
        from nic_fast.batch.dask_worker import TaskError, WorkerUnusable

        task = self.tasks.get(future.key)
        if task is None:  # given up on already (its worker left)
            return
        if future.status == "finished":
            try:
                result = future.result(timeout=RESULT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the worker left with the result: the slide is lost
                self._lose_task(future.key, f"left with the slide's result ({type(exc).__name__})")
                return
            self._settle(future.key)
            self._done(task, result)
            return
        exc = future.exception(timeout=RESULT_TIMEOUT_S) if future.status == "error" else None
        if isinstance(exc, WorkerUnusable):
            worker = self._settle(future.key)
            if worker is not None:
                worker.unusable = True
                self.rows[worker.slot].lost.append(f"could not start: {exc}")
            log.error("%s", exc)
            self.pending.appendleft((task.index, task.attempt, None))  # not the slide's fault: not an attempt
        elif isinstance(exc, TaskError):
            self._settle(future.key)
            item = self.items[task.index]
            result = SlideResult(str(item.path), "failed", f"{item.path}: {exc}", device=self.owner.options.device,
                                 attempts=task.attempt)
            record_result(self.settings, item, result)
            self._done(task, result)
        else:  # KilledWorker, or cancelled by the scheduler: the worker died with the slide
            self._refresh_workers(force=True)  # the worker's departure retries the slide, with its owner
            self._lose_task(future.key, f"died ({type(exc).__name__ if exc else future.status})")

    def _settle(self, key: str) -> _Worker | None:
        """Forget task ``key``; its worker (if still there) is free again."""
        task = self.tasks.pop(key)
        worker = self.workers.get(task.address)
        if worker is not None and worker.task == key:
            worker.task = None
        return worker

    def _done(self, task: _Task, result: SlideResult) -> None:
        self.any_ran = True
        if self.held is not None and result.held_by:  # another process has it: look again later
            self.held.add(task.index, result)
            return
        worker = self.workers.get(task.address) or self.gone.get(task.address)
        self._final(task.index, result, self.rows[worker.slot] if worker else None, worker)

    def _final(self, index: int, result: SlideResult, row: DaskWorkerSummary | None, worker: _Worker | None) -> None:
        self.results[index] = result
        if row is not None:
            row.device = result.device or row.device
            row.add(result, time.perf_counter() - self.started)
        self.owner.on_result(result)
        self.owner.on_event(SchedulerEvent("done", row.label if row else "", worker.pid if worker else 0,
                                           self.items[index].path, result.attempts, result=result))

    def _retry_or_fail(self, task: _Task, worker: _Worker | None, reason: str) -> None:
        item = self.items[task.index]
        row = self.rows.get(worker.slot) if worker is not None else None
        label = row.label if row is not None else task.address
        pid = worker.pid if worker is not None else 0
        self.owner.on_event(SchedulerEvent("died", label, pid, item.path, task.attempt, reason=reason))
        lost_owner = worker.owner if worker is not None else None
        if task.attempt < self.owner.max_attempts:
            self.pending.appendleft((task.index, task.attempt + 1, lost_owner))  # to the front: it has a partial store
            return
        if lost_owner:
            claims.break_lost(store_path(self.settings.out_dir, item.name), lost_owner)
        result = SlideResult(str(item.path), "failed",
                             f"the Dask worker {label} {reason} while compressing it (attempt {task.attempt} of "
                             f"{self.owner.max_attempts}); rerun to retry: the store resumes from its finished tiles",
                             device=self.owner.options.device, attempts=task.attempt)
        record_result(self.settings, item, result)
        self._final(task.index, result, row, None)

    def _take_back(self) -> None:
        assert self.held is not None
        ready, given_up = self.held.due()
        for index in ready:
            self.pending.appendleft((index, 1, None))
        for index, result in given_up:
            record_result(self.settings, self.items[index], result)
            self._final(index, result, None, None)

    def _abandoned(self) -> bool:
        """True when no usable worker has been there for the target's wait: every slide left
        is then failed (or, when no slide ever ran, the run is refused as a set-up problem)."""
        if self.alone_since is None or self.tasks:
            return False
        none_will_come = self.owner.target.kind == "local" and self.workers and \
            all(w.unusable for w in self.workers.values())  # this run started them all, and all failed
        if not none_will_come and time.monotonic() - self.alone_since < self.owner.target.wait_s:
            return False
        lost = "; ".join(reason for row in self.rows.values() for reason in row.lost)
        if self.workers and all(w.unusable for w in self.workers.values()):
            why = f"no Dask worker could compress: {lost}"
        else:
            kind = "with a GPU resource (start workers with --resources GPU=1) " if self.gpu else ""
            why = f"no Dask worker {kind}was there for {self.owner.target.wait_s:.0f} s" + (f" ({lost})" if lost else "")
        if not self.any_ran:
            raise ClusterError(f"--dask {self.owner.target.describe()}: {why}")
        while self.pending:
            index, attempt, _ = self.pending.popleft()
            item = self.items[index]
            result = SlideResult(str(item.path), "failed", f"{why}; rerun to compress it", attempts=attempt)
            record_result(self.settings, item, result)
            self._final(index, result, None, None)
        for index, result in self.held.drain() if self.held is not None else []:
            self._final(index, result, None, None)
        return True

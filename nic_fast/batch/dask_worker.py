"""The Dask worker's side of ``compress --dask``: one compressor per worker, one slide at a time.

:class:`CompressorPlugin` is registered by the client; the scheduler hands it to every
worker that is or will be part of the cluster (also to a worker its nanny restarted). On
its first slide the worker builds its :class:`~nic_fast.compress.Compressor` — encoder
loaded, CUDA context and buffers made — and keeps it for every later slide. Slides run
one at a time per worker, under a lock: a GPU worker's ``GPU`` resource already keeps
Dask from starting two, the lock also covers CPU workers shared by several clients.

Every slide goes through :func:`~nic_fast.batch.slide.process_slide`, so a Dask worker
honours the same claims and writes the same records as any other process. Progress goes
back to the client as Dask worker events (``log_event``), a few per second at most.

This module imports Dask at the top and torch only inside the worker: the client
imports it to name the plugin and the task, and stays free of torch and CUDA.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.slide import BatchSettings
from nic_fast.job import CompressOptions, SlideResult

__all__ = ["CompressorPlugin", "TaskError", "WorkerUnusable", "compress_on_worker", "identify"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # patches encoded are reported to the client at most this often


class WorkerUnusable(Exception):
    """This worker cannot build a compressor (no GPU, encoder missing there): give its slides to others."""


class TaskError(Exception):
    """An unexpected error outside the slide's own compression, as one line (no torch objects travel)."""


def identify() -> dict[str, Any]:
    """Who a worker is in claim files: its host name and process id (run by ``Client.run``)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}


class CompressorPlugin(WorkerPlugin):
    """Holds one worker's compressor, built on the first slide and reused for the others.

    ``cpu_threads``: torch threads on a CPU worker (None: the worker's ``nthreads``).
    ``gpu_from_name``: the worker is one of several in a job that sees several GPUs (Slurm
    ``--gpus-per-job`` > 1, ``dask worker --nworkers G``): it takes the GPU whose position
    in ``CUDA_VISIBLE_DEVICES`` is the number its name ends with (``...-0``, ``...-1``).
    """

    idempotent = True  # a second client with the same options keeps the workers' compressors

    def __init__(self, options: CompressOptions, name: str, *, cpu_threads: int | None = None,
                 gpu_from_name: bool = False) -> None:
        self.options = options
        self.name = name  # the registration name: clients with the same options share the compressor
        self.cpu_threads = cpu_threads
        self.gpu_from_name = gpu_from_name
        self._compressor: Any = None
        self._error = ""

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        if self.gpu_from_name:
            _pin_gpu(str(worker.name))

    def compressor(self) -> Any:
        """The worker's compressor, built once; :class:`WorkerUnusable` when it cannot be."""
        if self._compressor is None and not self._error:
            import torch

            from nic_fast.compress import Compressor, failure_reason

            if self.options.device == "cpu":
                torch.set_num_threads(self.cpu_threads or max(1, int(self.worker.state.nthreads)))
            try:
                self._compressor = Compressor(self.options)
            except Exception as exc:  # noqa: BLE001 - reported to the client, which stops using this worker
                self._error = failure_reason(exc)
        if self._error:
            raise WorkerUnusable(f"{socket.gethostname()}: cannot build the compressor: {self._error}")
        return self._compressor

    def run(self, item: SlideInput, settings: BatchSettings, attempt: int, lost_owner: str | None,
            topic: str, key: str) -> SlideResult:
        from nic_fast.batch.slide import process_slide

        with self._lock:
            compressor = self.compressor()
            events = _Events(self.worker, topic, key)
            result = process_slide(compressor, item, settings, attempt=attempt, lost_owner=lost_owner,
                                   on_start=lambda _slide, patches: events.send("planned", patches),
                                   progress=events.progress)
            events.flush()
            return result


def compress_on_worker(plugin_name: str, path: str, name: str, attempt: int, settings: BatchSettings,
                       lost_owner: str | None, topic: str, key: str) -> SlideResult:
    """The Dask task: one slide through this worker's compressor (see :class:`CompressorPlugin`)."""
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None:
        raise WorkerUnusable(f"{socket.gethostname()}: the nic-fast plugin {plugin_name} is not registered here")
    try:
        return plugin.run(SlideInput(Path(path), name), settings, attempt, lost_owner, topic, key)
    except WorkerUnusable:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug outside the slide's compression: one line, no torch objects
        log.exception("nic-fast task %s failed", key)
        raise TaskError(f"{type(exc).__name__}: {exc}") from None


class _Events:
    """A slide's progress as worker events on the client's topic, batched."""

    def __init__(self, worker: Any, topic: str, key: str) -> None:
        self.worker = worker
        self.topic = topic
        self.key = key
        self.pending = 0
        self.sent_at = 0.0

    def send(self, kind: str, patches: int) -> None:
        self.worker.log_event(self.topic, {"kind": kind, "key": self.key, "patches": int(patches)})

    def progress(self, patches: int) -> None:
        self.pending += patches
        if time.monotonic() - self.sent_at >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.send("progress", self.pending)
            self.pending = 0
        self.sent_at = time.monotonic()


def _pin_gpu(worker_name: str) -> None:
    """Make the worker see only its own GPU (before CUDA starts in this process)."""
    match = re.search(r"-(\d+)$", worker_name)
    if match is None:
        return
    rank = int(match.group(1))
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[rank] if rank < len(visible) else str(rank)

"""A batch run: slides → (supervised workers | this process) → records → summary.

:func:`run_batch` is what ``nic-fast compress`` runs on one machine, and what the
cluster launchers run per worker: it writes the run's own description
(``OUT/runs/<run id>.json``), compresses every slide under the batch contract
(:mod:`nic_fast.batch.slide`), and rebuilds ``OUT/summary.json`` from every record in
the folder as slides finish (at most every few seconds) and once more at the end —
also when the run is interrupted, so the summary never describes an older run.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nic_fast.batch import claims
from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.records import RunInfo, SummaryBuilder, SummaryError, iso_time, write_run
from nic_fast.batch.slide import BatchSettings, process_slide, record_result
from nic_fast.batch.supervisor import DEFAULT_STUCK_S, DeviceSummary, Scheduler, SchedulerEvent, largest_first
from nic_fast.batch.watch import HeldSlides
from nic_fast.job import CompressOptions, SlideResult
from nic_fast.report import write_report

if TYPE_CHECKING:
    from nic_fast.batch.dask_cluster import DaskTarget

__all__ = ["BatchOutcome", "options_json", "run_batch"]

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 5.0  # a long batch rebuilds its summary at most this often (and always at the end)


@dataclass
class BatchOutcome:
    results: list[SlideResult]  # one per input slide, in input order
    workers: list[DeviceSummary]
    summary: dict[str, Any] | None  # None when it could not be written (see summary_error)
    summary_error: str = ""
    run: RunInfo = field(default_factory=RunInfo)


def options_json(options: CompressOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


class _SummaryKeeper:
    """Rebuilds the summary when a slide finishes, at most every SUMMARY_EVERY_S."""

    def __init__(self, out_dir: Path, report: bool) -> None:
        self.builder = SummaryBuilder(out_dir)
        self.out_dir = out_dir
        self.report = report  # also OUT/report.html
        self.last = 0.0
        self.error = ""

    def maybe_write(self) -> None:
        if time.monotonic() - self.last >= SUMMARY_EVERY_S:
            self.write()

    def write(self) -> dict[str, Any] | None:
        self.last = time.monotonic()
        try:
            summary = self.builder.write()
            if self.report:
                write_report(self.out_dir, summary)
        except SummaryError as exc:
            self.error = str(exc)
            return None
        except OSError as exc:
            self.error = f"cannot write {self.out_dir / 'report.html'}: {exc.strerror or exc}"
            return None
        self.error = ""
        return summary


def run_batch(options: CompressOptions, items: Sequence[SlideInput], out_dir: Path, *,
              devices: Sequence[str] | None = None, dask: DaskTarget | None = None,
              lease_s: float = claims.DEFAULT_LEASE_S, max_attempts: int = 2, stuck_s: float = DEFAULT_STUCK_S,
              until_done: bool = False, qc: bool = True, command: str = "",
              on_event: Callable[[SchedulerEvent], None] | None = None,
              on_result: Callable[[SlideResult], None] | None = None) -> BatchOutcome:
    """Compress ``items`` into ``out_dir``.

    ``devices``: one supervised worker process per entry (``["cpu"]``, ``["cuda:0", "cuda:1"]``);
    None compresses in this process (no crash isolation: for libraries and tests). ``qc``:
    a QC image per published store and ``OUT/report.html`` beside the summary.
    ``dask``: run on a Dask cluster instead (:mod:`nic_fast.batch.dask_cluster`); this process
    is then only the client and never imports torch.
    ``until_done``: slides skipped because another process holds them are watched until
    they are complete or their claim goes stale, then taken over (:mod:`nic_fast.batch.watch`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.expected_slides is None:  # each compressor weighs compiling against its share of the run
        options = replace(options, expected_slides=max(1, math.ceil(len(items) / max(1, len(devices or [None])))))
    run = RunInfo(command=command, options=options_json(options))
    settings = BatchSettings(out_dir, run, overwrite=options.overwrite, lease_s=lease_s, qc=qc)
    keeper = _SummaryKeeper(out_dir, report=qc)
    write_run(out_dir, run)

    def finished(result: SlideResult) -> None:
        if on_result:
            on_result(result)
        keeper.maybe_write()

    workers: list[DeviceSummary] = []
    try:
        if dask is not None:
            from nic_fast.batch.dask_cluster import DaskScheduler

            cluster = DaskScheduler(options, dask, max_attempts=max_attempts, until_done=until_done,
                                    stuck_s=stuck_s, on_event=on_event, on_result=finished)
            results, workers = cluster.run(items, settings)
        elif devices is None:
            held = HeldSlides(out_dir, items, lease_s, stuck_s) if until_done else None
            results, workers = _in_process(options, items, settings, held, on_event, finished)
        else:
            scheduler = Scheduler(options, devices, max_attempts=max_attempts, stuck_s=stuck_s,
                                  until_done=until_done, on_event=on_event, on_result=finished)
            results, workers = scheduler.run(items, settings)
    except BaseException:
        run.interrupted = True
        raise
    finally:
        run.finished_at = iso_time()
        run.workers = [w.row() for w in workers]
        try:
            write_run(out_dir, run)
        except SummaryError as exc:
            keeper.error = str(exc)
        summary = keeper.write()
    return BatchOutcome(results, workers, summary, keeper.error, run)


def _in_process(options: CompressOptions, items: Sequence[SlideInput], settings: BatchSettings,
                held: HeldSlides | None, on_event: Callable[[SchedulerEvent], None] | None,
                finished: Callable[[SlideResult], None]) -> tuple[list[SlideResult], list[DeviceSummary]]:
    from nic_fast.compress import Compressor

    compressor = Compressor(options)
    device = str(compressor.device)
    summary = DeviceSummary(device, host=settings.run.host)
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    results: dict[int, SlideResult] = {}
    queue = deque(largest_first([item.path for item in items]))
    try:
        while queue or held:
            if held:
                if not queue:
                    time.sleep(held.wait_s())
                ready, given_up = held.due()
                queue.extendleft(ready)
                for index, result in given_up:
                    record_result(settings, items[index], result)
                    results[index] = result
                    finished(result)
                    emit(SchedulerEvent("done", "", settings.run.pid, items[index].path, 1, result=result))
                if not queue:
                    continue
            index = queue.popleft()
            item = items[index]
            if queue:  # a GPU engine prepares the next slide while this one streams
                compressor.prefetch(items[queue[0]].path)
            emit(SchedulerEvent("assigned", device, settings.run.pid, item.path, 1))
            result = process_slide(
                compressor, item, settings,
                on_start=lambda slide, n: emit(SchedulerEvent("planned", device, settings.run.pid, slide, 1,
                                                              patches=n)),
                progress=lambda n, p=item.path: emit(SchedulerEvent("progress", device, settings.run.pid, p, 1,
                                                                    patches=n)))
            if held is not None and result.held_by:  # another process has it: look again later
                held.add(index, result)
                continue
            results[index] = result
            summary.add(result, time.perf_counter() - started)
            finished(result)
            emit(SchedulerEvent("done", device, settings.run.pid, item.path, 1, result=result))
    finally:
        compressor.close()  # a slide prepared ahead and never compressed
    return [results[i] for i in range(len(items))], [summary]

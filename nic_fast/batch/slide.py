"""One slide under the batch contract: skip, stale, claim, compress, record.

Whoever compresses a slide — this process, a ``--gpus`` worker, a Dask worker, a Slurm
array task — goes through :func:`process_slide`, so the guarantees are the same
everywhere: a complete store whose source still matches is skipped; one whose source
changed is reported stale; otherwise the slide is claimed (or skipped while another
process holds it), compressed, published only by the claim's owner, and its outcome
written as its own record.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nic_fast.batch import claims
from nic_fast.batch.inputs import SlideInput
from nic_fast.batch.records import RunInfo, SummaryError, iso_time, record_path, write_record
from nic_fast.job import SlideResult, stale_reason
from nic_fast.store import read_attrs, store_path

if TYPE_CHECKING:
    from nic_fast.compress import Compressor

ProgressFn = Callable[[int], None]

__all__ = ["BatchSettings", "process_slide", "record_result"]

log = logging.getLogger(__name__)


class BatchSettings:
    """What every slide of a batch shares besides the compressor: where, who, how."""

    def __init__(self, out_dir: Path, run: RunInfo, *, overwrite: bool = False,
                 lease_s: float = claims.DEFAULT_LEASE_S, qc: bool = True) -> None:
        self.out_dir = Path(out_dir).absolute()  # records name stores by absolute path: runs may start anywhere
        self.run = run
        self.overwrite = overwrite
        self.lease_s = lease_s
        self.qc = qc  # draw OUT/qc/<name>.png for each published store
        self.started_at = run.started_epoch


def process_slide(compressor: Compressor, item: SlideInput, settings: BatchSettings, *, attempt: int = 1,
                  on_start: Callable[[Path, int], None] | None = None, progress: ProgressFn | None = None,
                  lost_owner: str | None = None) -> SlideResult:
    """Compress one slide unless it is done, stale or being done elsewhere; record the outcome.

    ``lost_owner`` (``host:pid``): a process known to be gone whose claim on the slide is
    taken over at once (a cluster worker that died with this slide).
    """
    result = _process(compressor, item, settings, on_start, progress, lost_owner)
    result.attempts = attempt
    if settings.qc and result.status == "ok" and result.store:
        _draw_qc(settings, Path(result.store))
    record_result(settings, item, result)
    return result


def _draw_qc(settings: BatchSettings, store: Path) -> None:
    """The store's QC image; a drawing problem is logged, never a failed slide."""
    from nic_fast.report import qc_path, write_qc_image

    try:
        write_qc_image(store, qc_path(settings.out_dir, store))
    except Exception as exc:  # noqa: BLE001 - the store is fine; only its picture is missing
        log.warning("%s: no QC image (%s: %s)", store, type(exc).__name__, exc)


def _process(compressor: Compressor, item: SlideInput, settings: BatchSettings,
             on_start: Callable[[Path, int], None] | None, progress: ProgressFn | None,
             lost_owner: str | None) -> SlideResult:
    final = store_path(settings.out_dir, item.name)
    device = str(compressor.device)
    done = _already_done(final, item.path, settings)
    if done is not None:
        return SlideResult(str(item.path), done[0], done[1], str(final), device=device)
    claim = claims.acquire(final, run_id=settings.run.run_id, lease_s=settings.lease_s, lost_owner=lost_owner)
    if isinstance(claim, claims.ClaimHeld):
        holder = claim.info.owner if claim.info else "unknown"
        return SlideResult(str(item.path), "skipped", claim.reason, str(final), device=device, held_by=holder)
    with claim.kept():
        done = _already_done(final, item.path, settings)  # published by another process while we claimed
        if done is not None:
            return SlideResult(str(item.path), done[0], done[1], str(final), device=device)
        return compressor.compress_slide(item.path, final, replace=final.exists(), run_id=settings.run.run_id,
                                         still_owned=claim.still_owned, on_start=on_start, progress=progress)


def _already_done(final: Path, slide: Path, settings: BatchSettings) -> tuple[str, str] | None:
    """(status, reason) when the complete store means there is nothing to do, else None."""
    attrs = read_attrs(final)
    if attrs is None and final.exists():
        return "failed", (f"{final} exists but is not a nic-fast store; move it away or choose another output "
                          "folder (nothing was overwritten)")
    if attrs is None or attrs.get("status") != "complete":
        return None
    if settings.overwrite and float(attrs.get("completed_at", 0)) < settings.started_at:
        return None  # --overwrite redoes stores finished before this run, not those another process just made
    if settings.overwrite:
        return "skipped", "complete store made during this run by another process"
    stale = stale_reason(attrs, slide)
    if stale is not None:
        return "stale", stale
    return "skipped", "complete store exists (use --overwrite to redo)"


def record_result(settings: BatchSettings, item: SlideInput, result: SlideResult) -> dict[str, Any]:
    """Write the slide's outcome record; a full disk is logged, never fatal to the batch."""
    run = settings.run
    record = {**asdict(result), "host": socket.gethostname(), "pid": os.getpid(), "run_id": run.run_id,
              "finished_at": iso_time(), "finished_epoch": time.time()}
    if record["grid_shape"] is not None:
        record["grid_shape"] = list(record["grid_shape"])
    if result.status == "skipped" and _recorded_outcome(settings, item) in ("ok", "failed", "stale"):
        return record  # a retry that found the store this run already published: keep what happened
    try:
        write_record(settings.out_dir, item.name, run.run_id, record)
    except SummaryError as exc:
        log.error("%s", exc)
    return record


def _recorded_outcome(settings: BatchSettings, item: SlideInput) -> str | None:
    try:
        return json.loads(record_path(settings.out_dir, item.name, settings.run.run_id).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None

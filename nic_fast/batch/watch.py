"""Slides another process holds, watched until they are done (``--until-done``).

A run skips a slide whose claim another process keeps fresh. That is enough when the
holder finishes it; it is not when the holder is killed or preempted (a Slurm array task
on a lost node): its claim goes stale after the lease, and no process is left to take
the slide over. A run ``until_done`` therefore keeps every slide it skipped for a held
claim and looks at it again every fraction of the lease. A slide whose store became
complete, or whose claim went stale or was released, goes back to the run's queue,
where :func:`~nic_fast.batch.slide.process_slide` skips the complete store, or takes over
the stale claim and resumes the partial store from its finished tiles.

Every watch ends: a holder that keeps its claim fresh but whose partial store has not
changed for ``stall_s`` (the run's stuck timeout: it hangs inside a native call with its refresher thread still
running) is given up on, and the slide is reported skipped with that reason.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nic_fast.batch import claims
from nic_fast.batch.inputs import SlideInput
from nic_fast.job import SlideResult
from nic_fast.store import read_attrs, store_path

__all__ = ["HeldSlides", "poll_interval_s"]

MIN_POLL_S = 0.1
MAX_POLL_S = 30.0


def poll_interval_s(lease_s: float) -> float:
    """A quarter of the lease (as often as holders refresh their claims), within [0.1 s, 30 s]."""
    return min(MAX_POLL_S, max(MIN_POLL_S, lease_s / 4))


@dataclass
class _Watched:
    result: SlideResult  # the skip that put the slide here
    signature: tuple[str, int, int]  # (claim token, files, newest mtime) of what the holder writes
    changed_at: float  # monotonic time the signature last changed


class HeldSlides:
    """Indices of a run's slides that are held by other processes, and when to take them back."""

    def __init__(self, out_dir: Path, items: Sequence[SlideInput], lease_s: float, stall_s: float) -> None:
        self.out_dir = Path(out_dir)
        self.items = items
        self.lease_s = lease_s
        self.stall_s = stall_s
        self.poll_s = poll_interval_s(lease_s)
        self._watched: dict[int, _Watched] = {}
        self._next_check = 0.0

    def __len__(self) -> int:
        return len(self._watched)

    def add(self, index: int, result: SlideResult) -> None:
        """Watch slide ``index``, skipped in ``result`` because another process held it."""
        final = store_path(self.out_dir, self.items[index].name)
        self._watched[index] = _Watched(result, _signature(final), time.monotonic())
        self._next_check = min(self._next_check or float("inf"), time.monotonic() + self.poll_s)

    def wait_s(self) -> float:
        """Seconds until the next look (0 when one is due); for loops that have nothing else to do."""
        return max(0.0, self._next_check - time.monotonic()) if self._watched else 0.0

    def drain(self) -> list[tuple[int, SlideResult]]:
        """Stop watching: every slide still held, with the skip that put it here."""
        left = [(index, watched.result) for index, watched in self._watched.items()]
        self._watched.clear()
        return left

    def due(self) -> tuple[list[int], list[tuple[int, SlideResult]]]:
        """(slides to put back in the queue, slides given up on with their final result).

        Looks at most once per poll interval; cheap otherwise.
        """
        now = time.monotonic()
        if not self._watched or now < self._next_check:
            return [], []
        self._next_check = now + self.poll_s
        ready, given_up = [], []
        for index, watched in list(self._watched.items()):
            final = store_path(self.out_dir, self.items[index].name)
            attrs = read_attrs(final)
            if (attrs is not None and attrs.get("status") == "complete") or \
                    claims.held(final, lease_s=self.lease_s) is None:
                ready.append(index)
                del self._watched[index]
                continue
            signature = _signature(final)
            if signature != watched.signature:
                watched.signature, watched.changed_at = signature, now
            elif now - watched.changed_at >= self.stall_s:
                del self._watched[index]
                result = watched.result
                result.reason = (f"{result.reason}; its holder kept the claim but wrote nothing for "
                                 f"{now - watched.changed_at:.0f} s, so this run stopped waiting for it")
                given_up.append((index, result))
        return ready, given_up


def _signature(final: Path) -> tuple[str, int, int]:
    """What changes while a holder works on a slide: its claim's token, and the number and
    newest modification time of the files of the partial store."""
    info = claims.current(final)
    token = info.token if info is not None else ""
    count, newest = 0, 0
    stack = [final.with_name(final.name + ".partial")]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                count += 1
                try:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
                except FileNotFoundError:
                    continue
    return token, count, newest

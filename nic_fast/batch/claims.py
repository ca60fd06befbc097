"""Per-slide claims: one writer per store, however many processes, runs or hosts share a folder.

A claim is a small JSON file ``<store>.claim`` beside the store, created with
``O_CREAT | O_EXCL`` — atomic on local disks and NFSv3+, so of any number of processes
trying at once exactly one gets it. The owner refreshes the file's mtime every
``lease_s / 4`` seconds while it works. A claim whose mtime is older than its lease
belongs to a process that died (or hangs): it is broken by renaming it away to a name
unique to the generation being broken, then claimed anew with the next generation.

A process can lose its claim (it stalled for longer than the lease and another process
broke it). Everything irreversible — publishing the store, deleting a ``.partial`` —
is therefore preceded by :meth:`Claim.still_owned`, which re-reads the file and
compares the owner's random token.

A cluster client that learns from its scheduler that a worker died may name that
worker's process as a *lost owner* (``host:pid``): its claim is taken over at once, on
any host, instead of after the lease.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["DEFAULT_LEASE_S", "Claim", "ClaimHeld", "ClaimInfo", "acquire", "break_lost", "claim_path",
           "clear_if_owner_dead", "current", "held"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 120.0
_SUFFIX = ".claim"


def claim_path(store: Path) -> Path:
    """The claim file of a store: ``<name>.zarr.claim`` in the store's folder."""
    return store.with_name(store.name + _SUFFIX)


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file holds: who works on the slide, since when, which generation."""

    host: str
    pid: int
    run_id: str
    started_at: float  # time.time() of the claim
    generation: int  # 1 for a first claim, +1 each time a stale claim is broken
    token: str  # random: tells this owner's claim from a successor's
    boot_id: str = ""  # the host's boot: a pid means something only within one boot of one host

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}"

    def owner_is_dead(self) -> bool:
        """True when the owner ran on this machine, in this boot, and its process is gone: its
        claim is stale at once (a crashed worker's slide is retried without waiting a lease)."""
        if self.host != socket.gethostname() or not self.boot_id or self.boot_id != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ClaimHeld:
    """Another process holds a fresh claim on the slide."""

    info: ClaimInfo | None  # None: the file could not be read (being written right now)
    age_s: float

    @property
    def reason(self) -> str:
        who = self.info.owner if self.info else "another process"
        run = f", run {self.info.run_id}" if self.info else ""
        return f"being compressed by {who}{run} (claim refreshed {self.age_s:.0f} s ago)"


class Claim:
    """A claim this process holds; :meth:`kept` refreshes it in the background."""

    def __init__(self, path: Path, info: ClaimInfo, lease_s: float, broke: ClaimInfo | None) -> None:
        self.path = path
        self.info = info
        self.lease_s = lease_s
        self.broke = broke  # the stale claim this one replaced, if any
        self._lost = False

    def still_owned(self) -> bool:
        """Whether the claim file is still this process's (re-read: another may have broken it)."""
        if self._lost:
            return False
        current = _read(self.path)
        self._lost = current is None or current.token != self.info.token
        return not self._lost

    def refresh(self) -> bool:
        """Push the claim's mtime forward; False once the claim is no longer ours."""
        if not self.still_owned():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._lost = True
        return not self._lost

    def release(self) -> None:
        """Remove the claim if it is still ours (a successor's claim is left alone)."""
        if self.still_owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._lost = True

    @contextlib.contextmanager
    def kept(self) -> Iterator[Claim]:
        """Refresh every lease / 4 seconds on a background thread; release at the end."""
        stop = threading.Event()
        interval = max(0.05, self.lease_s / 4)

        def keep() -> None:
            while not stop.wait(interval):
                if not self.refresh():
                    log.warning("%s: claim lost (another process broke it after its lease); this process will "
                                "not publish the store", self.path)
                    return

        thread = threading.Thread(target=keep, name="nic-fast-claim", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()


def acquire(store: Path, *, run_id: str, lease_s: float = DEFAULT_LEASE_S,
            lost_owner: str | None = None) -> Claim | ClaimHeld:
    """Claim ``store`` for this process, breaking a claim older than its lease (or one held
    by ``lost_owner``, a ``host:pid`` known to be gone).

    Returns the :class:`Claim`, or :class:`ClaimHeld` when another process holds a fresh one.
    """
    path = claim_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = _create(path, run_id, generation=1)
    if created is not None:
        return Claim(path, created, lease_s, broke=None)
    for _ in range(3):  # the holder may release or a breaker may win between our steps: look again
        age_s = _age_s(path)
        current = _read(path)
        if age_s is None:  # released just now
            created = _create(path, run_id, generation=1)
            if created is not None:
                return Claim(path, created, lease_s, broke=None)
            continue
        if age_s <= lease_s and not _gone(current, lost_owner):
            return ClaimHeld(current, age_s)
        if not _break(path, current):
            continue
        generation = current.generation + 1 if current else 2
        created = _create(path, run_id, generation=generation)
        if created is not None:
            log.warning("%s: took over a stale claim of %s (generation %d, silent for %.0f s)", store,
                        current.owner if current else "an unknown process", generation - 1, age_s)
            return Claim(path, created, lease_s, broke=current)
    age_s = _age_s(path) or 0.0
    return ClaimHeld(_read(path), age_s)


def held(store: Path, *, lease_s: float = DEFAULT_LEASE_S) -> ClaimHeld | None:
    """The fresh claim another process holds on ``store``, or None when it could be claimed
    now (no claim, a stale one, or one whose local owner is dead). Changes nothing."""
    path = claim_path(store)
    age_s = _age_s(path)
    if age_s is None:
        return None
    current = _read(path)
    if age_s > lease_s or _gone(current, None):
        return None
    return ClaimHeld(current, age_s)


def current(store: Path) -> ClaimInfo | None:
    """Who holds ``store``'s claim now, None when nobody does (or the file is being written)."""
    return _read(claim_path(store))


def break_lost(store: Path, lost_owner: str) -> bool:
    """Remove ``store``'s claim when ``lost_owner`` (``host:pid``) holds it: a worker that the
    cluster reported dead, whose slide is given up, so that a rerun need not wait the lease."""
    path = claim_path(store)
    info = _read(path)
    if info is None or info.owner != lost_owner:
        return False
    return _break(path, info)


def _gone(info: ClaimInfo | None, lost_owner: str | None) -> bool:
    """Whether the claim's owner is known to be gone: a dead local process, or the lost owner."""
    return info is not None and (info.owner_is_dead() or (lost_owner is not None and info.owner == lost_owner))


def clear_if_owner_dead(store: Path) -> bool:
    """Remove ``store``'s claim when its owner was a process of this machine that is gone
    (a worker this run killed or lost), so a rerun elsewhere need not wait out the lease."""
    path = claim_path(store)
    info = _read(path)
    if info is None or not info.owner_is_dead():
        return False
    return _break(path, info)


def _create(path: Path, run_id: str, generation: int) -> ClaimInfo | None:
    """Create the claim file exclusively; None when it exists. The content is written to the
    open descriptor, so a reader may briefly see an empty file: it counts as held."""
    info = ClaimInfo(host=socket.gethostname(), pid=os.getpid(), run_id=run_id, started_at=time.time(),
                     generation=generation, token=secrets.token_hex(8), boot_id=_boot_id())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    return info


def _break(path: Path, stale: ClaimInfo | None) -> bool:
    """Rename the stale claim away. If what was moved is not the claim we judged stale (its
    owner released it and another process claimed it in between), put it back. A claim
    file left empty by a process killed between creating and writing it is stale too."""
    tag = f"{stale.generation}-{stale.token}" if stale else f"unreadable-{secrets.token_hex(8)}"
    moved = path.with_name(f"{path.name}.broken-{tag}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    taken = _read(moved)
    if (taken is None and stale is None) or (taken is not None and stale is not None and taken.token == stale.token):
        with contextlib.suppress(FileNotFoundError):
            moved.unlink()
        return True
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(moved, path)  # atomic: fails if yet another claim appeared meanwhile
    with contextlib.suppress(FileNotFoundError):
        moved.unlink()
    return False


def _read(path: Path) -> ClaimInfo | None:
    try:
        fields = json.loads(path.read_text())
        return ClaimInfo(**{k: v for k, v in fields.items() if k in ClaimInfo.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def _age_s(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None

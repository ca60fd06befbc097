"""The batch contract's parts on their own: claims, records and the summary, inputs and names."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from nic_fast.batch import claims
from nic_fast.batch.inputs import InputError, collect_slides, name_stores, read_slide_list
from nic_fast.batch.records import SummaryBuilder, SummaryError, atomic_write_json, write_record

# -- claims ---------------------------------------------------------------------------------


def test_one_claim_per_store_and_the_holder_is_named(tmp_path):
    store = tmp_path / "a.zarr"
    first = claims.acquire(store, run_id="r1")
    assert isinstance(first, claims.Claim) and first.info.generation == 1
    second = claims.acquire(store, run_id="r2")
    assert isinstance(second, claims.ClaimHeld)
    assert f"{socket.gethostname()}:{os.getpid()}" in second.reason and "r1" in second.reason
    first.release()
    assert not claims.claim_path(store).exists()
    assert isinstance(claims.acquire(store, run_id="r3"), claims.Claim)


def _foreign_claim(store: Path, *, age_s: float, generation: int = 1, host: str = "node-7") -> None:
    path = claims.claim_path(store)
    path.write_text(json.dumps({"host": host, "pid": 4242, "run_id": "old", "started_at": time.time() - age_s,
                                "generation": generation, "token": "feedface", "boot_id": "other-boot"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_claim_older_than_its_lease_is_taken_over_with_the_next_generation(tmp_path):
    store = tmp_path / "a.zarr"
    _foreign_claim(store, age_s=5, generation=3)
    held = claims.acquire(store, run_id="r", lease_s=60)
    assert isinstance(held, claims.ClaimHeld) and "node-7:4242" in held.reason
    taken = claims.acquire(store, run_id="r", lease_s=2)
    assert isinstance(taken, claims.Claim) and taken.info.generation == 4
    assert taken.broke is not None and taken.broke.owner == "node-7:4242"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr.claim"]  # the broken claim was removed


def test_an_empty_claim_left_by_a_crash_is_broken_after_its_lease(tmp_path):
    store = tmp_path / "a.zarr"
    path = claims.claim_path(store)
    path.write_text("")
    os.utime(path, (time.time() - 10, time.time() - 10))
    assert isinstance(claims.acquire(store, run_id="r", lease_s=60), claims.ClaimHeld)
    assert isinstance(claims.acquire(store, run_id="r", lease_s=5), claims.Claim)


def test_a_dead_local_owner_loses_its_claim_at_once(tmp_path):
    process = mp.get_context("spawn").Process(target=_claim_and_exit, args=(str(tmp_path / "a.zarr"),))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    owner = json.loads(claims.claim_path(tmp_path / "a.zarr").read_text())
    assert owner["pid"] == process.pid
    taken = claims.acquire(tmp_path / "a.zarr", run_id="r", lease_s=3600)
    assert isinstance(taken, claims.Claim) and taken.info.generation == 2


def _claim_and_exit(store: str) -> None:
    assert isinstance(claims.acquire(Path(store), run_id="child"), claims.Claim)  # never released


def test_an_owner_that_lost_its_claim_knows_and_leaves_the_successor_alone(tmp_path):
    store = tmp_path / "a.zarr"
    mine = claims.acquire(store, run_id="slow", lease_s=1)
    assert isinstance(mine, claims.Claim) and mine.still_owned()
    old = time.time() - 5
    os.utime(claims.claim_path(store), (old, old))  # it stalled past its lease
    successor = claims.acquire(store, run_id="fast", lease_s=1)
    assert isinstance(successor, claims.Claim)
    assert not mine.still_owned() and not mine.refresh()
    mine.release()
    assert claims.claim_path(store).exists() and successor.still_owned()


def test_kept_claims_are_refreshed_in_the_background(tmp_path):
    store = tmp_path / "a.zarr"
    claim = claims.acquire(store, run_id="r", lease_s=0.4)
    assert isinstance(claim, claims.Claim)
    with claim.kept():
        old = time.time() - 100
        os.utime(claims.claim_path(store), (old, old))
        time.sleep(0.3)
        assert time.time() - claims.claim_path(store).stat().st_mtime < 1
        assert isinstance(claims.acquire(store, run_id="other", lease_s=0.4), claims.ClaimHeld)
    assert not claims.claim_path(store).exists()


def test_of_many_processes_claiming_at_once_exactly_one_wins(tmp_path):
    context = mp.get_context("spawn")
    barrier = context.Barrier(6)
    results = context.Queue()
    processes = [context.Process(target=_race, args=(str(tmp_path / "a.zarr"), barrier, results)) for _ in range(6)]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(60)
    assert sorted(outcomes) == ["held"] * 5 + ["won"]


def _race(store: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing objects
    barrier.wait()
    outcome = claims.acquire(Path(store), run_id=str(os.getpid()))
    results.put("won" if isinstance(outcome, claims.Claim) else "held")
    time.sleep(0.5)  # hold it while the others try


# -- records and the summary -------------------------------------------------------------------


def _record(out: Path, name: str, run: str, status: str, at: str, **extra) -> None:
    write_record(out, name, run, {"slide": f"/s/{name}.svs", "status": status, "reason": "", "finished_at": at,
                                  "run_id": run, **extra})


def test_summary_keeps_each_slides_newest_outcome_and_never_hides_it_behind_a_skip(tmp_path):
    _record(tmp_path, "a", "r1", "failed", "2026-12-01T10:00:00Z")
    _record(tmp_path, "a", "r2", "ok", "2026-12-01T11:00:00Z")
    _record(tmp_path, "a", "r3", "skipped", "2026-12-01T12:00:00Z")  # e.g. being compressed by r2, or complete
    _record(tmp_path, "b", "r3", "skipped", "2026-12-01T12:00:00Z")
    _record(tmp_path, "sub/c", "r1", "stale", "2026-12-01T10:00:00Z")
    summary = SummaryBuilder(tmp_path).write()
    assert {s["name"]: s["status"] for s in summary["slides"]} == {"a": "ok", "b": "skipped", "sub/c": "stale"}
    assert summary["counts"] == {"ok": 1, "skipped": 1, "failed": 0, "stale": 1}
    assert json.loads((tmp_path / "summary.json").read_text())["counts"] == summary["counts"]


def test_summary_builder_rereads_only_changed_records(tmp_path, monkeypatch):
    builder = SummaryBuilder(tmp_path)
    for i in range(5):
        _record(tmp_path, f"s{i}", "r1", "ok", "2026-12-01T10:00:00Z")
    builder.build()
    reads = []
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.append(self.name), original(self, *a, **k))[1])
    _record(tmp_path, "s5", "r1", "failed", "2026-12-01T10:00:01Z")
    summary = builder.build()
    assert reads == ["s5.r1.json"] and summary["counts"]["failed"] == 1


def test_a_full_disk_leaves_no_temporary_and_says_which_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(SummaryError, match=r"cannot write .*summary\.json: No space left on device"):
        atomic_write_json(tmp_path / "summary.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# -- inputs and store names ---------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_list_files_and_duplicates(tmp_path):
    a = _touch(tmp_path / "cohort" / "a.svs")
    _touch(tmp_path / "cohort" / "notes.txt")
    b = _touch(tmp_path / "cohort" / "site2" / "b.ndpi")
    mrxs = _touch(tmp_path / "cohort" / "m.mrxs")
    _touch(tmp_path / "cohort" / "m" / "Index.dat")  # MIRAX data folder: not searched
    assert collect_slides([tmp_path / "cohort"]) == [a, mrxs]
    assert collect_slides([tmp_path / "cohort"], recursive=True) == [a, mrxs, b]
    assert collect_slides([tmp_path / "cohort"], extensions=["ndpi"], recursive=True) == [b]
    assert collect_slides([a, tmp_path / "cohort" / ".." / "cohort" / "a.svs", tmp_path / "gone.svs"]) == \
        [a, tmp_path / "gone.svs"]  # the same file once; a missing one kept, to fail as itself
    with pytest.raises(InputError, match=r"no slides in this folder.*--recursive"):
        collect_slides([tmp_path / "cohort" / "m"])
    listing = tmp_path / "lists" / "slides.txt"
    listing.parent.mkdir()
    listing.write_text(f"\ufeff# cohort 1\n{a}\n\n../cohort/site2/b.ndpi\n")
    assert read_slide_list(listing) == [a, listing.parent / "../cohort/site2/b.ndpi"]


def test_store_names_clash_is_refused_with_the_fix(tmp_path):
    one, two = _touch(tmp_path / "site1" / "x.svs"), _touch(tmp_path / "site2" / "X.tif")
    with pytest.raises(InputError, match=r"site1/x\.svs, .*site2/X\.tif → x\.zarr.*--store-names relative"):
        name_stores([one, two])
    assert [item.name for item in name_stores([one, two], "relative")] == ["site1/x", "site2/X"]
    assert [item.name for item in name_stores([one])] == ["x"]


def test_a_retry_that_finds_its_own_published_store_keeps_the_runs_ok_record(tmp_path):
    from nic_fast.batch.inputs import SlideInput
    from nic_fast.batch.records import RunInfo
    from nic_fast.batch.slide import BatchSettings, record_result
    from nic_fast.job import SlideResult

    settings, item = BatchSettings(tmp_path, RunInfo()), SlideInput(tmp_path / "a.svs", "a")
    record_result(settings, item, SlideResult(str(item.path), "ok", patches=12))
    # the worker died after publishing; its retry finds the complete store
    record_result(settings, item, SlideResult(str(item.path), "skipped", "complete store exists", attempts=2))
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("a.*.json")]
    assert record["status"] == "ok" and record["patches"] == 12

"""What coordinating a batch costs per slide, apart from compressing it: claims, records, the
summary rebuild, and the Dask client's round trips — measured in one run on tiny slides.

1. claim + record: ``--records`` slides through ``process_slide`` with a compressor that
   returns at once (no store): skip check, claim created and refreshed by its thread,
   released, record.
2. summary rebuild: ``SummaryBuilder`` over all those records, cold (first read) and warm
   (records cached; what a long run pays after each slide, at most every 5 s).
3. Dask: the same tiny real slides (one 128-px cell each) compressed in this process and
   through ``--dask local:1`` (one worker, so nothing runs in parallel); the difference per
   slide is what the client's queue, the task, its events and the result cost.

Usage: python benchmarks/coordination.py [--slides 1000] [--records 10000] [--workdir bench-work/coordination]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from machine import describe as describe_machine


class _Instant:
    """A compressor that compresses nothing: what is left is the batch contract's own work."""

    device = "cpu"

    def compress_slide(self, slide, final, **kwargs):
        from nic_fast.job import SlideResult

        return SlideResult(str(slide), "ok", store=str(final), device="cpu")


def tiny_slides(folder: Path, count: int) -> list[Path]:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = np.clip(np.array([200, 110, 170]) + rng.integers(-60, 60, size=(128, 128, 3)), 0, 255).astype(np.uint8)
    desc = "Aperio Image Library v12.0.0 \r\n128x128 (128x128) RAW|AppMag = 20|MPP = 0.5"
    slides = []
    for i in range(count):
        path = folder / f"t{i:05d}.tif"
        if not path.exists():
            tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", description=desc, photometric="rgb")
        slides.append(path)
    return slides


def claim_and_record(count: int, out: Path) -> float:
    from nic_fast.batch.inputs import SlideInput
    from nic_fast.batch.records import RunInfo
    from nic_fast.batch.slide import BatchSettings, process_slide

    settings = BatchSettings(out, RunInfo(), qc=False)
    items = [SlideInput(out.parent / "slides" / f"s{i:05d}.svs", f"s{i:05d}") for i in range(count)]
    started = time.perf_counter()
    for item in items:
        assert process_slide(_Instant(), item, settings).status == "ok"  # type: ignore[arg-type]
    return (time.perf_counter() - started) / len(items)


def summary_rebuild(out: Path) -> tuple[float, float]:
    from nic_fast.batch.records import SummaryBuilder

    builder = SummaryBuilder(out)
    t0 = time.perf_counter()
    builder.write()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    builder.write()
    return cold, time.perf_counter() - t0


def real_runs(slides: list[Path], workdir: Path) -> dict[str, tuple[float, float, float]]:
    """Per run ("local": this process, "dask": --dask local:1): (seconds to the first slide's
    outcome, from the first to the last outcome, to the end including shutdown)."""
    from nic_fast.batch import compress_slides
    from nic_fast.batch.dask_cluster import DaskTarget
    from nic_fast.job import CompressOptions

    options = CompressOptions(batch_size=8, workers=1)
    runs = {}
    for name, kwargs in (("local", {}), ("dask", {"dask": DaskTarget("local", n_workers=1)})):
        out = workdir / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        done: list[float] = []
        started = time.perf_counter()
        outcome = compress_slides(slides, out, options, qc=False, on_result=lambda r, done=done: done.append(time.perf_counter()),
                                  **kwargs)
        ended = time.perf_counter()
        assert all(r.status == "ok" for r in outcome.results), [r.reason for r in outcome.results if r.reason][:3]
        runs[name] = (done[0] - started, done[-1] - done[0], ended - started)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000, help="tiny real slides, in this process and via Dask")
    parser.add_argument("--records", type=int, default=10000, help="slides of the stub compressor")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/coordination"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    slides = tiny_slides(args.workdir / "slides", args.slides)
    stub_out = args.workdir / "out-stub"
    shutil.rmtree(stub_out, ignore_errors=True)
    per_slide = claim_and_record(args.records, stub_out)
    cold, warm = summary_rebuild(stub_out)
    runs = real_runs(slides, args.workdir)
    n = len(slides)
    print(f"machine: {describe_machine()}")
    print(f"slides: {n} tiny slides (one 128-px cell each); one process, or one Dask worker")
    print(f"claim + record (stub compressor, {args.records} slides): {per_slide * 1e3:.2f} ms per slide")
    print(f"summary rebuild over {args.records} records: {cold * 1e3:.0f} ms cold, {warm * 1e3:.0f} ms warm "
          f"({warm / args.records * 1e3:.3f} ms per record)")
    for name, label in (("local", "in this process"), ("dask", "through --dask local:1")):
        first, stream, total = runs[name]
        print(f"real tiny slides {label}: {total:.1f} s in all; first slide after {first:.1f} s, then "
              f"{stream / (n - 1) * 1e3:.1f} ms per slide")
    extra = (runs["dask"][1] - runs["local"][1]) / (n - 1)
    print(f"Dask coordination per slide (client queue, pinned task, events, result): {extra * 1e3:.1f} ms "
          f"({runs['dask'][1] / runs['local'][1]:.2f}x the in-process stream)")


if __name__ == "__main__":
    main()

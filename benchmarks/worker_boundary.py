"""What crash isolation costs: the same slides compressed in this process and in a supervised
worker process (what `nic-fast compress` does), measured in one run.

Prints the wall time of each, the one-off start-up of the worker (spawn, imports, encoder
load) and the cost per slide beyond it (task hand-off, heartbeat, records), as seconds and
as a fraction of a slide's compression time.

Usage: python benchmarks/worker_boundary.py [--slides 12] [--size 3072] [--workdir bench-work/boundary]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from machine import describe as describe_machine


def prepare(workdir: Path, count: int, size: int) -> list[Path]:
    from nic_fast.synthetic import write_synthetic_slide

    workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(count):
        path = workdir / f"slide_{i:02d}.tif"
        if not path.exists():
            write_synthetic_slide(path, height=size, width=size, mpp=0.5, seed=i, lesion=False)
        slides.append(path)
    return slides


def timed_run(slides: list[Path], out: Path, devices: list[str] | None) -> tuple[float, float, float]:
    """(wall, start-up, stream) seconds: start-up until the first slide is handed out, stream
    from then to the last slide's outcome (what is left is shutting the worker down)."""
    from nic_fast.batch import compress_slides
    from nic_fast.job import CompressOptions

    shutil.rmtree(out, ignore_errors=True)
    first: list[float] = []
    last: list[float] = []

    def on_event(event) -> None:  # noqa: ANN001
        if event.kind == "assigned" and not first:
            first.append(time.perf_counter())
        if event.kind == "done":
            last[:] = [time.perf_counter()]

    t0 = time.perf_counter()
    outcome = compress_slides(slides, out, CompressOptions(), devices=devices, on_event=on_event)
    wall = time.perf_counter() - t0
    assert all(r.status == "ok" for r in outcome.results), [r.reason for r in outcome.results]
    return wall, first[0] - t0, last[0] - first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=3072, help="slide side in px at 0.5 µm/px")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/boundary"))
    args = parser.parse_args()
    print(describe_machine())
    slides = prepare(args.workdir, args.slides, args.size)
    timed_run(slides[:1], args.workdir / "warm", None)  # page cache and imports warm for both
    n = len(slides)
    in_process, in_startup, in_stream = timed_run(slides, args.workdir / "in-process", None)
    supervised, startup, stream = timed_run(slides, args.workdir / "supervised", ["cpu"])
    per_slide = in_stream / n
    overhead = (stream - in_stream) / n
    print(f"{n} slides of {args.size}² px, mean-rgb encoder, CPU")
    print(f"  in this process:        {in_process:7.2f} s wall ({per_slide:.3f} s per slide)")
    print(f"  supervised worker:      {supervised:7.2f} s wall (ratio {supervised / in_process:.3f})")
    print(f"  once per run:           {startup - in_startup:7.2f} s start-up (spawn, imports, encoder), "
          f"{supervised - startup - stream:.2f} s shutdown")
    print(f"  per slide:              {overhead * 1e3:+7.1f} ms ({overhead / per_slide:+.1%} of a slide)")


if __name__ == "__main__":
    main()

"""Decoding straight into the staging buffer (issue 13, finding 7): a 4096² region read by
cuCIM into a preallocated buffer, the old way (a fresh white region, then a copy into the
buffer) against ``out=`` (the buffer filled once). CPU only.

Usage: python benchmarks/staging_copy.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from nic_fast.slides import open_slide
from nic_fast.synthetic import write_synthetic_slide

SIDE = 4096
REPEATS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "staging_8192.tif"
    if not path.exists():
        write_synthetic_slide(path, height=8192, width=8192, mpp=0.25, seed=3, lesion=False)
    staging = np.empty((SIDE, SIDE, 3), np.uint8)
    with open_slide(path, backend="cucim") as reader:
        def copied() -> None:
            np.copyto(staging, reader.read_region_checked(0, 1024, 1024, SIDE, SIDE).pixels)

        def direct() -> None:
            reader.read_region_checked(0, 1024, 1024, SIDE, SIDE, out=staging)

        best = {}
        for read in (copied, direct) * REPEATS:
            t0 = time.perf_counter()
            read()
            best[read.__name__] = min(best.get(read.__name__, float("inf")), time.perf_counter() - t0)
    before, after = best["copied"], best["direct"]
    print(f"{SIDE}² region via cuCIM, best of {REPEATS}: fresh region + copy {before * 1e3:.0f} ms, "
          f"out= {after * 1e3:.0f} ms: {(before - after) / before:.0%} less")


if __name__ == "__main__":
    main()

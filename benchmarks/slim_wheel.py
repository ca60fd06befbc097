"""Drop files a wheel carries but a run never loads, so the wheels fit the GPU machine's carry.

The wheel is rewritten in place: the files whose name (the part after the last '/')
matches one of the comma-separated ``--drop`` patterns (fnmatch; a pattern with '/'
matches the whole path) leave the archive and its RECORD, which pip reads on install.

Usage: python benchmarks/slim_wheel.py WHEEL [WHEEL ...] --drop 'pattern,pattern'
"""
from __future__ import annotations

import argparse
import fnmatch
import zipfile
from pathlib import Path


def dropped(name: str, patterns: list[str]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name if "/" in p else base, f"*{p}" if "/" in p else p) for p in patterns)


def slim(wheel: Path, patterns: list[str]) -> tuple[int, int]:
    """Rewrite ``wheel`` without the matching files; (bytes before, bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if dropped(info.filename, patterns):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(ln for ln in lines if not dropped(ln.split(",", 1)[0], patterns)).encode() + b"\n"
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument("--drop", required=True, help="comma-separated file name patterns")
    args = parser.parse_args()
    patterns = [p for p in args.drop.split(",") if p]
    for wheel in args.wheels:
        before, after = slim(wheel, patterns)
        print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

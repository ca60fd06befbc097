#!/usr/bin/env bash
# The GPU check, in one call on a fresh CUDA machine (no internet needed):
#   installs the Python packages it lacks from wheels in .whl/ (see --prepare), builds the
#   extension with its CUDA kernels (ptxas resource report in build.log), runs the `gpu`
#   tests, runs benchmarks/compress_gpu.py, and writes into OUTDIR:
#     summary.md (the results table: machine, build, kernels' registers/spills, tests,
#     benchmark), results.json, results.md, env.txt, build.log, pytest_gpu.log, bench.log,
#     check.log: at most 8 files, as the device tool brings back.
#
# Usage:
#   benchmarks/gpu_check.sh --prepare        # here, with internet: fill .whl/ for Python 3.12
#   benchmarks/gpu_check.sh OUTDIR [SIZE]    # there: SIZE = slide side in px (default 40000)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${NIC_FAST_WHEELS:-$ROOT/.whl}
PY=${PYTHON:-python3}
ENCODER_H5=${NIC_FAST_BIGAN_H5:-$ROOT/../shared/data/nic-paper-encoders/encoder_bigan.h5}

# What the GPU image lacks (the image has torch, numpy, h5py, tifffile, pillow, scipy, rich,
# click, lazy-loader, cupy, pytest, cmake, ninja, scikit-build-core and pybind11).
PACKAGES=(cucim-cu13==26.10.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
          openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${PACKAGES[@]}" || exit 1
  cp "$ENCODER_H5" "$WHEELS/encoder_bigan.h5" || { echo "no $ENCODER_H5: set NIC_FAST_BIGAN_H5"; exit 1; }
  du -sh "$WHEELS"
  exit 0
fi

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [SIZE] | --prepare}
SIZE=${2:-40000}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
step() { echo "== $(date +%T) $*"; }

check() {
  STATUS=()

  step "environment"
  {
    nvidia-smi 2>&1 | head -20
    nvcc --version 2>&1 | tail -2
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
    [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    nproc
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"

  step "wheels from $WHEELS"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nic-fast-site \
      "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/nic-fast-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import zarr, openslide, cucim, imagecodecs, tifffile, h5py, click, rich" 2>&1; then
    echo "missing Python packages: run 'benchmarks/gpu_check.sh --prepare' where pip works and carry .whl"
    exit 1
  fi

  step "build (NIC_FAST_CUDA=ON, ptxas resource report)"
  if "$PY" -m pip install -v --no-build-isolation --no-deps -e . -C cmake.define.NIC_FAST_CUDA=ON \
       -C cmake.define.CMAKE_CUDA_FLAGS=--resource-usage > "$OUT/build.log" 2>&1 \
     && "$PY" -c "from nic_fast import kernels; print('CUDA devices seen by _C_cuda:', kernels.cuda_module().device_count())"
  then STATUS+=("build: ok"); else STATUS+=("build: FAILED (build.log)"); tail -30 "$OUT/build.log"; fi
  REGS=$(grep -o "Used [0-9]* registers" "$OUT/build.log" | awk '{print $2}' | sort -n | tail -1)
  SPILLS=$(grep -o "[0-9]* bytes spill stores" "$OUT/build.log" | awk '{s += $1} END {print s + 0}')
  STACK=$(grep -o "[0-9]* bytes stack frame" "$OUT/build.log" | awk '{s += $1} END {print s + 0}')
  STATUS+=("kernels (ptxas): at most ${REGS:-?} registers per thread, ${SPILLS} bytes of spill stores, ${STACK} bytes of stack frames in all")

  step "gpu tests"
  PER_TEST_LIMIT=()  # a deadlocked pipeline fails its test instead of the whole check
  "$PY" -c "import pytest_timeout" 2> /dev/null && PER_TEST_LIMIT=(--timeout=150)
  timeout 300 "$PY" -m pytest -m gpu -v -rs "${PER_TEST_LIMIT[@]}" --continue-on-collection-errors tests/ \
    > "$OUT/pytest_gpu.log" 2>&1
  STATUS+=("gpu tests: $(tail -1 "$OUT/pytest_gpu.log")")
  tail -5 "$OUT/pytest_gpu.log"

  step "benchmark, ${SIZE}² px"
  H5="$WHEELS/encoder_bigan.h5"
  [[ -f "$H5" ]] || H5="$ENCODER_H5"
  if PYTHONUNBUFFERED=1 timeout 420 "$PY" benchmarks/compress_gpu.py --size "$SIZE" --h5 "$H5" --out "$OUT" \
       --workdir /tmp/nic-fast-bench > "$OUT/bench.log" 2>&1
  then STATUS+=("benchmark: ok"); else STATUS+=("benchmark: FAILED or timed out (bench.log)"); tail -20 "$OUT/bench.log"; fi

  step "summary"
  {
    echo "# nic-fast GPU check, $(date -u +%F)"
    echo
    "$PY" -c "import torch; print('GPU:', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
    echo
    for line in "${STATUS[@]}"; do echo "- $line"; done
    echo
    [[ -f "$OUT/results.md" ]] && cat "$OUT/results.md"
  } > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

check 2>&1 | tee "$OUT/check.log"

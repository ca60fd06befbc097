#!/usr/bin/env bash
# The GPU check, in one call on a fresh CUDA machine (no internet there), sized for a
# 15-minute device budget with time left for one rerun. Each step has its own time limit
# and appends its line to OUTDIR/summary.md as soon as it finishes, so a call stopped
# part-way still says what passed:
#   wheels   install what the image lacks from .whl/ (see --prepare)          <= 60 s
#   build    the extension with its CUDA kernels (ptxas report in build.log)   <= 150 s
#   tests    the `gpu` tests                                                  <= 180 s
#   bench    benchmarks/compress_gpu.py: 4 slides of SIZE² px                  <= 240 s
# Files in OUTDIR (at most 8, as the device tool brings back): summary.md, results.json,
# results.md, env.txt, wheels.log, build.log, pytest_gpu.log, bench.log.
#
# Usage:
#   benchmarks/gpu_check.sh --prepare        # here, where pip works: fill .whl/ (<= 60 MiB, listed)
#   benchmarks/gpu_check.sh OUTDIR [SIZE]    # there: SIZE = slide side in px (default 40000)
#   NIC_FAST_DRY_RUN=1 benchmarks/gpu_check.sh OUTDIR   # every step on the CPU, tiny sizes
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${NIC_FAST_WHEELS:-$ROOT/.whl}
DRY=${NIC_FAST_DRY_RUN:-0}
if [[ -z "${PYTHON:-}" && "$DRY" == 1 && -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; fi
PY=${PYTHON:-python3}
ENCODER_H5=${NIC_FAST_BIGAN_H5:-$ROOT/../shared/data/nic-paper-encoders/encoder_bigan.h5}
MAX_CARRY_MIB=60

# What the GPU image (Python 3.12.3, torch 2.11.0+cu130, CuPy, tifffile, scikit-image, h5py,
# pillow, scipy, rich, click, lazy-loader, pytest, cmake, ninja, scikit-build-core, pybind11)
# lacks: Zarr and its codecs, imagecodecs (tifffile's JPEG codec), nvImageCodec and nvJPEG
# (the GPU tile decoder), cuCIM (CPU reader, GPU test reference), OpenSlide (naive baseline).
PACKAGES=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 imagecodecs==2026.3.6
          nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 cucim-cu13==26.10.0
          openslide-python==1.4.7 openslide-bin==4.0.1.2)
# Parts of wheels the check never loads, dropped by --prepare to fit the carry: nvImageCodec's
# builds for other Pythons and its non-JPEG codecs; imagecodecs' AV1/JPEG XL/SZ3 libraries.
IMPL=nvimgcodec_impl.cpython
SLIM=("nvidia_nvimgcodec*:$IMPL-39-*,$IMPL-310-*,$IMPL-311-*,$IMPL-313-*,$IMPL-313t-*,$IMPL-314-*,$IMPL-314t-*,libopencv_ext*,libnvtiff_ext*,libnvjpeg2k_ext*,libtiff_ext*,tools/*"
      "imagecodecs*:libaom-*,libjxl-*,libavif-*,libSZ3c-*,libcpcodec-*,_jpegxl.*,_avif.*,_sz3.*,_pcodec.*")
if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${PACKAGES[@]}" || exit 1
  for rule in "${SLIM[@]}"; do
    "$PY" "$ROOT/benchmarks/slim_wheel.py" "$WHEELS"/${rule%%:*}.whl --drop "${rule#*:}" || exit 1
  done
  cp "$ENCODER_H5" "$WHEELS/encoder_bigan.h5" || { echo "no $ENCODER_H5: set NIC_FAST_BIGAN_H5"; exit 1; }
  ls -l "$WHEELS" | awk 'NR > 1 {printf "%8.1f MiB  %s\n", $5 / 1048576, $9}'
  TOTAL=$(du -sm "$WHEELS" | cut -f1)
  echo "carry: ${TOTAL} MiB in $WHEELS (limit ${MAX_CARRY_MIB} MiB)"
  (( TOTAL <= MAX_CARRY_MIB )) || { echo "over the carry limit: drop a package or slim one more"; exit 1; }
  exit 0
fi

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [SIZE] | --prepare}
SIZE=${2:-40000}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
SUMMARY=$OUT/summary.md

line() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME LIMIT_S LOG COMMAND...: run under its limit, log to LOG, one summary line as it ends
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc
  echo "== $(date +%T) $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$log" 2>&1; rc=$?
  local took=$((SECONDS - t0))
  if (( rc == 0 )); then line "- $name: ok (${took} s)"
  elif (( rc == 124 )); then line "- $name: TIMED OUT after ${limit} s ($(basename "$log"))"; tail -15 "$log"
  else line "- $name: FAILED, exit $rc after ${took} s ($(basename "$log"))"; tail -15 "$log"; fi
  return $rc
}

{
  echo "# nic-fast GPU check, $(date -u +%F)"
  echo
  [[ "$DRY" == 1 ]] && echo "DRY RUN on the CPU: tiny sizes, nothing here is a GPU measurement" && echo
} > "$SUMMARY"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -5
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  echo "cores: $(nproc)"
} > "$OUT/env.txt" 2>&1
line "- machine: $(grep -m1 "^torch" "$OUT/env.txt"), $(grep -m1 "^cores" "$OUT/env.txt")"

if compgen -G "$WHEELS/*.whl" > /dev/null && [[ "$DRY" == 1 ]]; then  # cp312 wheels: checked, not installed
  step wheels 60 "$OUT/wheels.log" "$PY" -c "import sys, zipfile
for w in sys.argv[1:]: assert zipfile.ZipFile(w).testzip() is None, w" "$WHEELS"/*.whl
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
  step wheels 60 "$OUT/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/nic-fast-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/nic-fast-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import zarr, tifffile, imagecodecs, h5py, click, rich" >> "$OUT/build.log" 2>&1; then
  line "- packages: MISSING (build.log): run 'benchmarks/gpu_check.sh --prepare' where pip works and carry .whl"
  exit 1
fi

CUDA_FLAGS=()
[[ "$DRY" == 1 ]] || CUDA_FLAGS=(-C cmake.define.NIC_FAST_CUDA=ON -C cmake.define.CMAKE_CUDA_FLAGS=--resource-usage)
step build 150 "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps -e . "${CUDA_FLAGS[@]}"
if [[ "$DRY" != 1 ]]; then
  REGS=$(grep -o "Used [0-9]* registers" "$OUT/build.log" | awk '{print $2}' | sort -n | tail -1)
  SPILLS=$(grep -o "[0-9]* bytes spill stores" "$OUT/build.log" | awk '{s += $1} END {print s + 0}')
  line "- kernels (ptxas): at most ${REGS:-?} registers per thread, ${SPILLS} bytes of spill stores in all"
fi

PER_TEST=()  # a deadlocked pipeline fails its test instead of the whole step
"$PY" -c "import pytest_timeout" 2> /dev/null && PER_TEST=(--timeout=90)
step "gpu tests" 180 "$OUT/pytest_gpu.log" "$PY" -m pytest -m gpu -q -rs "${PER_TEST[@]}" -p no:cacheprovider tests/
line "  $(tail -1 "$OUT/pytest_gpu.log")"

H5="$WHEELS/encoder_bigan.h5"
[[ -f "$H5" ]] || H5="$ENCODER_H5"
BENCH=(--size "$SIZE" --slides 4 --h5 "$H5" --out "$OUT" --workdir /tmp/nic-fast-bench)
[[ "$DRY" == 1 ]] && BENCH+=(--dry-run)
PYTHONUNBUFFERED=1 step benchmark 240 "$OUT/bench.log" "$PY" benchmarks/compress_gpu.py "${BENCH[@]}"
if [[ -f "$OUT/results.md" ]]; then echo >> "$SUMMARY"; cat "$OUT/results.md" >> "$SUMMARY"; fi
echo; cat "$SUMMARY"

#!/usr/bin/env bash
# Everything chunkd's CUDA code needs checked on a machine with a GPU, in one run (bounded to
# about 8 minutes on 16 cores), and a summary of it:
#
#   deploy/scripts/gpu-check.sh [--out DIR]
#
#  1. builds chunkd, chunkctl, the test binaries and chunkd_gpu_bench (build/, ninja, all cores);
#  2. runs every C++ GPU test (ctest: GpuDeviceApiTest, GpuBufferOnCudaTest, GpuDeviceTierTest,
#     CudaTest, and the device tier's logic on the host stand-in: DeviceTier*, CudaImporter*, ...
#  3. runs the Python GPU tests (pytest -m gpu), with CuPy installed into .venv: the wheel for
#     the CUDA major version found (cupy-cuda12x for CUDA 12, ...; CHUNKD_CUPY_WHEEL=FILE
#     installs that file instead, for machines without PyPI);
#  4. runs chunkd_gpu_bench --quick against a chunkd with a device tier: host-to-device
#     promotion, IPC handle handoff (first open and repeated), device-tier hit throughput;
#  5. writes DIR/summary.md (default results/gpu-check-<timestamp>/): the device, each step's
#     outcome (passed, failed or skipped, and why) and the benchmark's figures; the logs
#     beside it.
#
# Without a CUDA device it runs what needs none (the build, the tests that then check the
# host-only behaviour, the host stand-in tests) and says which device parts it skipped. Exits 1
# if a step failed, 0 otherwise.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$root/results/gpu-check-$(date +%Y%m%d-%H%M%S)"
case "${1:-}" in
  --out) out="${2:?--out needs a directory}" ;;
  --out=*) out="${1#--out=}" ;;
  -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$root"
started=$(date +%s)
failed=0
summary="$out/summary.md"
steps=()

log() { echo "gpu-check [$(( $(date +%s) - started ))s]: $*" >&2; }
# step NAME OUTCOME DETAIL: one row of the summary.
step() {
  steps+=("| $1 | $2 | $3 |")
  log "$1: $2${3:+ ($3)}"
  [ "$2" = failed ] && failed=1
  return 0
}

# --- the device -------------------------------------------------------------------------------
device="none"
cuda_major=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L > "$out/nvidia-smi.txt" 2>&1 &&
   grep -q '^GPU ' "$out/nvidia-smi.txt"; then
  device="$(grep '^GPU ' "$out/nvidia-smi.txt" | head -n 4 | tr '\n' ';')"
  nvidia-smi >> "$out/nvidia-smi.txt" 2>&1
  # The CUDA version the driver supports ("CUDA Version: 12.4"); the toolkit's if no driver says.
  cuda_version="$(sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' "$out/nvidia-smi.txt" | head -n 1)"
  cuda_major="${cuda_version%%.*}"
  log "device: $device CUDA $cuda_version"
else
  reason="$(head -n 1 "$out/nvidia-smi.txt" 2>/dev/null || true)"
  log "no CUDA device (${reason:-nvidia-smi not found}): the device parts are skipped"
fi
have_gpu() { [ "$device" != none ]; }

# --- 1. build -----------------------------------------------------------------------------------
if [ ! -d /usr/local/cuda ] && ! command -v nvcc >/dev/null; then
  step "CUDA toolkit" failed "no /usr/local/cuda and no nvcc: the device tier would not be built"
fi
targets=(chunkd chunkctl chunkd_unit_tests chunkd_integration_tests chunkd_shm_reader chunkd_gpu_bench)
if timeout 330 "$root/deploy/scripts/build.sh" "${targets[@]}" > "$out/build.log" 2>&1; then
  if [[ "$("$root/build/server/chunkd" --version)" == *"CUDA built in"* ]]; then
    step build passed "${targets[*]}, CUDA device tier built in"
  else
    step build failed "built without the CUDA toolkit: the device tier is not in the binaries"
  fi
else
  step build failed "see build.log (install the build dependencies first: deploy/scripts/install-deps.sh build)"
  tail -n 20 "$out/build.log" >&2
fi

# --- 2. C++ GPU tests ---------------------------------------------------------------------------
if [ -x "$root/build/tests/chunkd_unit_tests" ]; then
  if timeout 150 ctest --test-dir "$root/build" --output-on-failure -j 4 --timeout 120 \
      -R '(Gpu|Cuda|DeviceTier|ExtentAllocator)' > "$out/ctest.log" 2>&1; then
    result="$(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -n 1)"
    skipped="$(grep -c '\*\*\*Skipped' "$out/ctest.log" || true)"
    if have_gpu && [ "$skipped" != 0 ]; then
      step "C++ GPU tests" failed "$result; $skipped skipped although a GPU is present"
    elif have_gpu; then
      step "C++ GPU tests" passed "$result"
    else
      step "C++ GPU tests" passed "$result; $skipped need a device and skipped (no GPU)"
    fi
  else
    step "C++ GPU tests" failed "see ctest.log: $(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -n 1)"
  fi
else
  step "C++ GPU tests" skipped "no test binaries (the build failed)"
fi

# --- 3. Python GPU tests ------------------------------------------------------------------------
venv_py="$root/.venv/bin/python"
if ! have_gpu; then
  step "Python GPU tests" skipped "no CUDA device (CuPy not installed)"
elif [ ! -x "$venv_py" ]; then
  step "Python GPU tests" skipped "no .venv (deploy/scripts/setup-venv.sh makes it)"
else
  if ! "$venv_py" -c 'import cupy' 2>/dev/null; then
    wheel="${CHUNKD_CUPY_WHEEL:-cupy-cuda${cuda_major}x}"
    log "installing $wheel into .venv"
    timeout 180 "$venv_py" -m pip install -q "$wheel" > "$out/cupy-install.log" 2>&1 ||
      log "could not install $wheel (see cupy-install.log)"
  fi
  if ! "$venv_py" -c 'import cupy; cupy.cuda.runtime.getDeviceCount()' > "$out/cupy.log" 2>&1; then
    step "Python GPU tests" failed "CuPy (${CHUNKD_CUPY_WHEEL:-cupy-cuda${cuda_major}x}) is not usable: $(tail -n 1 "$out/cupy.log" 2>/dev/null; tail -n 1 "$out/cupy-install.log" 2>/dev/null)"
  elif CHUNKD_BIN="$root/build/server/chunkd" CHUNKCTL_BIN="$root/build/client/chunkctl" \
      timeout 150 "$venv_py" -m pytest -q -m gpu -rs "$root/python/tests" > "$out/pytest.log" 2>&1; then
    result="$(tail -n 1 "$out/pytest.log")"
    if grep -q skipped <<< "$result"; then
      step "Python GPU tests" failed "$result (skipped although CuPy and a GPU are present)"
    else
      step "Python GPU tests" passed "$result"
    fi
  else
    step "Python GPU tests" failed "see pytest.log: $(tail -n 1 "$out/pytest.log")"
  fi
fi

# --- 4. benchmark -------------------------------------------------------------------------------
bench="$root/build/bench/chunkd_gpu_bench"
if [ ! -x "$bench" ]; then
  step benchmark skipped "no chunkd_gpu_bench (the build failed)"
else
  work="$(mktemp -d)"
  "$root/build/server/chunkd" --listen="unix:$work/chunkd.sock" --store=memory:// \
    --host_cache_bytes=2GiB --device_cache_bytes=1GiB --shm=false --ready_file="$work/ready" \
    > "$out/chunkd.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do [ -e "$work/ready" ] || sleep 0.1; done
  if timeout 120 "$bench" --server="unix:$work/chunkd.sock" --quick --value_bytes=$((16 << 20)) \
      --json="$out/bench.jsonl" > "$out/bench.txt" 2>&1; then
    step benchmark passed "see below"
  elif ! have_gpu && grep -q "no CUDA device" "$out/bench.txt"; then
    step benchmark skipped "no CUDA device: $(tail -n 1 "$out/bench.txt")"
  else
    step benchmark failed "$(tail -n 1 "$out/bench.txt")"
  fi
  kill -TERM "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  grep -h "CUDA\|device tier" "$out/chunkd.log" | head -n 3 >> "$out/bench.txt"
  rm -rf "$work"
fi

# --- 5. summary ---------------------------------------------------------------------------------
{
  echo "# chunkd GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $device"
  echo "- cores: $(nproc); took $(( $(date +%s) - started ))s"
  echo
  echo "| step | outcome | detail |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${steps[@]}"
  if [ -s "$out/bench.txt" ]; then
    echo
    echo "Benchmark (chunkd_gpu_bench --quick, 16 MiB values):"
    echo
    echo '```'
    cat "$out/bench.txt"
    echo '```'
  fi
} > "$summary"
log "summary: $summary"
cat "$summary"
exit "$failed"

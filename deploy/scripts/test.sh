#!/usr/bin/env bash
# The README's second command (and CI's): installs everything, checks the C++ formatting,
# builds, and runs every test:
# the GoogleTest suites (ctest), the Python client and Zarr store tests (pytest), the
# deployment manifest checks and the README's tour, the Python package installed with pip into
# a clean venv with the README's Python block (test-pip-install.sh), then builds the container
# image and runs it with podman (test-image.sh; outside CI one line says why where podman cannot
# run, under CI=true that fails). In CI (CI=true),
# or with CHUNKD_SANITIZERS=1, then the whole suite again under AddressSanitizer with
# UndefinedBehaviorSanitizer and under ThreadSanitizer, and every fuzz target for
# CHUNKD_FUZZ_SECONDS (20) each (deploy/scripts/sanitize.sh, fuzz.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
"$root/deploy/scripts/install-deps.sh" all
echo "== C++ formatting (clang-format)"
"$root/deploy/scripts/check-format.sh"
"$root/deploy/scripts/build.sh"

echo "== C++ tests (ctest)"
ctest --test-dir "$root/build" --output-on-failure -j "$(nproc)" --timeout 900

echo "== Python tests and deployment checks (pytest)"
py_tests=()
[ -d "$root/python/tests" ] && py_tests+=("$root/python/tests")
compgen -G "$root/deploy/test_*.py" >/dev/null && py_tests+=("$root"/deploy/test_*.py)
if [ "${#py_tests[@]}" -gt 0 ]; then
  CHUNKD_BIN="$root/build/server/chunkd" CHUNKCTL_BIN="$root/build/client/chunkctl" \
    "$root/.venv/bin/python" -m pytest -q "${py_tests[@]}"
fi
echo "== Python's first hour (a clean venv: pip install ./python[all], the README's block)"
"$root/deploy/scripts/test-pip-install.sh"
echo "== Container image (podman: build, run, sidecar pod, SIGTERM)"
"$root/deploy/scripts/test-image.sh"
if [ "${CI:-}" = true ] || [ "${CHUNKD_SANITIZERS:-0}" = 1 ]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
  "$root/deploy/scripts/sanitize.sh" asan
  echo "== fuzz targets, ${CHUNKD_FUZZ_SECONDS:-20} s each"
  "$root/deploy/scripts/fuzz.sh" all "${CHUNKD_FUZZ_SECONDS:-20}"
  echo "== ThreadSanitizer"
  "$root/deploy/scripts/sanitize.sh" tsan
fi
echo "== all tests passed"

#!/usr/bin/env bash
# Builds chunkd, chunkctl and the tests with a sanitizer and runs the whole suite against the
# sanitized binaries: every ctest suite (the integration tests start the sanitized chunkd) and
# the Python tests that drive the server binary (the Python client itself is not instrumented).
#
#   deploy/scripts/sanitize.sh asan|tsan [--build-only [TARGET...]]
#
#   asan  AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer), in build-asan/;
#         the libFuzzer targets are built there too (deploy/scripts/fuzz.sh runs them)
#   tsan  ThreadSanitizer, in build-tsan/
#
# clang 14 from Debian, -O1 -g, no CUDA (host-only: the device tier's logic is tested on its
# host stand-in), no benchmarks. Every process writes its reports to files under
# build-<kind>/sanitizer-reports/ (log_path), so a report from a server that a test starts is
# not lost in its log; the run fails when any report exists, and prints them.
# Suppressions (only for what is gRPC's, Abseil's, protobuf's or libcurl's own, each with its
# reason) are in tests/sanitizers/. deploy/scripts/test.sh runs both kinds when CI=true.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
kind="${1:-}"
build_only=false
targets=(chunkd chunkctl chunkd_shm_reader chunkd_unit_tests chunkd_integration_tests)
case "$kind" in
  asan) sanitize=address; extra=(-DCHUNKD_BUILD_FUZZERS=ON); targets+=(chunkd_fuzzers) ;;
  tsan) sanitize=thread; extra=() ;;
  *) echo "usage: $0 asan|tsan [--build-only [TARGET...]]" >&2; exit 2 ;;
esac
if [ "${2:-}" = "--build-only" ]; then
  build_only=true
  [ $# -gt 2 ] && targets=("${@:3}")
fi
dir="$root/build-$kind"
supp="$root/tests/sanitizers"

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
  export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"  # see build.sh
fi
start=$SECONDS
if [ ! -f "$dir/build.ninja" ]; then
  CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    -DCHUNKD_SANITIZE="$sanitize" -DCHUNKD_BUILD_BENCH=OFF -DCHUNKD_WITH_CUDA=OFF -DCHUNKD_BUILD_PYTHON=OFF \
    "${extra[@]}" "${launcher[@]}" >/dev/null
fi
ninja -C "$dir" -j "$(nproc)" "${targets[@]}"
echo "== $kind: built in $((SECONDS - start)) s"
$build_only && exit 0

reports="$dir/sanitizer-reports"
rm -rf "$reports"
mkdir -p "$reports"
# Reports go to files (one per process) and the processes go on, so that one report does not
# hide the next; LeakSanitizer runs at every sanitized process's exit.
if [ "$kind" = asan ]; then
  export ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
  export UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1:suppressions=$supp/ubsan.supp"
  export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
else
  export TSAN_OPTIONS="log_path=$reports/tsan:suppressions=$supp/tsan.supp:second_deadlock_stack=1:print_suppressions=0"
fi
# Tests that are too slow under a sanitizer trim themselves (each says why).
export CHUNKD_SANITIZER="$kind"

status=0
echo "== $kind: C++ tests (ctest)"
ctest --test-dir "$dir" --output-on-failure -j "$(nproc)" --timeout 1200 || status=1
echo "== $kind: Python tests against the sanitized server"
CHUNKD_BIN="$dir/server/chunkd" CHUNKCTL_BIN="$dir/client/chunkctl" \
  "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$root/python/tests" || status=1

if compgen -G "$reports/*" >/dev/null; then
  echo "== $kind: sanitizer reports:"
  for report in "$reports"/*; do
    echo "---- $report"
    head -n 60 "$report"
  done
  status=1
fi
echo "== $kind: $([ $status = 0 ] && echo clean || echo FAILED) in $((SECONDS - start)) s"
exit $status

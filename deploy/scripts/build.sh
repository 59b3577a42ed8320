#!/usr/bin/env bash
# Configures and builds chunkd (server, client, chunkctl, tests, benchmarks) into build/.
#   deploy/scripts/build.sh [ninja targets...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build_type="${CHUNKD_BUILD_TYPE:-RelWithDebInfo}"
launcher=()
# ccache (installed by install-deps.sh) makes rebuilds after a fresh clone cheap; CCACHE_BASEDIR
# lets clones at different paths share the cache.
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
fi
python_args=()
# The Python package's native module (python/native) is built with .venv's Python, where
# deploy/scripts/setup-venv.sh installed nanobind.
if [ -x "$root/.venv/bin/python" ]; then python_args=(-DPython_EXECUTABLE="$root/.venv/bin/python"); fi
if [ ! -f "$root/build/build.ninja" ]; then
  cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE="$build_type" "${launcher[@]}" \
    "${python_args[@]}"
elif [ "${#python_args[@]}" -gt 0 ] && ! grep -q '^CHUNKD_PYTHON_MODULE_DIR' "$root/build/CMakeCache.txt"; then
  # Configured before .venv existed (start.sh, then test.sh): configure again for the module.
  cmake -S "$root" -B "$root/build" "${python_args[@]}"
fi
# Compiling gRPC code takes about 1 GiB of memory per job; cap jobs at the cores there are.
ninja -C "$root/build" -j "$(nproc)" "$@"

#!/usr/bin/env bash
# Configures and builds chunkd (server, client, chunkctl, tests, benchmarks) into build/.
#   deploy/scripts/build.sh [ninja targets...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build_type="${CHUNKD_BUILD_TYPE:-RelWithDebInfo}"
launcher=()
# ccache (installed by install-deps.sh) makes rebuilds after a fresh clone cheap. Clones at
# different paths share the cache only with both settings: CCACHE_BASEDIR turns the absolute
# paths under the clone into relative ones, and CCACHE_NOHASHDIR keeps the build directory out
# of the hash, which ccache otherwise adds whenever it compiles with debug info (-g, as
# RelWithDebInfo does): measured, a second clone at another path had 0 hits without it. The
# cost: a cached object's debug info names the directory of the clone that compiled it first
# (source paths in it are relative, ../server/...).
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
  export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
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

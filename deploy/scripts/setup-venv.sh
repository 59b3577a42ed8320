#!/usr/bin/env bash
# Creates (or refreshes) the project's Python virtual environment at .venv, idempotently:
# installs python/requirements-dev.txt (nanobind among them, which the CMake build of the native
# module chunkd._native finds here) and installs the chunkd package editable. The native module
# itself is built by deploy/scripts/build.sh, into python/chunkd/, where the editable install
# finds it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${CHUNKD_PYTHON:-/usr/bin/python3}"
[ -x "$py" ] || py="$(command -v python3)"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install -q --upgrade pip
"$root/.venv/bin/python" -m pip install -q -r "$root/python/requirements-dev.txt"
if [ -f "$root/python/pyproject.toml" ]; then
  # The venv already holds the build requirements (setuptools, nanobind): no isolated build
  # environment, so nothing extra is downloaded.
  "$root/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root/python"
fi

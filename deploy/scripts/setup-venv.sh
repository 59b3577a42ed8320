#!/usr/bin/env bash
# Creates (or refreshes) the project's Python virtual environment at .venv, idempotently:
# installs python/requirements-dev.txt, generates the gRPC stubs of proto/chunkd/v1/chunkd.proto
# into python/chunkd/_proto/ (skipped when current) and installs the chunkd package editable.
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
  "$root/.venv/bin/python" "$root/python/tools/gen_proto.py"
  # The venv already holds the build requirements (setuptools, grpcio-tools): no isolated
  # build environment, so nothing extra is downloaded.
  "$root/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root/python"
fi

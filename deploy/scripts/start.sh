#!/usr/bin/env bash
# The README's first command: installs what chunkd needs, builds it, and starts the server on
# 127.0.0.1:7878 over a local directory store (./chunkd-data in the repository). Extra
# arguments go to chunkd (see build/server/chunkd --help). Stop it with Ctrl-C (or SIGTERM).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$root/deploy/scripts/install-deps.sh" build
"$root/deploy/scripts/build.sh" chunkd chunkctl
cd "$root"
echo "start.sh: chunkd is starting; try: build/client/chunkctl info" >&2
exec "$root/build/server/chunkd" "$@"

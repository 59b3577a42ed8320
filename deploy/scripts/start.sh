#!/usr/bin/env bash
# The README's first command: installs what chunkd needs, builds it, and runs the server in the
# foreground on 127.0.0.1:7878 and the UNIX socket ${XDG_RUNTIME_DIR:-/tmp}/chunkd.sock, over a
# local directory store (./chunkd-data in the repository). Extra arguments go to chunkd after
# these, and win (see build/server/chunkd --help). Stop it with Ctrl-C (or SIGTERM): calls in
# flight finish first (--shutdown_grace).
#
# The README's tour runs against exactly this (deploy/test_readme.py runs this script), so a
# change of address here is a change of the tour there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$root/deploy/scripts/install-deps.sh" build
"$root/deploy/scripts/build.sh" chunkd chunkctl
cd "$root"
socket="${XDG_RUNTIME_DIR:-/tmp}/chunkd.sock"
echo "start.sh: chunkd runs in the foreground (Ctrl-C stops it), on 127.0.0.1:7878 and unix:$socket;" \
  "in another terminal try: build/client/chunkctl info" >&2
exec "$root/build/server/chunkd" --listen="127.0.0.1:7878,unix:$socket" "$@"

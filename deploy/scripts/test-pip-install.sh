#!/usr/bin/env bash
# The README's first hour for Python users, as a new user takes it, in CI: a clean virtual
# environment, `pip install "./python[all]"` (which builds the native module and the chunkd and
# chunkctl binaries with the repository's CMake, into build-pip/), then the README's Python
# block (the one after the "python-first-hour" marker) run from the installed package, with the
# server it starts itself (chunkd.Server); then the console scripts and `python -m chunkd`.
# Every step must succeed: a failed install, block or check fails the script.
#
#   deploy/scripts/test-pip-install.sh
#
# Cheap when warm: pip reuses its wheel cache (~/.cache/pip), and the build reuses ccache's
# objects of deploy/scripts/build.sh (same build type, same depth below the repository) and
# build-pip/ itself. The Debian packages come from `install-deps.sh python` (a subset of
# `install-deps.sh all`, which test.sh has already run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$root/deploy/scripts/install-deps.sh" python
py="${CHUNKD_PYTHON:-/usr/bin/python3}"
[ -x "$py" ] || py="$(command -v python3)"
work="$(mktemp -d /tmp/chunkd-pip-XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
# Nothing from the developer's environment: the installed package and its binaries only.
clean=(env -u PYTHONPATH -u CHUNKD_BIN -u CHUNKCTL_BIN -u CHUNKD_BINARY)
"${clean[@]}" "$vpy" -m pip install -q "$root/python[all]"
echo "test-pip-install: pip install ./python[all] took $((SECONDS - start)) s"

# The README's block, as it is written there.
"$vpy" - "$root/README.md" "$work/block.py" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
marker = text.index("<!-- python-first-hour")
block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
open(sys.argv[2], "w").write(block.group(1))
PYEOF
cd "$work"
"${clean[@]}" "$vpy" - <<'PYEOF'
import pathlib, sys
import chunkd
package = pathlib.Path(chunkd.__file__).resolve().parent
assert str(package).startswith(sys.prefix), f"chunkd imported from {package}, not the venv"
for name in ("chunkd", "chunkctl"):
    assert (package / "bin" / name).is_file(), f"the wheel carries no bin/{name}"
    assert chunkd.server.binary_path(name) == package / "bin" / name
print("test-pip-install: chunkd", chunkd.__version__, "from", package)
PYEOF
"${clean[@]}" timeout 300 "$vpy" "$work/block.py"
"${clean[@]}" "$work/venv/bin/chunkd" --version
help="$("${clean[@]}" "$work/venv/bin/chunkctl" -h)"
grep -q -- "^  -o (" <<<"$help"
"${clean[@]}" "$vpy" -m chunkd where
echo "test-pip-install: passed in $((SECONDS - start)) s"

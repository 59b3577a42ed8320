"""The README's first hour, run as written: deploy/scripts/start.sh starts the server, then the
tour (the sh block of "A tour with chunkctl") runs line by line in bash, then the Python block of
"Python client and Zarr store" runs, both taken from README.md at test time so that neither can
drift from what the README says.

    .venv/bin/python -m pytest deploy/test_readme.py

The tour talks to 127.0.0.1:7878, as the README says. So that the test never takes that port
from anything else on the machine, everything runs in a network namespace of its own (`unshare
--net`, with only a loopback), where start.sh's fixed port is free: start.sh runs unchanged,
with only --store added (as the README shows) so that the tour's values go to a temporary
directory rather than ./chunkd-data. XDG_RUNTIME_DIR points at a temporary directory too, which
puts start.sh's UNIX socket, and the tour's line that uses it, there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def code_block(section: str, language: str) -> str:
    """The first ```language block under the README heading `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    m = re.search(rf"^```{language}\n(.*?)^```$", text[start:end], re.M | re.S)
    assert m, f"no ```{language} block under '## {section}' in README.md"
    return m.group(1)


def namespace_prefix() -> list[str] | None:
    """The command that runs a program in a network namespace of its own, or None where this
    machine cannot make one."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return None
    prefix = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run(prefix + ["ip", "link", "set", "lo", "up"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_tour_and_python_run_as_written(tmp_path):
    if not (ROOT / "build" / "build.ninja").exists():
        pytest.skip("no build/ (deploy/scripts/test.sh or start.sh builds it)")
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot make a network namespace here (unshare --net, ip): the tour's "
                    "fixed port 127.0.0.1:7878 could collide with another server")
    tour = code_block("A tour with chunkctl", "sh")
    python = code_block("Python client and Zarr store", "python")
    assert "127.0.0.1:7878" in python and "era5.zarr" in python
    (tmp_path / "python_block.py").write_text(python)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (tmp_path / "store").mkdir()
    driver = tmp_path / "driver.sh"
    driver.write_text(textwrap.dedent(f"""\
        set -euo pipefail
        ip link set lo up
        export XDG_RUNTIME_DIR={run}
        {ROOT}/deploy/scripts/start.sh --store={tmp_path}/store > {tmp_path}/server.log 2>&1 &
        server=$!
        trap 'kill -TERM $server 2>/dev/null || true' EXIT
        # start.sh installs nothing here (test.sh did) and its build is up to date: wait for
        # the socket it serves.
        for _ in $(seq 600); do
          [ -S "$XDG_RUNTIME_DIR/chunkd.sock" ] && break
          kill -0 $server 2>/dev/null || {{ echo "start.sh exited"; exit 1; }}
          sleep 0.1
        done
        cd {ROOT}
        shopt -s expand_aliases
        set -x
        """) + tour + textwrap.dedent(f"""\
        set +x
        echo "== the tour ran"
        cd {tmp_path}
        {sys.executable} python_block.py
        echo "== the Python block ran"
        kill -TERM $server
        wait $server
        echo "== start.sh's chunkd exited $?"
        """))
    proc = subprocess.run(prefix + ["bash", str(driver)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CHUNKD_SERVER": ""})
    server_log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    report = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\nserver log:\n{server_log}"
    assert proc.returncode == 0, report
    out = proc.stdout
    assert "== the tour ran" in out and "== the Python block ran" in out, report
    assert "== start.sh's chunkd exited 0" in out, report
    # What the tour's lines print, as the README's comments say.
    assert re.search(r"^100$", out, re.M), report                       # --range=0-100
    assert re.search(rf"^{(64 << 20) - 1048576}$", out, re.M), report   # --range=1048576-
    assert re.search(r"^4096$", out, re.M), report                      # --range=-4096
    assert "delivery DELIVERY_INLINE" in proc.stderr, report             # get -v
    assert re.search(r"^arr/c/0/0\narr/c/0/1\narr/zarr\.json$", out, re.M), report   # ls arr/
    assert out.count("version: ") == 2, report                          # info, TCP and socket
    assert f"serving file store file://{tmp_path}/store on 127.0.0.1:7878" in server_log, report
    assert f"unix:{run}/chunkd.sock" in server_log, report
    # The Python block read back what it wrote, quietly (a newcomer takes warnings for errors).
    assert "Warning" not in proc.stderr, report
    assert re.search(r"^0\.[45]\d*$", out, re.M), report

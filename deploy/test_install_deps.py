"""install-deps.sh waits for a package manager that holds dpkg's lock instead of failing.

    .venv/bin/python -m pytest deploy/test_install_deps.py

The real locks are never touched (other work on the machine may need them): the script is
pointed at a lock file of the test's own (CHUNKD_APT_LOCK_FILES) that the test holds with
fcntl, as dpkg and apt-get hold theirs, and runs its `wait-lock` mode, the wait that precedes
its apt-get calls.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "scripts" / "install-deps.sh"


def run_waiting(lock: Path, limit: int) -> subprocess.Popen:
    env = {**os.environ, "CHUNKD_APT_LOCK_FILES": f"{lock.parent}/absent {lock}",
           "CHUNKD_APT_LOCK_WAIT": str(limit)}
    return subprocess.Popen([str(SCRIPT), "wait-lock"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_waits_for_the_lock_and_says_who_holds_it(tmp_path):
    lock = tmp_path / "lock-frontend"
    with open(lock, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        start = time.monotonic()
        proc = run_waiting(lock, 60)
        time.sleep(2.5)
        assert proc.poll() is None, "install-deps.sh did not wait for the held lock"
    # The lock is released here; the script goes on within about a second.
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - start
    assert proc.returncode == 0, err
    assert 2.5 <= took < 10, took
    assert f"process {os.getpid()} (" in err, err
    assert "waiting for another package manager to finish" in err, err


def test_gives_up_after_the_limit_with_a_message(tmp_path):
    lock = tmp_path / "lock-frontend"
    with open(lock, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        proc = run_waiting(lock, 2)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "still holds the dpkg/apt lock after 2s" in err, err


def test_no_lock_no_wait(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.write_text("")
    start = time.monotonic()
    proc = run_waiting(lock, 60)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == "", err
    assert time.monotonic() - start < 5

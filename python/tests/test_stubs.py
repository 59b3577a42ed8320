"""The generated stubs: produced at install time, idempotently, with a clear error if missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PYTHON_DIR = Path(__file__).resolve().parents[1]
GEN = PYTHON_DIR / "tools" / "gen_proto.py"


def test_stubs_are_current_and_generation_is_idempotent():
    check = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    again = subprocess.run([sys.executable, str(GEN)], capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_generated_code_is_not_committed():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(PYTHON_DIR / "chunkd" / "_proto" / "chunkd_pb2.py")],
        cwd=PYTHON_DIR,
    )
    assert ignored.returncode == 0


def test_missing_stubs_give_a_clear_error(tmp_path):
    # A copy of the package without chunkd/_proto, first on sys.path.
    shutil.copytree(
        PYTHON_DIR / "chunkd",
        tmp_path / "chunkd",
        ignore=shutil.ignore_patterns("_proto", "__pycache__"),
    )
    # -S: no .pth files, so the editable install's finder cannot supply chunkd._proto.
    site_packages = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import chunkd"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{site_packages}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "gRPC stubs" in result.stderr and "setup-venv.sh" in result.stderr, result.stderr

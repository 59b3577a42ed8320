"""chunkd.Server (a server from Python) and python -m chunkd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

import chunkd
from chunkd.zarr import ChunkdStore

PYTHON_DIR = str(Path(chunkd.__file__).resolve().parent.parent)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("listen", [None, "tcp"])
def test_server_url_serves_client_store_and_fsspec(listen, tmp_path):
    with chunkd.Server(store=tmp_path, listen=listen, fsync=False) as server:
        assert server.running
        assert server.url.startswith("chunkd+unix:///" if listen is None else "chunkd://127.0.0.1:")
        with chunkd.Client(server.url) as client:
            client.put("a/b", b"hello")
            assert client.get("a/b") == b"hello"
        store = ChunkdStore(f"{server.url}/arr.zarr")
        zarr.create_array(store, shape=(10,), chunks=(5,), dtype="i4")[:] = np.arange(10)
        z = zarr.open_array(f"{server.url}/arr.zarr", mode="r")  # fsspec, by URL
        np.testing.assert_array_equal(z[:], np.arange(10))
        assert fsspec.open(f"{server.url}/a/b").open().read() == b"hello"
        assert (tmp_path / "a" / "b").read_bytes() == b"hello"
        pid = server.pid
    assert not server.running and server.process.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "chunkd" in server.log()  # its log, whole, after the stop
    if listen is None:
        assert not Path(server.url[len("chunkd+unix://") :]).exists()


def test_server_flags_and_failure_carry_the_log():
    with pytest.raises(chunkd.ServerError, match="before it was ready") as error:
        chunkd.Server(store="memory://", eviction="no-such-policy")
    assert "eviction" in str(error.value)
    with chunkd.Server(host_cache_bytes="64MiB", read_only=True) as server:
        info = chunkd.Client(server.url).server_info()
        # The host tier and the derived entries' share of it (--derived_cache_fraction).
        assert sum(t.capacity_bytes for t in info.tiers) == 64 << 20
        with pytest.raises(chunkd.ChunkdError):
            chunkd.Client(server.url).put("k", b"v")


def test_binary_paths_and_override(monkeypatch, tmp_path):
    assert chunkd.server.binary_path("chunkd").is_file()
    assert chunkd.server.binary_path("chunkctl").is_file()
    monkeypatch.setenv("CHUNKD_BIN", str(tmp_path / "nothing"))
    fake = tmp_path / "chunkd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CHUNKD_BIN", str(fake))
    assert chunkd.server.binary_path("chunkd") == fake
    with pytest.raises(ValueError):
        chunkd.server.binary_path("other")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkd", *args], capture_output=True, text=True, env=_env(),
        timeout=60, check=False,
    )  # fmt: skip


def test_python_dash_m_chunkd():
    usage = _run("--help")
    assert usage.returncode == 0 and "serve [FLAGS...]" in usage.stdout
    assert _run("-h").stdout == usage.stdout
    serve_help = _run("serve", "--help")
    assert serve_help.returncode == 0 and "--shutdown_grace" in serve_help.stdout
    ctl_help = _run("ctl", "-h")
    assert ctl_help.returncode == 0 and "\n  -o (" in ctl_help.stdout
    where = _run("where")
    assert where.returncode == 0 and "chunkd: /" in where.stdout and "chunkctl: /" in where.stdout
    bad = _run("frobnicate")
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_console_script_entry_points_run_the_binaries(tmp_path):
    with chunkd.Server() as server:
        socket = server.address
        for script, args, expect in (
            ("chunkd_main", ["--version"], "chunkd "),
            ("chunkctl_main", [f"--server={socket}", "info"], "backend: memory"),
        ):
            code = f"import sys; sys.argv = ['x', *{args!r}]; from chunkd.__main__ import {script}; {script}()"
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                timeout=60, check=False,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert expect in out.stdout

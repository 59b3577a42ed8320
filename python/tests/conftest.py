"""Shared fixtures: real chunkd servers (the binary from the CMake build) for the whole session.

The binary is build/server/chunkd at the repository root (override with CHUNKD_BINARY). Build it:

    cmake -S . -B build -G Ninja && ninja -C build chunkd
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNKD_BINARY = Path(os.environ.get("CHUNKD_BINARY", REPO_ROOT / "build" / "server" / "chunkd"))
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class ServerProcess:
    """One chunkd server process: started with --ready_file, stopped with SIGTERM."""

    def __init__(self, workdir: Path, store: str, listen: str = "127.0.0.1:0", *extra: str):
        self.workdir = workdir
        self.store = store
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / "ready"
        self.log_path = workdir / "server.log"
        self.ready_file.unlink(missing_ok=True)
        self.args = [
            str(CHUNKD_BINARY),
            f"--listen={listen}",
            f"--ready_file={self.ready_file}",
            f"--store={store}",
            *extra,
        ]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.address = self._wait_ready()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"chunkd exited with {self.process.returncode} before it was ready:\n"
                    f"{' '.join(self.args)}\n{self.log()}"
                )
            try:
                text = self.ready_file.read_text()
            except FileNotFoundError:
                text = ""
            if text.strip():  # written whole (temp file, then rename)
                return text.splitlines()[0].strip()
            time.sleep(0.02)
        self.process.kill()
        raise RuntimeError(f"chunkd was not ready after {READY_TIMEOUT_S}s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit status (killed after STOP_TIMEOUT_S)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def _require_binary() -> None:
    if not CHUNKD_BINARY.is_file() or not os.access(CHUNKD_BINARY, os.X_OK):
        pytest.fail(
            f"the chunkd server binary {CHUNKD_BINARY} is missing: build it first with\n"
            "    cmake -S . -B build -G Ninja && ninja -C build chunkd\n"
            "at the repository root (or set CHUNKD_BINARY to a built binary)",
            pytrace=False,
        )


def start_server(workdir: Path, store: str, listen: str = "127.0.0.1:0", *extra: str):
    _require_binary()
    return ServerProcess(workdir, store, listen, *extra)


def _session_server(tmp_path_factory, name: str, store: str | None, *extra: str, listen=None):
    workdir = tmp_path_factory.mktemp(name)
    if store is None:
        store_dir = workdir / "store"
        store_dir.mkdir()
        store = str(store_dir)
    if listen is None:
        listen = "127.0.0.1:0"
    elif listen == "unix":
        listen = f"unix:{workdir / 'chunkd.sock'}"
    server = start_server(workdir, store, listen, *extra)
    yield server
    status = server.stop()
    assert status == 0, f"chunkd ({name}) exited with {status} on SIGTERM:\n{server.log()}"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A file-backed server (a directory in Zarr's layout): ``server.store`` is the directory."""
    yield from _session_server(tmp_path_factory, "file-server", None)


@pytest.fixture(scope="session")
def memory_server(tmp_path_factory):
    """A server with the memory:// store."""
    yield from _session_server(tmp_path_factory, "memory-server", "memory://")


@pytest.fixture(scope="session")
def unix_server(tmp_path_factory):
    """A memory:// server listening on a Unix-domain socket (``server.address`` is unix:...)."""
    yield from _session_server(tmp_path_factory, "unix-server", "memory://", listen="unix")


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests share the session servers without clearing."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(server):
    import chunkd

    with chunkd.Client(server.address) as c:
        yield c


@pytest.fixture
def memory_client(memory_server):
    import chunkd

    with chunkd.Client(memory_server.address) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_event_loop_errors(caplog):
    """Fails a test during which asyncio logged an error (e.g. a gRPC poller callback failing
    on a closed descriptor): such errors never reach the test otherwise."""
    yield
    errors = [
        r for r in caplog.get_records("call") + caplog.get_records("teardown")
        if r.name == "asyncio" and r.levelno >= logging.ERROR
    ]
    assert not errors, "asyncio logged errors:\n" + "\n".join(r.getMessage() for r in errors)

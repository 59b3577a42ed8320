"""Test helpers: start and stop the real chunkd server binary (from the CMake build).

The binary is build/server/chunkd at the repository root (override with CHUNKD_BINARY or
CHUNKD_BIN). Build it:

    cmake -S . -B build -G Ninja && ninja -C build chunkd
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNKD_BINARY = Path(
    os.environ.get("CHUNKD_BINARY")
    or os.environ.get("CHUNKD_BIN")  # as deploy/scripts/test.sh names it
    or REPO_ROOT / "build" / "server" / "chunkd"
)
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
        if not self._log.closed:  # after stop() the file is closed, and complete
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


@contextlib.contextmanager
def serve_with_shm(workdir: Path, *extra: str):
    """A file-backed server on loopback with a shared-memory directory of its own (a fresh
    directory under /dev/shm, ``.shm_dir``), stopped and removed on exit."""
    shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-pytest-", dir="/dev/shm"))
    store = workdir / "store"
    store.mkdir(parents=True)
    server = start_server(
        workdir, str(store), "127.0.0.1:0", f"--shm_dir={shm_dir}", "--fsync=false", *extra
    )
    server.shm_dir = str(shm_dir)
    try:
        yield server
    finally:
        status = server.stop()
        shutil.rmtree(shm_dir, ignore_errors=True)
        assert status == 0, f"chunkd exited with {status}:\n{server.log()}"


class StoreCalls:
    """Counts a process's calls to chunkd servers from ``chunkd.aio.AsyncClient`` (the client of
    ``ChunkdStore``'s async methods), client side: Gets (``read``), GetMany calls (``read_many``,
    and the get batcher's ``read_many_each``) and the items those carried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads = 0
        self.read_many = 0
        self.items = 0

    @property
    def total(self) -> int:
        return self.reads + self.read_many

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.reads, self.read_many, self.items


def count_store_calls(monkeypatch) -> StoreCalls:
    """A StoreCalls counting every AsyncClient read call while `monkeypatch` is in force."""
    from chunkd.aio import AsyncClient

    counter = StoreCalls()
    read, read_many = AsyncClient.read, AsyncClient.read_many
    read_many_each = AsyncClient.read_many_each

    async def counted_read(self, *args, **kwargs):
        with counter.lock:
            counter.reads += 1
        return await read(self, *args, **kwargs)

    async def counted_read_many(self, items):
        items = list(items)
        with counter.lock:
            counter.read_many += 1
            counter.items += len(items)
        return await read_many(self, items)

    def counted_read_many_each(self, items, futures):
        # The batcher's GetMany, whose items complete their gets one by one.
        with counter.lock:
            counter.read_many += 1
            counter.items += len(items)
        return read_many_each(self, items, futures)

    monkeypatch.setattr(AsyncClient, "read", counted_read)
    monkeypatch.setattr(AsyncClient, "read_many", counted_read_many)
    monkeypatch.setattr(AsyncClient, "read_many_each", counted_read_many_each)
    return counter


def server_has_flag(flag: str) -> bool:
    """Whether the chunkd binary has --flag (its --help lists it); False when it is missing."""
    try:
        done = subprocess.run([str(CHUNKD_BINARY), "--help"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"\n  --{flag} (" in "\n" + done.stdout + done.stderr


# Where chunkd reads values by blocks (--block_bytes): a block small enough that the ranges of
# the tests that use it span several blocks. None for a chunkd that reads whole values.
SMALL_BLOCK_FLAG = "--block_bytes=64KiB" if server_has_flag("block_bytes") else None

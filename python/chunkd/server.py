"""A chunkd server started from Python: for notebooks, tests and scripts.

    import chunkd, zarr
    with chunkd.Server(store="memory://", host_cache_bytes="1GiB") as server:
        z = zarr.create_array(server.url + "/demo.zarr", shape=(100,), chunks=(10,), dtype="f4")
        with chunkd.Client(server.url) as client: ...

The server is the ``chunkd`` binary: the one ``pip install`` put into the package
(``chunkd/bin/chunkd``), else ``$CHUNKD_BIN``, else the repository's build
(``build/server/chunkd`` beside ``python/``). ``$CHUNKD_BIN`` wins when it is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from chunkd._address import url_of

__all__ = ["Server", "ServerError", "binary_path"]

_PACKAGE = Path(__file__).resolve().parent
_REPO_BUILD = {"chunkd": "server/chunkd", "chunkctl": "client/chunkctl"}
_ENV = {"chunkd": "CHUNKD_BIN", "chunkctl": "CHUNKCTL_BIN"}


class ServerError(RuntimeError):
    """The server did not start, or did not become ready; the message carries its log."""


def binary_path(name: str = "chunkd") -> Path:
    """The ``chunkd`` or ``chunkctl`` binary this package uses: ``$CHUNKD_BIN`` /
    ``$CHUNKCTL_BIN`` when set, else the one installed with the package, else the repository's
    build. Raises FileNotFoundError saying where it looked."""
    if name not in _ENV:
        raise ValueError(f"no chunkd binary named {name!r} (chunkd or chunkctl)")
    candidates = []
    if os.environ.get(_ENV[name]):
        candidates.append(Path(os.environ[_ENV[name]]))
    candidates.append(_PACKAGE / "bin" / name)
    candidates.append(_PACKAGE.parent.parent / "build" / _REPO_BUILD[name])
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"chunkd: no {name} binary (looked at {', '.join(map(str, candidates))}): install the "
        f"package with `pip install ./python` (it builds both binaries into the package), or "
        f"build the repository (deploy/scripts/build.sh) or set ${_ENV[name]}"
    )


def _flag(name: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"--{name}={os.fspath(value) if isinstance(value, os.PathLike) else value}"


def _stop(process: subprocess.Popen, timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Server:
    """A ``chunkd`` server process, started when the object is made and stopped (SIGTERM) by
    :meth:`stop`, at the end of a ``with`` block, or when the interpreter exits.

    Args:
        store: the server's ``--store``: ``"memory://"`` (the default: the cache is the
            store), a directory, ``s3://...``, ``http(s)://...``.
        listen: where it listens: None (the default) a UNIX socket in a private temporary
            directory (only this user's processes can reach it; shared-memory delivery works),
            ``"tcp"`` a free port on 127.0.0.1, or any ``--listen`` value of chunkd's.
        binary: the chunkd binary (default: :func:`binary_path`).
        ready_timeout: seconds to wait until the server accepts calls.
        stop_timeout: seconds :meth:`stop` waits after SIGTERM before it kills the process.
        **flags: any other chunkd flag, as ``name=value`` (``host_cache_bytes="1GiB"``,
            ``shm_dir="/dev/shm"``, ``fsync=False``; lists are joined with commas).

    Attributes: ``url`` (``chunkd+unix:///...`` or ``chunkd://127.0.0.1:PORT``), which
    :class:`chunkd.Client`, :class:`chunkd.zarr.ChunkdStore` and fsspec (``url + "/path"``) all
    take; ``address`` (the gRPC target); ``pid``; :meth:`log` the server's output so far.
    """

    def __init__(
        self,
        store: str | os.PathLike = "memory://",
        *,
        listen: str | None = None,
        binary: str | os.PathLike | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        **flags: Any,
    ) -> None:
        self.binary = Path(binary) if binary is not None else binary_path("chunkd")
        self.stop_timeout = stop_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="chunkd-server-"))
        os.chmod(self._dir, 0o700)
        if listen is None:
            listen = f"unix:{self._dir / 'chunkd.sock'}"
        elif listen == "tcp":
            listen = "127.0.0.1:0"
        self._ready = self._dir / "ready"
        self._log_path = self._dir / "chunkd.log"
        self._final_log: str | None = None
        self.args = [
            str(self.binary),
            _flag("store", store),
            _flag("listen", listen),
            _flag("ready_file", self._ready),
            *(_flag(name, value) for name, value in flags.items()),
        ]
        with open(self._log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        # Stopped when the interpreter exits (or the object is collected) without stop().
        self._finalizer = weakref.finalize(
            self, Server._cleanup, self.process, self._dir, stop_timeout
        )
        try:
            self.address = self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.url = url_of(self.address)

    @staticmethod
    def _cleanup(process: subprocess.Popen, directory: Path, timeout: float) -> None:
        _stop(process, timeout)
        shutil.rmtree(directory, ignore_errors=True)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"chunkd exited with status {self.process.returncode} before it was ready:\n"
                    f"  {' '.join(self.args)}\n{self.log()}"
                )
            try:
                text = self._ready.read_text()
            except FileNotFoundError:
                text = ""
            if text.strip():  # written whole (a temporary file, then a rename)
                return text.splitlines()[0].strip()
            time.sleep(0.02)
        raise ServerError(
            f"chunkd was not ready after {timeout:g}s:\n  {' '.join(self.args)}\n{self.log()}"
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """What the server has written to stdout and stderr so far (all of it after stop)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """Stops the server (SIGTERM; killed after ``stop_timeout``) and returns its exit
        status (0 for a clean stop). Idempotent."""
        status = _stop(self.process, self.stop_timeout)
        if self._final_log is None:
            self._final_log = self.log()
        self._finalizer()
        return status

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"stopped ({self.process.returncode})"
        return f"chunkd.Server({getattr(self, 'url', '?')!r}, pid={self.pid}, {state})"

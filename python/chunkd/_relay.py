"""Clients in a process forked after gRPC started: calls go through a helper process.

gRPC (Debian's 1.51, which the native module links) cannot be used in a child forked from a
process where it had started: the child's copies of gRPC's threads (timers, the executor that
resolves names, the threads that complete the C++ callback API's calls) are gone, so a call
there hangs (deadlines never fire, host names never resolve, asynchronous calls never
complete). gRPC's own fork support does not help: its fork handlers are not registered in
Debian's build, and registered by hand they skip themselves ("Other threads are currently
calling into gRPC"), because the callback API's completion threads are always inside gRPC.

So a client made (or first used) in such a child — a data loader's worker, a ``fork`` pool's
process — gets a :class:`RelayNative` instead of a native client: the first call starts a
helper, ``python -m chunkd._relay``, with exec (a fresh process, whose gRPC is its own), which
makes the native client with the same arguments and serves the child's calls over a socket
pair, one at a time. The helper exits when the child closes the socket or exits. Values cross
the socket (one copy more than a native client's: inline delivery only, no shared memory or
CUDA IPC in such a child); calls from the child's threads and event loops take turns. Measured
in docs/python.md, "Workers that fork".
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from chunkd import _common as c

__all__ = ["RelayNative", "serve"]

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def _portable(value: Any) -> Any:
    """A native call's result as it crosses the socket: views become bytes."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, c.GetResult):
        return c.GetResult(
            _portable(value.data), value.total_size, value.generation, value.range_start,
            c.Delivery.INLINE, value.production_id,
        )  # fmt: skip
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _local(value: Any) -> Any:
    """A result back in the child: bytes become writable views, as inline values are."""
    if isinstance(value, bytes):
        return memoryview(bytearray(value))
    if isinstance(value, c.GetResult):
        return c.GetResult(
            _local(value.data), value.total_size, value.generation, value.range_start,
            value.delivery, value.production_id,
        )  # fmt: skip
    if isinstance(value, list):
        return [_local(v) for v in value]
    return value


class _Cancel:
    def cancel(self) -> None:
        pass  # a relayed call runs to its end; its result is dropped if nobody waits


class RelayNative:
    """Stands in for ``chunkd._native.Client`` in a forked child (see the module's notes):
    the same methods, each a call to the helper process."""

    def __init__(self, constructor: str, args: tuple, kwargs: dict[str, Any]) -> None:
        self._constructor = (constructor, args, kwargs)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- the helper ------------------------------------------------------------------------------

    def _connection(self) -> Connection:
        if self._conn is None:
            ours, theirs = socket.socketpair()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
            )
            self._process = subprocess.Popen(
                [sys.executable, "-m", "chunkd._relay", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self._conn = Connection(ours.detach())
            self._conn.send(self._constructor)
            ok, value = self._conn.recv()
            if not ok:
                raise value
        return self._conn

    def _call(self, method: str, *args: Any) -> Any:
        if os.getpid() != self._pid:
            raise RuntimeError("chunkd: a relayed client is its own process's")
        with self._lock:
            conn = self._connection()
            conn.send((method, args))
            try:
                ok, value = conn.recv()
            except EOFError:
                raise c.error_from_status(
                    14, "chunkd: the helper process of this forked process's client exited"
                ) from None
        if not ok:
            raise value
        return _local(value)

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            conn, self._conn = self._conn, None
            process, self._process = self._process, None
        if conn is not None:
            conn.close()  # the helper sees EOF and exits
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    # -- blocking calls --------------------------------------------------------------------------

    def get(self, key, start, end, suffix, out, match, not_match, full):
        value = self._call("get", key, start, end, suffix, None, match, not_match, full)
        if out is None:
            return value
        data = value.data if full else value
        view = memoryview(out).cast("B")
        view[: len(data)] = data
        view = view[: len(data)]
        if full:
            return c.GetResult(view, value.total_size, value.generation, value.range_start,
                               value.delivery)  # fmt: skip
        return view

    def put(self, key, data, match, not_match):
        return self._call("put", key, memoryview(data).tobytes(), match, not_match)

    def put_derived(self, key, derivation, data, source_generation, production_id, abandon):
        # The value crosses the pipe as bytes (a memoryview or an array does not pickle).
        payload = None if data is None else memoryview(data).cast("B").tobytes()
        return self._call("put_derived", key, derivation, payload, source_generation,
                          production_id, abandon)  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name.endswith("_async"):
            raise AttributeError(name)
        return lambda *args: self._call(name, *args)

    @property
    def leases_held(self) -> int:
        return 0

    @property
    def shm_disabled(self) -> str:
        return "a forked process's client (its calls go through a helper process)"

    def flush_releases(self) -> bool:
        return True

    # -- asynchronous calls (chunkd.aio): the blocking call on a thread, then the future -------

    def _start(self, future: asyncio.Future, box: bool, call, *args) -> _Cancel:
        loop = future.get_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="chunkd-relay")

        def run() -> None:
            try:
                value = call(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the future
                loop.call_soon_threadsafe(_set, future, False, e)
            else:
                loop.call_soon_threadsafe(_set, future, True, [value] if box else value)

        self._executor.submit(run)
        return _Cancel()

    def get_async(self, queue, future, key, start, end, suffix, out, match, not_match, device,
                  full):  # fmt: skip
        return self._start(future, True, self.get, key, start, end, suffix, out, match,
                           not_match, full)  # fmt: skip

    def get_many_async(self, queue, future, items, full):
        return self._start(future, True, self.get_many, items, full)

    def get_many_each_async(self, queue, futures, items):
        loop = futures[0].get_loop() if futures else None

        def run() -> None:
            try:
                results = self.get_many(items, True)
            except BaseException as e:  # noqa: BLE001 - every item's
                results = [e] * len(futures)
            for future, result in zip(futures, results, strict=True):
                if isinstance(result, BaseException):
                    loop.call_soon_threadsafe(_set, future, False, result)
                else:
                    loop.call_soon_threadsafe(_set, future, True, [result])

        if futures:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="chunkd-relay")
            self._executor.submit(run)
        return _Cancel()

    def put_async(self, queue, future, key, data, match, not_match):
        return self._start(future, False, self.put, key, data, match, not_match)

    def put_derived_async(self, queue, future, key, derivation, data, source_generation,
                          production_id, abandon):  # fmt: skip
        return self._start(future, False, self.put_derived, key, derivation, data,
                           source_generation, production_id, abandon)  # fmt: skip

    def delete_async(self, queue, future, key, match, not_match):
        return self._start(future, False, self.delete, key, match, not_match)

    def stat_async(self, queue, future, key):
        return self._start(future, False, self.stat, key)

    def list_pages_async(self, queue, future, prefix, directory):
        return self._start(future, False, self.list_pages, prefix, directory)

    def server_info_async(self, queue, future):
        return self._start(future, False, self.server_info)


def _set(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def serve(fd: int) -> None:
    """The helper: makes the native client and answers the child's calls until EOF."""
    conn = Connection(fd)
    try:
        constructor, args, kwargs = conn.recv()
    except EOFError:
        return
    try:
        if constructor == "sharded":
            native = c._native.Client.sharded(*args, **kwargs)
        else:
            native = c._native.Client(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the child raises it
        conn.send((False, e))
        return
    conn.send((True, None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break
        try:
            value = _portable(getattr(native, method)(*args))
        except BaseException as e:  # noqa: BLE001 - the child raises it
            conn.send((False, e))
        else:
            conn.send((True, value))
    native.close()


c.register_relay(RelayNative)

if __name__ == "__main__":
    serve(int(sys.argv[1]))

"""The native client core (chunkd._native): a clear error when it is missing, values without a
copy, the GIL released during calls, asyncio completions and cancellation, and grpcio's own
gRPC core in the same process."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time

import numpy as np
import pytest
from zarr.buffer import cpu

import chunkd
from chunkd_testing import REPO_ROOT

PYTHON_DIR = REPO_ROOT / "python"
MiB = 1 << 20


def test_missing_native_module_gives_a_clear_error(tmp_path):
    # A copy of the package without its native module, first on sys.path.
    shutil.copytree(
        PYTHON_DIR / "chunkd",
        tmp_path / "chunkd",
        ignore=shutil.ignore_patterns("_native*", "__pycache__"),
    )
    # -S: no .pth files, so the editable install's finder cannot supply chunkd._native.
    site_packages = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import chunkd"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{site_packages}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "chunkd._native" in result.stderr and "build.sh" in result.stderr, result.stderr


def _address(array) -> int:
    return array.__array_interface__["data"][0]


def test_values_arrive_without_a_copy(client, prefix):
    data = os.urandom(MiB + 5)
    client.put(f"{prefix}/v", data)
    view = client.get(f"{prefix}/v")
    # numpy and zarr's Buffer wrap the very memory the C++ client received the bytes into.
    array = np.frombuffer(view, dtype=np.uint8)
    buffer = cpu.Buffer.from_bytes(view)
    assert _address(buffer.as_numpy_array()) == _address(array)
    assert buffer.to_bytes() == data
    view[0] ^= 0xFF  # the caller's own bytes: writable
    assert array[0] == data[0] ^ 0xFF
    del view, buffer
    assert bytes(array[1:10]) == data[1:10]  # the array alone keeps the memory alive


def test_blocking_calls_release_the_gil():
    """A call waiting on the network does not hold the GIL: Python keeps running meanwhile."""
    c = chunkd.Client("127.0.0.1:1", timeout=1.5, retries=100)
    done = threading.Event()

    def call():
        try:
            c.stat("x")
        except chunkd.ChunkdError:
            pass
        done.set()

    thread = threading.Thread(target=call)
    thread.start()
    spins = 0
    start = time.monotonic()
    while not done.is_set() and time.monotonic() - start < 10:
        spins += 1
    thread.join()
    assert spins > 10_000  # the GIL was free while the call waited
    c.close()


async def test_async_calls_from_many_tasks_and_loops(memory_server, prefix):
    values = {f"{prefix}/{i}": os.urandom(1000 + 37 * i) for i in range(64)}
    async with chunkd.AsyncClient(memory_server.address) as c:
        await asyncio.gather(*(c.put(k, v) for k, v in values.items()))
        got = await asyncio.gather(*(c.get(k) for k in values))
        assert got == list(values.values())

        # The same client from other threads' event loops at once (a completion queue each).
        def in_loop(keys):
            async def run():
                return [bytes(v) for v in await asyncio.gather(*(c.get(k) for k in keys))]

            return asyncio.run(run())

        keys = list(values)
        results = await asyncio.gather(
            *(asyncio.to_thread(in_loop, keys[i::4]) for i in range(4))
        )
        for i, result in enumerate(results):
            assert result == [values[k] for k in keys[i::4]]


async def test_cancelled_async_get_cancels_the_call(memory_server, prefix):
    data = os.urandom(16 * MiB)
    async with chunkd.AsyncClient(memory_server.address) as c:
        await c.put(f"{prefix}/big", data)
        for _ in range(5):
            task = asyncio.create_task(c.get(f"{prefix}/big"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.get(f"{prefix}/big"), 0.000001)
        assert await c.get(f"{prefix}/big") == data


_GRPCIO_TOGETHER = textwrap.dedent(
    """
    import os, sys
    first = sys.argv[2]
    if first == "grpc":
        import grpc
        import chunkd
    else:
        import chunkd
        import grpc

    address = sys.argv[1]

    def grpcio_info():
        # A raw call through grpcio's own gRPC core: ServerInfo takes an empty message.
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/chunkd.v1.Chunkd/ServerInfo")
            reply = call(b"", timeout=20)
            assert len(reply) > 10, reply

    grpcio_info()
    client = chunkd.Client(address)
    client.put("together/k", b"x" * 100_000)
    assert client.get("together/k") == b"x" * 100_000
    grpcio_info()
    try:
        client.get("together/missing")
    except chunkd.NotFoundError as e:
        assert e.code == grpc.StatusCode.NOT_FOUND and grpc.StatusCode.NOT_FOUND == e.code
        assert {grpc.StatusCode.NOT_FOUND: 1}[e.code] == 1
    # A forked child that uses neither: exits cleanly (both cores' fork handlers).
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    # A child that uses the native core (a client of its own, or its parent's): gRPC cannot run
    # in a child forked after it started, so both relay their calls through a helper process.
    pid = os.fork()
    if pid == 0:
        code = 0
        for attempt in (lambda: chunkd.Client(address).get("together/k"),
                        lambda: client.get("together/k")):
            try:
                code = code or (0 if attempt() == b"x" * 100_000 else 3)
            except Exception:
                code = 4
        os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    grpcio_info()
    assert client.get("together/k") == b"x" * 100_000
    print("ok", flush=True)
    """
)


@pytest.mark.parametrize("first", ["grpc", "chunkd"])
def test_grpcio_and_the_native_core_in_one_process(memory_server, first):
    pytest.importorskip("grpc")
    result = subprocess.run(
        [sys.executable, "-c", _GRPCIO_TOGETHER, memory_server.address, first],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr

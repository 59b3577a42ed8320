"""Shared-memory delivery (``delivery="shm"``) in the clients and in ChunkdStore, against real
servers whose ``--shm_dir`` is a fresh directory under /dev/shm."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.buffer import default_buffer_prototype

import chunkd
from chunkd._common import _native
from chunkd.zarr import ChunkdStore
from chunkd_testing import REPO_ROOT, serve_with_shm

KiB, MiB = 1 << 10, 1 << 20
SHM = chunkd.Delivery.SHM
INLINE = chunkd.Delivery.INLINE

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
    reason="shared-memory delivery needs Linux and /dev/shm",
)


def _server(tmp_path_factory, name: str, *extra: str):
    with serve_with_shm(tmp_path_factory.mktemp(name), *extra) as server:
        yield server


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    """A file-backed server with its own shared-memory directory (``.shm_dir``)."""
    yield from _server(tmp_path_factory, "shm-server")


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory):
    """The same with one-second leases."""
    yield from _server(tmp_path_factory, "shm-ttl-server", "--lease_ttl=1s")


def _info(server) -> chunkd.ServerInfo:
    with chunkd.Client(server.address) as c:
        return c.server_info()


def _wait_leases(server, active: int, timeout: float = 10.0) -> chunkd.ServerInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = _info(server)
        if info.leases_active == active or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def _settle(*clients) -> None:
    """Drops what only cycles hold and sends the releases now."""
    gc.collect()
    for client in clients:
        assert client.flush_releases(10)


@pytest.fixture
def shm_client(shm_server):
    """A blocking client with delivery="shm"; every test must leave no lease behind."""
    with chunkd.Client(shm_server.address, delivery="shm", shm_dir=shm_server.shm_dir) as c:
        yield c
        _settle(c)
        assert c.leases_held == 0
        assert _info(shm_server).leases_active == 0


# -- the blocking client -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * KiB, 64 * KiB + 3, MiB, 4 * MiB + 1, 16 * MiB])
def test_round_trip(shm_client, shm_server, prefix, size):
    data = os.urandom(size)
    key = f"{prefix}/v"
    put = shm_client.put(key, data)
    result = shm_client.read(key)
    assert result.delivery == SHM
    assert isinstance(result.data, memoryview) and result.data.readonly
    assert result.data == data
    assert (result.total_size, result.generation, result.range_start) == (size, put.generation, 0)
    assert _info(shm_server).leases_active == 1
    # get() returns the view itself; ranges come back as handles too.
    assert shm_client.get(key) == data
    for (start, end, suffix), expected in [
        ((3, 4099, None), data[3:4099]),
        ((size // 2, None, None), data[size // 2 :]),
        ((None, None, 1000), data[-1000:]),
        ((size - 5, size + 100, None), data[size - 5 :]),  # past the end: what exists
    ]:
        r = shm_client.read(key, start, end, suffix=suffix)
        assert r.delivery == SHM and r.data == expected
        assert r.range_start == size - len(expected) if suffix else r.range_start == (start or 0)


def test_views_keep_the_lease(shm_client, shm_server, prefix):
    data = os.urandom(MiB)
    shm_client.put(f"{prefix}/v", data)
    view = shm_client.get(f"{prefix}/v")
    piece = view[100:200]  # a memoryview slice shares the holder
    array = np.frombuffer(view, dtype=np.uint8)[::2]  # so does a numpy view of it
    del view
    _settle(shm_client)
    assert _info(shm_server).leases_active == 1 and shm_client.leases_held == 1
    del piece
    _settle(shm_client)
    assert _info(shm_server).leases_active == 1
    assert bytes(array[:10]) == data[:20:2]
    with pytest.raises(ValueError):
        array[0] = 1  # read-only: the server's memory
    del array
    _settle(shm_client)
    assert _info(shm_server).leases_active == 0 and shm_client.leases_held == 0


def test_many_values_then_gc(shm_client, shm_server, prefix):
    values = {f"{prefix}/{i}": os.urandom(4 * KiB * (i + 1)) for i in range(50)}
    for key, value in values.items():
        shm_client.put(key, value)
    before = _info(shm_server).counters
    held = {key: shm_client.get(key) for key in values}
    assert all(held[key] == values[key] for key in values)
    info = _info(shm_server)
    assert info.leases_active == 50 and info.leased_bytes >= sum(map(len, values.values()))
    assert info.counters["gets_shm"] - before["gets_shm"] == 50
    assert shm_client.leases_held == 50
    del held
    _settle(shm_client)
    info = _info(shm_server)
    assert info.leases_active == 0
    assert info.counters["leases_released"] - before["leases_released"] == 50
    assert info.counters["leases_unknown"] == before["leases_unknown"]


def test_out_buffer_copies_and_releases(shm_client, shm_server, prefix):
    data = os.urandom(MiB + 7)
    shm_client.put(f"{prefix}/v", data)
    out = np.zeros(2 * MiB, dtype=np.uint8)
    result = shm_client.read(f"{prefix}/v", out=out)
    assert result.delivery == SHM and result.data == data
    assert bytes(out[: len(data)]) == data
    _settle(shm_client)
    assert _info(shm_server).leases_active == 0  # the copy holds no lease
    with pytest.raises(ValueError, match="out holds"):
        shm_client.read(f"{prefix}/v", out=bytearray(10))


def test_missing_key_and_conditions(shm_client, prefix):
    with pytest.raises(chunkd.NotFoundError):
        shm_client.get(f"{prefix}/missing")
    put = shm_client.put(f"{prefix}/v", b"x" * 5000)
    assert shm_client.get(f"{prefix}/v", if_generation_match=put.generation) == b"x" * 5000
    with pytest.raises(chunkd.PreconditionFailed):
        shm_client.get(f"{prefix}/v", if_generation_match=put.generation + 1)


def test_empty_value_arrives_inline(shm_client, prefix):
    shm_client.put(f"{prefix}/empty", b"")
    result = shm_client.read(f"{prefix}/empty")
    assert result.delivery == INLINE and result.data == b""


def test_update_does_not_change_a_held_value(shm_client, prefix):
    old, new = os.urandom(256 * KiB), os.urandom(256 * KiB)
    shm_client.put(f"{prefix}/v", old)
    held = shm_client.get(f"{prefix}/v")
    shm_client.put(f"{prefix}/v", new)
    assert shm_client.get(f"{prefix}/v") == new
    assert held == old  # the lease pins the old bytes
    del held


def test_other_shm_dir_falls_back_to_inline(shm_server, prefix, tmp_path):
    data = os.urandom(64 * KiB)
    with chunkd.Client(shm_server.address) as writer:
        writer.put(f"{prefix}/v", data)
    before = _info(shm_server).counters["shm_fallbacks"]
    for shm_dir in (str(tmp_path), "/dev/shm", str(tmp_path / "does-not-exist")):
        with chunkd.Client(shm_server.address, delivery="shm", shm_dir=shm_dir) as other:
            result = other.read(f"{prefix}/v")
            assert result.delivery == INLINE, shm_dir
            assert isinstance(result.data, memoryview) and not result.data.readonly
            assert result.data == data
            assert other.leases_held == 0
    assert _info(shm_server).counters["shm_fallbacks"] - before == 3


def test_inline_is_the_default(shm_server, prefix):
    with chunkd.Client(shm_server.address) as plain:
        plain.put(f"{prefix}/v", b"y" * 10000)
        result = plain.read(f"{prefix}/v")
    assert result.delivery == INLINE and not result.data.readonly
    with pytest.raises(ValueError, match="delivery"):
        chunkd.Client(shm_server.address, delivery="carrier-pigeon")
    with pytest.raises(ValueError, match="delivery"):
        ChunkdStore(f"chunkd://{shm_server.address}", delivery="cuda-ipc-maybe")


def test_unmappable_handle_retries_inline(shm_client, shm_server, prefix):
    """A handle the client cannot map (here: a permission error, injected into the C++
    client's import) is given back and the value read again inline; shared memory stays off
    for that client."""
    data = os.urandom(128 * KiB)
    shm_client.put(f"{prefix}/v", data)
    assert not shm_client.shm_disabled
    _native.fail_next_shm_imports(1)
    result = shm_client.read(f"{prefix}/v")
    assert result.delivery == INLINE and result.data == data
    assert "permission denied" in shm_client.shm_disabled
    assert shm_client.read(f"{prefix}/v").delivery == INLINE
    # The lease of the refused handle was released (the fixture checks that none is left).


def test_get_many_over_shared_memory(shm_client, shm_server, prefix):
    """get_many: each value a handle with a lease of its own, released like get's; misses and
    empty values as with get."""
    values = {f"{prefix}/{i}": os.urandom(4 * KiB << (i % 9)) for i in range(30)}
    values[f"{prefix}/big"] = os.urandom(4 * MiB + 1)
    for key, value in values.items():
        shm_client.put(key, value)
    shm_client.put(f"{prefix}/empty", b"")
    keys = list(values)
    before = _info(shm_server).counters
    items = [*keys, f"{prefix}/missing", f"{prefix}/empty", (keys[0], 10, 20)]
    results = shm_client.read_many(items)
    info = _info(shm_server)
    assert info.counters["get_many_calls"] - before["get_many_calls"] == 1
    assert info.counters["gets_shm"] - before["gets_shm"] == len(keys) + 1
    assert info.leases_active == len(keys) + 1 and shm_client.leases_held == len(keys) + 1
    for key, result in zip(keys, results, strict=False):
        assert result.delivery == SHM, key
        assert isinstance(result.data, memoryview) and result.data.readonly
        assert result.data == values[key]
    missing, empty, ranged = results[len(keys) :]
    assert isinstance(missing, chunkd.NotFoundError)
    assert empty.delivery == INLINE and empty.data == b""
    assert ranged.delivery == SHM and ranged.data == values[keys[0]][10:20]
    kept = results[3].data[5:50]  # a view keeps its value's lease alone
    del results, result, missing, empty, ranged
    _settle(shm_client)
    assert _info(shm_server).leases_active == 1 and shm_client.leases_held == 1
    assert kept == values[keys[3]][5:50]
    del kept
    _settle(shm_client)
    assert _info(shm_server).leases_active == 0
    # get_many hands out the views themselves.
    got = shm_client.get_many(keys[:3])
    assert got == [values[k] for k in keys[:3]] and all(v.readonly for v in got)
    del got


def test_get_many_unmappable_handle_retries_inline(shm_client, shm_server, prefix):
    """As for get: a handle the client cannot map sends the whole call again, inline, and the
    leases of that first reply (the items mapped before and after it) are given back (the
    fixture checks that none is left)."""
    values = [os.urandom(64 * KiB + i) for i in range(5)]
    for i, value in enumerate(values):
        shm_client.put(f"{prefix}/{i}", value)
    assert shm_client.read(f"{prefix}/0").delivery == SHM
    _native.fail_next_shm_imports(1)
    results = shm_client.read_many([f"{prefix}/{i}" for i in range(5)] + [f"{prefix}/x"])
    assert [r.delivery for r in results[:5]] == [INLINE] * 5
    assert [r.data for r in results[:5]] == values
    assert isinstance(results[5], chunkd.NotFoundError)
    assert shm_client.shm_disabled


async def test_async_get_many_over_shared_memory(shm_server, prefix):
    async with chunkd.AsyncClient(
        shm_server.address, delivery="shm", shm_dir=shm_server.shm_dir
    ) as client:
        values = {f"{prefix}/{i}": os.urandom(8 * KiB * (i + 1)) for i in range(10)}
        await asyncio.gather(*(client.put(k, v) for k, v in values.items()))
        results = await client.read_many([*values, f"{prefix}/missing"])
        assert [r.delivery for r in results[:-1]] == [SHM] * 10
        assert [bytes(r.data) for r in results[:-1]] == list(values.values())
        assert isinstance(results[-1], chunkd.NotFoundError)
        assert client.leases_held == 10
        del results
        gc.collect()
        assert await client.flush_releases()
        assert client.leases_held == 0
        assert (await client.server_info()).leases_active == 0


def test_pickled_client_keeps_delivery(shm_server):
    client = chunkd.Client(shm_server.address, delivery="shm", shm_dir=shm_server.shm_dir)
    again = pickle.loads(pickle.dumps(client))
    assert (again.delivery, again.shm_dir) == ("shm", shm_server.shm_dir)
    again.close()
    client.close()


def test_fork_child_does_not_release_parent_leases(shm_client, shm_server, prefix):
    """A forked child inherits the parent's views; dropping them there releases nothing."""
    shm_client.put(f"{prefix}/v", os.urandom(64 * KiB))
    held = shm_client.get(f"{prefix}/v")
    pid = os.fork()
    if pid == 0:  # the child: no gRPC here, only the finalizer
        try:
            del held
            gc.collect()
            time.sleep(0.1)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    _settle(shm_client)
    assert _info(shm_server).leases_active == 1
    del held


# -- lease life: renewal, expiry, process exit ---------------------------------------------------


def test_held_leases_are_renewed(short_ttl_server, prefix):
    data = os.urandom(256 * KiB)
    with chunkd.Client(
        short_ttl_server.address, delivery="shm", shm_dir=short_ttl_server.shm_dir
    ) as client:
        client.put(f"{prefix}/v", data)
        before = _info(short_ttl_server).counters
        held = client.get(f"{prefix}/v")
        time.sleep(3.0)  # three TTLs: renewed about every 1/3 s
        info = _info(short_ttl_server)
        assert info.leases_active == 1
        assert info.counters["leases_expired"] == before["leases_expired"]
        assert held == data
        del held
        _settle(client)
        assert _info(short_ttl_server).leases_active == 0


_HOLDER = textwrap.dedent(
    """
    import os, sys, chunkd
    client = chunkd.Client(sys.argv[1], delivery="shm", shm_dir=sys.argv[2])
    held = [client.get(key) for key in sys.argv[4:]]
    print(sum(len(h) for h in held), flush=True)
    if sys.argv[3] == "kill":
        os._exit(0)  # no atexit, no releases: the leases must expire on their own
    """
)


def _run_holder(server, how: str, keys: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "python"))
    out = subprocess.run(
        [sys.executable, "-c", _HOLDER, server.address, server.shm_dir, how, *keys],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    return int(out.stdout.split()[0])


def test_leases_of_a_dead_client_expire(short_ttl_server, prefix):
    keys = [f"{prefix}/{i}" for i in range(4)]
    with chunkd.Client(short_ttl_server.address) as writer:
        for key in keys:
            writer.put(key, os.urandom(32 * KiB))
    before = _info(short_ttl_server).counters
    assert _run_holder(short_ttl_server, "kill", keys) == 4 * 32 * KiB
    info = _info(short_ttl_server)
    assert info.counters["leases_granted"] - before["leases_granted"] == 4
    info = _wait_leases(short_ttl_server, 0, timeout=15)
    assert info.leases_active == 0
    assert info.counters["leases_expired"] - before["leases_expired"] == 4


def test_leases_are_released_at_exit(shm_server, prefix):
    keys = [f"{prefix}/{i}" for i in range(4)]
    with chunkd.Client(shm_server.address) as writer:
        for key in keys:
            writer.put(key, os.urandom(32 * KiB))
    before = _info(shm_server).counters
    assert _run_holder(shm_server, "exit", keys) == 4 * 32 * KiB
    info = _info(shm_server)  # the server's TTL is 30 s: only a release explains 0
    assert info.leases_active == 0
    assert info.counters["leases_released"] - before["leases_released"] == 4


# -- the asyncio client --------------------------------------------------------------------------


async def test_async_round_trip_and_release(shm_server, prefix):
    async with chunkd.AsyncClient(
        shm_server.address, delivery="shm", shm_dir=shm_server.shm_dir
    ) as client:
        values = {f"{prefix}/{i}": os.urandom(4 * KiB << (i % 10)) for i in range(40)}
        await asyncio.gather(*(client.put(k, v) for k, v in values.items()))
        results = await asyncio.gather(*(client.read(k) for k in values))
        assert all(r.delivery == SHM for r in results)
        assert [bytes(r.data) for r in results] == list(values.values())
        key, value = next(iter(values.items()))
        assert await client.get(key, 10, 20) == value[10:20]
        assert await client.get(key, suffix=7) == value[-7:]
        assert client.leases_held >= 40
        del results
        gc.collect()
        assert await client.flush_releases()
        assert client.leases_held == 0
        assert (await client.server_info()).leases_active == 0


async def test_async_value_outlives_client_and_loop(shm_server, prefix):
    client = chunkd.AsyncClient(shm_server.address, delivery="shm", shm_dir=shm_server.shm_dir)
    await client.put(f"{prefix}/v", b"z" * 70000)
    held = await client.get(f"{prefix}/v")
    await client.close()
    assert held == b"z" * 70000 and _info(shm_server).leases_active == 1
    del held
    gc.collect()
    # The value held the client's lease keeper: it returns the lease, then goes.
    assert (await asyncio.to_thread(_wait_leases, shm_server, 0)).leases_active == 0


# -- ChunkdStore ---------------------------------------------------------------------------------


def _stores(server, prefix):
    url = f"chunkd://{server.address}/{prefix}"
    return ChunkdStore(url), ChunkdStore(url, delivery="shm", shm_dir=server.shm_dir)


@pytest.mark.parametrize(
    ("dtype", "compressors", "shards"),
    [
        ("float32", None, None),
        ("int16", ZstdCodec(level=1), None),
        (">f8", BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"), None),
        ("uint8", None, (64, 64)),
        ("complex64", ZstdCodec(level=1), (32, 96)),
    ],
)
def test_zarr_shm_equals_inline(shm_server, prefix, dtype, compressors, shards):
    rng = np.random.default_rng(7)
    data = (rng.standard_normal((150, 190)) * 100).astype(dtype)
    inline, shm = _stores(shm_server, prefix)
    array = zarr.create_array(
        inline, name="a", shape=data.shape, chunks=(16, 32), shards=shards, dtype=dtype,
        compressors=compressors,
    )
    array[:] = data
    before = _info(shm_server).counters["gets_shm"]
    by_inline = zarr.open_array(inline.with_read_only(True), path="a", mode="r")
    by_shm = zarr.open_array(shm.with_read_only(True), path="a", mode="r")
    assert by_shm.store.delivery == "shm"
    got = by_shm[:]
    np.testing.assert_array_equal(got, by_inline[:])
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(by_shm[17:91, 5:133], data[17:91, 5:133])
    assert got.flags.writeable  # zarr's output is its own array, not the server's memory
    got[0, 0] = 0
    assert _info(shm_server).counters["gets_shm"] - before >= 10
    gc.collect()
    assert by_shm.store.flush_releases()
    assert _info(shm_server).leases_active == 0


def test_zarr_buffer_holds_the_lease(shm_server, prefix):
    data = os.urandom(300 * KiB)
    inline, shm = _stores(shm_server, prefix)
    with chunkd.Client(shm_server.address) as writer:
        writer.put(f"{prefix}/c/0", data)
    proto = default_buffer_prototype()
    buf = shm.get_sync("c/0", prototype=proto)
    assert buf.to_bytes() == data
    assert not buf.as_numpy_array().flags.writeable  # a view of shared memory, no copy
    assert _info(shm_server).leases_active == 1
    array = buf.as_numpy_array()[1000:2000]  # zarr-style view of the buffer
    del buf
    gc.collect()
    assert shm.flush_releases()
    assert _info(shm_server).leases_active == 1  # the view keeps it
    assert bytes(array) == data[1000:2000]
    del array
    gc.collect()
    assert shm.flush_releases()
    assert _info(shm_server).leases_active == 0

    # The async path (zarr's own loop does this), through a loop that then closes.
    async def read():
        return await shm.get("c/0", proto), await inline.get("c/0", proto)

    buf, plain = asyncio.run(read())
    assert buf.to_bytes() == plain.to_bytes() == data
    assert _info(shm_server).leases_active == 1
    del buf
    gc.collect()
    assert shm.flush_releases()
    assert _info(shm_server).leases_active == 0


async def test_zarr_byte_ranges_come_as_handles(shm_server, prefix):
    data = os.urandom(MiB + 11)
    _, shm = _stores(shm_server, prefix)
    with chunkd.Client(shm_server.address) as writer:
        writer.put(f"{prefix}/blob", data)
    proto = default_buffer_prototype()
    before = _info(shm_server).counters["gets_shm"]
    requests = [
        (RangeByteRequest(5, 70000), data[5:70000]),
        (OffsetByteRequest(MiB), data[MiB:]),
        (SuffixByteRequest(4096), data[-4096:]),
        (None, data),
    ]
    for byte_range, expected in requests:
        assert (await shm.get("blob", proto, byte_range)).to_bytes() == expected
    many = await shm.get_partial_values(proto, [("blob", r) for r, _ in requests])
    assert [b.to_bytes() for b in many] == [e for _, e in requests]
    assert await shm.get("missing", proto) is None
    assert _info(shm_server).counters["gets_shm"] - before == 8
    del many
    gc.collect()
    assert shm.flush_releases()
    assert _info(shm_server).leases_active == 0


def test_store_pickles_with_delivery(shm_server, prefix):
    _, shm = _stores(shm_server, prefix)
    for store in (pickle.loads(pickle.dumps(shm)), shm.with_read_only(True)):
        assert (store.delivery, store.shm_dir) == ("shm", shm_server.shm_dir)


SHAPE = (256, 512)
CHUNKS = (32, 64)


def _expected() -> np.ndarray:
    return np.arange(SHAPE[0] * SHAPE[1], dtype="float32").reshape(SHAPE) * 0.5


def read_rows_shm(args):
    """Runs in a spawned process: the store arrives pickled, with delivery="shm"."""
    store, start, stop = args
    block = zarr.open_array(store, path="data", mode="r")[start:stop]
    gc.collect()
    store.flush_releases()
    return start, stop, block


@pytest.mark.timeout(240)
def test_pool_of_spawned_shm_readers(shm_server, prefix):
    inline, shm = _stores(shm_server, prefix)
    expected = _expected()
    zarr.create_array(inline, name="data", shape=SHAPE, chunks=CHUNKS, dtype="f4")[:] = expected
    before = _info(shm_server).counters["gets_shm"]
    reader = shm.with_read_only(True)
    rows = SHAPE[0] // 8
    jobs = [(reader, i * rows, (i + 1) * rows) for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(read_rows_shm, jobs)
        pool.close()
        pool.join()
    got = np.empty_like(expected)
    for start, stop, block in results:
        got[start:stop] = block
    np.testing.assert_array_equal(got, expected)
    chunks = (SHAPE[0] // CHUNKS[0]) * (SHAPE[1] // CHUNKS[1])
    info = _wait_leases(shm_server, 0, timeout=5)
    assert info.counters["gets_shm"] - before >= chunks
    assert info.leases_active == 0

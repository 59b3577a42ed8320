"""ChunkdStore.get coalescing (batch_gets=True, the default): the gets one event loop issues in
one iteration go out as one GetMany call, with the results and errors of one Get per key."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype

import chunkd
from chunkd import zarr as chunkd_zarr
from chunkd.zarr import ChunkdStore
from chunkd_testing import count_store_calls

KiB = 1 << 10
PROTO = default_buffer_prototype()


@pytest.fixture
def calls(monkeypatch):
    """The store's calls to the server, counted client side (chunkd_testing.StoreCalls)."""
    return count_store_calls(monkeypatch)


def _counters(server) -> dict[str, int]:
    with chunkd.Client(server.address) as c:
        return c.server_info().counters


@pytest.fixture
def values(memory_server, prefix):
    """600 small values (4 B to 6 KiB) under prefix/k/<i>."""
    data = {f"k/{i}": os.urandom(4 + (i * 37) % (6 * KiB)) for i in range(600)}
    with chunkd.Client(memory_server.address) as c:
        for key, value in data.items():
            c.put(f"{prefix}/{key}", value)
    return data


def _store(server, prefix, **kwargs) -> ChunkdStore:
    return ChunkdStore(f"chunkd://{server.address}/{prefix}", read_only=True, **kwargs)


def _bytes(buf):
    return None if buf is None else buf.to_bytes()


async def test_concurrent_gets_are_one_call(memory_server, prefix, values, calls):
    keys = list(values)[:200]
    store, plain = _store(memory_server, prefix), _store(memory_server, prefix, batch_gets=False)
    assert store.batch_gets and not plain.batch_gets
    before = _counters(memory_server)
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys))
    after = _counters(memory_server)
    assert [b.to_bytes() for b in got] == [values[k] for k in keys]
    assert all(isinstance(b, PROTO.buffer) for b in got)
    assert calls.snapshot() == (0, 1, len(keys))
    assert after["get_many_calls"] - before["get_many_calls"] == 1
    assert after["gets"] - before["gets"] == len(keys)
    # The same bytes as sequential gets, and as the unbatched store's (one Get each).
    sequential = [_bytes(await store.get(k, PROTO)) for k in keys]
    assert calls.snapshot() == (len(keys), 1, len(keys))  # each alone: one Get
    before = _counters(memory_server)
    unbatched = await asyncio.gather(*(plain.get(k, PROTO) for k in keys))
    assert _counters(memory_server)["get_many_calls"] == before["get_many_calls"]
    assert calls.reads == 2 * len(keys)
    assert sequential == [b.to_bytes() for b in unbatched] == [values[k] for k in keys]
    store.close()
    plain.close()


async def test_large_batches_are_split(memory_server, prefix, values, calls):
    keys = list(values)  # 600: 256 + 256 + 88
    store = _store(memory_server, prefix)
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys))
    assert [b.to_bytes() for b in got] == [values[k] for k in keys]
    assert calls.snapshot() == (0, 3, 600)
    store.close()


async def test_lone_get_is_one_get(memory_server, prefix, values, calls):
    store = _store(memory_server, prefix)
    for i in range(5):
        before = _counters(memory_server)
        assert (await store.get(f"k/{i}", PROTO)).to_bytes() == values[f"k/{i}"]
        after = _counters(memory_server)
        assert after["gets"] - before["gets"] == 1
        assert after["get_many_calls"] == before["get_many_calls"]
    assert await store.get("k/missing", PROTO) is None
    assert calls.snapshot() == (6, 0, 0)
    store.close()


async def test_lone_get_latency_is_not_delayed(memory_server, prefix, values):
    """A lone get is one Get sent on the loop's next iteration, with no timer: its latency stays
    that of the unbatched store's (a generous bound: this machine may be loaded)."""
    store, plain = _store(memory_server, prefix), _store(memory_server, prefix, batch_gets=False)
    loop = asyncio.get_running_loop()
    await store.get("k/0", PROTO)
    await plain.get("k/0", PROTO)
    batched, unbatched = [], []
    for _ in range(30):
        for which, samples in ((store, batched), (plain, unbatched)):
            start = loop.time()
            await which.get("k/1", PROTO)
            samples.append(loop.time() - start)
    assert sorted(batched)[15] < 3 * sorted(unbatched)[15] + 0.005
    store.close()
    plain.close()


async def test_missing_key_is_none_among_others(memory_server, prefix, values, calls):
    store = _store(memory_server, prefix)
    keys = ["k/0", "k/missing", "k/1", "nope/x", "k/2"]
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys))
    assert [_bytes(b) for b in got] == [values["k/0"], None, values["k/1"], None, values["k/2"]]
    assert calls.snapshot() == (0, 1, 5)
    store.close()


async def test_an_error_raises_from_its_get_only(memory_server, prefix, values, calls):
    store = _store(memory_server, prefix)
    keys = ["k/0", "a//b", "k/1", "../up", "k/2"]
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys), return_exceptions=True)
    assert [_bytes(b) for b in got[::2]] == [values["k/0"], values["k/1"], values["k/2"]]
    for error, key in ((got[1], "a//b"), (got[3], "../up")):
        assert isinstance(error, chunkd.InvalidArgument) and isinstance(error, ValueError)
        assert error.key == f"{prefix}/{key}"
    assert calls.snapshot() == (0, 1, 5)
    # A get whose arguments are wrong before anything is sent raises alone, as before.
    bad = await asyncio.gather(
        store.get("k/0", PROTO), store.get(42, PROTO), store.get("k/1", PROTO, (1, 2)),
        return_exceptions=True,
    )
    assert bad[0].to_bytes() == values["k/0"]
    assert isinstance(bad[1], TypeError) and isinstance(bad[2], TypeError)
    store.close()


async def test_byte_ranges(memory_server, prefix, calls):
    data = os.urandom(100 * KiB + 7)
    with chunkd.Client(memory_server.address) as c:
        c.put(f"{prefix}/blob", data)
        c.put(f"{prefix}/small", b"0123456789")
    store, plain = _store(memory_server, prefix), _store(memory_server, prefix, batch_gets=False)
    requests = [
        ("blob", None, data),
        ("blob", RangeByteRequest(5, 70000), data[5:70000]),
        ("blob", OffsetByteRequest(100 * KiB), data[100 * KiB :]),
        ("blob", SuffixByteRequest(4096), data[-4096:]),
        ("small", RangeByteRequest(3, 1 << 30), b"3456789"),  # past the end: what exists
        ("small", SuffixByteRequest(0), b""),
        ("small", RangeByteRequest(4, 4), b""),
        ("missing", RangeByteRequest(0, 1), None),
    ]
    got = await asyncio.gather(*(store.get(k, PROTO, r) for k, r, _ in requests))
    assert [_bytes(b) for b in got] == [e for _, _, e in requests]
    assert calls.snapshot() == (0, 1, len(requests))
    one_by_one = [_bytes(await plain.get(k, PROTO, r)) for k, r, _ in requests]
    assert one_by_one == [e for _, _, e in requests]
    store.close()
    plain.close()


async def test_cancelled_gets(memory_server, prefix, values, calls):
    store = _store(memory_server, prefix)
    keys = [f"k/{i}" for i in range(20)]
    # One cancelled before its batch goes out, one while the call is in flight.
    tasks = [asyncio.create_task(store.get(k, PROTO)) for k in keys]
    await asyncio.sleep(0)  # every get has enqueued; the batch goes out next iteration
    tasks[3].cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls.read_many == 1  # in flight
    tasks[7].cancel()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (key, result) in enumerate(zip(keys, got, strict=True)):
        if i in (3, 7):
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result.to_bytes() == values[key], i
    # Every get of a call cancelled: the call is cancelled, the store goes on.
    tasks = [asyncio.create_task(store.get(k, PROTO)) for k in keys]
    for _ in range(3):
        await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(task.cancelled() for task in tasks)
    # A batch all of whose gets went away before it was sent sends nothing.
    before = calls.snapshot()
    tasks = [asyncio.create_task(store.get(k, PROTO)) for k in keys]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    assert calls.snapshot() == before
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys))
    assert [b.to_bytes() for b in got] == [values[k] for k in keys]
    # A wait_for timeout on one get (a cancellation) leaves the others alone.
    slow = [asyncio.wait_for(store.get(k, PROTO), 60) for k in keys]
    assert [b.to_bytes() for b in await asyncio.gather(*slow)] == [values[k] for k in keys]
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_call_failure_raises_from_every_get(calls):
    url = f"chunkd://127.0.0.1:{_free_port()}/p"
    store = ChunkdStore(url, read_only=True, timeout=5, retries=0)
    plain = ChunkdStore(url, read_only=True, timeout=5, retries=0, batch_gets=False)
    keys = ["a", "b", "c"]
    got = await asyncio.gather(*(store.get(k, PROTO) for k in keys), return_exceptions=True)
    assert calls.snapshot() == (0, 1, 3)
    alone = await asyncio.gather(plain.get("a", PROTO), return_exceptions=True)
    for error, key in zip([*got, *alone], [*keys, "a"], strict=True):
        assert type(error) is chunkd.ChunkdError, error
        assert error.code == chunkd.StatusCode.UNAVAILABLE
        assert error.key == f"p/{key}"
    assert len({id(e) for e in got}) == 3  # one exception each
    store.close()
    plain.close()


def test_zarr_read_of_many_small_chunks(memory_server, prefix, calls):
    """zarr's sync API (its own event loop thread) and xarray: a read of 256 uncompressed chunks
    makes far fewer calls than chunks (zarr keeps async.concurrency=10 chunk reads in flight,
    and they wake together). Compressed chunks decode in threads (asyncio.to_thread), which
    spreads the next reads over several loop iterations: batches are smaller there."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((64, 64)).astype("f4")
    url = f"chunkd://{memory_server.address}/{prefix}"
    ds = xr.Dataset({"t": (("y", "x"), data)}, coords={"y": np.arange(64), "x": np.arange(64)})
    ds.to_zarr(
        ChunkdStore(url),
        mode="w",
        encoding={"t": {"chunks": (4, 4), "compressors": None}},
        consolidated=True,
    )
    chunks = 16 * 16
    reader = ChunkdStore(url, read_only=True)
    plain = ChunkdStore(url, read_only=True, batch_gets=False)

    before = calls.snapshot()
    back = zarr.open_array(reader, path="t", mode="r")[:]
    reads, many, items = (a - b for a, b in zip(calls.snapshot(), before, strict=True))
    np.testing.assert_array_equal(back, data)
    assert items + reads >= chunks
    assert reads + many <= chunks // 4, (reads, many, items)

    before = calls.snapshot()
    np.testing.assert_array_equal(zarr.open_array(plain, path="t", mode="r")[:], data)
    reads, many, _ = (a - b for a, b in zip(calls.snapshot(), before, strict=True))
    assert many == 0 and reads >= chunks

    before_server = _counters(memory_server)
    before = calls.snapshot()
    loaded = xr.open_zarr(reader, consolidated=True, chunks=None).load()
    reads, many, items = (a - b for a, b in zip(calls.snapshot(), before, strict=True))
    after_server = _counters(memory_server)
    xr.testing.assert_equal(loaded, ds)
    assert reads + many <= chunks // 4, (reads, many, items)
    assert after_server["get_many_calls"] - before_server["get_many_calls"] == many

    # Compressed (zstd, decoded in threads): the same values, and the first wave of reads at
    # least goes out together.
    zarr.create_array(ChunkdStore(url), name="z", shape=data.shape, chunks=(4, 4), dtype="f4")[
        :
    ] = data
    before = calls.snapshot()
    np.testing.assert_array_equal(zarr.open_array(reader, path="z", mode="r")[:], data)
    reads, many, items = (a - b for a, b in zip(calls.snapshot(), before, strict=True))
    assert many >= 1 and reads + items >= chunks and reads + many < reads + items
    reader.close()
    plain.close()


def test_loops_are_kept_apart(memory_server, prefix, values):
    """One store, gets from several event loops at once (threads with their own loops): each
    loop's gets are batched among themselves."""
    store = _store(memory_server, prefix)
    keys = list(values)[:300]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(n: int) -> None:
        async def read():
            got = []
            for _ in range(3):
                got = await asyncio.gather(*(store.get(k, PROTO) for k in keys[n::4]))
            return [b.to_bytes() for b in got]

        try:
            results[n] = asyncio.run(read())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for n in range(4):
        assert results[n] == [values[k] for k in keys[n::4]]
    # And zarr's sync API (another loop thread) on the same store.
    assert store.get_sync("k/0", prototype=PROTO).to_bytes() == values["k/0"]
    store.close()


def test_option_survives_pickling_and_with_read_only(memory_server, prefix):
    store = ChunkdStore(f"chunkd://{memory_server.address}/{prefix}", batch_gets=False)
    assert pickle.loads(pickle.dumps(store)).batch_gets is False
    assert store.with_read_only(True).batch_gets is False
    assert pickle.loads(pickle.dumps(_store(memory_server, prefix))).batch_gets is True


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory needs /dev/shm")
def test_shm_delivery_is_batched(tmp_path_factory, prefix, calls):
    import gc
    import shutil
    import tempfile

    from chunkd_testing import start_server

    shm_dir = tempfile.mkdtemp(prefix="chunkd-pytest-", dir="/dev/shm")
    workdir = tmp_path_factory.mktemp("batch-shm")
    (workdir / "store").mkdir()
    server = start_server(
        workdir, str(workdir / "store"), "127.0.0.1:0", f"--shm_dir={shm_dir}", "--fsync=false"
    )
    try:
        data = {f"c/{i}": os.urandom(8 * KiB + i) for i in range(40)}
        with chunkd.Client(server.address) as c:
            for key, value in data.items():
                c.put(f"{prefix}/{key}", value)
        store = _store(server, prefix, delivery="shm", shm_dir=shm_dir)
        before = _counters(server)

        async def read():
            return await asyncio.gather(
                *(store.get(k, PROTO) for k in data),
                store.get("c/missing", PROTO),
                store.get("c/1", PROTO, RangeByteRequest(10, 20)),
            )

        got = asyncio.run(read())
        after = _counters(server)
        assert [b.to_bytes() for b in got[:40]] == list(data.values())
        assert got[40] is None and got[41].to_bytes() == data["c/1"][10:20]
        assert not got[0].as_numpy_array().flags.writeable  # a view of the server's memory
        assert after["get_many_calls"] - before["get_many_calls"] == 1
        assert after["gets_shm"] - before["gets_shm"] == 41
        assert calls.snapshot() == (0, 1, 42)
        del got
        gc.collect()
        assert store.flush_releases()
        with chunkd.Client(server.address) as c:
            assert c.server_info().leases_active == 0
        store.close()
    finally:
        status = server.stop()
        shutil.rmtree(shm_dir, ignore_errors=True)
    assert status == 0, server.log()


def test_batch_limit_is_what_the_server_takes():
    assert 1 < chunkd_zarr._BATCH_MAX_ITEMS <= chunkd._common.MAX_GET_MANY_ITEMS

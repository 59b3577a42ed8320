"""get_many / read_many (the GetMany call) in the blocking and asyncio clients and in
ChunkdStore.get_partial_values, against real servers."""

from __future__ import annotations

import os
import socket

import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype

import chunkd
from chunkd.zarr import ChunkdStore

KiB, MiB = 1 << 10, 1 << 20
BIG = 5 * MiB + 3  # spans several 1 MiB parts of the reply (and several messages)


def _counters(client) -> dict[str, int]:
    return client.server_info().counters


@pytest.fixture(scope="module")
def values(server):
    """Values under one prefix of the file server: small, empty, big."""
    base = "get-many"
    data = {
        f"{base}/small": b"hello, get_many",
        f"{base}/empty": b"",
        f"{base}/big": os.urandom(BIG),
        f"{base}/medium": os.urandom(300 * KiB + 1),
    }
    with chunkd.Client(server.address) as c:
        generations = {key: c.put(key, value).generation for key, value in data.items()}
    return base, data, generations


def _mixed(values):
    """(item, expected): expected is the bytes, or the exception class of the item's error."""
    base, data, gen = values
    small, big, medium = data[f"{base}/small"], data[f"{base}/big"], data[f"{base}/medium"]
    return [
        (f"{base}/small", small),
        (f"{base}/missing", chunkd.NotFoundError),
        ((f"{base}/big", MiB - 5, 3 * MiB + 7), big[MiB - 5 : 3 * MiB + 7]),
        (f"{base}/empty", b""),
        ("a//b", chunkd.InvalidArgument),  # the server refuses the key: this item only
        (f"{base}/big", big),
        ((f"{base}/small", 7), small[7:]),  # offset to the end
        (chunkd.GetItem(f"{base}/small", suffix=4), small[-4:]),
        ((f"{base}/small", 3, 1 << 30), small[3:]),  # past the end: what exists
        ((f"{base}/small", -1, 4), chunkd.InvalidArgument),  # negative: refused by the server
        ((f"{base}/medium", None, 10), medium[:10]),
        (chunkd.GetItem(f"{base}/medium", if_generation_match=gen[f"{base}/medium"]), medium),
        (
            chunkd.GetItem(f"{base}/medium", if_generation_match=gen[f"{base}/medium"] + 1),
            chunkd.PreconditionFailed,
        ),
        (f"{base}/small", small),  # the same key again
    ]


def _check(results, cases):
    assert len(results) == len(cases)
    for i, (result, (item, expected)) in enumerate(zip(results, cases, strict=True)):
        if isinstance(expected, type):
            assert type(result) is expected, (i, item, result)
            assert isinstance(result, chunkd.ChunkdError)
            key = item if isinstance(item, str) else getattr(item, "key", None) or item[0]
            assert result.key == key, (i, result.key)
        else:
            assert not isinstance(result, Exception), (i, item, result)
            assert bytes(result) == expected, (i, item, len(result), len(expected))


def test_mixed_outcomes_in_one_call(client, values):
    cases = _mixed(values)
    before = _counters(client)
    results = client.get_many([item for item, _ in cases])
    after = _counters(client)
    _check(results, cases)
    assert isinstance(results[0], memoryview) and not results[0].readonly
    assert after["get_many_calls"] - before["get_many_calls"] == 1
    assert after["gets"] - before["gets"] == len(cases)
    missing = results[1]
    assert isinstance(missing, KeyError) and missing.code == chunkd.StatusCode.NOT_FOUND
    assert "not found" in str(missing)
    bad = results[4]
    assert isinstance(bad, ValueError) and bad.code == chunkd.StatusCode.INVALID_ARGUMENT
    assert "key" in str(bad)


def test_read_many_metadata(client, values):
    base, data, gen = values
    results = client.read_many(
        [
            f"{base}/big",
            (f"{base}/big", 2 * MiB, 2 * MiB + 10),
            chunkd.GetItem(f"{base}/big", suffix=100),
            f"{base}/empty",
            f"{base}/nope",
        ]
    )
    whole, ranged, suffix, empty, nope = results
    assert isinstance(whole, chunkd.GetResult)
    assert (whole.total_size, whole.generation, whole.range_start, whole.length) == (
        BIG,
        gen[f"{base}/big"],
        0,
        BIG,
    )
    assert whole.delivery == chunkd.Delivery.INLINE
    assert (ranged.range_start, ranged.length, ranged.total_size) == (2 * MiB, 10, BIG)
    assert ranged.data == data[f"{base}/big"][2 * MiB : 2 * MiB + 10]
    assert (suffix.range_start, suffix.length) == (BIG - 100, 100)
    assert (empty.total_size, empty.length, empty.data) == (0, 0, bytearray())
    assert isinstance(nope, chunkd.NotFoundError) and nope.key == f"{base}/nope"


def test_agrees_with_get(memory_client, prefix):
    """Every range form of get, item by item, over values of many sizes (small ones share
    messages, large ones span several)."""
    sizes = [0, 1, 100, 16 * KiB - 1, 16 * KiB, 64 * KiB + 5, MiB - 1, MiB, MiB + 1, 2 * MiB + 9]
    keys = [f"{prefix}/{n}" for n in sizes]
    for key, n in zip(keys, sizes, strict=True):
        memory_client.put(key, os.urandom(n))
    forms = [
        (None, None, None),
        (1, None, None),
        (None, 50, None),
        (3, MiB + 2, None),
        (None, None, 7),
        (None, None, 0),
    ]
    items = [chunkd.GetItem(k, s, e, suffix=x) for k in keys for s, e, x in forms]
    got = memory_client.get_many(items)
    want = [memory_client.get(i.key, i.start, i.end, suffix=i.suffix) for i in items]
    assert got == want


def test_more_than_4096_items_are_split(memory_client, prefix):
    n_keys = 50
    for j in range(n_keys):
        memory_client.put(f"{prefix}/{j}", j.to_bytes(2, "little") * 40)
    # Item i names key i % 53 (keys 50..52 are missing) and a range that depends on i, so that
    # the results must come back in order.
    count = 2 * 4096 + 10

    def item(i):
        return (f"{prefix}/{i % 53}", i % 11, i % 11 + 1 + i % 5)

    before = _counters(memory_client)
    results = memory_client.get_many(item(i) for i in range(count))  # any iterable
    after = _counters(memory_client)
    assert len(results) == count
    assert after["get_many_calls"] - before["get_many_calls"] == 3
    assert after["gets"] - before["gets"] == count
    for i, result in enumerate(results):
        key, start, end = item(i)
        j = i % 53
        if j >= n_keys:
            assert isinstance(result, chunkd.NotFoundError) and result.key == key, i
        else:
            assert result == (j.to_bytes(2, "little") * 40)[start:end], i

    before = _counters(memory_client)
    assert len(memory_client.get_many([f"{prefix}/0"] * 4096)) == 4096
    assert len(memory_client.get_many([f"{prefix}/0"] * 4097)) == 4097
    after = _counters(memory_client)
    assert after["get_many_calls"] - before["get_many_calls"] == 3


def test_arguments_checked_before_sending(client, prefix):
    before = _counters(client)["get_many_calls"]
    assert client.get_many([]) == []
    with pytest.raises(TypeError):
        client.get_many([f"{prefix}/a", b"bytes-key"])
    with pytest.raises(TypeError):
        client.get_many([(f"{prefix}/a", 1, 2, 3)])
    with pytest.raises(TypeError):
        client.get_many([42])
    with pytest.raises(ValueError, match="either"):
        client.get_many([chunkd.GetItem(f"{prefix}/a", 0, 4, suffix=2)])
    assert _counters(client)["get_many_calls"] == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_call_failure_raises():
    with chunkd.Client(f"127.0.0.1:{_free_port()}", timeout=5, retries=0) as c:
        with pytest.raises(chunkd.ChunkdError) as info:
            c.get_many(["a", "b"])
    assert info.value.code == chunkd.StatusCode.UNAVAILABLE


def test_item_errors_from_codes():
    """ItemError codes become the exceptions a Get of the item would have raised."""
    from chunkd.errors import error_from_status

    assert type(error_from_status(5, "gone", "k")) is chunkd.NotFoundError
    assert type(error_from_status(3, "bad", "k")) is chunkd.InvalidArgument
    assert type(error_from_status(9, "cond", "k")) is chunkd.PreconditionFailed
    other = error_from_status(14, "", "k")
    assert type(other) is chunkd.ChunkdError and other.code == chunkd.StatusCode.UNAVAILABLE
    assert str(other) == "UNAVAILABLE"
    assert error_from_status(999, "odd").code == chunkd.StatusCode.UNKNOWN


# -- the asyncio client --------------------------------------------------------------------------


async def test_async_mixed_outcomes(server, values):
    cases = _mixed(values)
    async with chunkd.AsyncClient(server.address) as c:
        before = (await c.server_info()).counters["get_many_calls"]
        results = await c.get_many([item for item, _ in cases])
        _check(results, cases)
        read = await c.read_many([cases[0][0], cases[2][0]])
        assert read[0].data == cases[0][1] and read[1].range_start == MiB - 5
        assert (await c.server_info()).counters["get_many_calls"] - before == 2
        assert await c.get_many([]) == []


async def test_async_split(memory_server, prefix):
    async with chunkd.AsyncClient(memory_server.address) as c:
        await c.put(f"{prefix}/v", b"0123456789")
        before = (await c.server_info()).counters["get_many_calls"]
        items = [(f"{prefix}/v", i % 10, i % 10 + 1) for i in range(4096 + 1)]
        items.append(f"{prefix}/missing")
        results = await c.get_many(items)
        assert (await c.server_info()).counters["get_many_calls"] - before == 2
        assert results[:-1] == [str(i % 10).encode() for i in range(4097)]
        assert isinstance(results[-1], chunkd.NotFoundError)


# -- ChunkdStore.get_partial_values --------------------------------------------------------------


async def test_store_get_partial_values_is_one_call(server, values):
    base, data, _ = values
    small, big = data[f"{base}/small"], data[f"{base}/big"]
    store = ChunkdStore(f"chunkd://{server.address}/{base}", read_only=True)
    proto = default_buffer_prototype()
    requests = [
        ("small", None, small),
        ("big", RangeByteRequest(MiB - 1, 2 * MiB + 1), big[MiB - 1 : 2 * MiB + 1]),
        ("missing", None, None),
        ("big", OffsetByteRequest(BIG - 10), big[-10:]),
        ("small", SuffixByteRequest(5), small[-5:]),
        ("empty", None, b""),
        ("big", None, big),
        ("missing", RangeByteRequest(0, 1), None),
    ]
    with chunkd.Client(server.address) as admin:
        before = _counters(admin)
        got = await store.get_partial_values(proto, [(k, r) for k, r, _ in requests])
        after = _counters(admin)
    assert after["get_many_calls"] - before["get_many_calls"] == 1
    assert after["gets"] - before["gets"] == len(requests)
    assert len(got) == len(requests)
    for buf, (key, rng, expected) in zip(got, requests, strict=True):
        if expected is None:
            assert buf is None, key
        else:
            assert isinstance(buf, proto.buffer), key
            assert buf.to_bytes() == expected, (key, rng)
    assert await store.get_partial_values(proto, []) == []
    # get() and get_partial_values() agree.
    for (key, rng, _), buf in zip(requests, got, strict=True):
        one = await store.get(key, proto, rng)
        assert (one is None and buf is None) or one.to_bytes() == buf.to_bytes()
    store.close()


async def test_store_get_partial_values_raises_other_errors(server, values):
    base, _, _ = values
    store = ChunkdStore(f"chunkd://{server.address}/{base}", read_only=True)
    proto = default_buffer_prototype()
    with pytest.raises(ValueError):
        await store.get_partial_values(proto, [("small", None), ("a//b", None)])
    with pytest.raises(TypeError, match="byte_range"):
        await store.get_partial_values(proto, [("small", (1, 2))])
    store.close()

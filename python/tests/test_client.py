"""The blocking client against a real chunkd server."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import chunkd
from chunkd_testing import start_server

MiB = 1 << 20
SIZES = [0, 1, 4096, MiB + 1, 16 * MiB]


@pytest.fixture(scope="module")
def payloads():
    rng = np.random.default_rng(5)
    return {n: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES}


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(client, prefix, payloads, size):
    key = f"{prefix}/v{size}"
    data = payloads[size]
    put = client.put(key, data)
    assert put.size == size
    result = client.read(key)
    # No copy: a writable view of the buffer the C++ client received the bytes into.
    assert isinstance(result.data, memoryview) and not result.data.readonly
    assert result.data == data
    assert (result.total_size, result.range_start, result.length) == (size, 0, size)
    assert result.generation == put.generation
    assert client.stat(key) == chunkd.Stat(True, size, put.generation)
    assert bytes(client.get(key)) == data


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_memory_store(memory_client, prefix, payloads, size):
    key = f"{prefix}/v{size}"
    memory_client.put(key, payloads[size])
    assert memory_client.get(key) == payloads[size]


def test_put_accepts_buffers(client, prefix):
    array = np.arange(1000, dtype="<f8")
    client.put(f"{prefix}/np", array)
    assert client.get(f"{prefix}/np") == array.tobytes()
    client.put(f"{prefix}/ba", bytearray(b"abc"))
    client.put(f"{prefix}/mv", memoryview(b"xabcx")[1:4])
    assert client.get(f"{prefix}/ba") == client.get(f"{prefix}/mv") == b"abc"
    with pytest.raises(TypeError):
        client.put(f"{prefix}/s", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contiguous"):
        client.put(f"{prefix}/nc", np.arange(10)[::2])


# Ranges over a value of 3 MiB + 7 bytes, so that they cross the 1 MiB parts of the reply.
RANGE_SIZE = 3 * MiB + 7
RANGES = [
    # (start, end, suffix) -> slice of the value
    ((0, 10, None), slice(0, 10)),
    ((5, 5, None), slice(5, 5)),
    ((MiB - 3, 2 * MiB + 3, None), slice(MiB - 3, 2 * MiB + 3)),
    ((RANGE_SIZE - 2, RANGE_SIZE + 100, None), slice(RANGE_SIZE - 2, None)),  # past the end
    ((RANGE_SIZE + 10, RANGE_SIZE + 20, None), slice(0, 0)),  # wholly past the end
    ((None, 100, None), slice(0, 100)),
    ((MiB + 1, None, None), slice(MiB + 1, None)),  # offset to the end
    ((0, None, None), slice(None)),
    ((RANGE_SIZE * 2, None, None), slice(0, 0)),
    ((None, None, 1), slice(RANGE_SIZE - 1, None)),  # suffix
    ((None, None, 2 * MiB), slice(RANGE_SIZE - 2 * MiB, None)),
    ((None, None, RANGE_SIZE * 2), slice(None)),  # suffix longer than the value
    ((None, None, 0), slice(0, 0)),
]


@pytest.fixture(scope="module")
def ranged(server):
    data = os.urandom(RANGE_SIZE)
    with chunkd.Client(server.address) as c:
        c.put("ranges/value", data)
    return data


@pytest.mark.parametrize(("args", "expected"), RANGES)
def test_ranges(client, ranged, args, expected):
    start, end, suffix = args
    result = client.read("ranges/value", start, end, suffix=suffix)
    want = ranged[expected]
    assert result.data == want
    assert result.total_size == RANGE_SIZE
    assert result.length == len(want)
    span = range(RANGE_SIZE)[expected]
    if len(span):
        assert result.range_start == span.start


def test_range_into_out_buffer(client, ranged):
    out = np.zeros(2 * MiB, dtype=np.uint8)
    view = client.get("ranges/value", MiB, MiB + 1000, out=out)
    assert isinstance(view, memoryview) and len(view) == 1000
    assert out[:1000].tobytes() == ranged[MiB : MiB + 1000]
    with pytest.raises(ValueError, match="out holds"):
        client.get("ranges/value", out=bytearray(10))
    with pytest.raises(TypeError, match="writable"):
        client.get("ranges/value", 0, 4, out=b"read-only")


def test_bad_ranges(client, ranged):
    with pytest.raises(ValueError, match="negative"):
        client.get("ranges/value", -1, 4)
    with pytest.raises(ValueError, match="ends before it starts"):
        client.get("ranges/value", 10, 4)
    with pytest.raises(ValueError, match="negative"):
        client.get("ranges/value", suffix=-4)
    with pytest.raises(ValueError, match="either"):
        client.get("ranges/value", 0, 4, suffix=2)


BAD_KEYS = ["", "/a", "a//b", "../x", "a/../b", "a/./b", "a/", "nul\x00key", "x" * 1025, "bad\udcffutf8"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_value_errors(client, key):
    for call in (
        lambda: client.get(key),
        lambda: client.put(key, b"x"),
        lambda: client.stat(key),
        lambda: client.delete(key),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, chunkd.InvalidArgument)
        assert info.value.code == chunkd.StatusCode.INVALID_ARGUMENT
        assert "key" in str(info.value)


def test_bad_prefix(client):
    with pytest.raises(ValueError, match="starts with '/'"):
        client.list("/abs")


def test_key_must_be_str(client):
    with pytest.raises(TypeError):
        client.get(b"bytes")  # type: ignore[arg-type]


def test_missing_key(client, prefix):
    key = f"{prefix}/missing"
    with pytest.raises(KeyError) as info:
        client.get(key)
    err = info.value
    assert isinstance(err, chunkd.NotFoundError)
    assert isinstance(err, FileNotFoundError)
    assert isinstance(err, chunkd.ChunkdError)
    assert err.code == chunkd.StatusCode.NOT_FOUND and err.key == key
    assert "not found" in str(err)
    assert client.stat(key) == chunkd.Stat(False, 0, 0)
    assert not client.exists(key)
    with pytest.raises(chunkd.NotFoundError):
        client.delete(key)
    with pytest.raises(chunkd.NotFoundError):
        client.get(key, 0, 10)


def test_errors_pickle(client, prefix):
    with pytest.raises(chunkd.NotFoundError) as info:
        client.get(f"{prefix}/missing")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is chunkd.NotFoundError
    assert copy.code == chunkd.StatusCode.NOT_FOUND and str(copy) == str(info.value)


def test_delete(client, prefix):
    key = f"{prefix}/d"
    client.put(key, b"x")
    client.delete(key)
    assert not client.exists(key)
    with pytest.raises(KeyError):
        client.get(key)


def test_overwrite_changes_generation(client, prefix):
    key = f"{prefix}/g"
    g1 = client.put(key, b"one").generation
    g2 = client.put(key, b"two!").generation
    assert g1 != g2 and g1 != 0 and g2 != 0
    assert client.get(key) == b"two!"
    assert client.stat(key).generation == g2


def test_conditions(client, prefix):
    key = f"{prefix}/c"
    created = client.put(key, b"v1", if_generation_match=0)  # only if absent
    with pytest.raises(chunkd.PreconditionFailed) as info:
        client.put(key, b"v2", if_generation_match=0)
    assert info.value.code == chunkd.StatusCode.FAILED_PRECONDITION
    assert client.get(key) == b"v1"
    # compare-and-swap on the generation
    with pytest.raises(chunkd.PreconditionFailed):
        client.put(key, b"v2", if_generation_match=created.generation + 1)
    swapped = client.put(key, b"v2", if_generation_match=created.generation)
    assert client.get(key) == b"v2"
    with pytest.raises(chunkd.PreconditionFailed):
        client.put(key, b"v3", if_generation_not_match=swapped.generation)
    client.put(key, b"v3", if_generation_not_match=created.generation)
    current = client.stat(key).generation
    # conditional reads
    assert client.get(key, if_generation_match=current) == b"v3"
    with pytest.raises(chunkd.PreconditionFailed):
        client.get(key, if_generation_match=swapped.generation)
    with pytest.raises(chunkd.PreconditionFailed):
        client.get(key, if_generation_not_match=current)
    # conditional deletes
    with pytest.raises(chunkd.PreconditionFailed):
        client.delete(key, if_generation_match=swapped.generation)
    assert client.exists(key)
    client.delete(key, if_generation_match=current)
    assert not client.exists(key)


def test_list(client, prefix):
    keys = [f"{prefix}/zarr.json", f"{prefix}/a/zarr.json", f"{prefix}/a/c/0", f"{prefix}/a/c/1"]
    keys += [f"{prefix}/b", f"{prefix}/bb/x"]
    for i, key in enumerate(keys):
        client.put(key, b"x" * i)
    listing = client.list(prefix)
    assert listing.keys == sorted(keys)
    assert [e.size for e in listing.entries] == [keys.index(k) for k in sorted(keys)]
    assert listing.prefixes == []
    assert client.list(f"{prefix}/b").keys == [f"{prefix}/b", f"{prefix}/bb/x"]  # string prefix
    assert client.list(f"{prefix}/a/").keys == sorted(keys[1:4])
    assert client.list(f"{prefix}/nothing").keys == []
    top = client.list(f"{prefix}/", directory=True)
    assert top.keys == [f"{prefix}/b", f"{prefix}/zarr.json"]
    assert top.prefixes == [f"{prefix}/a/", f"{prefix}/bb/"]
    inner = client.list(f"{prefix}/a/", directory=True)
    assert inner.keys == [f"{prefix}/a/zarr.json"] and inner.prefixes == [f"{prefix}/a/c/"]
    assert client.list(prefix, directory=True).prefixes == [f"{prefix}/"]


def test_list_pages(memory_client, prefix):
    # The server sends at most 1000 entries per message.
    n = 2500
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: memory_client.put(f"{prefix}/k{i:05d}", b""), range(n)))
    pages = list(memory_client.iter_list(prefix))
    assert len(pages) >= 3
    keys = [e.key for page in pages for e in page.entries]
    assert keys == [f"{prefix}/k{i:05d}" for i in range(n)]
    assert memory_client.list(prefix).keys == keys


def test_server_info(client, server, memory_client):
    info = client.server_info()
    assert info.backend == "file"
    assert info.version
    assert "DELIVERY_INLINE" in info.deliveries
    assert "conditional-writes" in info.features
    assert info.max_value_bytes > 0
    assert info.tiers and info.tiers[0].tier == "host"
    assert "gets" in info.counters
    assert memory_client.server_info().backend == "memory"


def test_concurrent_threads_share_one_client(client, prefix):
    def work(i):
        key = f"{prefix}/t{i}"
        value = os.urandom(1000 + i * 997)
        client.put(key, value)
        assert client.get(key) == value
        assert client.get(key, 10, 20) == value[10:20]
        return i

    with ThreadPoolExecutor(16) as pool:
        assert sorted(pool.map(work, range(64))) == list(range(64))


def test_addresses(server, unix_server):
    host, port = server.address.rsplit(":", 1)
    for address in (server.address, f"chunkd://{server.address}", f"localhost:{port}"):
        with chunkd.Client(address) as c:
            assert c.server_info().backend == "file"
    socket_path = unix_server.address.removeprefix("unix:")
    for address in (f"unix:{socket_path}", f"unix://{socket_path}", f"chunkd+unix://{socket_path}"):
        with chunkd.Client(address) as c:
            c.put("u/key", b"over a unix socket")
            assert c.get("u/key") == b"over a unix socket"
    with pytest.raises(ValueError, match="path inside the store"):
        chunkd.Client(f"chunkd://{server.address}/some/path")


def test_closed_client(server):
    c = chunkd.Client(server.address)
    c.server_info()
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.stat("x")


def test_client_pickles(client, prefix):
    client.put(f"{prefix}/p", b"pickled")
    copy = pickle.loads(pickle.dumps(client))
    assert copy.get(f"{prefix}/p") == b"pickled"
    copy.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_without_server():
    port = _free_port()
    c = chunkd.Client(f"127.0.0.1:{port}", retries=2, timeout=10)
    start = time.monotonic()
    with pytest.raises(chunkd.ChunkdError) as info:
        c.stat("x")
    assert info.value.code == chunkd.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 9
    c.close()


def test_retries_until_the_server_is_up(tmp_path):
    """A call made while the server is down succeeds once it starts (UNAVAILABLE is retried)."""
    port = _free_port()
    c = chunkd.Client(f"127.0.0.1:{port}", retries=12, timeout=60)
    outcome = {}

    def call():
        try:
            outcome["info"] = c.server_info()
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    late = start_server(tmp_path / "late", "memory://", f"127.0.0.1:{port}")
    try:
        thread.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["info"].backend == "memory"
    finally:
        c.close()
        assert late.stop() == 0


def test_deadline_covers_retries():
    port = _free_port()
    c = chunkd.Client(f"127.0.0.1:{port}", retries=1000, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(chunkd.ChunkdError) as info:
        c.stat("x")
    elapsed = time.monotonic() - start
    assert info.value.code in (chunkd.StatusCode.UNAVAILABLE, chunkd.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < 5
    c.close()


def test_server_exits_cleanly_on_sigterm(tmp_path, prefix):
    store = tmp_path / "store"
    store.mkdir()
    s = start_server(tmp_path, str(store))
    with chunkd.Client(s.address) as c:
        c.put(f"{prefix}/k", b"durable")
    assert s.stop() == 0
    assert (store / prefix / "k").read_bytes() == b"durable"


def test_read_only_server(tmp_path):
    s = start_server(tmp_path, "memory://", "127.0.0.1:0", "--read_only")
    try:
        with chunkd.Client(s.address) as c:
            assert c.server_info().read_only
            with pytest.raises(chunkd.ChunkdError) as info:
                c.put("k", b"x")
            assert info.value.code == chunkd.StatusCode.PERMISSION_DENIED
            assert type(info.value) is chunkd.ChunkdError
    finally:
        assert s.stop() == 0

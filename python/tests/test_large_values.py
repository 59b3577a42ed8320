"""A value larger than chunkd's cache, read whole and by byte ranges through every Python
reader: chunkd.Client (one Get, GetMany; inline and shared memory), ChunkdStore (get with each
zarr ByteRequest, get_partial_values) and TensorStore's tsgrpc_kvstore driver (Read with
byte_range). The same bytes as the file in the store, however the server holds the value
(whole, or by blocks where it has --block_bytes); a value replaced in the store is read whole
at its new version, never mixed with bytes of the old one. Where chunkd reads by blocks, the
last 4 KiB of a cold value cost at most one block from the store."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype

import chunkd
from chunkd.zarr import ChunkdStore
from chunkd_testing import SMALL_BLOCK_FLAG, serve_with_shm

MiB = 1 << 20
CACHE = 4 * MiB
SIZE = 24 * MiB + 12345  # 6x the cache, not a multiple of any block size
PROTO = default_buffer_prototype()
FLAGS = {"whole values": ()}
if SMALL_BLOCK_FLAG:
    FLAGS["small blocks"] = (SMALL_BLOCK_FLAG,)


@pytest.fixture(scope="module", params=list(FLAGS))
def big_server(request, tmp_path_factory):
    with serve_with_shm(tmp_path_factory.mktemp("large"), f"--host_cache_bytes={CACHE}",
                        *FLAGS[request.param]) as server:
        server.flags = FLAGS[request.param]
        yield server


def _put_file(server, key: str, value: bytes) -> None:
    """Writes `value` into the server's store directory (not through chunkd): temp + rename."""
    path = Path(server.store) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(value)
    os.replace(tmp, path)


def _ranges(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ranges = [(0, 1), (size - 4096, size), (size - 1, size), (MiB - 7, MiB + 7),
              (3 * MiB, 9 * MiB + 1), (0, size)]
    for _ in range(count):
        start = int(rng.integers(0, size))
        ranges.append((start, min(size, start + int(rng.integers(1, 3 * MiB)))))
    return ranges


def _counters(server) -> dict[str, int]:
    with chunkd.Client(server.address) as c:
        return dict(c.server_info().counters)


def test_last_4kib_of_a_cold_value(big_server, prefix):
    value = os.urandom(SIZE)
    key = f"{prefix}/tail"
    _put_file(big_server, key, value)
    before = _counters(big_server)
    with chunkd.Client(big_server.address) as c:
        assert c.get(key, SIZE - 4096, SIZE) == value[-4096:]
        assert c.get(key, suffix=4096) == value[-4096:]
    read = _counters(big_server)["backend_read_bytes"] - before["backend_read_bytes"]
    assert read >= 4096
    if big_server.flags:  # by blocks: one block at most (64 KiB)
        assert read <= 64 << 10, read


def test_client_reads_whole_and_by_range(big_server, prefix):
    value = os.urandom(SIZE)
    key = f"{prefix}/v"
    _put_file(big_server, key, value)
    ranges = _ranges(SIZE, 20, seed=1)
    with chunkd.Client(big_server.address) as c:
        for start, end in ranges:
            assert c.get(key, start, end) == value[start:end], (start, end)
        assert c.get(key) == value
        assert c.get(key, SIZE - 100) == value[-100:]
        assert c.get(key, suffix=SIZE + 10) == value  # past the start: what exists
        got = c.get_many([(key, start, end) for start, end in ranges] + [key])
        assert got == [value[start:end] for start, end in ranges] + [value]
        info = c.server_info()
    host = next(t for t in info.tiers if t.tier == "host")
    derived = next(t for t in info.tiers if t.tier == "derived")
    # The derived entries' share (--derived_cache_fraction) is carved out of the budget.
    assert host.used_bytes <= host.capacity_bytes == CACHE - derived.capacity_bytes
    # Shared memory: handles of ranges (or inline bytes where a range cannot be one handle).
    with chunkd.Client(big_server.address, delivery="shm", shm_dir=big_server.shm_dir) as c:
        for start, end in ranges[:10]:
            assert bytes(c.get(key, start, end)) == value[start:end], (start, end)
        assert bytes(c.get(key)) == value
        assert c.flush_releases()


def test_zarr_store_and_tensorstore_read_by_range(big_server, prefix):
    from tensorstore_testing import assert_value, open_kvstore

    value = os.urandom(SIZE)
    _put_file(big_server, f"{prefix}/big/v", value)
    requests = [(RangeByteRequest(s, e), value[s:e]) for s, e in _ranges(SIZE, 12, seed=2)]
    requests += [(OffsetByteRequest(SIZE - 5000), value[-5000:]),
                 (SuffixByteRequest(70000), value[-70000:]), (None, value)]

    async def read(store: ChunkdStore):
        alone = [await store.get("big/v", PROTO, r) for r, _ in requests]
        together = await asyncio.gather(*(store.get("big/v", PROTO, r) for r, _ in requests))
        partial = await store.get_partial_values(PROTO, [("big/v", r) for r, _ in requests])
        return alone, together, partial

    for options in ({}, {"delivery": "shm", "shm_dir": big_server.shm_dir}):
        store = ChunkdStore(f"chunkd://{big_server.address}/{prefix}", read_only=True, **options)
        for got in asyncio.run(read(store)):
            assert [b.to_bytes() for b in got] == [want for _, want in requests], options
        store.close()

    kv = open_kvstore(big_server.address)
    key = f"{prefix}/big/v".encode()
    for start, end in _ranges(SIZE, 12, seed=3):
        assert_value(kv.read(key, byte_range=slice(start, end)).result(), value[start:end])
    assert_value(kv.read(key, byte_range=slice(-4096, None)).result(), value[-4096:])
    assert_value(kv.read(key).result(), value)


def test_a_replaced_value_is_never_mixed(big_server, prefix):
    """Ranges of the old version are read (and may stay cached); the file is replaced by one
    of the same size: every read after that, whole or by range, is the new version alone."""
    key = f"{prefix}/changing"
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    _put_file(big_server, key, old)
    ranges = _ranges(SIZE, 8, seed=4)
    with chunkd.Client(big_server.address) as c:
        for start, end in ranges:
            assert c.get(key, start, end) == old[start:end]
        _put_file(big_server, key, new)
        assert c.get(key) == new
        for start, end in ranges:
            assert c.get(key, start, end) == new[start:end], (start, end)

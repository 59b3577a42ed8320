"""The asyncio client: the same semantics and errors as the blocking one."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

import chunkd

MiB = 1 << 20


@pytest.fixture
async def aclient(server):
    async with chunkd.AsyncClient(server.address) as c:
        yield c


@pytest.mark.parametrize("size", [0, 1, 4096, MiB + 1, 16 * MiB])
async def test_round_trip(aclient, prefix, size):
    data = os.urandom(size)
    key = f"{prefix}/v"
    put = await aclient.put(key, data)
    result = await aclient.read(key)
    assert result.data == data and result.generation == put.generation
    assert result.total_size == size
    assert await aclient.stat(key) == chunkd.Stat(True, size, put.generation)


async def test_ranges(aclient, prefix):
    data = os.urandom(2 * MiB + 3)
    key = f"{prefix}/r"
    await aclient.put(key, data)
    assert await aclient.get(key, 3, 9) == data[3:9]
    assert await aclient.get(key, MiB - 1, MiB + 1) == data[MiB - 1 : MiB + 1]
    assert await aclient.get(key, MiB) == data[MiB:]
    assert await aclient.get(key, suffix=5) == data[-5:]
    assert await aclient.get(key, len(data) + 5, len(data) + 9) == b""
    out = np.empty(16, np.uint8)
    view = await aclient.get(key, 0, 16, out=out)
    assert bytes(view) == out.tobytes() == data[:16]
    with pytest.raises(ValueError, match="negative"):
        await aclient.get(key, -2, 4)


async def test_errors(aclient, prefix):
    for key in ("", "/a", "a//b", "../x"):
        with pytest.raises(ValueError):
            await aclient.get(key)
        with pytest.raises(chunkd.InvalidArgument):
            await aclient.put(key, b"x")
    with pytest.raises(KeyError) as info:
        await aclient.get(f"{prefix}/missing")
    assert isinstance(info.value, chunkd.NotFoundError)
    assert info.value.code == chunkd.StatusCode.NOT_FOUND
    assert await aclient.stat(f"{prefix}/missing") == chunkd.Stat(False)
    with pytest.raises(chunkd.NotFoundError):
        await aclient.delete(f"{prefix}/missing")


async def test_conditions_and_delete(aclient, prefix):
    key = f"{prefix}/c"
    first = await aclient.put(key, b"1", if_generation_match=0)
    with pytest.raises(chunkd.PreconditionFailed):
        await aclient.put(key, b"2", if_generation_match=0)
    await aclient.put(key, b"2", if_generation_match=first.generation)
    with pytest.raises(chunkd.PreconditionFailed):
        await aclient.delete(key, if_generation_match=first.generation)
    await aclient.delete(key)
    assert not await aclient.exists(key)


async def test_concurrent_calls_share_one_channel(aclient, prefix):
    values = {f"{prefix}/k{i}": os.urandom(i * 1013) for i in range(100)}
    await asyncio.gather(*(aclient.put(k, v) for k, v in values.items()))
    got = await asyncio.gather(*(aclient.get(k) for k in values))
    assert got == list(values.values())
    sizes = await asyncio.gather(*(aclient.stat(k) for k in values))
    assert [s.size for s in sizes] == [len(v) for v in values.values()]


async def test_list(aclient, prefix):
    for key in ("a/zarr.json", "a/c/0", "a/c/1", "b"):
        await aclient.put(f"{prefix}/{key}", b"..")
    listing = await aclient.list(prefix)
    assert listing.keys == [f"{prefix}/{k}" for k in ("a/c/0", "a/c/1", "a/zarr.json", "b")]
    top = await aclient.list(f"{prefix}/", directory=True)
    assert top.keys == [f"{prefix}/b"] and top.prefixes == [f"{prefix}/a/"]
    pages = [page async for page in aclient.iter_list(f"{prefix}/a/", directory=True)]
    assert [k for p in pages for k in p.keys] == [f"{prefix}/a/zarr.json"]
    assert [x for p in pages for x in p.prefixes] == [f"{prefix}/a/c/"]


async def test_server_info_and_unix_socket(unix_server):
    path = unix_server.address.removeprefix("unix:")
    async with chunkd.AsyncClient(f"chunkd+unix://{path}") as c:
        info = await c.server_info()
        assert info.backend == "memory"
        await c.put("x", b"y")
        assert await c.get("x") == b"y"


async def test_unavailable():
    c = chunkd.AsyncClient("127.0.0.1:1", retries=1, timeout=5)
    with pytest.raises(chunkd.ChunkdError) as info:
        await c.stat("x")
    assert info.value.code == chunkd.StatusCode.UNAVAILABLE
    await c.close()
    with pytest.raises(RuntimeError, match="closed"):
        await c.stat("x")

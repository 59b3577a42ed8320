"""Zarr's own store conformance suite (zarr.testing.store.StoreTests) for ChunkdStore, against a
real chunkd server with the file store and with the memory:// store, plus zarr's stateful
store test (zarr.testing.stateful.ZarrStoreStateMachine)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.abc.buffer import Buffer
from zarr.buffer import cpu, default_buffer_prototype
from zarr.core.sync import _collect_aiterator
from zarr.testing.stateful import ZarrStoreStateMachine
from zarr.testing.store import StoreTests
from zarr.testing.utils import assert_bytes_equal

import chunkd
from chunkd.zarr import ChunkdStore


class _ChunkdStoreTests(StoreTests[ChunkdStore, cpu.Buffer]):
    store_cls = ChunkdStore
    buffer_cls = cpu.Buffer
    server_fixture: str  # the session fixture of the server these tests run against

    @pytest.fixture
    def chunkd_server(self, request):
        return request.getfixturevalue(self.server_fixture)

    @pytest.fixture
    def direct(self, chunkd_server):
        """A client that reads and writes keys without going through the store."""
        with chunkd.Client(chunkd_server.address) as c:
            yield c

    @pytest.fixture
    def store_kwargs(self, chunkd_server, prefix, direct) -> dict[str, str]:
        # Each test gets a key space of its own inside the shared server.
        self._direct = direct
        return {"url": f"chunkd://{chunkd_server.address}/{prefix}"}

    async def set(self, store: ChunkdStore, key: str, value: Buffer) -> None:
        self._direct.put(store.path + "/" + key, value.to_bytes())

    async def get(self, store: ChunkdStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(bytes(self._direct.get(store.path + "/" + key)))

    def test_store_repr(self, store: ChunkdStore, chunkd_server) -> None:
        url = f"chunkd://{chunkd_server.address}/{store.path}"
        assert str(store) == url
        assert repr(store) == f"ChunkdStore('{url}')"

    def test_store_supports_writes(self, store: ChunkdStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ChunkdStore) -> None:
        assert store.supports_listing

    def test_store_supports_deletes(self, store: ChunkdStore) -> None:
        assert store.supports_deletes

    # -- beyond zarr's suite --------------------------------------------------------------------

    async def test_get_with_prototype_default(self, store: ChunkdStore) -> None:
        data = self.buffer_cls.from_bytes(b"\x01\x02\x03\x04")
        await self.set(store, "c/0", data)
        assert_bytes_equal(await store.get("c/0", prototype=None), data)

    async def test_get_missing_is_none(self, store: ChunkdStore) -> None:
        assert await store.get("c/404", prototype=default_buffer_prototype()) is None
        rng = RangeByteRequest(0, 2)
        assert await store.get("c/404", default_buffer_prototype(), rng) is None
        partial = await store.get_partial_values(
            default_buffer_prototype(), [("c/404", None), ("c/405", rng)]
        )
        assert partial == [None, None]

    async def test_get_bad_key_raises_value_error(self, store: ChunkdStore) -> None:
        with pytest.raises(ValueError):
            await store.get("a//b", prototype=default_buffer_prototype())

    async def test_byte_ranges_past_the_end(self, store: ChunkdStore) -> None:
        await self.set(store, "k", self.buffer_cls.from_bytes(b"0123456789"))
        proto = default_buffer_prototype()

        async def get(rng):
            return (await store.get("k", proto, rng)).to_bytes()

        assert await get(RangeByteRequest(8, 100)) == b"89"
        assert await get(RangeByteRequest(20, 30)) == b""
        assert await get(OffsetByteRequest(20)) == b""
        assert await get(SuffixByteRequest(100)) == b"0123456789"
        assert await get(SuffixByteRequest(0)) == b""

    async def test_get_partial_values_many(self, store: ChunkdStore) -> None:
        values = {f"c/{i}": bytes(range(i % 256)) * 7 for i in range(200)}
        await store._set_many((k, self.buffer_cls.from_bytes(v)) for k, v in values.items())
        ranges = [(k, RangeByteRequest(1, 5)) for k in values] + [
            (k, SuffixByteRequest(3)) for k in values
        ]
        got = await store.get_partial_values(default_buffer_prototype(), ranges)
        want = [v[1:5] for v in values.values()] + [v[-3:] if v else b"" for v in values.values()]
        assert [b.to_bytes() for b in got] == want

    async def test_getsize_prefix_uses_listing(self, store: ChunkdStore) -> None:
        await store._set_many(
            [(f"a/c/{i}", self.buffer_cls.from_bytes(b"x" * i)) for i in range(10)]
        )
        assert await store.getsize_prefix("a") == sum(range(10))
        assert await store.getsize("a/c/3") == 3

    async def test_set_if_not_exists_is_atomic(self, store: ChunkdStore) -> None:
        candidates = [self.buffer_cls.from_bytes(bytes([i]) * 10) for i in range(20)]
        await asyncio.gather(*(store.set_if_not_exists("once", c) for c in candidates))
        value = (await self.get(store, "once")).to_bytes()
        assert value in [c.to_bytes() for c in candidates]

    async def test_list_dir_nested(self, store: ChunkdStore) -> None:
        await store._set_many(
            (k, self.buffer_cls.from_bytes(b"1"))
            for k in ("zarr.json", "a/zarr.json", "a/b/c/0", "a/b/zarr.json", "a/d")
        )
        assert sorted(await _collect_aiterator(store.list_dir(""))) == ["a", "zarr.json"]
        assert sorted(await _collect_aiterator(store.list_dir("a"))) == ["b", "d", "zarr.json"]
        assert sorted(await _collect_aiterator(store.list_dir("a/b/"))) == ["c", "zarr.json"]
        assert await _collect_aiterator(store.list_dir("a/d")) == ()
        assert await _collect_aiterator(store.list_dir("nothing")) == ()

    async def test_delete_dir_many(self, store: ChunkdStore) -> None:
        await store._set_many(
            [(f"g/c/{i}", self.buffer_cls.from_bytes(b"x")) for i in range(150)]
            + [("g2/zarr.json", self.buffer_cls.from_bytes(b"{}"))]
        )
        await store.delete_dir("g")
        assert await _collect_aiterator(store.list()) == ("g2/zarr.json",)

    async def test_path_isolates_stores(self, store: ChunkdStore, chunkd_server) -> None:
        other = ChunkdStore(chunkd_server.address, path=f"{store.path}-other")
        await store.set("k", self.buffer_cls.from_bytes(b"mine"))
        assert not await other.exists("k")
        assert await _collect_aiterator(other.list()) == ()
        sub = ChunkdStore(chunkd_server.address, path=f"/{store.path}/sub/")
        await sub.set("k", self.buffer_cls.from_bytes(b"nested"))
        assert sorted(await _collect_aiterator(store.list())) == ["k", "sub/k"]
        assert sub.path == f"{store.path}/sub"

    async def test_unpickled_store_reads(self, store: ChunkdStore) -> None:
        await store.set("k", self.buffer_cls.from_bytes(b"value"))
        copy = pickle.loads(pickle.dumps(store))
        assert not copy._is_open
        assert (await copy.get("k", default_buffer_prototype())).to_bytes() == b"value"
        copy.close()

    async def test_close_and_reuse(self, store: ChunkdStore) -> None:
        await store.set("k", self.buffer_cls.from_bytes(b"v"))
        store.close()
        await asyncio.sleep(0)
        assert await store.exists("k")

    def test_store_used_from_several_event_loops(self, store_not_open: ChunkdStore) -> None:
        store = store_not_open
        for _ in range(5):
            asyncio.run(store.set("k", self.buffer_cls.from_bytes(b"v")))
        assert asyncio.run(store.exists("k"))
        # One client serves every loop; the completion queues of closed loops go with them.
        import gc

        from chunkd import aio

        gc.collect()
        assert store._aio_client is not None
        assert not any(loop.is_closed() for loop in list(aio._queues.keys()))
        store.close()


class TestChunkdStoreFile(_ChunkdStoreTests):
    """Against a server with the file store (a directory in Zarr's layout)."""

    server_fixture = "server"

    def test_read_only_server_refuses_writes(self, tmp_path) -> None:
        from chunkd_testing import start_server

        s = start_server(tmp_path, "memory://", "127.0.0.1:0", "--read_only")
        try:
            store = ChunkdStore(s.address)
            with pytest.raises(chunkd.ChunkdError) as info:
                asyncio.run(store.set("k", self.buffer_cls.from_bytes(b"v")))
            assert info.value.code == chunkd.StatusCode.PERMISSION_DENIED
        finally:
            assert s.stop() == 0


class TestChunkdStoreMemory(_ChunkdStoreTests):
    """Against a server with the memory:// store."""

    server_fixture = "memory_server"

    async def test_list_dir_value_and_folder_of_same_name(self, store: ChunkdStore) -> None:
        # Only a memory:// server can hold both (a file store refuses with FAILED_PRECONDITION).
        for key in ("x/a", "x/a/b", "x/a/c/d", "x/b"):
            await store.set(key, self.buffer_cls.from_bytes(b"1"))
        assert sorted(await _collect_aiterator(store.list_dir("x"))) == ["a", "b"]
        assert sorted(await _collect_aiterator(store.list_dir("x/a"))) == ["b", "c"]


class TestChunkdStoreUnixSocket(_ChunkdStoreTests):
    """Over a Unix-domain socket (chunkd+unix:///path), memory:// store."""

    server_fixture = "unix_server"

    @pytest.fixture
    def store_kwargs(self, chunkd_server, prefix, direct) -> dict[str, str]:
        self._direct = direct
        socket = chunkd_server.address.removeprefix("unix:")
        return {"url": f"chunkd+unix://{socket}", "path": prefix}

    def test_store_repr(self, store: ChunkdStore, chunkd_server) -> None:
        url = f"chunkd+unix://{chunkd_server.address.removeprefix('unix:')}"
        assert str(store) == url
        assert repr(store) == f"ChunkdStore('{url}', path='{store.path}')"


@pytest.mark.parametrize("server_fixture", ["memory_server", "server"])
def test_zarr_stateful_store(request, server_fixture, prefix) -> None:
    """zarr's ZarrStoreStateMachine: random set/get/delete/clear/list sequences against a model."""
    if server_fixture == "server":
        pytest.skip(
            "a file store cannot hold a value and a folder of the same name (keys 'a' and "
            "'a/b' at once: FAILED_PRECONDITION), which the state machine's random keys "
            "produce; zarr's own suite skips LocalStore here for the same reason"
        )
    srv = request.getfixturevalue(server_fixture)
    store = ChunkdStore(f"chunkd://{srv.address}/{prefix}")

    run_state_machine_as_test(
        lambda: ZarrStoreStateMachine(store),
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    store.close()

"""Derived entries (a decoded chunk, say) through the Python API against the real server:
GetItem(derivation=..., produce=..., wait_ms=...), GetResult.production_id, put_derived and
abandon_derived; one producer per miss across clients and processes, takeover when the
producer gives up or dies, the wait's deadline, never an entry of an older generation of the
source, the budget, and a server without derived entries."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import chunkd
from chunkd_testing import REPO_ROOT, serve_with_shm, start_server

DERIVATION = b"codecs=zstd;dtype=<f4;shape=64,64"

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
    reason="shared-memory delivery needs Linux and /dev/shm",
)


def item(key: str, produce: bool = True, wait_ms: int = 0, derivation: bytes = DERIVATION):
    return chunkd.GetItem(key, derivation=derivation, produce=produce, wait_ms=wait_ms)


def counters(client) -> dict:
    return client.server_info().counters


@pytest.fixture
def server(tmp_path):
    # A UNIX socket: the server knows each client's process (a dead producer is noticed).
    socket = tmp_path / "chunkd.sock"
    with serve_with_shm(
        tmp_path, f"--listen=unix:{socket}", "--derived_produce_timeout=60s"
    ) as server:
        server.address = f"unix:{socket}"
        yield server


def test_miss_produce_publish_then_hit_by_shared_memory(server):
    with chunkd.Client(server.address, delivery="shm", shm_dir=server.shm_dir) as c:
        put = c.put("a/c/0", b"encoded" * 100)
        # Without produce, a miss nobody produces is NOT_FOUND.
        [missing] = c.read_many([item("a/c/0", produce=False)])
        assert isinstance(missing, chunkd.NotFoundError), missing
        [told] = c.read_many([item("a/c/0")])
        assert told.production_id != 0
        assert told.generation == put.generation
        assert len(told.data) == 0
        c.put_derived(
            "a/c/0",
            DERIVATION,
            b"decoded!" * 64,
            source_generation=told.generation,
            production_id=told.production_id,
        )
        [hit] = c.read_many([item("a/c/0")])
        assert hit.production_id == 0
        assert bytes(hit.data) == b"decoded!" * 64
        assert hit.generation == put.generation
        assert hit.delivery == chunkd.Delivery.SHM
        # The range applies to the derived value.
        [part] = c.read_many([chunkd.GetItem("a/c/0", start=8, end=16, derivation=DERIVATION)])
        assert bytes(part.data) == b"decoded!"
        # Another derivation of the same key is another entry.
        [other] = c.read_many([item("a/c/0", derivation=b"other")])
        assert other.production_id != 0
        c.abandon_derived("a/c/0", b"other", other.production_id)
        # The value itself is untouched.
        assert c.get("a/c/0") == b"encoded" * 100
        n = counters(c)
        assert n["derived_productions"] == 2
        assert n["derived_published"] == 1
        assert n["derived_hits"] == 2
        assert n["derived_entries"] == 1
        assert n["derived_bytes"] == 512
        info = c.server_info()
        assert "derived" in info.features
        derived = next(t for t in info.tiers if t.tier == "derived")
        host = next(t for t in info.tiers if t.tier == "host")
        assert derived.entries == 1 and derived.used_bytes == 512
        # Carved out of --host_cache_bytes (1 GiB by default): a quarter.
        assert derived.capacity_bytes == 256 << 20
        assert derived.capacity_bytes + host.capacity_bytes == 1 << 30


def test_a_second_reader_waits_for_the_producer_and_gets_the_entry(server):
    with chunkd.Client(server.address) as a, chunkd.Client(server.address) as b:
        a.put("w/c/0", b"source")
        [told] = a.read_many([item("w/c/0")])
        assert told.production_id != 0
        got = {}

        def wait():
            [got["r"]] = b.read_many([item("w/c/0", wait_ms=30000)])

        waiter = threading.Thread(target=wait)
        waiter.start()
        _wait_for(lambda: counters(a)["derived_waiting"] == 1)
        a.put_derived(
            "w/c/0",
            DERIVATION,
            b"derived",
            source_generation=told.generation,
            production_id=told.production_id,
        )
        waiter.join(30)
        r = got["r"]
        assert r.production_id == 0 and bytes(r.data) == b"derived", r
        assert counters(a)["derived_productions"] == 1


def test_abandon_hands_the_production_to_a_waiter(server):
    with chunkd.Client(server.address) as a, chunkd.Client(server.address) as b:
        a.put("ab/c/0", b"source")
        [told] = a.read_many([item("ab/c/0")])
        got = {}

        def wait():
            [got["r"]] = b.read_many([item("ab/c/0", wait_ms=30000)])

        waiter = threading.Thread(target=wait)
        waiter.start()
        _wait_for(lambda: counters(a)["derived_waiting"] == 1)
        a.abandon_derived("ab/c/0", DERIVATION, told.production_id)
        waiter.join(30)
        r = got["r"]
        assert r.production_id not in (0, told.production_id), r
        assert r.generation == told.generation
        n = counters(a)
        assert n["derived_abandons"] == 1 and n["derived_handoffs"] == 1
        # The old producer's id is over: publishing under the new one works.
        b.put_derived(
            "ab/c/0", DERIVATION, b"x", source_generation=r.generation, production_id=r.production_id
        )
        assert bytes(a.read_many([item("ab/c/0")])[0].data) == b"x"


# Asks to produce, says so, and then sleeps until it is killed.
PRODUCER = textwrap.dedent(
    """
    import sys, time
    import chunkd
    address, key, derivation = sys.argv[1], sys.argv[2], sys.argv[3].encode()
    c = chunkd.Client(address)
    [r] = c.read_many([chunkd.GetItem(key, derivation=derivation, produce=True)])
    print(r.production_id, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_producer_hands_the_production_to_a_waiter(server):
    with chunkd.Client(server.address) as c:
        c.put("k/c/0", b"source")
        producer = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, server.address, "k/c/0", DERIVATION.decode()],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "python")},
        )
        try:
            first = int(producer.stdout.readline())
            assert first != 0
            got = {}

            def wait():
                [got["r"]] = c.read_many([item("k/c/0", wait_ms=30000)])

            waiter = threading.Thread(target=wait)
            waiter.start()
            _wait_for(lambda: counters(c)["derived_waiting"] == 1)
            producer.kill()
            producer.wait(30)
            # Well within --derived_produce_timeout=60s: the server noticed the process died.
            waiter.join(30)
            r = got["r"]
            assert r.production_id not in (0, first), r
            assert counters(c)["derived_handoffs"] == 1
        finally:
            producer.kill()
            producer.wait()


def test_a_wait_past_its_deadline_fails_with_deadline_exceeded(server):
    with chunkd.Client(server.address) as c:
        c.put("d/c/0", b"source")
        [told] = c.read_many([item("d/c/0")])
        assert told.production_id != 0
        start = time.monotonic()
        [r] = c.read_many([item("d/c/0", wait_ms=300)])
        assert isinstance(r, chunkd.ChunkdError) and r.code == chunkd.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start >= 0.29
        assert counters(c)["derived_wait_timeouts"] == 1


def test_a_source_rewritten_through_chunkd_is_never_served_decoded_from_before(server):
    with chunkd.Client(server.address) as c:
        c.put("r/c/0", b"one")
        [told] = c.read_many([item("r/c/0")])
        c.put_derived(
            "r/c/0", DERIVATION, b"ONE", source_generation=told.generation,
            production_id=told.production_id,
        )
        assert bytes(c.read_many([item("r/c/0")])[0].data) == b"ONE"
        second = c.put("r/c/0", b"two")
        [again] = c.read_many([item("r/c/0")])
        assert again.production_id != 0 and again.generation == second.generation
        # A publication derived from the old generation is refused.
        with pytest.raises(chunkd.PreconditionFailed):
            c.put_derived("r/c/0", DERIVATION, b"ONE", source_generation=told.generation)
        n = counters(c)
        assert n["derived_stale_drops"] == 1 and n["derived_entries"] == 0


def test_a_source_changed_behind_chunkds_back_is_never_served_decoded_from_before(server):
    store = server.workdir / "store"
    with chunkd.Client(server.address) as c:
        (store / "b").mkdir()
        path = store / "b" / "0"
        path.write_bytes(b"one")
        [told] = c.read_many([item("b/0")])
        assert told.production_id != 0
        c.put_derived("b/0", DERIVATION, b"ONE", source_generation=told.generation)
        assert bytes(c.read_many([item("b/0")])[0].data) == b"ONE"
        # Rewritten by another program: the file store validates every read.
        tmp = store / "b" / "0.tmp"
        tmp.write_bytes(b"two, longer")
        os.replace(tmp, path)
        [again] = c.read_many([item("b/0")])
        assert again.production_id != 0, again
        assert again.generation != told.generation


def test_get_many_answers_derived_and_plain_items_in_order(server):
    with chunkd.Client(server.address) as c:
        c.put("m/c/0", b"zero")
        c.put("m/c/1", b"one")
        results = c.read_many(["m/c/0", item("m/c/1"), item("m/c/0", produce=False)])
        assert bytes(results[0].data) == b"zero"
        assert results[1].production_id != 0
        assert isinstance(results[2], chunkd.NotFoundError)


def test_async_client_reads_and_publishes(server):
    async def run():
        async with chunkd.AsyncClient(server.address) as c:
            await c.put("as/c/0", b"source")
            [told] = await c.read_many([item("as/c/0")])
            assert told.production_id != 0
            await c.put_derived(
                "as/c/0", DERIVATION, b"derived", source_generation=told.generation,
                production_id=told.production_id,
            )
            [hit] = await c.read_many([item("as/c/0")])
            assert bytes(hit.data) == b"derived"
            [other] = await c.read_many([item("as/c/0", derivation=b"x")])
            await c.abandon_derived("as/c/0", b"x", other.production_id)

    asyncio.run(run())


def test_the_derived_budget_holds_under_many_entries(tmp_path):
    with serve_with_shm(
        tmp_path, "--host_cache_bytes=8MiB", "--derived_cache_fraction=0.25"
    ) as server, chunkd.Client(server.address) as c:
        for i in range(64):
            key = f"many/c/{i}"
            c.put(key, b"s")
            [told] = c.read_many([item(key)])
            c.put_derived(
                key, DERIVATION, bytes([i]) * (100 << 10), source_generation=told.generation,
                production_id=told.production_id,
            )
            n = counters(c)
            assert n["derived_bytes"] <= n["derived_capacity_bytes"] == 2 << 20
        n = counters(c)
        assert n["derived_evictions"] > 0 and n["derived_published"] == 64


def test_a_server_without_derived_entries_says_so(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    server = start_server(tmp_path, str(store), "127.0.0.1:0", "--derived_cache_fraction=0")
    try:
        with chunkd.Client(server.address) as c:
            c.put("off/c/0", b"x")
            [r] = c.read_many([item("off/c/0")])
            assert isinstance(r, chunkd.PreconditionFailed), r
            assert "--derived_cache_fraction=0" in str(r)
            with pytest.raises(chunkd.PreconditionFailed):
                c.put_derived("off/c/0", DERIVATION, b"y", source_generation=1)
            info = c.server_info()
            assert "derived" not in info.features
            assert [t.tier for t in info.tiers] == ["host"]
            assert info.tiers[0].capacity_bytes == 1 << 30
    finally:
        assert server.stop() == 0


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)

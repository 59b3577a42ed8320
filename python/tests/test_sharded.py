"""chunkd.ShardedClient: routing (the same as the C++ ShardedClient, checked on a golden list),
spread, movement when the pool changes, and failover across real chunkd servers."""

from __future__ import annotations

import collections
import pickle
import socket

import pytest

import chunkd
from chunkd.sharded import hash64, rendezvous_order, rendezvous_score
from chunkd_testing import start_server

# The same servers, keys and answers as tests/integration/sharded_test.cc: C++ and Python route
# every key to the same server.
GOLDEN_SERVERS = ["chunkd-0.chunkd:7878", "chunkd-1.chunkd:7878", "chunkd-2.chunkd:7878"]
GOLDEN_KEYS = [
    "arr/zarr.json",
    "arr/c/0/0",
    "arr/c/0/1",
    "arr/c/1/0",
    "arr/c/1/1",
    "temperature/c/3/1",
    "température/c/0",
    "x y/z",
    ".zgroup",
    "a",
    "b/c/d/e",
    "zarr.json",
]
GOLDEN_HOME = [0, 1, 2, 0, 2, 1, 2, 2, 1, 2, 1, 1]
GOLDEN_LAST = [1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0]
GOLDEN_HASHES = {
    "": 0xF52A15E9A9B5E89B,
    "a": 0x02C0BDBF481420F8,
    "arr/c/0/0": 0x83269BC04CDE9140,
    "température": 0x124C1C6D4A23102C,
}


def test_golden_routing():
    for text, want in GOLDEN_HASHES.items():
        assert hash64(text) == want, text
        assert hash64(text.encode()) == want
    for key, home, last in zip(GOLDEN_KEYS, GOLDEN_HOME, GOLDEN_LAST):
        order = rendezvous_order(GOLDEN_SERVERS, key)
        assert order[0] == GOLDEN_SERVERS[home], key
        assert order[-1] == GOLDEN_SERVERS[last], key
        assert rendezvous_score(order[0], key) >= rendezvous_score(order[1], key)


def _keys(n: int) -> list[str]:
    return [f"arr/c/{i // 60}/{i % 60}" for i in range(n)]


def test_spread_within_ten_percent():
    servers = [f"127.0.0.1:{p}" for p in (40001, 40002, 40003)]
    counts = collections.Counter(rendezvous_order(servers, k)[0] for k in _keys(3000))
    assert len(counts) == 3
    for n in counts.values():
        assert abs(n - 1000) <= 100, counts


def test_adding_or_removing_a_server_moves_only_its_share():
    three = ["a:1", "b:1", "c:1"]
    four = three + ["d:1"]
    keys = _keys(3000)
    for k in keys:
        before, after = rendezvous_order(three, k)[0], rendezvous_order(four, k)[0]
        assert after == before or after == "d:1"
        # Removing a server: its keys go to their next server, the others stay.
        without_b = rendezvous_order(["a:1", "c:1"], k)[0]
        order = rendezvous_order(three, k)
        assert without_b == (order[1] if order[0] == "b:1" else order[0])


def test_arguments():
    with pytest.raises(ValueError):
        chunkd.ShardedClient([])
    pool = chunkd.ShardedClient("127.0.0.1:1, 127.0.0.1:2,127.0.0.1:1")
    assert pool.servers == ["127.0.0.1:1", "127.0.0.1:2"]
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.servers == pool.servers
    copy.close()
    pool.close()


def test_host_name_resolves_to_the_pool():
    pool = chunkd.ShardedClient("localhost:7999")
    assert pool.servers in (["127.0.0.1:7999"], ["[::1]:7999"])
    pool.close()
    with pytest.raises(chunkd.ChunkdError):
        chunkd.ShardedClient("no-such-host.invalid:7878")


@pytest.fixture()
def pool_of_three(tmp_path):
    """Three chunkd servers over one shared file store directory."""
    store = tmp_path / "store"
    store.mkdir()
    servers = [start_server(tmp_path / f"s{i}", str(store)) for i in range(3)]
    yield servers
    for s in servers:
        s.stop()


def test_failover_to_the_next_server(pool_of_three):
    servers = pool_of_three
    addresses = [s.address for s in servers]
    pool = chunkd.ShardedClient(addresses, timeout=10, failures_to_mark_down=2, down_backoff=30)
    keys = _keys(300)
    values = {k: hash64(k).to_bytes(8, "little") * (1 + len(k)) for k in keys}
    for k in keys:
        pool.put(k, values[k])
    # Keys spread over every server.
    homes = collections.Counter(pool.server_for(k) for k in keys)
    assert set(homes) == set(addresses)
    listing = pool.list("arr/", directory=False)
    assert listing.keys == sorted(keys)
    assert pool.list("arr/c/", directory=True).prefixes == sorted(
        {f"arr/c/{i // 60}/" for i in range(300)}
    )

    victim = servers[0]
    victim.stop()
    for k in keys:
        assert bytes(pool.get(k)) == values[k], k
    assert pool.is_down(victim.address)
    assert not pool.is_down(servers[1].address)
    # Listing leaves the down server out.
    assert pool.list("arr/").keys == sorted(keys)
    pool.close()


def test_get_many_one_call_per_server_and_failover(pool_of_three):
    servers = pool_of_three
    addresses = [s.address for s in servers]
    pool = chunkd.ShardedClient(addresses, timeout=10, failures_to_mark_down=2, down_backoff=30)
    keys = _keys(200)
    values = {k: hash64(k).to_bytes(8, "little") * (1 + len(k)) for k in keys}
    for k in keys:
        pool.put(k, values[k])
    missing = [f"nope/{i}" for i in range(20)]
    items = [*keys, *missing, (keys[0], 2, 9)]

    def calls():
        out = {}
        for s in servers:
            if s.process.poll() is None:
                with chunkd.Client(s.address) as c:
                    out[s.address] = c.server_info().counters["get_many_calls"]
        return out

    before = calls()
    results = pool.get_many(items)
    after = calls()
    homes = {pool.server_for(k if isinstance(k, str) else k[0]) for k in items}
    assert {a: after[a] - before[a] for a in addresses} == {
        a: int(a in homes) for a in addresses
    }
    assert results[: len(keys)] == [values[k] for k in keys]
    assert all(isinstance(r, chunkd.NotFoundError) for r in results[len(keys) : -1])
    assert results[-1] == values[keys[0]][2:9]
    assert pool.get_many([]) == []

    # A down server's group goes to the next server of its first key.
    servers[0].stop()
    results = pool.read_many(keys)
    assert [bytes(r.data) for r in results] == [values[k] for k in keys]
    pool.close()


def test_writes_leave_no_stale_copies(pool_of_three):
    """Each server caches what it read; the store is shared. A copy on a key's second server (a
    read that failed over there, by this client or another) is dropped when the key is written
    at its home, so a read that fails over later gets the new value, not the old copy."""
    servers = pool_of_three
    by_address = {s.address: s for s in servers}
    pool = chunkd.ShardedClient(list(by_address), timeout=10, failures_to_mark_down=1)
    key = "arr/c/9/9"
    home, second = pool.ranked_servers(key)[:2]
    pool.put(key, b"one")
    with chunkd.Client(second) as c:
        assert bytes(c.get(key)) == b"one"  # the second server caches it
    pool.put(key, b"two")
    with chunkd.Client(second) as c:
        assert bytes(c.get(key)) == b"two", "the second server's copy went stale"
        assert c.server_info().counters["invalidations"] == 2  # one per write at the home
    by_address[home].stop()
    assert bytes(pool.get(key)) == b"two"
    assert pool.is_down(home)
    pool.close()

"""Freshness: a file store changed behind chunkd's back (another process writing the directory)
is seen at the next read, through chunkd.Client and through ChunkdStore; max_staleness passes
through to the server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

import chunkd
from chunkd.zarr import ChunkdStore


def _counters(client) -> dict[str, int]:
    return dict(client.server_info().counters)


def _next_tick() -> None:
    # File times come from a coarse clock (a few ms): a same-size change within one tick of the
    # previous one keeps the modification time. A real writer's next change is later than that.
    time.sleep(0.02)


def test_changes_behind_the_servers_back_are_seen_at_the_next_read(server, client, prefix):
    root = Path(server.store) / prefix
    root.mkdir()
    key = f"{prefix}/k"
    (root / "k").write_bytes(b"first")
    assert bytes(client.get(key)) == b"first"
    assert bytes(client.get(key)) == b"first"  # a hit, checked with a stat
    # Overwritten in place (same size).
    _next_tick()
    with open(root / "k", "r+b") as f:
        f.write(b"again")
    assert bytes(client.get(key)) == b"again"
    # Replaced by rename.
    (root / "tmp").write_bytes(b"renamed in")
    os.replace(root / "tmp", root / "k")
    assert bytes(client.get(key)) == b"renamed in"
    # Deleted.
    (root / "k").unlink()
    with pytest.raises(chunkd.NotFoundError):
        client.get(key)
    # A new key.
    (root / "new").write_bytes(b"new")
    assert bytes(client.get(f"{prefix}/new")) == b"new"
    counters = _counters(client)
    assert counters["stale_invalidations"] >= 3
    assert counters["revalidations"] >= counters["revalidations_not_modified"] >= 1


def test_zarr_array_appended_with_local_store_is_seen_through_chunkd(server, prefix):
    local = LocalStore(Path(server.store) / prefix)
    a = zarr.create_array(local, shape=(4, 4), chunks=(2, 2), dtype="int32", fill_value=0)
    a[:] = np.arange(16, dtype="int32").reshape(4, 4)
    store = ChunkdStore(server.address, path=prefix, read_only=True)
    through = zarr.open_array(store, mode="r")
    np.testing.assert_array_equal(through[:], np.arange(16).reshape(4, 4))
    # Appended behind chunkd's back: zarr.json changes, new chunks appear, an old one changes.
    _next_tick()
    a.append(np.full((2, 4), 7, dtype="int32"), axis=0)
    a[0, 0] = 100
    reopened = zarr.open_array(store, mode="r")
    assert reopened.shape == (6, 4)
    expected = np.concatenate([np.arange(16).reshape(4, 4), np.full((2, 4), 7)])
    expected[0, 0] = 100
    np.testing.assert_array_equal(reopened[:], expected)


def test_max_staleness_passes_through(server, prefix):
    root = Path(server.store) / prefix
    root.mkdir()
    key = f"{prefix}/k"
    (root / "k").write_bytes(b"one")
    # An hour of staleness allowed: the cached copy is served without a stat, so a change made
    # behind the server's back stays unseen.
    with chunkd.Client(server.address, max_staleness=3600) as lax:
        assert bytes(lax.get(key)) == b"one"
        before = _counters(lax)["revalidations"]
        _next_tick()
        (root / "k").write_bytes(b"two")
        assert bytes(lax.get(key)) == b"one"
        assert [bytes(v) for v in lax.get_many([key])] == [b"one"]  # GetMany too
        assert _counters(lax)["revalidations"] == before
    # 0: validate now.
    with chunkd.Client(server.address, max_staleness=0) as strict:
        assert [bytes(v) for v in strict.get_many([key])] == [b"two"]
        assert bytes(strict.get(key)) == b"two"
    store = ChunkdStore(server.address, max_staleness=3600)
    assert store.max_staleness == 3600


def test_tensorstore_staleness_bound_is_measured_against_validation(tmp_path):
    """A file store with validation every hour: the stamp of a cached value is the time it was
    last validated (not the call's arrival), and a later staleness_bound makes chunkd look."""
    ts_testing = pytest.importorskip("tensorstore_testing")
    from chunkd_testing import start_server

    store = tmp_path / "store"
    store.mkdir()
    server = start_server(tmp_path / "server", str(store), "127.0.0.1:0", "--revalidate_after=1h")
    try:
        kv = ts_testing.open_kvstore(server.address, "")
        (store / "k").write_bytes(b"one")
        first = kv.read(b"k").result()
        assert first.value == b"one"
        _next_tick()
        (store / "k").write_bytes(b"two!")
        time.sleep(0.05)
        # Within the policy: the cached copy, stamped with when it was read from the store.
        cached = kv.read(b"k").result()
        assert cached.value == b"one"
        assert cached.stamp.time == first.stamp.time
        # A bound after that time: validated now, the change is seen.
        bound = time.time()
        fresh = kv.read(b"k", staleness_bound=bound).result()
        assert fresh.value == b"two!"
        assert fresh.stamp.time >= bound - 0.01
    finally:
        assert server.stop() == 0

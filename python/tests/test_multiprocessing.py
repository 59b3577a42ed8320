"""A pool of 8 spawned reader processes sharing one server through a pickled ChunkdStore."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
import zarr

import chunkd
from chunkd.zarr import ChunkdStore

SHAPE = (512, 256)
CHUNKS = (32, 64)
READERS = 8


def _expected() -> np.ndarray:
    return np.arange(SHAPE[0] * SHAPE[1], dtype="float64").reshape(SHAPE) ** 0.5


def read_rows(args):
    """Runs in a spawned process: the store arrives pickled and reconnects there."""
    store, start, stop = args
    array = zarr.open_array(store, path="data", mode="r")
    block = array[start:stop]
    return start, stop, block, store.get_sync("data/zarr.json") is not None


def stat_via_client(args):
    client, key = args
    return client.stat(key).size


@pytest.mark.timeout(240)
def test_pool_of_spawned_readers(server, prefix):
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    expected = _expected()
    zarr.create_array(store, name="data", shape=SHAPE, chunks=CHUNKS, dtype="f8")[:] = expected
    reader = store.with_read_only(True)
    assert pickle.loads(pickle.dumps(reader)) == reader
    rows = SHAPE[0] // (READERS * 2)
    jobs = [(reader, i * rows, (i + 1) * rows) for i in range(READERS * 2)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(READERS) as pool:
        results = pool.map(read_rows, jobs)
        sizes = pool.map(
            stat_via_client, [(chunkd.Client(server.address), "missing/key")] * READERS
        )
    assert sizes == [0] * READERS
    got = np.empty_like(expected)
    for start, stop, block, has_metadata in results:
        assert has_metadata
        got[start:stop] = block
    np.testing.assert_array_equal(got, expected)
    info = chunkd.Client(server.address).server_info()
    assert info.counters["gets"] > 0


@pytest.mark.timeout(240)
def test_dask_process_scheduler(server, prefix):
    dask = pytest.importorskip("dask")
    import dask.array as da

    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    expected = _expected()
    zarr.create_array(store, name="data", shape=SHAPE, chunks=CHUNKS, dtype="f8")[:] = expected
    lazy = da.from_zarr(zarr.open_array(store.with_read_only(True), path="data", mode="r"))
    with dask.config.set(scheduler="processes", num_workers=2):
        total = lazy.sum().compute()
    assert total == pytest.approx(expected.sum())

"""A pool of 8 spawned reader processes sharing one server through a pickled ChunkdStore."""

from __future__ import annotations

import multiprocessing
import os
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


@pytest.mark.timeout(300)
def test_xarray_on_a_dask_local_cluster(server, prefix, tmp_path):
    """xarray.open_zarr(ChunkdStore, chunks=...) computed by a distributed LocalCluster of 4
    worker processes (the store pickled to each): equal to the same dataset read through
    zarr's LocalStore, and the reads went through chunkd."""
    distributed = pytest.importorskip("distributed")
    import xarray as xr
    from zarr.storage import LocalStore

    rng = np.random.default_rng(11)
    ds = xr.Dataset(
        {
            "t": (("time", "y", "x"), rng.standard_normal((8, 64, 96)).astype("f4")),
            "q": (("y", "x"), np.arange(64 * 96, dtype="i8").reshape(64, 96)),
        },
        coords={"time": np.arange(8), "y": np.arange(64) * 0.5, "x": np.arange(96) * 0.25},
    )
    encoding = {"t": {"chunks": (2, 32, 32)}, "q": {"chunks": (16, 48)}}
    url = f"chunkd://{server.address}/{prefix}/ds.zarr"
    ds.to_zarr(ChunkdStore(url), mode="w", encoding=encoding, consolidated=True)
    ds.to_zarr(LocalStore(tmp_path / "ds.zarr"), mode="w", encoding=encoding, consolidated=True)
    chunks = {"time": 4, "y": 32, "x": 48}
    before = chunkd.Client(server.address).server_info().counters["gets"]
    with distributed.LocalCluster(
        n_workers=4, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as dask_client:
        assert len(dask_client.scheduler_info()["workers"]) == 4
        remote = xr.open_zarr(ChunkdStore(url, read_only=True), chunks=chunks, consolidated=True)
        local = xr.open_zarr(
            LocalStore(tmp_path / "ds.zarr", read_only=True), chunks=chunks, consolidated=True
        )
        assert remote.t.data.npartitions > 4
        got = remote.compute()
        xr.testing.assert_identical(got, local.compute())
        total = (remote.t * 2).sum(dim="time").mean().compute()
        assert float(total) == pytest.approx(float((local.t * 2).sum(dim="time").mean().compute()))
        worker_pids = dask_client.run(lambda: os.getpid())
    after = chunkd.Client(server.address).server_info().counters["gets"]
    assert len(set(worker_pids.values())) == 4
    assert after - before >= remote.t.data.npartitions

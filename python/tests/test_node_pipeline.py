"""chunkd.zarr.NodeCodecPipeline: zarr reads from a ChunkdStore decoded once per node, through the
server's derived entries (docs/python.md, "Decoded once per node").

Every test reads the real server's entries and compares with zarr's own pipeline
(BatchedCodecPipeline) over the same store; the server's counters say the node path was taken
(derived hits, productions), so that a silent fall back to zarr's pipeline fails them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)
from zarr.storage import LocalStore

import chunkd
from chunkd.zarr import ChunkdStore, NodeCodecPipeline
from chunkd_testing import REPO_ROOT, count_store_calls, serve_with_shm

NODE = "chunkd.zarr.NodeCodecPipeline"
ZARR = "zarr.core.codec_pipeline.BatchedCodecPipeline"
DERIVED_FLAG = "--derived_cache_fraction=0.25"


@pytest.fixture(scope="module")
def node_server(tmp_path_factory):
    with serve_with_shm(tmp_path_factory.mktemp("node"), DERIVED_FLAG) as s:
        yield s


def _counters(server) -> dict[str, int]:
    with chunkd.Client(server.address) as c:
        return dict(c.server_info().counters)


def _counter(counters: dict[str, int], name: str) -> int:
    assert name in counters, f"no counter {name!r} among {sorted(counters)}"
    return counters[name]


# The server's counters of derived entries (server/services/server_counters.cc).
HITS = "derived_hits"
PUBLISHED = "derived_published"
HANDOFFS = "derived_handoffs"
BYTES = "derived_bytes"
MISSES = "derived_misses"
PRODUCTIONS = "derived_productions"
WAIT_TIMEOUTS = "derived_wait_timeouts"


def _open(store, path: str, pipeline: str):
    # The pipeline is chosen when the array is opened (zarr's codec_pipeline.path).
    with zarr.config.set({"codec_pipeline.path": pipeline}):
        array = zarr.open_array(store, path=path, mode="r")
    assert type(array._async_array.codec_pipeline).__name__ == pipeline.rsplit(".", 1)[1]
    return array


# -- equality with zarr's pipeline --------------------------------------------------------------

SHAPE = (13, 9, 6)  # edge chunks on every axis
CHUNKS = (4, 4, 6)

CHAINS = {
    "bytes-little": dict(serializer=BytesCodec(endian="little")),
    "bytes-big": dict(serializer=BytesCodec(endian="big")),
    "transpose": dict(filters=[TransposeCodec(order=(2, 0, 1))], compressors=None),
    "zstd": dict(compressors=[ZstdCodec(level=1)]),
    "blosc": dict(compressors=[BloscCodec(cname="lz4", clevel=3)]),
    "gzip": dict(compressors=[GzipCodec(level=1)]),
    "crc32c": dict(compressors=[Crc32cCodec()]),
    "zstd+crc32c": dict(compressors=[ZstdCodec(level=1), Crc32cCodec()]),
    # Sharding: shards of (8, 8, 6), inner chunks of CHUNKS, inner compression.
    "sharding": dict(shards=(8, 8, 6), compressors=[ZstdCodec(level=1)]),
    "sharding-index-start": dict(
        serializer=ShardingCodec(
            chunk_shape=CHUNKS,
            codecs=[BytesCodec(), GzipCodec(level=1)],
            index_location="start",
        ),
        chunks=(8, 8, 6),
        compressors=None,
    ),
}
DTYPES = ["int16", "uint8", "int64", "float32", "float64", "bool", "complex64"]
CASES = [(chain, "float32") for chain in CHAINS] + [
    (chain, dtype) for chain in ("zstd", "bytes-big", "sharding") for dtype in DTYPES
    if dtype != "float32"
]

SELECTIONS = {
    "whole": (slice(None),) * 3,
    "partial": (slice(1, 11), slice(3, 9), slice(2, 5)),
    "int": (5, slice(None), slice(1, 4)),
    "step": (slice(0, 13, 3), slice(None), 4),
}


def _values(dtype: str, shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _fill(dtype: str):
    return {"bool": True, "uint8": 7, "int16": -3, "int64": -3}.get(dtype, -2.5)


def _create(store, path: str, chain: str, dtype: str, values: np.ndarray):
    kwargs = dict(CHAINS[chain])
    kwargs.setdefault("chunks", CHUNKS)
    if "shards" in kwargs:
        kwargs["chunks"] = CHUNKS
    array = zarr.create_array(
        store, name=path, shape=SHAPE, dtype=dtype, fill_value=_fill(dtype), **kwargs
    )
    # Written except the last row of chunks (shards): those stay missing (the fill value).
    array[:8] = values[:8]
    return array


@pytest.mark.parametrize("chain,dtype", CASES, ids=[f"{c}-{d}" for c, d in CASES])
def test_reads_equal_zarrs_pipeline(node_server, chain, dtype):
    store = ChunkdStore(node_server.address, delivery="shm")
    path = f"eq/{chain}/{dtype}"
    values = _values(dtype)
    _create(store, path, chain, dtype, values)
    expected_whole = values.copy()
    expected_whole[8:] = _fill(dtype)
    zarrs = _open(store, path, ZARR)
    node = _open(store, path, NODE)
    before = _counters(node_server)
    for name, selection in SELECTIONS.items():
        want = zarrs[selection]
        np.testing.assert_array_equal(want, expected_whole[selection])
        for _ in range(2):  # a production (or hit), then a hit
            got = node[selection]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    # Orthogonal selection (zarr's drop_axes path) and a single element.
    sel = (np.array([0, 5, 12]), slice(None), np.array([1, 4]))
    np.testing.assert_array_equal(node.oindex[sel], zarrs.oindex[sel])
    assert node[12, 8, 5] == zarrs[12, 8, 5]
    after = _counters(node_server)
    assert _counter(after, HITS) > _counter(before, HITS)
    assert _counter(after, PUBLISHED) > _counter(before, PUBLISHED)


def test_zarr_v2_arrays_read_decoded_too(node_server):
    # Zarr format 2 (zarr's V2Codec: numcodecs' compressor, big-endian here, a fill value).
    store = ChunkdStore(node_server.address, delivery="shm")
    values = np.arange(120, dtype=">i4").reshape(10, 12)
    a = zarr.create_array(store, name="v2", shape=(10, 12), chunks=(4, 5), dtype=">i4",
                          zarr_format=2, fill_value=3)
    a[:4] = values[:4]
    expected = values.copy()
    expected[4:] = 3
    node = _open(store, "v2", NODE)
    before = _counters(node_server)
    for _ in range(2):
        np.testing.assert_array_equal(node[:], expected)
        np.testing.assert_array_equal(node[1:9, 3:11], expected[1:9, 3:11])
    after = _counters(node_server)
    assert _counter(after, PUBLISHED) - _counter(before, PUBLISHED) == 3  # the chunks written
    assert _counter(after, HITS) > _counter(before, HITS)


def test_each_chunk_is_decoded_once(node_server):
    store = ChunkdStore(node_server.address, delivery="shm")
    values = _values("float32", (16, 16, 6))
    zarr.create_array(store, name="once", shape=values.shape, chunks=CHUNKS, dtype="f4")[:] = values
    before = _counters(node_server)
    node = _open(store, "once", NODE)
    for _ in range(3):
        np.testing.assert_array_equal(node[:], values)
    after = _counters(node_server)
    chunks = 4 * 4
    assert _counter(after, PUBLISHED) - _counter(before, PUBLISHED) == chunks
    assert _counter(after, HITS) - _counter(before, HITS) == 2 * chunks


def test_sharded_hits_read_no_shard_index(node_server, monkeypatch):
    store = ChunkdStore(node_server.address, delivery="shm")
    values = _values("float32", (16, 16, 6))
    zarr.create_array(
        store, name="nohdr", shape=values.shape, chunks=CHUNKS, shards=(8, 8, 6), dtype="f4"
    )[:] = values
    node = _open(store, "nohdr", NODE)
    # The selection touches 8 inner chunks of 2 shards. A production reads each shard's index
    # once and each inner chunk's range: 2 + 8 Gets; the entries are the 8 inner chunks.
    calls = count_store_calls(monkeypatch)
    before = _counters(node_server)
    np.testing.assert_array_equal(node[1:7, 2:15], values[1:7, 2:15])  # produces
    assert _counter(_counters(node_server), PUBLISHED) - _counter(before, PUBLISHED) == 8
    reads, read_many, items = calls.snapshot()
    assert (reads, read_many, items) == (2 + 8, 1, 8)
    monkeypatch.undo()
    # A hit asks the server for derived entries only: no plain get (the index, a shard's bytes).
    plain = []
    original = ChunkdStore.get

    async def counted_get(self, key, prototype=None, byte_range=None):
        plain.append((key, byte_range))
        return await original(self, key, prototype, byte_range)

    monkeypatch.setattr(ChunkdStore, "get", counted_get)
    np.testing.assert_array_equal(node[1:7, 2:15], values[1:7, 2:15])
    assert plain == []


def test_other_stores_and_writes_are_zarrs(node_server, tmp_path):
    # A LocalStore read and written through the node pipeline: zarr's pipeline, same values.
    values = _values("int16", (10, 10))
    with zarr.config.set({"codec_pipeline.path": NODE}):
        local = zarr.create_array(LocalStore(tmp_path / "l"), shape=(10, 10), chunks=(4, 4),
                                  dtype="i2", compressors=[ZstdCodec()])
        local[:] = values
        np.testing.assert_array_equal(local[:], values)
        # A ChunkdStore opted out (decoded_cache=False): zarr's pipeline, no derived reads.
        store = ChunkdStore(node_server.address, decoded_cache=False)
        before = _counters(node_server)
        a = zarr.create_array(store, name="optout", shape=(10, 10), chunks=(4, 4), dtype="i2")
        a[:] = values
        np.testing.assert_array_equal(a[:], values)
        after = _counters(node_server)
    assert isinstance(a._async_array.codec_pipeline, NodeCodecPipeline)
    assert _counter(after, PUBLISHED) == _counter(before, PUBLISHED)
    assert _counter(after, HITS) == _counter(before, HITS)


def test_inline_delivery_reads_decoded_too(node_server):
    store = ChunkdStore(node_server.address)  # inline
    values = _values("float64", (9, 9))
    zarr.create_array(store, name="inline", shape=(9, 9), chunks=(4, 4), dtype="f8",
                      compressors=[ZstdCodec()])[:] = values
    node = _open(store, "inline", NODE)
    before = _counters(node_server)
    for _ in range(2):
        np.testing.assert_array_equal(node[:], values)
    assert _counter(_counters(node_server), HITS) - _counter(before, HITS) == 9


def test_gpu_prototype_falls_back_to_zarrs_pipeline(node_server):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA device")
    from zarr.buffer import gpu

    store = ChunkdStore(node_server.address, delivery="shm")
    values = _values("float32", (8, 8))
    zarr.create_array(store, name="gpu", shape=(8, 8), chunks=(4, 4), dtype="f4")[:] = values
    node = _open(store, "gpu", NODE)
    got = node.get_basic_selection(..., prototype=gpu.buffer_prototype)
    np.testing.assert_array_equal(cupy.asnumpy(got), values)


# -- the pipeline is one line, and travels ----------------------------------------------------


def test_store_option_turns_the_pipeline_on_and_travels_in_pickles(node_server):
    import pickle

    default = zarr.config.get("codec_pipeline.path")
    try:
        store = ChunkdStore(node_server.address, decoded_cache=True)
        assert zarr.config.get("codec_pipeline.path") == NODE
        zarr.config.set({"codec_pipeline.path": default})
        copy = pickle.loads(pickle.dumps(store))  # as in a dask worker: it turns it on again
        assert copy.decoded_cache is True
        assert zarr.config.get("codec_pipeline.path") == NODE
        a = zarr.create_array(copy, name="opt", shape=(4,), chunks=(2,), dtype="i4")
        assert isinstance(pickle.loads(pickle.dumps(a))._async_array.codec_pipeline,
                          NodeCodecPipeline)
    finally:
        zarr.config.set({"codec_pipeline.path": default})


_FORKED = None  # the array a fork pool's workers inherit (never pickled)


def _read_forked(i: int) -> np.ndarray:
    return _FORKED[:, i * 4 : (i + 1) * 4]


def test_fork_pool_workers_produce_and_publish(node_server):
    # Forked workers (a DataLoader's, a "fork" pool) inherit an array opened, and read, in the
    # parent: their clients relay through a helper process (chunkd._relay), productions and
    # publications included. Each chunk is produced once and published; no wait runs out.
    import multiprocessing

    global _FORKED
    store = ChunkdStore(node_server.address, delivery="shm")
    values = _values("float32", (8, 16))
    zarr.create_array(store, name="forked", shape=(8, 16), chunks=(4, 4), dtype="f4",
                      compressors=[ZstdCodec()])[:] = values
    _FORKED = _open(store, "forked", NODE)
    np.testing.assert_array_equal(_FORKED[:4, :4], values[:4, :4])  # gRPC started here
    before = _counters(node_server)
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            parts = pool.map(_read_forked, [0, 1, 2, 3, 0, 1, 2, 3])
    finally:
        _FORKED = None
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part, values[:, (i % 4) * 4 : (i % 4 + 1) * 4])
    after = _counters(node_server)
    delta = {n: _counter(after, n) - _counter(before, n)
             for n in (PUBLISHED, PRODUCTIONS, WAIT_TIMEOUTS)}
    assert delta == {PUBLISHED: 7, PRODUCTIONS: 7, WAIT_TIMEOUTS: 0}, delta


# -- never the old generation -------------------------------------------------------------------


def test_a_source_rewritten_through_chunkd_is_decoded_again(node_server):
    store = ChunkdStore(node_server.address, delivery="shm")
    first, second = _values("float32", (8, 8), 1), _values("float32", (8, 8), 2)
    w = zarr.create_array(store, name="rw", shape=(8, 8), chunks=(4, 4), dtype="f4",
                          compressors=[ZstdCodec()])
    w[:] = first
    node = _open(store, "rw", NODE)
    np.testing.assert_array_equal(node[:], first)
    np.testing.assert_array_equal(node[:], first)  # hits
    w[:4, :4] = second[:4, :4]  # one chunk rewritten
    expected = first.copy()
    expected[:4, :4] = second[:4, :4]
    np.testing.assert_array_equal(node[:], expected)
    w[:] = second
    np.testing.assert_array_equal(node[:], second)


def test_a_source_changed_behind_chunkds_back_is_decoded_again(node_server):
    # The file store is checked at every read: a chunk replaced in the directory by another
    # writer is the new one at the next read, decoded, never the old generation's entry.
    root = Path(node_server.store) / "behind"
    local = LocalStore(root)
    first, second = _values("int16", (8, 8), 1), _values("int16", (8, 8), 2)
    w = zarr.create_array(local, shape=(8, 8), chunks=(4, 4), dtype="i2",
                          compressors=[ZstdCodec()])
    w[:] = first
    store = ChunkdStore(node_server.address, path="behind", delivery="shm")
    node = _open(store, "", NODE)
    np.testing.assert_array_equal(node[:], first)
    np.testing.assert_array_equal(node[:], first)
    time.sleep(0.02)  # past the file clock's tick (see test_freshness.py)
    w[:] = second
    np.testing.assert_array_equal(node[:], second)
    np.testing.assert_array_equal(node[:], second)


# -- a producer that dies ------------------------------------------------------------------------

_PRODUCER = textwrap.dedent(
    """
    import sys, time, chunkd
    from chunkd import GetItem
    address, key, derivation = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    with chunkd.Client(address) as c:
        (r,) = c.read_many([GetItem(key, derivation=derivation, produce=True)])
        print(r.production_id, flush=True)
        time.sleep(600)  # "decoding": killed before it publishes
    """
)


def test_a_producer_killed_mid_decode_is_taken_over(tmp_path):
    # A server that hands a production over after 2 s without its value (or sooner, when it
    # sees its producer go).
    with serve_with_shm(tmp_path, DERIVED_FLAG, "--derived_produce_timeout=2s") as server:
        _killed_producer(server)


def _one_chunk_array(server, name: str):
    """A 4 x 4 float32 zstd array of one chunk, and the derivation the pipeline asks for."""
    from zarr.core.array_spec import ArrayConfig, ArraySpec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.dtype import parse_dtype

    from chunkd.node_pipeline import derivation

    store = ChunkdStore(server.address, delivery="shm")
    values = _values("float32", (4, 4))
    zarr.create_array(store, name=name, shape=(4, 4), chunks=(4, 4), dtype="f4",
                      compressors=[ZstdCodec()])[:] = values
    pipeline = _open(store, name, NODE)._async_array.codec_pipeline
    spec = ArraySpec(
        shape=(4, 4), dtype=parse_dtype("float32", zarr_format=3), fill_value=np.float32(0),
        config=ArrayConfig.from_dict({}), prototype=default_buffer_prototype(),
    )
    return store, values, derivation(list(pipeline), spec, np.dtype("float32"))


def _start_producer(server, key: str, d: bytes) -> subprocess.Popen:
    """A process that is told to produce `key`'s entry, says its production id, and sleeps."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "python"))
    return subprocess.Popen(
        [sys.executable, "-c", _PRODUCER, server.address, key, d.hex()],
        stdout=subprocess.PIPE, text=True, env=env,
    )


def _killed_producer(node_server):
    store, values, d = _one_chunk_array(node_server, "killed")
    node = _open(store, "killed", NODE)
    producer = _start_producer(node_server, "killed/c/0/0", d)
    try:
        production = int(producer.stdout.readline())
        assert production != 0, "the first reader was not told to produce"
        before = _counters(node_server)
        os.kill(producer.pid, signal.SIGKILL)
        producer.wait(60)
        # Another process's read takes the production over and publishes it.
        np.testing.assert_array_equal(node[:], values)
        after = _counters(node_server)
        assert _counter(after, HANDOFFS) > _counter(before, HANDOFFS)
        assert _counter(after, PUBLISHED) == _counter(before, PUBLISHED) + 1
        np.testing.assert_array_equal(node[:], values)
        assert _counter(_counters(node_server), HITS) == _counter(after, HITS) + 1
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(60)


def test_a_production_that_fails_is_given_up_at_once(node_server, monkeypatch):
    # A decode that raises fails the read (as in zarr's pipeline) and gives the production up
    # (abandon_derived): the next read is told to produce it at once, not after the server's
    # production deadline (30 s here).
    store = ChunkdStore(node_server.address, delivery="shm")
    values = _values("float32", (4, 4))
    zarr.create_array(store, name="fails", shape=(4, 4), chunks=(4, 4), dtype="f4",
                      compressors=[ZstdCodec()])[:] = values
    node = _open(store, "fails", NODE)

    async def broken(self, getter, spec):
        raise RuntimeError("decode failed")

    before = _counters(node_server)
    with monkeypatch.context() as m:
        m.setattr(NodeCodecPipeline, "_decode_chunk", broken)
        with pytest.raises(RuntimeError, match="decode failed"):
            node[:]
    after = _counters(node_server)
    assert _counter(after, "derived_abandons") == _counter(before, "derived_abandons") + 1
    start = time.monotonic()
    np.testing.assert_array_equal(node[:], values)
    assert time.monotonic() - start < 20
    final = _counters(node_server)
    assert _counter(final, PRODUCTIONS) == _counter(after, PRODUCTIONS) + 1
    assert _counter(final, PUBLISHED) == _counter(after, PUBLISHED) + 1


def test_a_wait_past_its_deadline_decodes_with_zarrs_pipeline(tmp_path):
    # Another process holds the production (and does not publish); a reader's wait ends after
    # --derived_wait_ms and it decodes the chunk itself, through zarr's pipeline.
    with serve_with_shm(tmp_path, DERIVED_FLAG, "--derived_wait_ms=300",
                        "--derived_produce_timeout=120s") as server:
        store, values, d = _one_chunk_array(server, "waits")
        producer = _start_producer(server, "waits/c/0/0", d)
        try:
            assert int(producer.stdout.readline()) != 0
            node = _open(store, "waits", NODE)
            before = _counters(server)
            np.testing.assert_array_equal(node[:], values)
            after = _counters(server)
            assert _counter(after, WAIT_TIMEOUTS) == _counter(before, WAIT_TIMEOUTS) + 1
            assert _counter(after, PUBLISHED) == _counter(before, PUBLISHED)
        finally:
            producer.kill()
            producer.wait(60)


# -- the budget -----------------------------------------------------------------------------------


def test_the_derived_budget_holds_under_many_arrays(tmp_path):
    # A 4 MiB host cache, a quarter of it for derived entries: 24 arrays of 256 KiB decoded
    # each (6 MiB) read in turn; what the derived tier holds stays within its budget.
    with serve_with_shm(tmp_path, "--derived_cache_fraction=0.25", "--host_cache_bytes=4MiB") as s:
        store = ChunkdStore(s.address, delivery="shm")
        values = _values("float32", (256, 256))
        peak = 0
        for i in range(24):
            zarr.create_array(store, name=f"b{i}", shape=values.shape, chunks=(64, 64),
                              dtype="f4", compressors=[ZstdCodec()])[:] = values
            node = _open(store, f"b{i}", NODE)
            np.testing.assert_array_equal(node[:], values)
            with chunkd.Client(s.address) as c:
                info = c.server_info()
            tiers = {t.tier: t for t in info.tiers}
            derived = tiers["derived"]
            assert derived.capacity_bytes <= 1024 * 1024 + 4096
            assert derived.used_bytes <= derived.capacity_bytes
            peak = max(peak, derived.used_bytes)
        assert peak > 0
        # Every chunk went through the derived tier (24 x 16 entries of 16 KiB: 6 MiB through
        # a 1 MiB budget, so most were evicted on the way).
        assert _counter(info.counters, PUBLISHED) == 24 * 16


# -- 8 processes: dask ----------------------------------------------------------------------------


def test_eight_dask_processes_decode_each_chunk_once(node_server):
    distributed = pytest.importorskip("dask.distributed")
    import dask.array as da

    store = ChunkdStore(node_server.address, delivery="shm", decoded_cache=None)
    values = _values("float32", (32, 32, 8))
    zarr.create_array(store, name="dask", shape=values.shape, chunks=(8, 8, 8), dtype="f4",
                      compressors=[ZstdCodec()])[:] = values
    chunks = 16
    before = _counters(node_server)
    # The store travels to the workers with decoded_cache=True (turns the pipeline on there);
    # the array opened here holds a NodeCodecPipeline, pickled with it.
    node_store = ChunkdStore(node_server.address, delivery="shm", decoded_cache=True)
    default = ZARR
    try:
        array = zarr.open_array(node_store, path="dask", mode="r")
        assert isinstance(array._async_array.codec_pipeline, NodeCodecPipeline)
        with distributed.LocalCluster(
            n_workers=8, threads_per_worker=1, processes=True, dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster, distributed.Client(cluster) as client:
            # Every worker reads every chunk (8 reads of each chunk, in 8 processes): a graph
            # of its own each (a name of its own: dask would compute shared keys once).
            workers = list(client.scheduler_info()["workers"])
            assert len(workers) == 8
            futures = [
                client.compute(
                    da.from_array(array, chunks=(8, 8, 8), name=f"read-{i}").sum(),
                    workers=[w],
                )
                for i, w in enumerate(workers)
            ]
            totals = client.gather(futures)
            got = client.compute(da.from_array(array, chunks=(8, 8, 8), name="all")).result()
    finally:
        zarr.config.set({"codec_pipeline.path": default})
    np.testing.assert_array_equal(got, values)
    for total in totals:
        assert np.isclose(total, values.sum(dtype=np.float64), rtol=1e-4)
    after = _counters(node_server)
    delta = {name: _counter(after, name) - _counter(before, name)
             for name in (PUBLISHED, HITS, MISSES, PRODUCTIONS, WAIT_TIMEOUTS)}
    # Decoded once each on the node: one production per chunk, published, and no reader that
    # gave up waiting and decoded on its own; every read of every process asked the server
    # (8 workers' reads and the last one's): a hit, or a miss that produced or waited.
    assert delta[PRODUCTIONS] == delta[PUBLISHED] == chunks, delta
    assert delta[WAIT_TIMEOUTS] == 0, delta
    assert delta[HITS] + delta[MISSES] == 9 * chunks, delta


# -- the benchmark's report (python/benchmarks/node_decode.py) ---------------------------------


def test_benchmark_report_holds_targets_by_the_runs_medians():
    sys.path.insert(0, str(REPO_ROOT / "python" / "benchmarks"))
    import node_decode

    rows = []
    for rep, scale in enumerate((1.0, 1.1, 0.9), start=1):
        for codec in node_decode.CODECS:
            for kind, gbps1, gbps8 in (("memory", 1.0, 1.0), ("local", 1.0, 1.0),
                                       ("chunkd-shm", 0.8, 0.9), ("chunkd-node", 1.6, 2.1)):
                for procs, gbps in ((1, gbps1), (8, gbps8)):
                    rows.append({"store": kind, "codec": codec, "procs": procs, "rep": rep,
                                 "available": True, "gbps": gbps * scale})
    env = {"quick": False, "plan": {"reads": 3, "repeat": 3}, "stored_bytes": {"zstd": 10},
           "derived_before_warm": {"published": 5, "hits": 0},
           "derived_after": {"published": 5 + 2 * node_decode.CHUNK_COUNT, "hits": 9,
                             "derived_used_bytes": 7}}
    text = node_decode.report(rows, env, [1, 8])
    # Medians of 1.6 and 2.1 against 1.0: both targets held (1.5x and 2x); each chunk once.
    assert text.count("(target ≥ 2×: held)") == 2 and text.count("(target ≥ 1.5×: held)") == 2
    assert "each decoded once" in text
    env["derived_after"]["published"] += 1
    rows = [dict(r, gbps=r["gbps"] * 0.9) if r["store"] == "chunkd-node" else r for r in rows]
    text = node_decode.report(rows, env, [1, 8])
    assert text.count("not held") == 4 and "NOT once each" in text

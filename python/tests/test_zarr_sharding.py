"""Sharded Zarr v3 (the sharding codec) read through chunkd: byte-range reads of shards on the
file store, equal to zarr's LocalStore, and the calls they cost.

zarr 3.1's sharding codec (zarr/codecs/sharding.py, ``ShardingCodec._decode_partial_single``)
reads, for each shard a selection touches:
- the whole shard (one ``get`` without a range) when the selection covers every inner chunk;
- otherwise the shard index (``SuffixByteRequest``: 16 bytes per inner chunk and a 4-byte
  checksum), then each inner chunk as a ``RangeByteRequest``, one after another: the codec
  awaits each ``get`` before issuing the next, so a store cannot put the inner chunks of one
  shard into one call; 1 + N calls for N inner chunks of a shard is what zarr allows.
The shards of a selection are read concurrently (``async.concurrency``): their gets wake in
the same event-loop iteration, and ChunkdStore's get batcher sends them as one GetMany.
(``get_partial_values`` is not used by zarr 3.1's sharding codec.)

(``test_sharded.py`` is about chunkd.ShardedClient, a pool of servers, not Zarr's sharding.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

import chunkd
from chunkd.zarr import ChunkdStore
from chunkd_testing import SMALL_BLOCK_FLAG, count_store_calls, serve_with_shm

FILL = -7.5


# A server with the default block size, and, where chunkd reads values by blocks
# (--block_bytes), one with 64 KiB blocks, the size of the inner chunks here: most of their
# ranges span two blocks.
SERVER_FLAGS = {"default": ()}
if SMALL_BLOCK_FLAG:
    SERVER_FLAGS["small blocks"] = (SMALL_BLOCK_FLAG,)


@pytest.fixture(scope="module", params=list(SERVER_FLAGS))
def shm_server(request, tmp_path_factory):
    with serve_with_shm(tmp_path_factory.mktemp("sharding"), *SERVER_FLAGS[request.param]) as s:
        yield s


def _counters(server) -> dict[str, int]:
    with chunkd.Client(server.address) as c:
        return dict(c.server_info().counters)


# -- values -----------------------------------------------------------------------------------

# 3 x 2 shards of 512 x 512 (1 MiB of float32 uncompressed), the last row and column partial;
# inner chunks of 128 x 128 (64 KiB).
SHAPE, SHARDS, INNER = (1100, 700), (512, 512), (128, 128)


def _expected() -> np.ndarray:
    data = np.random.default_rng(18).standard_normal(SHAPE).astype("float32")
    data[512:1024, 512:700] = FILL  # shard (1, 1): every inner chunk empty, no shard at all
    data[0:128, 128:256] = FILL  # inner chunk (0, 1) of shard (0, 0): absent from its index
    data[1024:1100, 0:128] = FILL  # an edge inner chunk of the edge shard (2, 0)
    return data


def _write(root: Path, compressor: str) -> np.ndarray:
    data = _expected()
    array = zarr.create_array(LocalStore(root), name="a", shape=SHAPE, chunks=INNER,
                              shards=SHARDS, dtype="float32", fill_value=FILL,
                              compressors=None if compressor == "none" else ZstdCodec(level=3))
    array[...] = data
    shards = sorted(str(p.relative_to(root / "a" / "c")) for p in (root / "a" / "c").rglob("*")
                    if p.is_file())
    assert shards == ["0/0", "0/1", "1/0", "2/0", "2/1"]  # no file for the empty shard (1, 1)
    return data


def _selections() -> list:
    rng = np.random.default_rng(7)
    picks = [
        np.s_[:, :],
        np.s_[0:128, 0:128],  # one inner chunk
        np.s_[0:128, 128:256],  # one empty inner chunk
        np.s_[512:1024, 512:700],  # the missing shard
        np.s_[0:512, 0:512],  # one whole shard
        np.s_[1024:1100, 512:700],  # the corner: edge shard, edge chunks
        np.s_[500:530, 490:530],  # four shards, one corner each
        np.s_[3, :],
        np.s_[:, 699],
    ]
    for _ in range(24):
        rows = sorted(int(v) for v in rng.integers(0, SHAPE[0] + 1, 2))
        cols = sorted(int(v) for v in rng.integers(0, SHAPE[1] + 1, 2))
        if rows[0] == rows[1] or cols[0] == cols[1]:
            continue
        picks.append(np.s_[rows[0]:rows[1], cols[0]:cols[1]])
    for _ in range(4):  # random single inner chunks
        i, j = int(rng.integers(0, 9)), int(rng.integers(0, 6))
        picks.append(np.s_[i * 128:min((i + 1) * 128, SHAPE[0]),
                           j * 128:min((j + 1) * 128, SHAPE[1])])
    return picks


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_sharded_reads_equal_local_store(shm_server, prefix, compressor):
    """Random selections of a sharded array (a partial edge shard, a missing shard, missing
    inner chunks read as the fill value) through ChunkdStore inline and with shared memory and
    through TensorStore's tsgrpc_kvstore driver: equal to LocalStore's, read from the server's
    directory."""
    from tensorstore_testing import kvstore_spec, ts

    root = Path(shm_server.store) / prefix
    expected = _write(root, compressor)
    local = zarr.open_array(LocalStore(root, read_only=True), path="a", mode="r")
    inline = ChunkdStore(f"chunkd://{shm_server.address}/{prefix}", read_only=True)
    shm = ChunkdStore(f"chunkd://{shm_server.address}/{prefix}", read_only=True,
                      delivery="shm", shm_dir=shm_server.shm_dir)
    readers = {name: zarr.open_array(store, path="a", mode="r")
               for name, store in (("ChunkdStore inline", inline), ("ChunkdStore shm", shm))}
    tensorstore = ts.open({"driver": "zarr3",
                           "kvstore": kvstore_spec(shm_server.address, f"{prefix}/a/")}).result()
    assert tensorstore.shape == SHAPE
    before = _counters(shm_server)
    for selection in _selections():
        want = local[selection]
        np.testing.assert_array_equal(want, expected[selection], err_msg=str(selection))
        for name, array in readers.items():
            np.testing.assert_array_equal(array[selection], want, err_msg=f"{name} {selection}")
        np.testing.assert_array_equal(tensorstore[selection].read().result(), want,
                                      err_msg=f"TensorStore {selection}")
    # Orthogonal (fancy) selections across shards.
    rows, cols = [1, 130, 513, 1099, 600], [0, 700 - 1, 255, 256, 511, 512]
    for name, array in readers.items():
        np.testing.assert_array_equal(array.oindex[rows, cols], local.oindex[rows, cols],
                                      err_msg=name)
    after = _counters(shm_server)
    assert after["gets_shm"] > before["gets_shm"]  # shared memory was used, not inline bytes
    inline.close()
    shm.close()


def test_partial_shard_reads_cost_the_calls_zarr_allows(shm_server, prefix, monkeypatch):
    """The calls a ChunkdStore makes for zarr's reads of a sharded array, counted by the client
    and by the server: one inner chunk, 16 inner chunks of one shard, a whole shard, and 16
    inner chunks in each of 4 shards (the shards' gets batched into GetMany calls)."""
    root = Path(shm_server.store) / prefix
    data = np.random.default_rng(3).standard_normal((256, 256)).astype("float32")
    # 2 x 2 shards of 128 x 128, each of 8 x 8 inner chunks of 16 x 16.
    zarr.create_array(LocalStore(root), name="a", shape=data.shape, chunks=(16, 16),
                      shards=(128, 128), dtype="float32", compressors=None)[...] = data
    store = ChunkdStore(f"chunkd://{shm_server.address}/{prefix}", read_only=True)
    array = zarr.open_array(store, path="a", mode="r")
    calls = count_store_calls(monkeypatch)

    def read(selection) -> tuple[int, int, int, int]:
        """(Get calls, GetMany calls, GetMany items, gets the server counted) for one read."""
        before, server_before = calls.snapshot(), _counters(shm_server)
        np.testing.assert_array_equal(array[selection], data[selection], err_msg=str(selection))
        reads, many, items = (a - b for a, b in zip(calls.snapshot(), before, strict=True))
        server = _counters(shm_server)
        assert server["get_many_calls"] - server_before["get_many_calls"] == many
        server_gets = server["gets"] - server_before["gets"]
        assert server_gets == reads + items  # the server saw what the client sent
        return reads, many, items, server_gets

    # One inner chunk: the shard index and the chunk, one Get each.
    reads, many, items, gets = read(np.s_[16:32, 32:48])
    assert gets == 2 and reads + many <= 2
    # 16 inner chunks of one shard: the index, then the 16 chunks one after another (zarr
    # awaits each before the next): at most 17 calls.
    reads, many, items, gets = read(np.s_[0:64, 0:64])
    assert gets == 17 and reads + many <= 17
    # A whole shard: one Get, no index read.
    reads, many, items, gets = read(np.s_[0:128, 128:256])
    assert (reads, many, gets) == (1, 0, 1)
    # 16 inner chunks in each of 4 shards: 4 x 17 gets; the shards' reads go out together
    # (one GetMany per round in step; 34 leaves room for a round that splits on a loaded
    # machine), against 68 Gets unbatched.
    reads, many, items, gets = read(np.s_[64:192, 64:192])
    assert gets == 4 * 17
    assert many >= 1 and reads + many <= 34, (reads, many, items)
    store.close()

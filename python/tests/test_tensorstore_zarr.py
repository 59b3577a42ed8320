"""Arrays across TensorStore and zarr-python through chunkd: TensorStore's zarr3 and zarr (v2)
drivers over the tsgrpc_kvstore driver write an array through chunkd, zarr-python reads it from
the server's directory (LocalStore) and through chunkd (ChunkdStore), equal; and the other way
round. Sharded zarr3 too (TensorStore reads shards with byte-range reads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from chunkd.zarr import ChunkdStore
from tensorstore_testing import kvstore_spec, ts

COMPRESSORS = ["none", "zstd", "blosc"]


def ts_codecs(compressor: str) -> list[dict]:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compressor == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    elif compressor == "blosc":
        codecs.append({"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5,
                                                          "shuffle": "shuffle", "typesize": 4,
                                                          "blocksize": 0}})
    return codecs


def zarr_compressors(compressor: str):
    return {"none": None, "zstd": ZstdCodec(level=3),
            "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}[compressor]


def data(shape, dtype="float32", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, shape).astype(dtype)


def zarr3_spec(address, path, shape, chunks, dtype, codecs, **extra) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": kvstore_spec(address, path),
        "metadata": {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": dtype,
            "codecs": codecs,
            "fill_value": 0,
        },
        **extra,
    }


def zarr_readers(server, prefix):
    """The same array through zarr-python: from the directory, and through chunkd."""
    return {
        "LocalStore": LocalStore(Path(server.store) / prefix, read_only=True),
        "ChunkdStore": ChunkdStore(f"chunkd://{server.address}/{prefix}", read_only=True),
    }


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8", "float64"])
def test_zarr3_written_by_tensorstore_reads_in_zarr_python(server, prefix, compressor, dtype):
    expected = data((45, 70), dtype, seed=len(dtype))
    codecs = ts_codecs(compressor)
    if compressor == "blosc":
        codecs[1]["configuration"]["typesize"] = np.dtype(dtype).itemsize
    array = ts.open(zarr3_spec(server.address, f"{prefix}/a/", expected.shape, (16, 32), dtype,
                               codecs), create=True).result()
    array.write(expected).result()
    np.testing.assert_array_equal(array.read().result(), expected)
    for name, store in zarr_readers(server, prefix).items():
        back = zarr.open_array(store, path="a", mode="r")
        np.testing.assert_array_equal(back[:], expected, err_msg=name)
        np.testing.assert_array_equal(back[5:40, 3:66], expected[5:40, 3:66], err_msg=name)


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("writer", ["ChunkdStore", "LocalStore"])
def test_zarr3_written_by_zarr_python_reads_in_tensorstore(server, prefix, compressor, writer):
    expected = data((50, 33), "float32", seed=3)
    store = (ChunkdStore(f"chunkd://{server.address}/{prefix}") if writer == "ChunkdStore"
             else LocalStore(Path(server.store) / prefix))
    z = zarr.create_array(store, name="a", shape=expected.shape, chunks=(16, 8), dtype="float32",
                          compressors=zarr_compressors(compressor), fill_value=0)
    z[:] = expected
    array = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(server.address,
                                                                f"{prefix}/a/")}).result()
    assert array.shape == expected.shape
    np.testing.assert_array_equal(array.read().result(), expected)
    np.testing.assert_array_equal(array[7:41, 2:30].read().result(), expected[7:41, 2:30])


def test_tensorstore_partial_writes_update_chunks_zarr_python_sees(server, prefix):
    """Partial chunk writes are read-modify-write: TensorStore reads the chunk, then writes it
    on the condition that its generation did not change."""
    expected = data((40, 40), "int16", seed=5)
    array = ts.open(zarr3_spec(server.address, f"{prefix}/a/", expected.shape, (16, 16), "int16",
                               ts_codecs("zstd")), create=True).result()
    array.write(expected).result()
    patch = np.full((10, 10), 7, dtype="int16")
    array[3:13, 20:30].write(patch).result()
    expected[3:13, 20:30] = patch
    for name, store in zarr_readers(server, prefix).items():
        np.testing.assert_array_equal(zarr.open_array(store, path="a", mode="r")[:], expected,
                                      err_msg=name)
    # A fresh TensorStore (no cache of its own) reads the same through chunkd.
    again = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(server.address,
                                                                f"{prefix}/a/")}).result()
    np.testing.assert_array_equal(again.read().result(), expected)


def test_sharded_zarr3_written_by_tensorstore_reads_in_zarr_python(server, prefix):
    expected = data((64, 48), "float32", seed=7)
    codecs = [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [8, 8],
        "codecs": ts_codecs("zstd"),
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                         {"name": "crc32c"}],
    }}]
    array = ts.open(zarr3_spec(server.address, f"{prefix}/a/", expected.shape, (32, 24),
                               "float32", codecs), create=True).result()
    array.write(expected).result()
    for name, store in zarr_readers(server, prefix).items():
        back = zarr.open_array(store, path="a", mode="r")
        np.testing.assert_array_equal(back[:], expected, err_msg=name)
        np.testing.assert_array_equal(back[9:50, 5:47], expected[9:50, 5:47], err_msg=name)
    # 4 shards of 32x24, not 48 chunk files.
    assert sorted(p.name for p in (Path(server.store) / prefix / "a" / "c").rglob("*")
                  if p.is_file()) == ["0", "0", "1", "1"]


def test_sharded_zarr3_written_by_zarr_python_reads_in_tensorstore(server, prefix):
    expected = data((64, 48), "float32", seed=8)
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    z = zarr.create_array(store, name="a", shape=expected.shape, chunks=(8, 8), shards=(32, 24),
                          dtype="float32", compressors=ZstdCodec(level=3), fill_value=0)
    z[:] = expected
    array = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(server.address,
                                                                f"{prefix}/a/")}).result()
    np.testing.assert_array_equal(array.read().result(), expected)
    # A few inner chunks of one shard: TensorStore reads the shard index and those chunks with
    # byte-range reads.
    np.testing.assert_array_equal(array[1:7, 30:35].read().result(), expected[1:7, 30:35])


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_zarr_v2_written_by_tensorstore_reads_in_zarr_python(server, prefix, compressor):
    expected = data((30, 41), "float32", seed=11)
    spec = {
        "driver": "zarr",
        "kvstore": kvstore_spec(server.address, f"{prefix}/a/"),
        "metadata": {"shape": list(expected.shape), "chunks": [16, 16], "dtype": "<f4",
                     "compressor": None if compressor == "none" else {"id": "zstd", "level": 3},
                     "fill_value": 0, "order": "C"},
    }
    array = ts.open(spec, create=True).result()
    array.write(expected).result()
    for name, store in zarr_readers(server, prefix).items():
        back = zarr.open_array(store, path="a", mode="r", zarr_format=2)
        np.testing.assert_array_equal(back[:], expected, err_msg=name)


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_zarr_v2_written_by_zarr_python_reads_in_tensorstore(server, prefix, compressor):
    from numcodecs import Zstd

    expected = data((30, 41), "int32", seed=12)
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    z = zarr.create_array(store, name="a", shape=expected.shape, chunks=(16, 16), dtype="int32",
                          zarr_format=2, fill_value=0,
                          compressors=None if compressor == "none" else Zstd(level=3))
    z[:] = expected
    array = ts.open({"driver": "zarr", "kvstore": kvstore_spec(server.address,
                                                               f"{prefix}/a/")}).result()
    np.testing.assert_array_equal(array.read().result(), expected)


def test_tensorstore_and_chunkd_clients_share_one_cache(server, prefix, client):
    """A second TensorStore process would read what the first wrote from chunkd's cache: the
    reads of a fresh TensorStore are cache hits on the server."""
    expected = data((32, 32), "float32", seed=13)
    array = ts.open(zarr3_spec(server.address, f"{prefix}/a/", expected.shape, (16, 16),
                               "float32", ts_codecs("none")), create=True).result()
    array.write(expected).result()
    before = client.server_info().counters
    fresh = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(server.address,
                                                                f"{prefix}/a/")}).result()
    np.testing.assert_array_equal(fresh.read().result(), expected)
    after = client.server_info().counters
    # zarr.json and 4 chunks, all written through chunkd and so in its cache: each read is a
    # hit (other tests may add reads of their own meanwhile).
    assert after["tensorstore_gets"] - before["tensorstore_gets"] >= 5
    assert after["hits"] - before["hits"] >= 5

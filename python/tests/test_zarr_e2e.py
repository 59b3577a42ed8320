"""End to end: arrays written with zarr through ChunkdStore, read back through ChunkdStore and
straight from the server's directory with zarr's LocalStore; xarray on top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

from chunkd.zarr import ChunkdStore

DTYPES = ["bool", "int8", "uint16", "int32", "int64", "float32", "float64", "complex64"]
COMPRESSORS = {
    "none": None,
    "zstd": ZstdCodec(level=3),
    "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "gzip": GzipCodec(level=4),
}


def _data(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _local(server, prefix: str) -> LocalStore:
    return LocalStore(Path(server.store) / prefix, read_only=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compressor", list(COMPRESSORS))
def test_arrays_round_trip(server, prefix, dtype, compressor):
    data = _data(dtype, (37, 50), seed=len(dtype))
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    array = zarr.create_array(
        store,
        name="a",
        shape=data.shape,
        chunks=(10, 16),
        dtype=dtype,
        compressors=COMPRESSORS[compressor],
        attributes={"units": "K"},
    )
    array[:] = data
    reader = ChunkdStore(f"chunkd://{server.address}/{prefix}", read_only=True)
    back = zarr.open_array(reader, path="a", mode="r")
    np.testing.assert_array_equal(back[:], data)
    np.testing.assert_array_equal(back[3:29, 7:41], data[3:29, 7:41])
    assert back.attrs["units"] == "K"
    direct = zarr.open_array(_local(server, prefix), path="a", mode="r")
    np.testing.assert_array_equal(direct[:], data)
    assert back.nchunks_initialized == direct.nchunks_initialized == 4 * 4
    assert back.nbytes_stored() == direct.nbytes_stored()


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_sharding(server, prefix, compressor):
    data = _data("float32", (64, 96), seed=3)
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    array = zarr.create_array(
        store,
        name="sharded",
        shape=data.shape,
        chunks=(8, 8),
        shards=(32, 48),
        dtype="float32",
        compressors=COMPRESSORS[compressor],
    )
    array[:] = data
    keys = sorted(k for k in zarr.core.sync.sync(_collect(store.list_prefix("sharded/c/"))))
    assert keys == [f"sharded/c/{i}/{j}" for i in range(2) for j in range(2)]
    back = zarr.open_array(ChunkdStore(f"chunkd://{server.address}/{prefix}"), path="sharded")
    np.testing.assert_array_equal(back[:], data)
    # Reading one inner chunk fetches the shard index (a suffix range) and the chunk (a range).
    np.testing.assert_array_equal(back[9:15, 50:55], data[9:15, 50:55])
    direct = zarr.open_array(_local(server, prefix), path="sharded", mode="r")
    np.testing.assert_array_equal(direct[:], data)
    # Partial writes rewrite whole shards; the result still matches.
    back[0:4, 0:4] = -1
    data[0:4, 0:4] = -1
    np.testing.assert_array_equal(zarr.open_array(_local(server, prefix), path="sharded")[:], data)


async def _collect(aiter):
    return [x async for x in aiter]


def test_zarr_v2_format(server, prefix):
    data = _data("int32", (20, 20))
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    array = zarr.create_array(store, name="v2", shape=(20, 20), chunks=(7, 7), dtype="int32",
                              zarr_format=2)
    array[:] = data
    assert (Path(server.store) / prefix / "v2" / ".zarray").is_file()
    np.testing.assert_array_equal(zarr.open_array(store, path="v2")[:], data)
    np.testing.assert_array_equal(zarr.open_array(_local(server, prefix), path="v2")[:], data)


def test_groups_and_consolidated_metadata(server, prefix):
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    root = zarr.open_group(store, mode="w", attributes={"title": "test"})
    sub = root.create_group("sub")
    for name in ("x", "y"):
        sub.create_array(name, shape=(10,), chunks=(5,), dtype="int16")[:] = np.arange(10)
    zarr.consolidate_metadata(store)
    reopened = zarr.open_consolidated(
        ChunkdStore(f"chunkd://{server.address}/{prefix}", read_only=True), mode="r"
    )
    assert reopened.attrs["title"] == "test"
    assert sorted(reopened["sub"].array_keys()) == ["x", "y"]
    np.testing.assert_array_equal(reopened["sub/y"][:], np.arange(10))
    direct = zarr.open_group(_local(server, prefix), mode="r")
    assert sorted(direct["sub"].array_keys()) == ["x", "y"]
    # Deleting a group removes its keys on the server.
    del root["sub"]
    assert not (Path(server.store) / prefix / "sub" / "x" / "zarr.json").exists()


def test_existing_dataset_written_beside_the_server(server, prefix):
    """A Zarr tree written into the server's directory (not through chunkd) is served as is."""
    data = _data("float64", (30, 30), seed=9)
    local = LocalStore(Path(server.store) / prefix)
    zarr.create_array(local, name="pre", shape=data.shape, chunks=(10, 10), dtype="f8")[:] = data
    via_chunkd = zarr.open_array(ChunkdStore(f"chunkd://{server.address}/{prefix}",
                                             read_only=True), path="pre")
    np.testing.assert_array_equal(via_chunkd[:], data)


def test_memory_server(memory_server, prefix):
    data = _data("uint16", (100, 100))
    store = ChunkdStore(f"chunkd://{memory_server.address}/{prefix}")
    zarr.create_array(store, name="m", shape=data.shape, chunks=(25, 25), shards=(50, 50),
                      dtype="uint16")[:] = data
    np.testing.assert_array_equal(zarr.open_array(store, path="m")[:], data)


def test_read_only_store_refuses_writes(server, prefix):
    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    zarr.create_array(store, name="a", shape=(4,), chunks=(2,), dtype="i1")[:] = 1
    ro = zarr.open_array(store.with_read_only(True), path="a")
    with pytest.raises(ValueError, match="read-only"):
        ro[:] = 2
    np.testing.assert_array_equal(ro[:], np.ones(4, "i1"))


def _dataset() -> xr.Dataset:
    rng = np.random.default_rng(1)
    time = np.arange("2024-01-01", "2024-01-11", dtype="datetime64[D]").astype("datetime64[ns]")
    return xr.Dataset(
        {
            "temperature": (("time", "lat", "lon"), rng.standard_normal((10, 6, 8)).astype("f4"),
                            {"units": "K"}),
            "mask": (("lat", "lon"), rng.integers(0, 2, (6, 8)).astype(bool)),
        },
        coords={"time": time, "lat": np.linspace(-50, 50, 6), "lon": np.arange(8) * 45.0},
        attrs={"source": "chunkd test"},
    )


@pytest.mark.filterwarnings("ignore::zarr.errors.ZarrUserWarning")
@pytest.mark.parametrize("consolidated", [False, True])
def test_xarray(server, prefix, consolidated):
    ds = _dataset()
    url = f"chunkd://{server.address}/{prefix}"
    ds.to_zarr(ChunkdStore(url), zarr_format=3, consolidated=consolidated,
               encoding={"temperature": {"chunks": (5, 3, 4)}})
    back = xr.open_zarr(ChunkdStore(url, read_only=True), consolidated=consolidated, chunks=None)
    xr.testing.assert_identical(back.load(), ds)
    direct = xr.open_zarr(_local(server, prefix), consolidated=consolidated, chunks=None)
    xr.testing.assert_identical(direct.load(), ds)


@pytest.mark.filterwarnings("ignore::zarr.errors.ZarrUserWarning")
def test_xarray_with_dask(server, prefix):
    pytest.importorskip("dask")
    ds = _dataset()
    url = f"chunkd://{server.address}/{prefix}"
    ds.to_zarr(ChunkdStore(url), zarr_format=3, consolidated=True,
               encoding={"temperature": {"chunks": (2, 3, 4)}})
    lazy = xr.open_zarr(ChunkdStore(url, read_only=True))
    assert lazy["temperature"].chunks is not None
    mean = lazy["temperature"].mean("time").compute(scheduler="threads")
    np.testing.assert_allclose(mean.values, ds["temperature"].mean("time").values, rtol=1e-6)

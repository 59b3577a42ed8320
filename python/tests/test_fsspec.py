"""chunkd:// for fsspec users: the filesystem (chunkd.fsspec) against real servers, fsspec's own
conformance suite for implementations, and zarr, xarray (zarr and h5netcdf engines) and pandas
reading and writing through URLs."""

from __future__ import annotations

import os
import pickle
import posixpath
import subprocess
import sys
from pathlib import Path

import fsspec
import fsspec.tests.abstract as abstract
import numpy as np
import pytest

import chunkd
from chunkd.fsspec import ChunkdFileSystem


def _fs(server, **kwargs) -> ChunkdFileSystem:
    return fsspec.filesystem("chunkd", address=server.address, skip_instance_cache=True, **kwargs)


# -- fsspec's conformance suite (fsspec.tests.abstract) ------------------------------------------


class ChunkdFixtures(abstract.AbstractFixtures):
    """The suite's fixtures for a file-backed chunkd server: each test under a prefix of its
    own. Keys are not files in directories: a "directory" exists while a key under it does,
    as on object stores (supports_empty_directories False)."""

    @pytest.fixture
    def fs(self, server):
        return _fs(server)

    @pytest.fixture
    def fs_path(self, prefix):
        return prefix

    @pytest.fixture
    def fs_join(self):
        return posixpath.join

    @pytest.fixture
    def supports_empty_directories(self):
        return False


class TestChunkdCopy(abstract.AbstractCopyTests, ChunkdFixtures):
    pass


class TestChunkdGet(abstract.AbstractGetTests, ChunkdFixtures):
    pass


class TestChunkdPut(abstract.AbstractPutTests, ChunkdFixtures):
    pass


class TestChunkdOpen(abstract.AbstractOpenTests, ChunkdFixtures):
    pass


class TestChunkdPipe(abstract.AbstractPipeTests, ChunkdFixtures):
    pass


# -- the filesystem's own behaviour --------------------------------------------------------------


def test_registered_through_the_entry_point_without_an_import():
    """A fresh interpreter that never imports chunkd resolves chunkd:// and chunkd+unix://
    (the package's fsspec.specs entry point)."""
    code = (
        "import sys, fsspec\n"
        "assert 'chunkd' not in sys.modules\n"
        "for p in ('chunkd', 'chunkd+unix'):\n"
        "    cls = fsspec.get_filesystem_class(p)\n"
        "    print(p, cls.__module__, cls.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "chunkd chunkd.fsspec ChunkdFileSystem",
        "chunkd+unix chunkd.fsspec ChunkdFileSystem",
    ]


def test_urls_name_the_server(server, unix_server, prefix):
    url = f"chunkd://{server.address}/{prefix}/a.bin"
    fs, path = fsspec.url_to_fs(url)
    assert isinstance(fs, ChunkdFileSystem) and fs.target == server.address
    assert path == f"{prefix}/a.bin"
    fs.pipe(url, b"0123456789")
    assert fs.unstrip_protocol(path) == url
    copy = pickle.loads(pickle.dumps(fs))  # as dask ships it to its workers
    assert copy.target == fs.target and copy.cat_file(path, 2, 4) == b"23"
    with fsspec.open(url, "rb") as f:
        assert f.read() == b"0123456789"
    socket = unix_server.address[len("unix:") :]
    for unix_url in (
        f"chunkd+unix://{socket}/{prefix}/u.bin",
        "chunkd+unix://" + socket.replace("/", "%2F") + f"/{prefix}/u.bin",
    ):
        ufs, upath = fsspec.url_to_fs(unix_url)
        assert ufs.target == unix_server.address and upath == f"{prefix}/u.bin"
    fsspec.open(unix_url, "wb").open().close()
    with fsspec.open(unix_url, "wb") as f:
        f.write(b"over the socket")
    assert chunkd.Client(unix_server.address).get(f"{prefix}/u.bin") == b"over the socket"


def test_ranges_and_cat_ranges_in_one_call(server, prefix):
    fs = _fs(server)
    data = bytes(range(256)) * 4
    fs.pipe({f"{prefix}/a": data, f"{prefix}/b": data[:100]})
    assert fs.cat_file(f"{prefix}/a", 10, 20) == data[10:20]
    assert fs.cat_file(f"{prefix}/a", -16) == data[-16:]
    assert fs.cat_file(f"{prefix}/a", 5, -5) == data[5:-5]
    assert fs.cat_file(f"{prefix}/a", -20, -10) == data[-20:-10]
    assert fs.cat_file(f"{prefix}/a", 1000, 2000) == data[1000:]
    assert fs.cat_file(f"{prefix}/a", 7, 7) == b""
    before = chunkd.Client(server.address).server_info().counters
    paths = [f"{prefix}/a", f"{prefix}/b", f"{prefix}/missing", f"{prefix}/a"]
    got = fs.cat_ranges(paths, [0, 50, 0, -8], [4, None, 1, None])
    after = chunkd.Client(server.address).server_info().counters
    assert got[0] == data[:4] and got[1] == data[50:100] and got[3] == data[-8:]
    assert isinstance(got[2], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges(paths, 0, 1, on_error="raise")
    # One GetMany call carried the four items.
    assert after["get_many_calls"] - before["get_many_calls"] == 1
    assert after["gets"] - before["gets"] == 4
    assert fs.cat([f"{prefix}/a", f"{prefix}/b"]) == {f"{prefix}/a": data, f"{prefix}/b": data[:100]}


def test_listing_info_find_rm_and_errors(server, prefix):
    fs = _fs(server)
    fs.pipe({f"{prefix}/d/x": b"1", f"{prefix}/d/e/y": b"22", f"{prefix}/f": b"333"})
    assert fs.ls(prefix, detail=False) == [f"{prefix}/d", f"{prefix}/f"]
    entries = {e["name"]: e for e in fs.ls(prefix)}
    assert entries[f"{prefix}/f"]["size"] == 3 and entries[f"{prefix}/f"]["type"] == "file"
    assert entries[f"{prefix}/d"]["type"] == "directory"
    assert fs.ls(f"{prefix}/f", detail=False) == [f"{prefix}/f"]
    assert fs.info(f"{prefix}/d")["type"] == "directory"
    assert fs.info(f"{prefix}/d/e/y")["size"] == 2
    assert fs.find(prefix) == [f"{prefix}/d/e/y", f"{prefix}/d/x", f"{prefix}/f"]
    assert fs.find(prefix, withdirs=True) == [
        prefix, f"{prefix}/d", f"{prefix}/d/e", f"{prefix}/d/e/y", f"{prefix}/d/x", f"{prefix}/f"
    ]
    assert fs.find(prefix, maxdepth=1) == [f"{prefix}/f"]
    assert fs.du(prefix) == 6
    assert fs.isdir(f"{prefix}/d") and fs.isfile(f"{prefix}/f") and not fs.exists(f"{prefix}/n")
    for call in (fs.info, fs.ls, fs.cat_file, fs.rm_file, fs.rm):
        with pytest.raises(FileNotFoundError):
            call(f"{prefix}/nothing")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{prefix}/nothing", "rb")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{prefix}/f", b"x", mode="create")
    fs.rm(f"{prefix}/d", recursive=True)
    assert fs.find(prefix) == [f"{prefix}/f"]
    fs.rm_file(f"{prefix}/f")
    assert not fs.exists(prefix)


def test_files_read_in_blocks_and_write_whole(server, prefix):
    fs = _fs(server)
    data = os.urandom(3 << 20)
    with fs.open(f"{prefix}/big", "wb", block_size=1 << 20) as f:
        for i in range(0, len(data), 300_000):
            f.write(data[i : i + 300_000])
    assert fs.size(f"{prefix}/big") == len(data)
    with fs.open(f"{prefix}/big", "rb", block_size=1 << 20) as f:
        f.seek(2_000_000)
        assert f.read(10) == data[2_000_000:2_000_010]
        f.seek(-5, 2)
        assert f.read() == data[-5:]
    with fs.open(f"{prefix}/big", "ab") as f:
        f.write(b"tail")
    assert fs.cat_file(f"{prefix}/big", -8) == data[-4:] + b"tail"


async def test_asynchronous_instance_on_the_callers_loop(server, prefix):
    fs = ChunkdFileSystem(server.address, asynchronous=True, skip_instance_cache=True)
    await fs._pipe_file(f"{prefix}/k", b"async")
    assert await fs._cat_file(f"{prefix}/k", start=1) == b"sync"
    assert await fs._exists(f"{prefix}/k")
    await fs._rm_file(f"{prefix}/k")
    assert not await fs._exists(f"{prefix}/k")


# -- libraries over the URL ----------------------------------------------------------------------


def test_zarr_open_and_xarray_open_zarr_by_url(server, prefix):
    import xarray as xr
    import zarr

    url = f"chunkd://{server.address}/{prefix}/era5.zarr"
    z = zarr.create_array(url, shape=(40, 30), chunks=(10, 10), dtype="f4")
    z[:] = np.arange(1200, dtype="f4").reshape(40, 30)
    assert fsspec.filesystem("chunkd", address=server.address).exists(f"{prefix}/era5.zarr/c/3/2")
    again = zarr.open(url, mode="r")
    np.testing.assert_array_equal(again[5:15, 3], z[5:15, 3])

    ds = xr.Dataset({"t": (("y", "x"), np.random.default_rng(1).random((16, 8)))})
    ds_url = f"chunkd://{server.address}/{prefix}/ds.zarr"
    ds.to_zarr(ds_url, mode="w", consolidated=False)
    got = xr.open_zarr(ds_url, consolidated=False)
    xr.testing.assert_identical(got.compute(), ds)
    # The keys are where ChunkdStore (and the file backend's directory) sees them.
    assert (Path(server.store) / prefix / "ds.zarr" / "t" / "zarr.json").is_file()


def test_xarray_h5netcdf_over_the_url(server, prefix):
    pytest.importorskip("h5netcdf")
    import xarray as xr

    ds = xr.Dataset(
        {"q": (("t", "x"), np.arange(60, dtype="i4").reshape(6, 10))},
        coords={"t": np.arange(6), "x": np.linspace(0, 1, 10)},
    )
    url = f"chunkd://{server.address}/{prefix}/q.nc"
    with fsspec.open(url, "wb") as f:
        f.write(ds.to_netcdf(engine="h5netcdf"))
    with fsspec.open(url, "rb") as f:
        got = xr.open_dataset(f, engine="h5netcdf").load()
    xr.testing.assert_identical(got, ds)


def test_pandas_parquet_over_the_url(server, prefix):
    pytest.importorskip("pyarrow")
    import pandas as pd

    df = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000), "c": ["x", "y"] * 500})
    url = f"chunkd://{server.address}/{prefix}/t.parquet"
    df.to_parquet(url)
    pd.testing.assert_frame_equal(pd.read_parquet(url), df)
    pd.testing.assert_frame_equal(pd.read_parquet(url, columns=["b"]), df[["b"]])


def test_mv_file_and_directory(server, prefix):
    """fsspec.tests.abstract has no mv suite for implementations (its mv.py tests the local
    filesystem only): mv as the conformance suite's copy and rm see it."""
    fs = _fs(server)
    fs.pipe({f"{prefix}/a/x": b"1", f"{prefix}/a/s/y": b"2", f"{prefix}/f": b"3"})
    fs.mv(f"{prefix}/f", f"{prefix}/g")
    assert not fs.exists(f"{prefix}/f") and fs.cat_file(f"{prefix}/g") == b"3"
    fs.mv(f"{prefix}/a", f"{prefix}/b", recursive=True)
    assert fs.find(prefix) == [f"{prefix}/b/s/y", f"{prefix}/b/x", f"{prefix}/g"]
    with pytest.raises(FileNotFoundError):
        fs.mv(f"{prefix}/nothing", f"{prefix}/else")

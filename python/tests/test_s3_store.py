"""chunkd in front of S3 (moto's S3 server on loopback): an array written to the bucket by
zarr-python directly (s3fs) is served by `chunkd --store=s3://bucket/prefix` and read back equal
through ChunkdStore; and the other way round, an array written through chunkd is read from the
bucket directly."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from chunkd.zarr import ChunkdStore
from chunkd_testing import REPO_ROOT, start_server

MOTO_SERVER = Path(os.environ.get("CHUNKD_MOTO_SERVER") or REPO_ROOT / ".venv" / "bin" / "moto_server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

pytest.importorskip("s3fs", reason="s3fs is in python/requirements-dev.txt")
boto3 = pytest.importorskip("boto3", reason="moto[server] brings boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} is missing (deploy/scripts/setup-venv.sh installs moto[server])")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not start: {log.name}")
            time.sleep(0.05)
    yield endpoint
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture()
def bucket(moto):
    name = f"zarr-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=moto,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name


def _s3_store(moto: str, url: str, read_only: bool = False):
    return zarr.storage.FsspecStore.from_url(
        url,
        storage_options={
            "endpoint_url": moto,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        },
        read_only=read_only,
    )


def _chunkd_over_s3(tmp_path, moto: str, url: str, *extra: str):
    env_backup = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # the server inherits the environment
    try:
        return start_server(tmp_path / "server", url, "127.0.0.1:0", f"--s3_endpoint={moto}", *extra)
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_chunkd_serves_an_array_written_to_s3_by_zarr(tmp_path, moto, bucket):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((60, 45)).astype("float32")
    ints = rng.integers(0, 1000, (17, 9, 5), dtype="int64")
    writer = _s3_store(moto, f"s3://{bucket}/era5.zarr")
    root = zarr.open_group(writer, mode="w")
    t = root.create_array("t2m", shape=data.shape, chunks=(16, 16), dtype="float32",
                          attributes={"units": "K"})
    t[:] = data
    counts = root.create_array("counts", shape=ints.shape, chunks=(5, 4, 5), dtype="int64")
    counts[:] = ints
    zarr.consolidate_metadata(writer)

    server = _chunkd_over_s3(tmp_path, moto, f"s3://{bucket}/era5.zarr")
    try:
        store = ChunkdStore(f"chunkd://{server.address}", read_only=True)
        group = zarr.open_group(store, mode="r")
        back = group["t2m"]
        np.testing.assert_array_equal(back[:], data)
        np.testing.assert_array_equal(back[7:41, 3:30], data[7:41, 3:30])
        assert back.attrs["units"] == "K"
        np.testing.assert_array_equal(group["counts"][:], ints)
        # Consolidated metadata, and listing (ListObjectsV2 behind chunkd's List).
        consolidated = zarr.open_consolidated(store, mode="r")
        assert sorted(consolidated.array_keys()) == ["counts", "t2m"]
        assert sorted(zarr.open_group(store, mode="r", use_consolidated=False).array_keys()) == [
            "counts",
            "t2m",
        ]
        # A second read is served from chunkd's cache: the same bytes.
        np.testing.assert_array_equal(back[:], data)
    finally:
        server.stop()


def test_array_written_through_chunkd_lands_in_s3(tmp_path, moto, bucket):
    data = np.arange(40 * 30, dtype="int32").reshape(40, 30)
    server = _chunkd_over_s3(tmp_path, moto, f"s3://{bucket}/through")
    try:
        store = ChunkdStore(f"chunkd://{server.address}")
        a = zarr.create_array(store, name="a", shape=data.shape, chunks=(8, 8), dtype="int32")
        a[:] = data
    finally:
        server.stop()
    direct = zarr.open_array(_s3_store(moto, f"s3://{bucket}/through", read_only=True), path="a",
                             mode="r")
    np.testing.assert_array_equal(direct[:], data)
    assert direct.nchunks_initialized == 5 * 4

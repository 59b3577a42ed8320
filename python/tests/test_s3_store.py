"""chunkd in front of S3 (moto's S3 server on loopback): an array written to the bucket by
zarr-python directly (s3fs) is served by `chunkd --store=s3://bucket/prefix` and read back equal
through ChunkdStore; and the other way round, an array written through chunkd is read from the
bucket directly."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

import chunkd
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


# -- Signature V4 as AWS computes it -------------------------------------------------------------
# moto does not check signatures; AWS does. These requests go to a recording server, and each
# signature libcurl made for chunkd is recomputed here from the AWS specification.


def _aws_encode(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def _expected_signature(method: str, path: str, headers: dict[str, str], secret: str) -> str:
    auth = headers["authorization"]
    credential = auth.split("Credential=")[1].split(",")[0]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    _, date, region, service, _ = credential.split("/")
    raw_path, _, raw_query = path.partition("?")
    pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True)
    query = "&".join(f"{_aws_encode(k)}={_aws_encode(v)}" for k, v in sorted(pairs))
    canonical_headers = "".join(f"{h}:{' '.join(headers[h].split())}\n" for h in signed)
    canonical = "\n".join(
        [method, raw_path, query, canonical_headers, ";".join(signed),
         headers["x-amz-content-sha256"]]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", headers["x-amz-date"], scope,
         hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict[str, str]]] = []

    def log_message(self, *args):  # quiet
        pass

    def _record(self):
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length", "0") or 0)
        if length:
            self.rfile.read(length)
        self.requests.append((self.command, self.path, headers))

    def _reply(self, code: int, body: bytes = b"", extra: dict[str, str] | None = None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"e1"')
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self._record()
        if "list-type=2" in self.path:
            self._reply(200, b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
        else:
            self._reply(200, b"hello")

    def do_HEAD(self):
        self._record()
        self._reply(200, b"hello")

    def do_PUT(self):
        self._record()
        self._reply(200)

    def do_DELETE(self):
        self._record()
        self._reply(204)


def test_requests_carry_valid_aws_signatures(tmp_path):
    _Recorder.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    env_backup = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": secret})
    try:
        server = start_server(tmp_path / "server", "s3://bkt/my prefix", "127.0.0.1:0",
                              f"--s3_endpoint={endpoint}", "--s3_region=eu-central-1")
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        with chunkd.Client(server.address) as client:
            assert bytes(client.get("a b/c+d=e")) == b"hello"
            client.put("x/é", b"value", if_generation_match=None)
            client.delete("x/é")
            client.list("some/prefix/", directory=True)
    finally:
        server.stop()
        httpd.shutdown()
    methods = {m for m, _, _ in _Recorder.requests}
    assert {"GET", "PUT", "HEAD", "DELETE"} <= methods
    for method, path, headers in _Recorder.requests:
        assert "authorization" in headers, (method, path)
        got = headers["authorization"].split("Signature=")[1]
        assert got == _expected_signature(method, path, headers, secret), (method, path)
        assert "/eu-central-1/s3/aws4_request" in headers["authorization"]

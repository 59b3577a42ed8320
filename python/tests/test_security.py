"""TLS and bearer tokens with the real server: the Python clients' tls_ca=, tls_cert=, token=
and CHUNKD_TOKEN. Certificates are made here with the openssl tool."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import chunkd
from chunkd_testing import start_server

READ = "py-read-token-0123456789abcdef"
WRITE = "py-write-token-0123456789abcdef"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
        "-out", str(d / f"{name}.pem"),
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, server: bool) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"),
        "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(d / f"{name}.pem"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_leaf(d, "server", "ca", server=True)
    _make_leaf(d, "client", "ca", server=False)
    _make_ca(d, "other-ca")
    return d


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory, certs):
    """Mutual TLS on TCP, bearer tokens on TCP and on a (plaintext) UNIX socket, and shared
    memory in a directory of its own."""
    workdir = tmp_path_factory.mktemp("secure-server")
    tokens = workdir / "tokens"
    tokens.write_text(f"# test tokens\n{READ} read\n{WRITE} read,write\n")
    tokens.chmod(0o600)
    shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-pytest-", dir="/dev/shm"))
    socket = workdir / "chunkd.sock"
    server = start_server(
        workdir,
        "memory://",
        f"127.0.0.1:0,unix:{socket}",
        f"--tls_cert={certs / 'server.pem'}",
        f"--tls_key={certs / 'server.key'}",
        f"--tls_client_ca={certs / 'ca.pem'}",
        f"--auth_tokens={tokens}",
        f"--shm_dir={shm_dir}",
    )
    server.unix_address = f"unix:{socket}"
    server.shm_dir = str(shm_dir)
    yield server
    status = server.stop()
    shutil.rmtree(shm_dir, ignore_errors=True)
    assert status == 0, server.log()


def _tls(certs: Path, **kwargs):
    return dict(
        tls_ca=str(certs / "ca.pem"),
        tls_cert=str(certs / "client.pem"),
        tls_key=str(certs / "client.key"),
        **kwargs,
    )


def test_tls_and_token_round_trip(secure_server, certs):
    with chunkd.Client(secure_server.address, timeout=20, **_tls(certs, token=WRITE)) as c:
        c.put("py/tls/a", b"over tls")
        assert bytes(c.get("py/tls/a")) == b"over tls"
        assert c.server_info().version


def test_tls_async_client(secure_server, certs):
    async def main():
        async with chunkd.AsyncClient(
            secure_server.address, timeout=20, **_tls(certs, token=WRITE)
        ) as c:
            await c.put("py/tls/async", b"x" * 3_000_000)
            assert bytes(await c.get("py/tls/async")) == b"x" * 3_000_000
            assert (await c.stat("py/tls/async")).size == 3_000_000
            with pytest.raises(chunkd.ChunkdError) as e:
                async with chunkd.AsyncClient(
                    secure_server.address, timeout=20, **_tls(certs, token=READ)
                ) as reader:
                    await reader.put("py/tls/async", b"no")
            assert e.value.code == chunkd.StatusCode.PERMISSION_DENIED

    asyncio.run(main())


def test_tls_client_trusting_another_ca_fails(secure_server, certs):
    options = _tls(certs, token=READ)
    options["tls_ca"] = str(certs / "other-ca.pem")
    with chunkd.Client(secure_server.address, timeout=5, retries=0, **options) as c:
        with pytest.raises(chunkd.ChunkdError) as e:
            c.stat("py/tls/a")
    assert e.value.code == chunkd.StatusCode.UNAVAILABLE


def test_tls_without_client_certificate_is_refused(secure_server, certs):
    with chunkd.Client(
        secure_server.address, timeout=5, retries=0, tls_ca=str(certs / "ca.pem"), token=READ
    ) as c:
        with pytest.raises(chunkd.ChunkdError) as e:
            c.stat("py/tls/a")
    assert e.value.code == chunkd.StatusCode.UNAVAILABLE


def test_tls_options_are_checked_at_construction(certs, tmp_path):
    with pytest.raises(ValueError, match="cannot read CA file"):
        chunkd.Client("127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="needs its key"):
        chunkd.Client(
            "127.0.0.1:1", tls_ca=str(certs / "ca.pem"), tls_cert=str(certs / "client.pem")
        )
    with pytest.raises(ValueError, match="printable ASCII"):
        chunkd.Client("127.0.0.1:1", token="has blank")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_token_rights(secure_server, certs, transport):
    address = secure_server.address if transport == "tcp" else secure_server.unix_address
    tls = _tls(certs) if transport == "tcp" else {}
    with chunkd.Client(address, timeout=20, **tls, token=WRITE) as writer:
        writer.put(f"py/{transport}/k", b"value")
    with chunkd.Client(address, timeout=20, **tls, token=READ) as reader:
        assert bytes(reader.get(f"py/{transport}/k")) == b"value"
        with pytest.raises(chunkd.ChunkdError) as e:
            reader.put(f"py/{transport}/k", b"other")
        assert e.value.code == chunkd.StatusCode.PERMISSION_DENIED
        assert "write right" in str(e.value)
        with pytest.raises(chunkd.ChunkdError) as e:
            reader.delete(f"py/{transport}/k")
        assert e.value.code == chunkd.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("token", [None, "py-unknown-token-0123456789"])
def test_token_missing_or_unknown_is_unauthenticated(secure_server, monkeypatch, token):
    monkeypatch.delenv("CHUNKD_TOKEN", raising=False)
    with chunkd.Client(secure_server.unix_address, timeout=20, token=token) as c:
        with pytest.raises(chunkd.ChunkdError) as e:
            c.server_info()
    assert e.value.code == chunkd.StatusCode.UNAUTHENTICATED
    assert ("missing bearer token" if token is None else "unknown token") in str(e.value)


def test_token_from_environment(secure_server, monkeypatch):
    monkeypatch.setenv("CHUNKD_TOKEN", READ)
    with chunkd.Client(secure_server.unix_address, timeout=20) as c:
        assert c.server_info().version
        with pytest.raises(chunkd.ChunkdError) as e:
            c.put("py/env", b"no")
        assert e.value.code == chunkd.StatusCode.PERMISSION_DENIED
    # An explicit token wins over the environment.
    with chunkd.Client(secure_server.unix_address, timeout=20, token=WRITE) as c:
        c.put("py/env", b"yes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared memory needs Linux")
def test_token_reaches_the_lease_keeper(secure_server):
    pytest.importorskip("numpy")
    with chunkd.Client(secure_server.unix_address, timeout=20, token=WRITE) as writer:
        writer.put("py/shm/v", os.urandom(1 << 20))
    with chunkd.Client(
        secure_server.unix_address,
        timeout=20,
        token=READ,
        delivery="shm",
        shm_dir=secure_server.shm_dir,
    ) as c:
        before = c.server_info().counters.get("leases_released", 0)
        r = c.read("py/shm/v")
        if r.delivery != chunkd.Delivery.SHM:
            pytest.skip("no shared-memory delivery here")
        assert c.leases_held == 1
        del r
        gc.collect()
        assert c.flush_releases(10)  # the Release call carries the token
        info = c.server_info()
        assert info.counters.get("leases_released", 0) == before + 1
        assert info.counters.get("leases_unknown", 0) == 0
        assert c.leases_held == 0


def test_tls_and_token_travel_with_a_pickled_client_and_store(secure_server, certs):
    import pickle

    client = chunkd.Client(secure_server.address, timeout=20, **_tls(certs, token=WRITE))
    again = pickle.loads(pickle.dumps(client))
    again.put("py/pickle/k", b"pickled")
    assert bytes(again.get("py/pickle/k")) == b"pickled"
    again.close()
    client.close()

    zarr = pytest.importorskip("zarr")
    np = pytest.importorskip("numpy")
    from chunkd.zarr import ChunkdStore

    store = ChunkdStore(secure_server.address, path="py/zarr", **_tls(certs, token=WRITE))
    array = zarr.create_array(store, shape=(64,), chunks=(16,), dtype="int32")
    array[:] = np.arange(64, dtype="int32")
    copy = pickle.loads(pickle.dumps(store))
    assert (zarr.open_array(copy, mode="r")[:] == np.arange(64)).all()
    with pytest.raises(Exception) as e:
        zarr.open_array(ChunkdStore(secure_server.address, path="py/zarr", **_tls(certs)), mode="r")
    assert "missing bearer token" in str(e.value) or "UNAUTHENTICATED" in repr(e.value)

"""Address and URL forms (no server needed)."""

from __future__ import annotations

import pickle

import pytest

import chunkd
from chunkd._address import parse_url, url_of
from chunkd.zarr import ChunkdStore


@pytest.mark.parametrize(
    ("url", "target", "path"),
    [
        ("127.0.0.1:7878", "127.0.0.1:7878", ""),
        ("localhost", "localhost:7878", ""),
        ("[::1]:9000", "[::1]:9000", ""),
        ("[::1]", "[::1]:7878", ""),
        ("unix:/run/chunkd.sock", "unix:/run/chunkd.sock", ""),
        ("unix:///run/chunkd.sock", "unix:///run/chunkd.sock", ""),
        ("chunkd://host:1234", "host:1234", ""),
        ("chunkd://host", "host:7878", ""),
        ("chunkd://host:1234/", "host:1234", ""),
        ("chunkd://host:1234/era5.zarr", "host:1234", "era5.zarr"),
        ("chunkd://[::1]:1234/a/b/", "[::1]:1234", "a/b"),
        ("chunkd+unix:///run/chunkd.sock", "unix:/run/chunkd.sock", ""),
        ("dns:///host:1234", "dns:///host:1234", ""),
    ],
)
def test_parse_url(url, target, path):
    assert parse_url(url) == (target, path)


@pytest.mark.parametrize(
    "url", ["", "http://host:1", "chunkd+unix://relative.sock", "chunkd://host:port", "a b:1"]
)
def test_bad_urls(url):
    with pytest.raises(ValueError):
        parse_url(url)


def test_url_of_round_trips():
    for url in ("chunkd://h:1", "chunkd+unix:///run/x.sock", "chunkd://[::1]:5"):
        assert url_of(parse_url(url)[0]) == url
    assert url_of("unix:///run/x.sock") == "chunkd+unix:///run/x.sock"


def test_store_url_and_path():
    store = ChunkdStore("chunkd://h:1/a", path="b/c")
    assert (store.target, store.path, store.url) == ("h:1", "a/b/c", "chunkd://h:1/a/b/c")
    assert store == ChunkdStore("h:1", path="/a/b/c/")
    assert store != ChunkdStore("h:1", path="a/b")
    assert store != ChunkdStore("chunkd://h:1/a/b/c", read_only=True)
    assert store.with_read_only(True) == ChunkdStore("chunkd://h:1/a/b/c", read_only=True)
    assert hash(store) == hash(ChunkdStore("h:1", path="a/b/c"))
    copy = pickle.loads(pickle.dumps(store.with_read_only(True)))
    assert copy == store.with_read_only(True) and copy.read_only
    unix = ChunkdStore("chunkd+unix:///run/x.sock", path="p")
    assert repr(unix) == "ChunkdStore('chunkd+unix:///run/x.sock', path='p')"
    assert pickle.loads(pickle.dumps(unix)) == unix
    for bad in ("a/../b", "./a", "a//b"):
        with pytest.raises(ValueError):
            ChunkdStore("h:1", path=bad)


def test_store_defaults():
    store = ChunkdStore()
    assert store.target == chunkd.DEFAULT_ADDRESS and store.path == ""
    assert str(store) == f"chunkd://{chunkd.DEFAULT_ADDRESS}"
    assert not store.read_only and store.supports_writes and store.supports_listing
    assert store.supports_deletes and not store.supports_partial_writes


def test_unix_urls_with_a_key_path(tmp_path):
    """chunkd+unix URLs name the socket percent-encoded as the host, or as the leading part of
    the path that is a socket on this host; the rest is the store path."""
    import socket

    assert parse_url("chunkd+unix://%2Frun%2Fc.sock/a/b/") == ("unix:/run/c.sock", "a/b")
    sock_path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    try:
        assert parse_url(f"chunkd+unix://{sock_path}/era5.zarr/t") == (
            f"unix:{sock_path}", "era5.zarr/t"
        )
        assert parse_url(f"chunkd+unix://{sock_path}") == (f"unix:{sock_path}", "")
        assert ChunkdStore(f"chunkd+unix://{sock_path}/era5.zarr").path == "era5.zarr"
    finally:
        listener.close()
    # No socket there (yet): the whole path is the socket, as before.
    assert parse_url("chunkd+unix:///nowhere/x.sock/a") == ("unix:/nowhere/x.sock/a", "")
    with pytest.raises(ValueError):
        parse_url("chunkd+unix://relative%2Fc.sock/a")

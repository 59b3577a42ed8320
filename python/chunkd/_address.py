"""Addresses of a chunkd server, as the clients and the Zarr store accept them.

=====================================  =====================================  ==============
form                                   gRPC target                            store path
=====================================  =====================================  ==============
``127.0.0.1:7878``, ``host``           ``127.0.0.1:7878``, ``host:7878``      ""
``[::1]:7878``                         ``[::1]:7878``                         ""
``unix:/run/chunkd.sock``              ``unix:/run/chunkd.sock``              ""
``chunkd://host:7878``                 ``host:7878``                          ""
``chunkd://host:7878/era5.zarr``       ``host:7878``                          ``era5.zarr``
``chunkd+unix:///run/chunkd.sock``     ``unix:/run/chunkd.sock``              ""
``chunkd+unix:///run/c.sock/a/b``      ``unix:/run/c.sock`` (a socket there)  ``a/b``
``chunkd+unix://%2Frun%2Fc.sock/a/b``  ``unix:/run/c.sock``                   ``a/b``
=====================================  =====================================  ==============

A ``chunkd+unix`` URL names its socket either percent-encoded as the host (as ``http+unix``
URLs do) or as the start of the path: the shortest leading part of the path that is a socket
on this host is the socket, the rest the store path (a socket is always local, so this is
decided here; where no part is a socket yet, the whole path is taken as the socket).

The port defaults to 7878. Other gRPC target forms (``dns:///host:port``, ``ipv4:...``,
``unix-abstract:...``) pass through unchanged. The *store path* is a key prefix inside the server
(only the Zarr store uses it; a :class:`chunkd.Client` refuses a URL with one).
"""

from __future__ import annotations

import os
import re
import stat
from urllib.parse import unquote

DEFAULT_PORT = 7878
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^:/\[\]\s]+)(?::(?P<port>\d+))?$")


def _host_port(netloc: str, original: str) -> str:
    m = _HOST_PORT.match(netloc)
    if not m:
        raise ValueError(f"chunkd address {original!r}: expected HOST:PORT, got {netloc!r}")
    return f"{m['host']}:{m['port'] or DEFAULT_PORT}"


def parse_url(url: str) -> tuple[str, str]:
    """Splits a chunkd URL or address into (gRPC target, store path)."""
    if not isinstance(url, str):
        raise TypeError(f"chunkd address must be a str, got {type(url).__name__}")
    if not url:
        raise ValueError("chunkd address is empty")
    if url.startswith("chunkd+unix://"):
        socket, path = _unix_socket_and_path(url)
        return f"unix:{socket}", path
    if url.startswith("chunkd://"):
        rest = url[len("chunkd://") :]
        netloc, _, path = rest.partition("/")
        return _host_port(netloc, url), path.strip("/")
    if "://" in url and not url.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        raise ValueError(
            f"chunkd address {url!r}: unknown scheme (use chunkd://HOST:PORT, "
            "chunkd+unix:///PATH, HOST:PORT or unix:/PATH)"
        )
    if url.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return url, ""
    return _host_port(url, url), ""


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _unix_socket_and_path(url: str) -> tuple[str, str]:
    rest = url[len("chunkd+unix://") :]
    if not rest.startswith("/"):
        # The socket percent-encoded as the host: chunkd+unix://%2Frun%2Fchunkd.sock/a/b
        netloc, _, path = rest.partition("/")
        socket = unquote(netloc)
        if not socket.startswith("/"):
            raise ValueError(
                f"chunkd address {url!r}: expected chunkd+unix:///absolute/path/to/socket[/path]"
                " or chunkd+unix://%2Fpercent%2Fencoded.sock/path"
            )
        return socket, path.strip("/")
    parts = rest.split("/")
    for i in range(2, len(parts)):
        socket = "/".join(parts[:i])
        if _is_socket(socket):
            return socket, "/".join(parts[i:]).strip("/")
    return rest.rstrip("/") or rest, ""


def url_of(target: str) -> str:
    """The chunkd URL of a gRPC target (the inverse of :func:`parse_url`, without a path)."""
    if target.startswith("unix:"):
        socket = target[len("unix:") :]
        if socket.startswith("//"):
            socket = socket[2:]
        return f"chunkd+unix://{socket}"
    if _HOST_PORT.match(target):
        return f"chunkd://{target}"
    return target

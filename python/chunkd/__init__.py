"""Python client of the chunkd chunk-cache server, and a Zarr v3 store built on it.

    import chunkd
    with chunkd.Client("127.0.0.1:7878") as client:
        client.put("a/b", b"hello")
        bytes(client.get("a/b", 1, 3))   # b"el" (get returns a memoryview)

    from chunkd.zarr import ChunkdStore  # needs zarr>=3.1 (pip install chunkd[zarr])

    with chunkd.Server(store="memory://") as server:   # a server of your own (chunkd binary)
        xarray.open_zarr(server.url + "/era5.zarr")     # chunkd:// URLs work in any fsspec user

The calls run in the C++ client library, through the native module chunkd._native (built by
the repository's CMake build, or by `pip install ./python`); importing this package without it
raises an ImportError that says how to build it.
"""

from chunkd import _relay  # noqa: F401 - registers the fork relay (chunkd._common.make_native)
from chunkd._address import DEFAULT_ADDRESS, DEFAULT_PORT, parse_url
from chunkd._common import (
    CacheTier,
    Delivery,
    GetItem,
    GetResult,
    ListEntry,
    Listing,
    PutResult,
    ServerInfo,
    Stat,
)
from chunkd.aio import AsyncClient
from chunkd.client import Client
from chunkd.errors import (
    ChunkdError,
    InvalidArgument,
    NotFoundError,
    PreconditionFailed,
    StatusCode,
)
from chunkd.server import Server, ServerError
from chunkd.sharded import ShardedClient

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "AsyncClient",
    "CacheTier",
    "ChunkdError",
    "Client",
    "Delivery",
    "GetItem",
    "GetResult",
    "InvalidArgument",
    "ListEntry",
    "Listing",
    "NotFoundError",
    "PreconditionFailed",
    "PutResult",
    "Server",
    "ServerError",
    "ServerInfo",
    "ShardedClient",
    "Stat",
    "StatusCode",
    "parse_url",
]

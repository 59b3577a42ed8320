"""Python client of the chunkd chunk-cache server, and a Zarr v3 store built on it.

    import chunkd
    with chunkd.Client("127.0.0.1:7878") as client:
        client.put("a/b", b"hello")
        client.get("a/b", 1, 3)          # bytearray(b"el")

    from chunkd.zarr import ChunkdStore  # needs zarr>=3.1 (pip install chunkd[zarr])

The gRPC stubs are generated from proto/chunkd/v1/chunkd.proto when the package is installed
(deploy/scripts/setup-venv.sh); importing this package without them raises an ImportError that
says how to generate them.
"""

from chunkd._address import DEFAULT_ADDRESS, DEFAULT_PORT, parse_url
from chunkd._common import (
    CacheTier,
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
from chunkd.errors import ChunkdError, InvalidArgument, NotFoundError, PreconditionFailed
from chunkd.sharded import ShardedClient

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "AsyncClient",
    "CacheTier",
    "ChunkdError",
    "Client",
    "GetItem",
    "GetResult",
    "InvalidArgument",
    "ListEntry",
    "Listing",
    "NotFoundError",
    "PreconditionFailed",
    "PutResult",
    "ServerInfo",
    "ShardedClient",
    "Stat",
    "parse_url",
]

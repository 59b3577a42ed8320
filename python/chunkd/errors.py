"""Exceptions raised by the chunkd clients.

Every error from the server is a :class:`ChunkdError` carrying the gRPC status code. Three codes
get subclasses that also derive from the built-in exception Python code expects:

========================  ==========================================================
gRPC status               exception
========================  ==========================================================
NOT_FOUND                 :class:`NotFoundError` (also ``KeyError``, ``FileNotFoundError``)
INVALID_ARGUMENT          :class:`InvalidArgument` (also ``ValueError``)
FAILED_PRECONDITION       :class:`PreconditionFailed`
anything else             :class:`ChunkdError` (``.code`` tells which)
========================  ==========================================================
"""

from __future__ import annotations

import grpc

__all__ = [
    "ChunkdError",
    "InvalidArgument",
    "NotFoundError",
    "PreconditionFailed",
    "error_from_rpc",
    "error_from_status",
]


class ChunkdError(Exception):
    """An error reported by (or on the way to) the chunkd server.

    Attributes:
        code: the ``grpc.StatusCode`` of the failed call.
        details: the server's message.
        key: the key the call was about, when it was about one.
    """

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        key: str | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code
        self.key = key

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.details

    def __reduce__(self):  # picklable across processes despite keyword-only arguments
        return (_rebuild, (type(self), self.details, self.code.name, self.key))


class NotFoundError(ChunkdError, KeyError, FileNotFoundError):
    """The key does not exist (NOT_FOUND)."""


class InvalidArgument(ChunkdError, ValueError):
    """The server refused the request's arguments: a bad key, prefix or byte range."""


class PreconditionFailed(ChunkdError):
    """A condition (``if_generation_match`` / ``if_generation_not_match``) did not hold,
    or the store cannot hold the key (FAILED_PRECONDITION)."""


def _rebuild(cls, details, code_name, key):
    return cls(details, code=grpc.StatusCode[code_name], key=key)


_BY_CODE: dict[grpc.StatusCode, type[ChunkdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
}


_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(
    code: int | grpc.StatusCode, details: str, key: str | None = None
) -> ChunkdError:
    """The chunkd exception for a status given as a code (a ``grpc.StatusCode`` or its number,
    as a GetMany item's ``ItemError`` carries it) and a message."""
    if not isinstance(code, grpc.StatusCode):
        code = _CODE_BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN)
    details = details or code.name
    return _BY_CODE.get(code, ChunkdError)(details, code=code, key=key)


def error_from_rpc(error: grpc.RpcError, key: str | None = None) -> ChunkdError:
    """The chunkd exception for a failed gRPC call (sync or asyncio)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_from_status(code, details, key)

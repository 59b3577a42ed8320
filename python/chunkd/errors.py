"""Exceptions raised by the chunkd clients.

Every error from the server is a :class:`ChunkdError` carrying the call's status code (a
:class:`StatusCode`, gRPC's codes). Three codes get subclasses that also derive from the
built-in exception Python code expects:

========================  ==========================================================
status                    exception
========================  ==========================================================
NOT_FOUND                 :class:`NotFoundError` (also ``KeyError``, ``FileNotFoundError``)
INVALID_ARGUMENT          :class:`InvalidArgument` (also ``ValueError``)
FAILED_PRECONDITION       :class:`PreconditionFailed`
anything else             :class:`ChunkdError` (``.code`` tells which)
========================  ==========================================================

:class:`StatusCode` has the names and values of ``grpc.StatusCode``, and its members compare
equal to grpcio's members of the same name (and hash alike), so code written when the package
ran on grpcio (``e.code == grpc.StatusCode.NOT_FOUND``) keeps working; the package itself no
longer imports grpcio.
"""

from __future__ import annotations

import enum

__all__ = [
    "ChunkdError",
    "InvalidArgument",
    "NotFoundError",
    "PreconditionFailed",
    "StatusCode",
    "error_from_status",
]


class StatusCode(enum.Enum):
    """gRPC's status codes (the values of ``grpc.StatusCode``: ``(number, name)``)."""

    OK = (0, "ok")
    CANCELLED = (1, "cancelled")
    UNKNOWN = (2, "unknown")
    INVALID_ARGUMENT = (3, "invalid argument")
    DEADLINE_EXCEEDED = (4, "deadline exceeded")
    NOT_FOUND = (5, "not found")
    ALREADY_EXISTS = (6, "already exists")
    PERMISSION_DENIED = (7, "permission denied")
    RESOURCE_EXHAUSTED = (8, "resource exhausted")
    FAILED_PRECONDITION = (9, "failed precondition")
    ABORTED = (10, "aborted")
    OUT_OF_RANGE = (11, "out of range")
    UNIMPLEMENTED = (12, "unimplemented")
    INTERNAL = (13, "internal")
    UNAVAILABLE = (14, "unavailable")
    DATA_LOSS = (15, "data loss")
    UNAUTHENTICATED = (16, "unauthenticated")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StatusCode):
            return self is other
        # grpc.StatusCode (an Enum of the same name): equal by member name.
        if isinstance(other, enum.Enum) and type(other).__name__ == "StatusCode":
            return self.name == other.name
        return NotImplemented

    __hash__ = enum.Enum.__hash__  # hash(name), as grpc.StatusCode's members hash


class ChunkdError(Exception):
    """An error reported by (or on the way to) the chunkd server.

    Attributes:
        code: the :class:`StatusCode` of the failed call.
        details: the server's message.
        key: the key the call was about, when it was about one.
    """

    def __init__(
        self,
        details: str,
        *,
        code: StatusCode = StatusCode.UNKNOWN,
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
    return cls(details, code=StatusCode[code_name], key=key)


_BY_CODE: dict[StatusCode, type[ChunkdError]] = {
    StatusCode.NOT_FOUND: NotFoundError,
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.FAILED_PRECONDITION: PreconditionFailed,
}

_CODE_BY_NUMBER: dict[int, StatusCode] = {code.value[0]: code for code in StatusCode}


def error_from_status(code: int | enum.Enum, details: str, key: str | None = None) -> ChunkdError:
    """The chunkd exception for a status given as a code (a :class:`StatusCode`, a
    ``grpc.StatusCode`` or its number, as the native client reports it) and a message."""
    if isinstance(code, StatusCode):
        status = code
    elif isinstance(code, enum.Enum):
        status = StatusCode.__members__.get(code.name, StatusCode.UNKNOWN)
    else:
        status = _CODE_BY_NUMBER.get(int(code), StatusCode.UNKNOWN)
    details = details or status.name
    return _BY_CODE.get(status, ChunkdError)(details, code=status, key=key)

"""What the sync and asyncio clients share: options, request building, reply assembly, retries.

Nothing here does I/O (beyond what ClientBase's constructor sets up: TLS files, shared
memory), so both clients stay thin loops around the same logic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from chunkd import _shm
from chunkd._address import DEFAULT_ADDRESS, parse_url
from chunkd._security import Security
from chunkd._stubs import pb
from chunkd.errors import ChunkdError, error_from_status

# Values travel in parts of at most 1 MiB (the wire contract).
PART_BYTES = 1 << 20
# Get replies are one header plus a part; leave room for a server configured with larger parts.
MAX_RECEIVE_MESSAGE_BYTES = 16 << 20
MAX_SEND_MESSAGE_BYTES = 8 << 20
# Items of one GetMany call (the server refuses more); get_many splits larger batches.
MAX_GET_MANY_ITEMS = 4096

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4  # 5 attempts, as the C++ client's max_attempts

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    ("grpc.primary_user_agent", "chunkd-python/0.1.0"),
)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class GetResult:
    """A value (or a byte range of it) and where it came from.

    ``data`` holds ``length`` bytes: a ``bytearray`` owned by the caller, a ``memoryview`` of
    the ``out`` buffer the caller passed in, or (``delivery`` DELIVERY_SHM) a read-only
    ``memoryview`` of the server's shared memory whose lease lasts as long as it and its views.
    """

    data: bytearray | memoryview
    total_size: int
    generation: int
    range_start: int
    delivery: int = pb.DELIVERY_INLINE

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class PutResult:
    generation: int
    size: int


@dataclass(frozen=True, slots=True)
class Stat:
    """What Stat says about a key; ``exists`` is False (not an error) for a missing key."""

    exists: bool
    size: int = 0
    generation: int = 0


@dataclass(frozen=True, slots=True)
class ListEntry:
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of a listing, or the whole of one (:meth:`Client.list`).

    ``prefixes`` (directory listings only) are the deeper "folders", each ending in '/'.
    """

    entries: list[ListEntry] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]


@dataclass(frozen=True, slots=True)
class CacheTier:
    tier: str
    capacity_bytes: int
    used_bytes: int
    entries: int
    # Memory that leases on handles pin, and its caps (all clients, one client; 0: none).
    pinned_bytes: int = 0
    max_pinned_bytes: int = 0
    max_client_pinned_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str
    backend: str
    store: str
    read_only: bool
    max_value_bytes: int
    tiers: list[CacheTier]
    features: list[str]
    deliveries: list[str]
    counters: dict[str, int]
    leases_active: int
    leased_bytes: int
    raw: Any = field(repr=False, compare=False, default=None)


def server_info_from_proto(r: Any) -> ServerInfo:
    return ServerInfo(
        version=r.version,
        backend=r.backend,
        store=r.store,
        read_only=r.read_only,
        max_value_bytes=r.max_value_bytes,
        tiers=[
            CacheTier(
                t.tier,
                t.capacity_bytes,
                t.used_bytes,
                t.entries,
                t.pinned_bytes,
                t.max_pinned_bytes,
                t.max_client_pinned_bytes,
            )
            for t in r.tiers
        ],
        features=list(r.features),
        deliveries=[pb.Delivery.Name(d) for d in r.deliveries],
        counters=dict(r.counters),
        leases_active=r.leases_active,
        leased_bytes=r.leased_bytes,
        raw=r,
    )


def listing_from_proto(r: Any) -> Listing:
    return Listing(
        [ListEntry(decode_key(e.key), e.size) for e in r.entries],
        [decode_key(p) for p in r.prefixes],
    )


def stat_from_proto(r: Any) -> Stat:
    return Stat(bool(r.exists), int(r.size), int(r.generation)) if r.exists else Stat(False)


# ----------------------------------------------------------------------------------------------
# Requests


def encode_key(key: str, what: str = "key") -> bytes:
    """A key (or prefix) as it travels: UTF-8 bytes.

    The server validates keys (INVALID_ARGUMENT with its reason); here only the type is checked.
    ``surrogateescape`` round-trips the odd name a listing of a file store decoded that way.
    """
    if not isinstance(key, str):
        raise TypeError(f"chunkd {what} must be a str, got {type(key).__name__}")
    return key.encode("utf-8", "surrogateescape")


def decode_key(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def conditions(if_generation_match: int | None, if_generation_not_match: int | None) -> Any:
    if if_generation_match is None and if_generation_not_match is None:
        return None
    c = pb.Conditions()
    if if_generation_match is not None:
        c.if_generation_match = int(if_generation_match)
    if if_generation_not_match is not None:
        c.if_generation_not_match = int(if_generation_not_match)
    return c


def byte_range(start: int | None, end: int | None, suffix: int | None) -> Any:
    """The ByteRange for get(start, end, suffix=...); None for the whole value.

    (start, end): bytes [start, end); (start, None): from start to the end; (None, end): [0, end);
    suffix=n: the last n bytes. Negative numbers go to the server, which refuses them.
    """
    if suffix is not None:
        if start is not None or end is not None:
            raise ValueError("get: give either start/end or suffix, not both")
        return pb.ByteRange(suffix=int(suffix))
    if start is None and end is None:
        return None
    if end is None:
        return pb.ByteRange(offset=int(start))
    return pb.ByteRange(bounded=pb.ByteRange.Bounded(start=int(start or 0), end=int(end)))


def get_request(key: str, rng: Any, conds: Any) -> Any:
    request = pb.GetRequest(key=encode_key(key), accept=ACCEPTED_DELIVERIES)
    if rng is not None:
        request.range.CopyFrom(rng)
    if conds is not None:
        request.conditions.CopyFrom(conds)
    return request


@dataclass(frozen=True, slots=True)
class GetItem:
    """One item of ``get_many``/``read_many``: a key, with the byte range and conditions that
    :meth:`chunkd.Client.read` takes (``start``/``end``, or ``suffix``; ``if_generation_*``).

    ``get_many`` also takes a plain key for ``GetItem(key)`` and a tuple ``(key, start)`` or
    ``(key, start, end)`` for ``GetItem(key, start, end)``.
    """

    key: str
    start: int | None = None
    end: int | None = None
    suffix: int | None = None
    if_generation_match: int | None = None
    if_generation_not_match: int | None = None


ItemLike = str | tuple | GetItem


def get_item(item: ItemLike) -> GetItem:
    """A get_many item as a :class:`GetItem` (a key, a (key, start[, end]) tuple, a GetItem)."""
    if isinstance(item, GetItem):
        return item
    if isinstance(item, str):
        return GetItem(item)
    if isinstance(item, tuple) and 1 <= len(item) <= 3:
        return GetItem(*item)
    raise TypeError(
        "get_many items are keys (str), (key, start) or (key, start, end) tuples, or "
        f"chunkd.GetItem; got {item!r}"
    )


def get_many_requests(items: Iterable[ItemLike]) -> list[tuple[list[str], Any]]:
    """The GetManyRequests of a batch, at most MAX_GET_MANY_ITEMS items each, with the keys of
    their items. Items are checked here (key type, range form), before anything is sent; the
    server checks the rest (key syntax, negative ranges) item by item."""
    batches: list[tuple[list[str], Any]] = []
    keys: list[str] = []
    request: Any = None
    for raw in items:
        item = get_item(raw)
        if request is None or len(keys) == MAX_GET_MANY_ITEMS:
            keys, request = [], pb.GetManyRequest(accept=ACCEPTED_DELIVERIES)
            batches.append((keys, request))
        one = request.items.add(key=encode_key(item.key))
        rng = byte_range(item.start, item.end, item.suffix)
        if rng is not None:
            one.range.CopyFrom(rng)
        conds = conditions(item.if_generation_match, item.if_generation_not_match)
        if conds is not None:
            one.conditions.CopyFrom(conds)
        keys.append(item.key)
    return batches


def as_bytes_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (bytes, bytearray, numpy, ...)."""
    if isinstance(data, str):
        raise TypeError("chunkd values are bytes, not str: encode the string first")
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise ValueError("chunkd: the value must be a C-contiguous buffer")
        view = view.cast("B")
    return view


def put_requests(key: str, view: memoryview, conds: Any) -> Iterator[Any]:
    """The Put stream: a header (key, size, conditions), then data parts of at most 1 MiB."""
    header = pb.PutHeader(key=encode_key(key), size=len(view))
    if conds is not None:
        header.conditions.CopyFrom(conds)
    yield pb.PutRequest(header=header)
    for offset in range(0, len(view), PART_BYTES):
        yield pb.PutRequest(data=view[offset : offset + PART_BYTES].tobytes())


# ----------------------------------------------------------------------------------------------
# Get replies: a header, then the value in one of the deliveries the client accepted.
#
# Only inline delivery exists today. A later delivery (shared memory, CUDA IPC) adds a receiver
# class to RECEIVERS and its enum to ACCEPTED_DELIVERIES (when the client can use it); the
# clients' loops and the Zarr store's conversion to a zarr Buffer stay as they are.


class InlineReceiver:
    """Assembles inline ``data`` parts into one buffer allocated once from the header's length."""

    def __init__(self, key: str, header: Any, out: Any) -> None:
        self.key = key
        self.length = int(header.length)
        if out is None:
            self.owner: bytearray | None = bytearray(self.length)
            self.view = memoryview(self.owner)
        else:
            self.owner = None
            self.view = as_bytes_view(out)
            if self.view.readonly:
                raise TypeError("get: out must be a writable buffer")
            if len(self.view) < self.length:
                raise ValueError(
                    f"get {key!r}: out holds {len(self.view)} bytes, the reply has {self.length}"
                )
            self.view = self.view[: self.length]
        self.filled = 0

    def add(self, data: bytes) -> None:
        n = len(data)
        if n == 0:
            return
        end = self.filled + n
        if end > self.length:
            raise ChunkdError(
                f"get {self.key!r}: the server sent more than the {self.length} bytes it announced",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )
        self.view[self.filled : end] = data
        self.filled = end

    def finish(self) -> bytearray | memoryview:
        if self.filled != self.length:
            raise ChunkdError(
                f"get {self.key!r}: the reply ended after {self.filled} of {self.length} bytes",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )
        return self.owner if self.owner is not None else self.view


RECEIVERS: dict[int, type] = {
    pb.DELIVERY_UNSPECIFIED: InlineReceiver,  # servers that leave the field unset send inline
    pb.DELIVERY_INLINE: InlineReceiver,
}
ACCEPTED_DELIVERIES = [pb.DELIVERY_INLINE]


def feed_all(call: Any, assembler: Any) -> None:
    """Feeds every message of a server-streaming ``call`` to ``assembler`` (``feed``); cancels
    the call when anything (a malformed message, an interrupt) stops the reading."""
    try:
        for response in call:
            assembler.feed(response)
    except BaseException:
        call.cancel()
        raise


async def feed_all_async(call: Any, assembler: Any) -> None:
    """:func:`feed_all` for an asyncio call."""
    try:
        async for response in call:
            assembler.feed(response)
    except BaseException:
        call.cancel()
        raise


class GetAssembler:
    """Turns the stream of GetResponse messages into a :class:`GetResult`."""

    def __init__(self, key: str, out: Any = None, receivers: dict[int, Any] | None = None) -> None:
        self.key = key
        self.out = out
        # Receivers by delivery: RECEIVERS, or a client's own (shared memory: chunkd._shm).
        self.receivers = RECEIVERS if receivers is None else receivers
        self.header: Any = None
        self.receiver: Any = None

    def feed(self, response: Any) -> None:
        if self.header is None:
            if not response.HasField("header"):
                raise ChunkdError(
                    f"get {self.key!r}: the first reply message carries no header",
                    code=grpc.StatusCode.INTERNAL,
                    key=self.key,
                )
            self.header = response.header
            receiver_cls = self.receivers.get(self.header.delivery)
            if receiver_cls is None:
                raise ChunkdError(
                    f"get {self.key!r}: the server chose delivery "
                    f"{pb.Delivery.Name(self.header.delivery)}, which this client did not accept",
                    code=grpc.StatusCode.INTERNAL,
                    key=self.key,
                )
            self.receiver = receiver_cls(self.key, self.header, self.out)
        self.receiver.add(response.data)

    def result(self) -> GetResult:
        if self.header is None:
            raise ChunkdError(
                f"get {self.key!r}: the reply ended without a header",
                code=grpc.StatusCode.INTERNAL,
                key=self.key,
            )
        h = self.header
        return GetResult(
            data=self.receiver.finish(),
            total_size=int(h.total_size),
            generation=int(h.generation),
            range_start=int(h.range_start),
            delivery=int(h.delivery) or pb.DELIVERY_INLINE,
        )


class GetManyAssembler:
    """Turns the stream of GetManyResponse messages of one GetMany call into one result per
    item, in order: a :class:`GetResult`, or the item's error as a :class:`ChunkdError` (a
    :class:`chunkd.NotFoundError` for a missing key, and so on).

    Each item's parts (its first carries the header or the error; inline data may span later
    parts and messages) go to a :class:`GetAssembler` of its own, with the same receivers as a
    Get. A reply that does not fit the items (an index out of range, data after an error) fails
    the whole call."""

    def __init__(self, keys: list[str], receivers: dict[int, Any] | None = None) -> None:
        self.keys = keys
        self.receivers = receivers
        self.assemblers: list[GetAssembler | None] = [None] * len(keys)
        self.errors: list[ChunkdError | None] = [None] * len(keys)

    def _malformed(self, why: str) -> ChunkdError:
        return ChunkdError(f"get_many: malformed reply ({why})", code=grpc.StatusCode.DATA_LOSS)

    def feed(self, response: Any) -> None:
        for part in response.parts:
            i = part.index
            if i >= len(self.keys):
                raise self._malformed(f"item {i} of {len(self.keys)}")
            if self.errors[i] is not None:
                raise self._malformed(f"more parts for item {i} after its error")
            assembler = self.assemblers[i]
            if part.HasField("error"):
                if assembler is not None or part.data:
                    raise self._malformed(f"an error in a later part of item {i}")
                error = part.error
                self.errors[i] = error_from_status(error.code, error.message, self.keys[i])
                continue
            if assembler is None:
                assembler = self.assemblers[i] = GetAssembler(self.keys[i], None, self.receivers)
            assembler.feed(part)  # GetManyPart has GetResponse's header and data fields

    def results(self) -> list[GetResult | ChunkdError]:
        """One result per item. A handle that cannot be mapped raises (as for a Get: the call
        is then retried inline); an item's own trouble is its result."""
        results: list[GetResult | ChunkdError] = []
        for i, key in enumerate(self.keys):
            error = self.errors[i]
            assembler = self.assemblers[i]
            if error is None and assembler is None:
                error = ChunkdError(
                    f"get_many: no reply for item {i} ({key!r})",
                    code=grpc.StatusCode.DATA_LOSS,
                    key=key,
                )
            if error is None:
                try:
                    results.append(assembler.result())
                    continue
                except ChunkdError as e:
                    error = e
            results.append(error)
        return results


# ----------------------------------------------------------------------------------------------
# Retries


class Deadline:
    """The end of a call, retries included (None: no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.end is None:
            return None
        return max(0.0, self.end - time.monotonic())


class RetryPolicy:
    """Retries UNAVAILABLE (server down, restarting, overloaded) with capped exponential backoff
    and full jitter, within the call's deadline. The same policy as the C++ client: 50 ms
    initial backoff, 2 s at most; conditional puts are not retried."""

    RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __init__(self, retries: int, initial: float = 0.05, maximum: float = 2.0) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = int(retries)
        self.initial = initial
        self.maximum = maximum

    def should_retry(self, error: BaseException, attempt: int, deadline: Deadline) -> bool:
        if attempt >= self.retries or not isinstance(error, grpc.RpcError):
            return False
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            return False
        code = error.code() if callable(getattr(error, "code", None)) else None
        return code in self.RETRYABLE

    def delay(self, attempt: int, deadline: Deadline) -> float:
        delay = random.uniform(0, min(self.maximum, self.initial * (2**attempt)))
        remaining = deadline.remaining()
        return delay if remaining is None else min(delay, remaining)


def target_of(address: str) -> str:
    target, path = parse_url(address)
    if path:
        raise ValueError(
            f"chunkd address {address!r} names a path inside the store ({path!r}); clients take "
            "the server's address only (the path is for chunkd.zarr.ChunkdStore)"
        )
    return target


# ----------------------------------------------------------------------------------------------
# Options


class ClientBase:
    """The options and state both clients are made with (arguments: see :class:`chunkd.Client`).

    Subclasses add their own state in ``_setup``, called last.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        channel_options: list[tuple[str, Any]] | None = None,
        delivery: str = "inline",
        shm_dir: str = _shm.DEFAULT_SHM_DIR,
        tls_ca: str | None = None,
        tls: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.target = target_of(address)
        # TLS and the bearer token (chunkd._security); token defaults to $CHUNKD_TOKEN.
        self._security = Security.create(
            tls_ca=tls_ca,
            tls=tls,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
            token=token,
        )
        self.timeout = timeout
        self._retry = RetryPolicy(retries)
        self._options = list(CHANNEL_OPTIONS) + list(channel_options or [])
        self._channel: Any = None
        self._stub: Any = None
        self._closed = False
        self.delivery = delivery
        self.shm_dir = shm_dir
        # Shared-memory delivery (None when inline): request fields, receiver, lease keeper. The
        # lease keeper uses a blocking channel on a thread of its own (so the asyncio client's
        # releases go on whichever event loop is running, if any).
        self._shm = _shm.ShmDelivery.create(
            delivery,
            shm_dir,
            self.target,
            self._options,
            channel_factory=self._security.channel_factory(self.target, self._options),
        )
        self._setup()

    def _setup(self) -> None:
        """The subclass's own state."""

    @property
    def retries(self) -> int:
        return self._retry.retries

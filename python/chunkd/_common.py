"""What the clients share: results, options, items, and the native client core.

Every call goes to the C++ client library through the native module ``chunkd._native``
(python/native/chunkd_native.cc): the protocol, retries, deadlines, leases, shared-memory
mapping, CUDA IPC import and sharding live there. This module holds the Python side's types
and the construction of a native client from the clients' arguments.
"""

from __future__ import annotations

import atexit
import enum
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chunkd._address import DEFAULT_ADDRESS, parse_url
from chunkd._security import Security
from chunkd.errors import error_from_status

try:
    from chunkd import _native
except ImportError as _e:  # pragma: no cover - exercised by test_native via a subprocess
    raise ImportError(
        "chunkd: the native module chunkd._native (the C++ client core) is missing or does not "
        "load. It is built by the repository's CMake build: run deploy/scripts/setup-venv.sh "
        "then deploy/scripts/build.sh from the repository root (it needs python3-dev and "
        "nanobind; deploy/scripts/install-deps.sh all installs both), or install the package "
        f"with `pip install ./python`, which builds it. Import error: {_e}"
    ) from _e

# Items of one GetMany call (the server refuses more); get_many splits larger batches.
MAX_GET_MANY_ITEMS = _native.MAX_GET_MANY_ITEMS

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4  # 5 attempts, as the C++ client's max_attempts

DEFAULT_SHM_DIR = "/dev/shm"
# The values of the clients' and the store's ``delivery=`` option.
DELIVERIES = ("inline", "shm")


class Delivery(enum.IntEnum):
    """How a value came (``GetResult.delivery``): the wire contract's ``Delivery`` enum."""

    UNSPECIFIED = _native.DELIVERY_UNSPECIFIED
    INLINE = _native.DELIVERY_INLINE
    SHM = _native.DELIVERY_SHM
    CUDA_IPC = _native.DELIVERY_CUDA_IPC


def check_delivery(delivery: str) -> str:
    if delivery not in DELIVERIES:
        raise ValueError(f"chunkd: delivery must be one of {DELIVERIES}, got {delivery!r}")
    return delivery


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class GetResult:
    """A value (or a byte range of it) and where it came from.

    ``data`` holds ``length`` bytes: a writable ``memoryview`` of the one buffer the client
    received the bytes into (inline; no copy was made), a read-only ``memoryview`` of the
    server's shared memory (``delivery`` SHM) whose lease lasts as long as it and its views, a
    ``memoryview`` of the ``out`` buffer the caller passed in, or (CUDA IPC) a CuPy array over
    the server's GPU memory.

    A derived read (:class:`GetItem` with a ``derivation``) that missed has a nonzero
    ``production_id``: the caller is to derive the value from generation ``generation`` of
    the key and publish it (:meth:`chunkd.Client.put_derived`); ``data`` is then empty.
    """

    data: Any
    total_size: int
    generation: int
    range_start: int
    delivery: int = Delivery.INLINE
    production_id: int = 0

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
    # Memory that leases on handles pin, its caps (all clients, one client; 0: none), the
    # clients pinning some, and the handles refused at each cap (served inline instead).
    pinned_bytes: int = 0
    max_pinned_bytes: int = 0
    max_client_pinned_bytes: int = 0
    pinning_clients: int = 0
    pin_refusals_total_cap: int = 0
    pin_refusals_client_cap: int = 0


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


def server_info(d: dict[str, Any]) -> ServerInfo:
    """A ServerInfo from the native client's answer (``raw`` keeps that dict)."""
    return ServerInfo(
        version=d["version"],
        backend=d["backend"],
        store=d["store"],
        read_only=d["read_only"],
        max_value_bytes=d["max_value_bytes"],
        tiers=[CacheTier(*t) for t in d["tiers"]],
        features=d["features"],
        deliveries=d["deliveries"],
        counters=d["counters"],
        leases_active=d["leases_active"],
        leased_bytes=d["leased_bytes"],
        raw=d,
    )


def merge(pages: list[Listing]) -> Listing:
    entries: list[ListEntry] = []
    prefixes: list[str] = []
    for page in pages:
        entries.extend(page.entries)
        prefixes.extend(page.prefixes)
    return Listing(entries, prefixes)


# ----------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True, slots=True)
class GetItem:
    """One item of ``get_many``/``read_many``: a key, with the byte range and conditions that
    :meth:`chunkd.Client.read` takes (``start``/``end``, or ``suffix``; ``if_generation_*``).

    ``get_many`` also takes a plain key for ``GetItem(key)`` and a tuple ``(key, start)`` or
    ``(key, start, end)`` for ``GetItem(key, start, end)``.

    With a ``derivation`` (1 to 4096 bytes), the item reads the server's derived entry of the
    key for it (a decoded chunk, say) instead of the value: the range applies to the derived
    value, freshness and conditions to the key's value. A miss answers
    :class:`chunkd.NotFoundError`, or, with ``produce=True`` when nobody is producing it, a
    :class:`GetResult` with a nonzero ``production_id``; a miss while another reader produces
    it waits up to ``wait_ms`` (0: the server's ``--derived_wait_ms``) and fails with
    ``DEADLINE_EXCEEDED`` past it. See docs/python.md, "Derived entries".
    """

    key: str
    start: int | None = None
    end: int | None = None
    suffix: int | None = None
    if_generation_match: int | None = None
    if_generation_not_match: int | None = None
    derivation: bytes | None = None
    produce: bool = False
    wait_ms: int = 0


ItemLike = str | tuple | GetItem


def check_item(key: Any, start: Any = None, end: Any = None, suffix: Any = None) -> None:
    """The checks a get makes before anything is sent (the key's type, the range's form), for
    a caller that queues the get with others (ChunkdStore's batcher): a bad one then raises
    from its own get, not from the batch."""
    if not isinstance(key, str):
        raise TypeError(f"chunkd key must be a str, got {type(key).__name__}")
    if suffix is not None and (start is not None or end is not None):
        raise ValueError("get: give either start/end or suffix, not both")


def batches(items: Iterable[ItemLike]) -> list[list[ItemLike]]:
    """The items in batches of at most MAX_GET_MANY_ITEMS, one GetMany call each (the native
    client checks and converts each item)."""
    items = items if isinstance(items, list) else list(items)
    if len(items) <= MAX_GET_MANY_ITEMS:
        return [items] if items else []
    return [items[i : i + MAX_GET_MANY_ITEMS] for i in range(0, len(items), MAX_GET_MANY_ITEMS)]


_native.configure(GetResult, PutResult, Stat, ListEntry, Listing, error_from_status, GetItem)


# ----------------------------------------------------------------------------------------------
# Options


def target_of(address: str) -> str:
    target, path = parse_url(address)
    if path:
        raise ValueError(
            f"chunkd address {address!r} names a path inside the store ({path!r}); clients take "
            "the server's address only (the path is for chunkd.zarr.ChunkdStore)"
        )
    return target


class ClientBase:
    """The options both clients are made with (arguments: see :class:`chunkd.Client`), and
    their native client."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        delivery: str = "inline",
        shm_dir: str = DEFAULT_SHM_DIR,
        tls_ca: str | bytes | None = None,
        tls: bool = False,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_staleness: float | None = None,
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
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.timeout = timeout
        self.retries = int(retries)
        self.delivery = check_delivery(delivery)
        self.shm_dir = os.fspath(shm_dir)
        # Seconds: a cached value is served only if the server's store confirmed it at most
        # this long ago (0: validate every read). None: the server's policy.
        if max_staleness is not None and max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 or None")
        self.max_staleness = None if max_staleness is None else float(max_staleness)
        self._closed = False
        self._pid = os.getpid()
        self._n = make_native(
            "client",
            self.target,
            timeout=None if timeout is None else float(timeout),
            retries=self.retries,
            delivery=self.delivery,
            shm_dir=self.shm_dir,
            max_staleness=self.max_staleness,
            **self._security.native(),
        )

    # -- blocking calls of both clients --------------------------------------------------------
    # For code that holds an AsyncClient outside its event loop (chunkd.zarr.ChunkdStore's
    # close, from any thread): Client's close and flush_releases are these; AsyncClient's
    # coroutines wrap them.

    def close_blocking(self) -> None:
        """Closes the client now, on the calling thread; later calls raise RuntimeError.
        Idempotent. Values still alive keep their memory (and leases) until they are
        dropped."""
        if not self._closed:
            self._closed = True
            self._n.close()

    def flush_releases_blocking(self) -> bool:
        """Returns the leases of shared-memory values dropped so far to the server now, and
        waits for its answer (they otherwise go in batches within milliseconds); False if the
        release call failed. Blocks the calling thread."""
        return self._n.flush_releases()

    def _native_client(self) -> Any:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self._pid != os.getpid():
            self._reconnect_in_child()
        return self._n

    def _reconnect_in_child(self) -> None:
        """This process was forked from the one that made the client (a data loader's
        workers, a ``fork`` pool): the parent's native client, its connections and threads
        are the parent's and are never touched here; the child gets a client of its own, made
        from the same arguments, as an unpickled copy would be."""
        with _FORK_LOCK:
            if self._pid != os.getpid():
                self.__setstate__(self.__getstate__())

    def __getstate__(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "timeout": self.timeout,
            "retries": self.retries,
            "delivery": self.delivery,
            "shm_dir": self.shm_dir,
            "max_staleness": self.max_staleness,
            "security": self._security.arguments(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A fresh client of its own in the process that unpickles it.
        ClientBase.__init__(
            self,
            state["address"],
            timeout=state["timeout"],
            retries=state["retries"],
            delivery=state.get("delivery", "inline"),
            shm_dir=state.get("shm_dir", DEFAULT_SHM_DIR),
            max_staleness=state.get("max_staleness"),
            **state.get("security", {}),
        )

    @property
    def leases_held(self) -> int:
        """Shared-memory values (leases) of this client still alive."""
        return self._n.leases_held

    @property
    def shm_disabled(self) -> str:
        """Why shared-memory delivery was turned off for this client (a handle it could not
        map; values arrive inline since), or "" while it is on."""
        return self._n.shm_disabled


# The process whose native clients started gRPC (None before the first): a process forked from
# it cannot use gRPC (see chunkd._relay), and its clients relay their calls through a helper.
_GRPC_PID: int | None = None
# chunkd._relay.RelayNative, registered by that module when the package is imported: the
# relay uses this module, and registering keeps the imports one way.
_RELAY: Any = None


def register_relay(factory: Any) -> None:
    global _RELAY
    _RELAY = factory


def make_native(constructor: str, *args: Any, **kwargs: Any) -> Any:
    """A native client (``_native.Client(...)``, or ``.sharded(...)``), or in a process forked
    after gRPC started, a :class:`chunkd._relay.RelayNative` with the same methods."""
    global _GRPC_PID
    if _GRPC_PID is not None and _GRPC_PID != os.getpid():
        if _RELAY is None:
            raise RuntimeError("chunkd._relay is not loaded (import chunkd, not its modules alone)")
        return _RELAY(constructor, args, kwargs)
    _GRPC_PID = os.getpid()
    if constructor == "sharded":
        return _native.Client.sharded(*args, **kwargs)
    return _native.Client(*args, **kwargs)


# Taken by a forked child's first call on a client made before the fork (see
# ClientBase._reconnect_in_child); a fresh lock in each child.
_FORK_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

# The process is ending and its values with it: return their leases now rather than pin the
# servers' memory for a TTL (a process that dies without this lets them expire).
atexit.register(_native.release_leases_at_exit)

"""Shared-memory delivery, the client side (``delivery="shm"``).

A client on the server's host asks for ``accept=[DELIVERY_SHM, DELIVERY_INLINE]`` and says who
it is (:func:`client_identity`: boot id, IPC and mount namespaces, and the device and inode of
its view of the shared-memory directory). When the server can share memory with it, the reply's
header carries a segment name, offset and length and a *lease* instead of the bytes: the client
maps the segment read-only, once per process (:func:`map_segment`), and hands out a read-only
view of the chunk in place. Anyone else gets inline bytes, as before.

Lifetimes. Each chunk is a ``numpy.uint8`` array over the mapping (the *holder*); what the
caller receives is a ``memoryview`` of it, or (through the Zarr store) a zarr ``Buffer`` over a
view of it. Every derived object (memoryview slices, numpy views, zarr buffers) keeps the holder
alive, so the holder dies with the last of them; a ``weakref.finalize`` on it then hands the
lease to the client's :class:`LeaseKeeper`. The keeper's thread returns leases in batches
(``Release``) and renews the leases still held every TTL/3 (``Renew``), over a channel of its
own, so neither happens on the caller's thread or event loop, and a buffer may outlive its
client. A process that dies holding leases lets them expire on the server (``--lease_ttl``).

The finalizer runs wherever the garbage collector runs, so it only puts the lease id on a
``queue.SimpleQueue`` (reentrant, no lock). After ``fork`` a child forgets its parent's leases:
the parent still owns them, and arrays inherited by the child never release them.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from chunkd._stubs import pb, pb_grpc
from chunkd.errors import ChunkdError

__all__ = [
    "DEFAULT_SHM_DIR",
    "DELIVERIES",
    "LeaseKeeper",
    "ShmDelivery",
    "client_identity",
    "map_segment",
]

log = logging.getLogger("chunkd")

DEFAULT_SHM_DIR = "/dev/shm"
# The values of the clients' and the store's ``delivery=`` option.
DELIVERIES = ("inline", "shm")

ACCEPT_SHM = (pb.DELIVERY_SHM, pb.DELIVERY_INLINE)


def check_delivery(delivery: str) -> str:
    if delivery not in DELIVERIES:
        raise ValueError(f"chunkd: delivery must be one of {DELIVERIES}, got {delivery!r}")
    return delivery


# ----------------------------------------------------------------------------------------------
# Who this process is


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def client_identity(shm_dir: str) -> Any:
    """This process's ``ClientIdentity`` for a shared-memory directory (as the server's
    buffer/host_identity.cc computes its own). A directory that cannot be stat()ed gets device
    and inode 0, which the server never matches: such a client gets inline bytes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    identity = pb.ClientIdentity(
        boot_id=boot_id,
        ipc_namespace=_inode("/proc/self/ns/ipc"),
        mount_namespace=_inode("/proc/self/ns/mnt"),
        shm_dir=shm_dir,
        # Tells this process apart from others on the same UNIX socket (the server's cap on
        # the memory one client's leases pin).
        process_id=os.getpid(),
    )
    try:
        st = os.stat(shm_dir)
        identity.shm_dir_dev = st.st_dev
        identity.shm_dir_ino = st.st_ino
    except OSError:
        pass
    return identity


# ----------------------------------------------------------------------------------------------
# Mappings: one per segment per process


class _Mapping:
    __slots__ = ("dev", "ino", "size", "mm")

    def __init__(self, dev: int, ino: int, size: int, mm: mmap.mmap) -> None:
        self.dev, self.ino, self.size, self.mm = dev, ino, size, mm


# Mappings stay for reuse (mapping a segment and faulting its pages in costs more than the read
# that follows); past this many, the least recently used one leaves the cache. Its views keep
# it mapped for as long as they live (a mmap object lives while buffers of it exist).
MAX_CACHED_MAPPINGS = 64
_mappings: collections.OrderedDict[tuple[str, str], _Mapping] = collections.OrderedDict()
_mappings_lock = threading.Lock()


def map_segment(shm_dir: str, segment: str, segment_size: int) -> mmap.mmap:
    """The read-only mapping of ``shm_dir/segment`` (``segment_size`` bytes), made once and
    reused. The cache entry is checked against the file's device and inode on every call, so
    a segment that a restarted server recreated under the same name is mapped afresh."""
    if not segment or "/" in segment or segment.startswith(".") or "\0" in segment:
        raise ValueError(f"bad shared-memory segment name {segment!r}")
    path = os.path.join(shm_dir, segment)
    key = (shm_dir, segment)
    st = os.stat(path, follow_symlinks=False)
    with _mappings_lock:
        m = _mappings.get(key)
        if m is not None and (m.dev, m.ino, m.size) == (st.st_dev, st.st_ino, segment_size):
            _mappings.move_to_end(key)
            return m.mm
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_size < segment_size:
            raise OSError(
                f"shared-memory segment {path} holds {st.st_size} bytes, the server said "
                f"{segment_size}"
            )
        mm = mmap.mmap(fd, segment_size, access=mmap.ACCESS_READ)  # MAP_SHARED, PROT_READ
    finally:
        os.close(fd)
    with _mappings_lock:
        _mappings[key] = _Mapping(st.st_dev, st.st_ino, segment_size, mm)
        _mappings.move_to_end(key)
        while len(_mappings) > MAX_CACHED_MAPPINGS:
            _mappings.popitem(last=False)
    return mm


def cached_mappings() -> int:
    with _mappings_lock:
        return len(_mappings)


# ----------------------------------------------------------------------------------------------
# Leases


class LeaseKeeper:
    """Releases the leases of dropped chunk views in batches and renews the ones still held,
    from a background thread with a channel of its own (made by ``channel_factory``).

    The thread starts with the first lease and ends after ``IDLE_S`` without any (at once when
    the owning client is closed), closing its channel; the next lease starts it again.
    """

    BATCH = 256
    LINGER_S = 0.005  # a release waits this long for company
    IDLE_S = 10.0
    RPC_TIMEOUT_S = 10.0
    EXIT_TIMEOUT_S = 1.0

    def __init__(self, channel_factory: Callable[[], grpc.Channel], name: str = "") -> None:
        self._factory = channel_factory
        self.name = name
        self._reset()
        _keepers.add(self)

    def _reset(self) -> None:
        # Also the state of a child after fork: nothing held, no thread, no channel.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._live: set[int] = set()
        self._expired: set[int] = set()
        self._ttl_s = 30.0
        self._next_renew: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    # -- called by the client and by finalizers -------------------------------------------------

    def track(self, lease_id: int, ttl_ms: int) -> None:
        """A view holding ``lease_id`` is about to exist: renew the lease until it is dropped."""
        with self._lock:
            self._live.add(lease_id)
            now = time.monotonic()
            if ttl_ms > 0:
                self._ttl_s = min(self._ttl_s, ttl_ms / 1000.0)
            renew_by = now + self._ttl_s / 3
            if self._next_renew is None or renew_by < self._next_renew:
                self._next_renew = renew_by
            self._start_locked()

    def drop(self, lease_id: int, pid: int) -> None:
        """The view of ``lease_id`` is gone (a finalizer: no lock, no allocation beyond the
        queue's). ``pid``: the process that took the lease; nothing happens in another one."""
        if pid == os.getpid():
            self._queue.put(lease_id)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Sends the releases of views dropped so far and waits for the server's answer (or
        ``timeout``); False if it did not come in time. Run ``gc.collect()`` first to drop
        views held only by reference cycles."""
        done = threading.Event()
        with self._lock:
            self._queue.put(done)
            self._start_locked()
        return done.wait(timeout)

    @property
    def held(self) -> int:
        """Leases of views still alive (as far as the keeper's thread has seen)."""
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """The client is closed or gone: the thread ends once no lease is held."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)  # wake it up to look

    # -- the thread -----------------------------------------------------------------------------

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"chunkd-leases {self.name}".strip(), daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - never expected; the leases then expire
            log.exception("chunkd: the lease keeper failed; held leases will expire")
            with self._lock:
                self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._live:
                    wait = max(0.0, (self._next_renew or 0.0) - time.monotonic())
                else:
                    wait = 0.0 if self._closed else self.IDLE_S
            releases: list[int] = []
            flushes: list[threading.Event] = []
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
                idle = True
            else:
                idle = False
                self._sort(item, releases, flushes)
                linger_end = time.monotonic() + self.LINGER_S
                while not flushes and len(releases) < self.BATCH:
                    remaining = linger_end - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        self._sort(self._queue.get(timeout=remaining), releases, flushes)
                    except queue.Empty:
                        break
                while True:
                    try:
                        self._sort(self._queue.get_nowait(), releases, flushes)
                    except queue.Empty:
                        break
            now = time.monotonic()
            with self._lock:
                for lease in releases:
                    self._live.discard(lease)
                if self._expired:
                    releases = [lease for lease in releases if lease not in self._expired]
                    self._expired.difference_update(releases)
                renew: list[int] = []
                if not self._live:
                    self._next_renew = None
                elif self._next_renew is not None and now >= self._next_renew:
                    renew = list(self._live)
                    self._next_renew = now + self._ttl_s / 3
                stop = (
                    not releases
                    and not flushes
                    and not self._live
                    and (idle or self._closed)
                    and self._queue.empty()
                )
                if stop:
                    self._thread = None
                    channel, self._channel, self._stub = self._channel, None, None
            for start in range(0, len(releases), self.BATCH):
                self._release(releases[start : start + self.BATCH])
            if renew:
                self._renew(renew)
            for done in flushes:
                done.set()
            if stop:
                if channel is not None:
                    channel.close()
                return

    @staticmethod
    def _sort(item: Any, releases: list[int], flushes: list[threading.Event]) -> None:
        if isinstance(item, int):
            releases.append(item)
        elif isinstance(item, threading.Event):
            flushes.append(item)
        # None: a wake-up

    def _get_stub(self) -> Any:
        if self._stub is None:
            self._channel = self._factory()
            self._stub = pb_grpc.ChunkdStub(self._channel)
        return self._stub

    def _release(self, ids: list[int]) -> None:
        try:
            self._get_stub().Release(pb.ReleaseRequest(lease_ids=ids), timeout=self.RPC_TIMEOUT_S)
        except grpc.RpcError as e:  # a lost release is not lost memory: the lease expires
            log.debug("chunkd: releasing %d leases failed: %s", len(ids), e)

    def _renew(self, ids: list[int]) -> None:
        try:
            reply = self._get_stub().Renew(
                pb.RenewRequest(lease_ids=ids), timeout=self.RPC_TIMEOUT_S
            )
        except grpc.RpcError as e:
            log.warning("chunkd: renewing %d leases failed: %s", len(ids), e)
            return
        if reply.ttl_ms:
            with self._lock:
                self._ttl_s = min(self._ttl_s, reply.ttl_ms / 1000.0)
        if reply.unknown_lease_ids:
            gone = set(reply.unknown_lease_ids)
            with self._lock:
                gone &= self._live
                self._live -= gone
                self._expired |= gone
            if gone:
                log.warning(
                    "chunkd: %d leases expired on the server while their buffers were alive; "
                    "the server may reuse that memory (was the client stalled past --lease_ttl?)",
                    len(gone),
                )

    # -- process life ---------------------------------------------------------------------------

    def _release_all_at_exit(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            ids = set(self._live)
            self._live.clear()
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, int):
                ids.add(item)
        if not ids:
            return
        try:
            channel = self._factory()
            try:
                pb_grpc.ChunkdStub(channel).Release(
                    pb.ReleaseRequest(lease_ids=sorted(ids)), timeout=self.EXIT_TIMEOUT_S
                )
            finally:
                channel.close()
        except Exception:  # noqa: BLE001 - at exit: the leases expire anyway
            pass


_keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    # The process is ending and its views with it: return their leases now rather than pin
    # the server's memory for a TTL.
    for keeper in list(_keepers):
        keeper._release_all_at_exit()


def _after_fork_in_child() -> None:
    # Locks another thread held at fork stay locked in the child: replace them.
    global _mappings_lock
    _mappings_lock = threading.Lock()
    for keeper in list(_keepers):
        keeper._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------------------------
# The client's side of a Get


class ShmImportFailed(grpc.RpcError):
    """The client could not map a handle (permissions, a missing segment): retried inline.

    An ``RpcError`` with ``UNAVAILABLE`` so that the clients' retry loops repeat the call, which
    then asks for inline delivery only (the client turns shared memory off after this)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class ShmReceiver:
    """The receiver (see ``chunkd._common.GetAssembler``) of a DELIVERY_SHM reply: a handle and
    a lease in the header, no data parts."""

    def __init__(self, delivery: ShmDelivery, key: str, header: Any, out: Any) -> None:
        self.delivery = delivery
        self.key = key
        self.header = header
        self.out = out
        self.lease = int(header.lease.id)
        self.pid = os.getpid()
        delivery.keeper.track(self.lease, int(header.lease.ttl_ms))
        self.pending = True  # the lease is ours until a view takes it over

    def __del__(self) -> None:
        if getattr(self, "pending", False):
            self.delivery.keeper.drop(self.lease, self.pid)

    def add(self, data: bytes) -> None:
        if data:
            raise ChunkdError(
                f"get {self.key!r}: the server sent bytes with a shared-memory handle",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )

    def finish(self) -> memoryview:
        h = self.header
        if h.shm.length != h.length:
            raise ChunkdError(
                f"get {self.key!r}: the handle holds {h.shm.length} bytes, the header says "
                f"{h.length}",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )
        try:
            holder = self.delivery.view(h.shm, self.lease, self.pid)
        except (OSError, ValueError) as e:
            self.delivery.disable(f"{e}")
            raise ShmImportFailed(
                f"get {self.key!r}: cannot map the shared-memory handle ({e}); shared-memory "
                "delivery is off for this client from now on"
            ) from None
        self.pending = False  # the holder's finalizer returns the lease
        if self.out is None:
            return memoryview(holder)
        from chunkd._common import as_bytes_view

        view = as_bytes_view(self.out)
        if view.readonly:
            raise TypeError("get: out must be a writable buffer")
        if len(view) < len(holder):
            raise ValueError(
                f"get {self.key!r}: out holds {len(view)} bytes, the reply has {len(holder)}"
            )
        view = view[: len(holder)]
        view[:] = memoryview(holder)
        return view  # the holder (and its lease) goes when this returns


class ShmDelivery:
    """What a client with ``delivery="shm"`` adds to its Gets: the accepted deliveries and its
    identity on requests, the receiver of handles, the lease keeper."""

    def __init__(
        self,
        shm_dir: str = DEFAULT_SHM_DIR,
        *,
        channel_factory: Callable[[], grpc.Channel],
        name: str = "",
    ) -> None:
        try:
            import numpy
        except ImportError as e:  # pragma: no cover - numpy comes with chunkd[zarr]
            raise ImportError(
                "chunkd: delivery='shm' needs numpy (pip install numpy, or chunkd[zarr])"
            ) from e
        self._np = numpy
        self.shm_dir = os.fspath(shm_dir)
        self.identity = client_identity(self.shm_dir)
        self.keeper = LeaseKeeper(channel_factory, name)
        self.disabled: str | None = None
        # The owning client may be dropped without close(): its keeper winds down then too.
        weakref.finalize(self, self.keeper.close)

    @classmethod
    def create(
        cls,
        delivery: str,
        shm_dir: str,
        target: str,
        options: list[tuple[str, Any]],
        channel_factory: Callable[[], grpc.Channel] | None = None,
    ) -> ShmDelivery | None:
        """None for ``delivery="inline"``. ``channel_factory`` makes the (blocking) channel the
        lease keeper talks over; by default an insecure channel to ``target`` with ``options``
        (a client with credentials passes a factory that uses them)."""
        if check_delivery(delivery) == "inline":
            return None
        if channel_factory is None:
            channel_factory = functools.partial(
                grpc.insecure_channel, target, options=list(options)
            )
        return cls(shm_dir, channel_factory=channel_factory, name=target)

    def request(self, request: Any) -> Any:
        """The GetRequest (or GetManyRequest) to send: ``request`` (inline only) with shared
        memory accepted and this process's identity, unless mapping failed before."""
        if self.disabled is not None:
            return request
        shm_request = type(request)()
        shm_request.CopyFrom(request)
        del shm_request.accept[:]
        shm_request.accept.extend(ACCEPT_SHM)
        shm_request.client.CopyFrom(self.identity)
        return shm_request

    def receivers(self) -> dict[int, Any]:
        """The receivers by delivery for ``chunkd._common.GetAssembler``."""
        from chunkd import _common

        return {**_common.RECEIVERS, pb.DELIVERY_SHM: functools.partial(ShmReceiver, self)}

    def view(self, shm: Any, lease: int, pid: int) -> Any:
        """The holder of a chunk: a read-only uint8 array over the mapping whose finalizer
        returns ``lease``."""
        if shm.offset > shm.segment_size or shm.length > shm.segment_size - shm.offset:
            raise ValueError(
                f"chunk [{shm.offset}, +{shm.length}) lies outside segment {shm.segment} "
                f"({shm.segment_size} bytes)"
            )
        mm = map_segment(self.shm_dir, shm.segment, int(shm.segment_size))
        holder = self._np.frombuffer(
            mm, dtype=self._np.uint8, count=int(shm.length), offset=int(shm.offset)
        )
        finalizer = weakref.finalize(holder, self.keeper.drop, lease, pid)
        finalizer.atexit = False  # at exit, _release_at_exit returns every lease in one call
        return holder

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            log.warning(
                "chunkd: shared-memory delivery from %s is off: %s (values arrive inline)",
                self.shm_dir,
                reason,
            )
        self.disabled = reason

    def close(self) -> None:
        self.keeper.close()

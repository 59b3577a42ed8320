"""CUDA IPC delivery, the client side (``ChunkdStore`` reading into GPU buffers).

When CuPy and a CUDA device are present, a read for a GPU destination (zarr's
``zarr.core.buffer.gpu.buffer_prototype``) asks for ``accept=[DELIVERY_CUDA_IPC,
DELIVERY_INLINE]`` with the UUID of the current CuPy device. A server on this host whose device
tier holds that GPU (``chunkd --device_cache_bytes``) answers with a CUDA IPC handle of one of
its device segments, an offset, a length and a lease: the chunk is already in GPU memory, and
the reply becomes a ``cupy.ndarray`` over it without a copy. Anyone else gets inline bytes,
which zarr copies to the device as before.

Handles. CUDA lets a process open an IPC handle once at a time, so each (segment, GPU) is opened
once per process and reference-counted (:func:`_open`): the first chunk of a segment opens it,
the last one to go closes it.

Lifetimes. Each chunk's array sits on ``cupy.cuda.UnownedMemory`` whose *owner* is a
:class:`_DeviceChunk`; every view CuPy or zarr makes of the array keeps the owner alive, and its
finalizer hands the lease to the client's lease keeper (the one of shared-memory delivery,
:class:`chunkd._shm.LeaseKeeper`) and drops the segment's reference.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from chunkd import _shm
from chunkd._stubs import pb
from chunkd.errors import ChunkdError

log = logging.getLogger("chunkd")

ACCEPT_CUDA = (pb.DELIVERY_CUDA_IPC, pb.DELIVERY_INLINE)
_IPC_LAZY_ENABLE_PEER_ACCESS = 1

_uuids: list[bytes] | None = None
_probed = False
_probe_lock = threading.Lock()


def device_uuids() -> list[bytes] | None:
    """The 16-byte UUIDs of this process's CUDA devices by ordinal, or None without CuPy or a
    device (then every read is inline). Probed once."""
    global _uuids, _probed
    with _probe_lock:
        if not _probed:
            _probed = True
            try:
                import cupy

                n = cupy.cuda.runtime.getDeviceCount()
                uuids = [bytes(cupy.cuda.runtime.getDeviceProperties(i)["uuid"]) for i in range(n)]
                _uuids = uuids if uuids and all(len(u) == 16 for u in uuids) else None
            except Exception as e:  # noqa: BLE001 - no CuPy, no driver, no device: inline
                log.debug("chunkd: no CUDA IPC delivery: %s", e)
                _uuids = None
        return _uuids


def current_device() -> int | None:
    """The ordinal of CuPy's current device, or None when CUDA IPC delivery is not possible."""
    if device_uuids() is None:
        return None
    import cupy

    return int(cupy.cuda.Device().id)


# ----------------------------------------------------------------------------------------------
# Opened handles: one per (segment, GPU) per process


_opened: dict[tuple[str, bytes], list[Any]] = {}  # key -> [pointer, device, handle, refs]
_opened_lock = threading.Lock()


def _open(segment: str, uuid: bytes, handle: bytes, device: int) -> int:
    import cupy

    key = (segment, uuid)
    # Opened under the lock: a second open of one handle in one process is an error in CUDA.
    with _opened_lock:
        entry = _opened.get(key)
        if entry is not None and entry[2] != handle:
            raise OSError(f"segment {segment} came with another IPC handle than before")
        if entry is None:
            with cupy.cuda.Device(device):
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle, _IPC_LAZY_ENABLE_PEER_ACCESS)
            entry = _opened[key] = [ptr, device, handle, 0]
        entry[3] += 1
        return entry[0]


def _close(key: tuple[str, bytes], pid: int) -> None:
    if pid != os.getpid():
        return
    with _opened_lock:
        entry = _opened.get(key)
        if entry is None:
            return
        entry[3] -= 1
        if entry[3] > 0:
            return
        del _opened[key]
    try:
        import cupy

        with cupy.cuda.Device(entry[1]):
            cupy.cuda.runtime.ipcCloseMemHandle(entry[0])
    except Exception as e:  # noqa: BLE001 - at exit CUDA may be gone already
        log.debug("chunkd: closing the IPC handle of %s failed: %s", key[0], e)


def open_handles() -> int:
    with _opened_lock:
        return len(_opened)


class _DeviceChunk:
    """The owner of a chunk's device memory: holds the lease and the segment's reference."""

    __slots__ = ("__weakref__",)


# ----------------------------------------------------------------------------------------------
# The client's side of a Get


class CudaImportFailed(_shm.ShmImportFailed):
    """The client could not open a handle (containers without a shared PID/IPC namespace, say):
    an UNAVAILABLE error, so the call is retried, inline, and CUDA IPC is off for the client."""


class CudaReceiver:
    """The receiver (see ``chunkd._common.GetAssembler``) of a DELIVERY_CUDA_IPC reply."""

    def __init__(self, delivery: CudaDelivery, key: str, header: Any, out: Any) -> None:
        self.delivery = delivery
        self.key = key
        self.header = header
        self.lease = int(header.lease.id)
        self.pid = os.getpid()
        delivery.keeper.track(self.lease, int(header.lease.ttl_ms))
        self.pending = True

    def __del__(self) -> None:
        if getattr(self, "pending", False):
            self.delivery.keeper.drop(self.lease, self.pid)

    def add(self, data: bytes) -> None:
        if data:
            raise ChunkdError(
                f"get {self.key!r}: the server sent bytes with a CUDA IPC handle",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )

    def finish(self) -> Any:
        import cupy

        h = self.header.cuda
        uuids = device_uuids() or []
        uuid = bytes(h.device_uuid)
        if uuid not in uuids or len(h.ipc_handle) != 64 or h.length != self.header.length:
            raise ChunkdError(
                f"get {self.key!r}: malformed CUDA IPC reply, or a GPU this process does not see",
                code=grpc.StatusCode.DATA_LOSS,
                key=self.key,
            )
        device = uuids.index(uuid)
        try:
            base = _open(h.segment, uuid, bytes(h.ipc_handle), device)
        except Exception as e:  # noqa: BLE001 - CUDA's errors, OSError
            self.delivery.disable(f"{e}")
            raise CudaImportFailed(
                f"get {self.key!r}: cannot open the CUDA IPC handle ({e}); CUDA IPC delivery is "
                "off for this client from now on"
            ) from None
        owner = _DeviceChunk()
        finalizer = weakref.finalize(owner, _release, self.delivery.keeper, self.lease, self.pid,
                                     (h.segment, uuid))
        finalizer.atexit = False  # at exit, the keeper returns every lease in one call
        self.pending = False
        memory = cupy.cuda.UnownedMemory(base + int(h.offset), int(h.length), owner, device)
        return cupy.ndarray((int(h.length),), dtype=cupy.uint8,
                            memptr=cupy.cuda.MemoryPointer(memory, 0))


def _release(keeper: _shm.LeaseKeeper, lease: int, pid: int, key: tuple[str, bytes]) -> None:
    keeper.drop(lease, pid)
    _close(key, pid)


class CudaDelivery:
    """What a client adds to Gets for GPU destinations: accepted deliveries, the GPU's UUID and
    the client's identity on requests, the receiver of handles, the lease keeper."""

    def __init__(self, *, channel_factory: Callable[[], grpc.Channel], name: str = "") -> None:
        self.identity = _shm.client_identity(_shm.DEFAULT_SHM_DIR)
        self.identity.gpu_uuids.extend(device_uuids() or [])
        self.keeper = _shm.LeaseKeeper(channel_factory, name)
        self.disabled: str | None = None
        weakref.finalize(self, self.keeper.close)

    @classmethod
    def create(
        cls,
        target: str,
        options: list[tuple[str, Any]],
        channel_factory: Callable[[], grpc.Channel] | None = None,
    ) -> CudaDelivery | None:
        """None where CUDA IPC delivery is impossible (no CuPy, no device). ``channel_factory``
        makes the lease keeper's channel: the client's own (TLS, bearer token), so that its
        Release and Renew calls pass the server's checks; plaintext without one."""
        if device_uuids() is None:
            return None
        if channel_factory is None:
            channel_factory = functools.partial(grpc.insecure_channel, target, options=list(options))
        return cls(channel_factory=channel_factory, name=target)

    def request(self, request: Any, device: int) -> Any:
        """The GetRequest to send for a chunk wanted on ``device`` (a CuPy device ordinal)."""
        uuids = device_uuids()
        if self.disabled is not None or not uuids or not 0 <= device < len(uuids):
            return request
        cuda_request = pb.GetRequest()
        cuda_request.CopyFrom(request)
        del cuda_request.accept[:]
        cuda_request.accept.extend(ACCEPT_CUDA)
        cuda_request.client.CopyFrom(self.identity)
        cuda_request.gpu_uuid = uuids[device]
        return cuda_request

    def receivers(self) -> dict[int, Any]:
        from chunkd import _common

        return {**_common.RECEIVERS, pb.DELIVERY_CUDA_IPC: functools.partial(CudaReceiver, self)}

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            log.warning("chunkd: CUDA IPC delivery is off: %s (values arrive inline)", reason)
        self.disabled = reason

    def close(self) -> None:
        self.keeper.close()


def _after_fork_in_child() -> None:
    # CUDA state does not survive fork; a child opens handles afresh (and owns none).
    global _opened_lock
    _opened_lock = threading.Lock()
    _opened.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

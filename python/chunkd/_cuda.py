"""CUDA IPC delivery, the Python side (``ChunkdStore`` reading into GPU buffers).

The C++ client does the work (client/cuda_import.h): it asks for ``DELIVERY_CUDA_IPC`` with the
GPU's UUID, opens each device segment's IPC handle once per process and hands out the chunk as
a ``chunkd._native.DeviceValue`` (``__cuda_array_interface__``) that holds the chunk's lease.
Here: whether CUDA IPC can be asked for (CuPy and a device present), and the CuPy array over a
DeviceValue, which keeps it (and so the lease) alive as its memory's owner.
"""

from __future__ import annotations

import logging
from typing import Any

from chunkd._common import _native

log = logging.getLogger("chunkd")

_possible: dict[int, bool] = {}


def possible(device: int) -> bool:
    """Whether a read can ask for CUDA IPC delivery onto this process's device ``device``."""
    ok = _possible.get(device)
    if ok is None:
        try:
            import cupy  # noqa: F401 - the arrays handed out are CuPy's
        except ImportError:
            ok = False
        else:
            ok = bool(_native.cuda_delivery_possible(int(device)))
        _possible[device] = ok
    return ok


def current_device() -> int | None:
    """The ordinal of CuPy's current device, or None when CUDA IPC delivery is not possible."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        device = int(cupy.cuda.Device().id)
    except Exception as e:  # noqa: BLE001 - no driver or no device: inline
        log.debug("chunkd: no CUDA IPC delivery: %s", e)
        return None
    return device if possible(device) else None


def as_cupy(value: Any) -> Any:
    """A ``cupy.ndarray`` of uint8 over a DeviceValue's GPU memory, without a copy."""
    import cupy

    return cupy.asarray(value)

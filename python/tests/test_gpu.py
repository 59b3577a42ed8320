"""GPU buffers (zarr.buffer.gpu, CuPy): values read into device memory through ChunkdStore.

Skipped where CuPy or a CUDA device is missing. Delivery is inline today (the bytes arrive in
host memory and are copied to the device); the zero-copy CUDA IPC delivery comes later.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu
from zarr.testing.utils import gpu_test, has_cupy

from chunkd.zarr import ChunkdStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_cupy(), reason="CuPy is not installed or no CUDA device exists"),
]


@gpu_test
async def test_get_into_device_buffers(server, prefix):
    import cupy as cp
    from zarr.core.buffer import gpu

    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    await store.set("c/0", cpu.Buffer.from_bytes(data))
    proto = gpu.buffer_prototype
    for rng, want in [
        (None, data),
        (RangeByteRequest(5, 1 << 20), data[5 : 1 << 20]),
        (OffsetByteRequest(2 << 20), data[2 << 20 :]),
        (SuffixByteRequest(100), data[-100:]),
    ]:
        buf = await store.get("c/0", prototype=proto, byte_range=rng)
        assert isinstance(buf, gpu.Buffer)
        assert isinstance(buf.as_array_like(), cp.ndarray)
        assert cp.asnumpy(buf.as_array_like()).tobytes() == want
    parts = await store.get_partial_values(proto, [("c/0", RangeByteRequest(0, 4)), ("x", None)])
    assert isinstance(parts[0], gpu.Buffer) and parts[1] is None


@gpu_test
async def test_set_from_device_buffer(server, prefix):
    import cupy as cp
    from zarr.core.buffer import gpu

    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    device = cp.arange(1000, dtype=cp.uint8)
    await store.set("k", gpu.Buffer.from_array_like(device))
    got = await store.get("k", prototype=cpu.buffer_prototype)
    assert got.to_bytes() == cp.asnumpy(device).tobytes()


@gpu_test
def test_zarr_array_on_the_gpu(server, prefix):
    import cupy as cp

    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    data = np.arange(64 * 64, dtype="float32").reshape(64, 64)
    zarr.create_array(store, name="a", shape=data.shape, chunks=(16, 16), dtype="f4")[:] = data
    with zarr.config.enable_gpu():
        array = zarr.open_array(store, path="a", mode="r")
        block = array[8:40, 3:50]
        assert isinstance(block, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(block), data[8:40, 3:50])

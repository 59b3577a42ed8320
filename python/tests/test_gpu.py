"""GPU buffers (zarr.buffer.gpu, CuPy): values read into device memory through ChunkdStore.

Skipped where CuPy or a CUDA device is missing. Against a server without a device tier the
bytes arrive inline and are copied to the device; against one with a device tier
(``--device_cache_bytes``, the ``gpu_server`` fixture) they arrive by CUDA IPC: the buffer views
the server's GPU memory, without a copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import cpu
from zarr.testing.utils import gpu_test, has_cupy

from chunkd import Client
from chunkd._common import _native
from chunkd.zarr import ChunkdStore
from chunkd_testing import start_server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_cupy(), reason="CuPy is not installed or no CUDA device exists"),
]


@gpu_test
async def test_get_into_device_buffers(server, prefix):
    import cupy as cp
    from zarr.buffer import gpu

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
    from zarr.buffer import gpu

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


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    """A memory:// server with a device tier on GPU 0 (CUDA IPC delivery)."""
    workdir = tmp_path_factory.mktemp("gpu-server")
    server = start_server(workdir, "memory://", "127.0.0.1:0", "--device_cache_bytes=256MiB",
                          "--device_segment_bytes=64MiB")
    yield server
    assert server.stop() == 0, server.log()


@gpu_test
async def test_cuda_ipc_reads_chunks_in_place(gpu_server, prefix):
    import gc

    import cupy as cp
    from zarr.buffer import gpu

    info = Client(gpu_server.address).server_info()
    assert "DELIVERY_CUDA_IPC" in info.deliveries, gpu_server.log()
    store = ChunkdStore(f"chunkd://{gpu_server.address}/{prefix}")
    data = np.random.default_rng(1).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    await store.set("c/0", cpu.Buffer.from_bytes(data))
    before = Client(gpu_server.address).server_info().counters
    buf = await store.get("c/0", prototype=gpu.buffer_prototype)
    part = await store.get("c/0", prototype=gpu.buffer_prototype,
                           byte_range=RangeByteRequest(100, 200000))
    assert isinstance(buf, gpu.Buffer)
    assert isinstance(buf.as_array_like(), cp.ndarray)
    assert cp.asnumpy(buf.as_array_like()).tobytes() == data
    assert cp.asnumpy(part.as_array_like()).tobytes() == data[100:200000]
    after = Client(gpu_server.address).server_info()
    assert after.counters["gets_cuda"] - before.get("gets_cuda", 0) == 2
    assert after.counters.get("bytes_served_inline", 0) == before.get("bytes_served_inline", 0)
    assert after.leases_active == 2
    assert _native.cuda_open_handles() == 1  # one segment, opened once for both chunks
    # Dropping the buffers returns the leases and closes the handle.
    del buf, part
    gc.collect()
    assert store.flush_releases()
    assert _native.cuda_open_handles() == 0
    assert Client(gpu_server.address).server_info().leases_active == 0


@gpu_test
async def test_without_a_device_tier_gpu_reads_are_inline(server, prefix):
    from zarr.buffer import gpu

    store = ChunkdStore(f"chunkd://{server.address}/{prefix}")
    await store.set("k", cpu.Buffer.from_bytes(b"inline bytes"))
    buf = await store.get("k", prototype=gpu.buffer_prototype)
    assert buf.to_bytes() == b"inline bytes"
    counters = Client(server.address).server_info().counters
    assert counters.get("gets_cuda", 0) == 0
    assert counters["cuda_fallbacks"] >= 1

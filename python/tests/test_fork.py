"""Workers that fork: an array opened in the parent (through ChunkdStore, a chunkd:// URL, or a
plain Client) is read by a pool of 4 workers made with the "fork" start method, the default of
multiprocessing and of PyTorch's DataLoader on Linux. The workers inherit the objects (they are
not pickled): each makes its own connection on its first call."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import zarr

import chunkd
from chunkd.zarr import ChunkdStore

SHAPE = (64, 32)
CHUNKS = (8, 32)
WORKERS = 4


class ArrayDataset:
    """What a PyTorch Dataset usually is: the array is opened in __init__, in the parent, and
    __getitem__ runs in the forked workers."""

    def __init__(self, store_or_url, *, path: str | None = None) -> None:
        self.array = zarr.open_array(store_or_url, path=path, mode="r")
        self.first = self.array[0]  # the parent has read through it: its gRPC has started

    def __len__(self) -> int:
        return self.array.shape[0] // CHUNKS[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[i * CHUNKS[0] : (i + 1) * CHUNKS[0]]


_DATASET: ArrayDataset | None = None  # inherited by the forked workers, never pickled


def _read(i: int):
    return os.getpid(), i, _DATASET[i]


def _expected() -> np.ndarray:
    return np.arange(SHAPE[0] * SHAPE[1], dtype="f8").reshape(SHAPE) * 0.5


def _read_with_fork_pool(dataset: ArrayDataset) -> None:
    global _DATASET
    _DATASET = dataset
    expected = _expected()
    try:
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            # Two rounds: a worker's second batch reuses the connection it made.
            results = pool.map(_read, list(range(len(dataset))) * 2, chunksize=1)
    finally:
        _DATASET = None
    got = np.empty_like(expected)
    for _, i, block in results:
        got[i * CHUNKS[0] : (i + 1) * CHUNKS[0]] = block
    np.testing.assert_array_equal(got, expected)
    assert os.getpid() not in {pid for pid, _, _ in results}
    # The parent's store still works after the fork.
    np.testing.assert_array_equal(dataset[1], expected[8:16])


@pytest.fixture
def written(server, prefix):
    url = f"chunkd://{server.address}/{prefix}"
    z = zarr.create_array(ChunkdStore(url), name="data", shape=SHAPE, chunks=CHUNKS, dtype="f8")
    z[:] = _expected()
    return url


@pytest.mark.timeout(180)
def test_fork_pool_reads_an_array_opened_through_chunkd_store(written):
    _read_with_fork_pool(ArrayDataset(ChunkdStore(written, read_only=True), path="data"))


@pytest.mark.timeout(180)
def test_fork_pool_reads_an_array_opened_through_a_url(written):
    _read_with_fork_pool(ArrayDataset(f"{written}/data"))


_CLIENT: chunkd.Client | None = None


def _get(key: str):
    value = bytes(_CLIENT.get(key))
    # A new client made in the child works too, and so does a write.
    with chunkd.Client(_CLIENT.address) as own:
        own.put(f"{key}-from-child", value)
    return value, type(_CLIENT._n).__name__


@pytest.mark.timeout(180)
def test_fork_pool_uses_a_client_made_before_the_fork(server, prefix):
    """By host name: resolving it needs gRPC's resolver threads, which a forked child does
    not have (the call hung there before the child's calls went through a helper)."""
    global _CLIENT
    _CLIENT = chunkd.Client(server.address.replace("127.0.0.1", "localhost"), timeout=30)
    keys = [f"{prefix}/k{i}" for i in range(16)]
    for key in keys:
        _CLIENT.put(key, key.encode())
    try:
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            results = pool.map(_get, keys, chunksize=1)
    finally:
        client, _CLIENT = _CLIENT, None
    assert [value for value, _ in results] == [k.encode() for k in keys]
    assert {kind for _, kind in results} == {"RelayNative"}
    assert client.get(keys[0]) == keys[0].encode()
    assert client.get(f"{keys[3]}-from-child") == keys[3].encode()
    assert type(client._n).__name__ == "Client"  # the parent's own, untouched
    client.close()


def _native_client_in_child(address: str) -> str:
    try:
        chunkd._common._native.Client(
            address, timeout=5.0, retries=0, delivery="inline", shm_dir="/dev/shm", tls_ca="",
            tls=False, tls_cert="", tls_key="", tls_server_name="", token="",
        )
    except RuntimeError as e:
        return str(e)
    return "made"


@pytest.mark.timeout(120)
def test_a_native_client_made_in_a_forked_child_is_refused_with_right_advice(server):
    chunkd.Client(server.address).stat("x")  # gRPC has started in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        message = pool.apply(_native_client_in_child, (server.address,))
    assert "forked from one that had started gRPC" in message
    assert "chunkd.Client, AsyncClient" in message and "spawn" not in message

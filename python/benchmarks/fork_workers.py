#!/usr/bin/env python3
"""What workers that fork pay: a pool of 4 reading a zarr array through ChunkdStore, started
with "fork" (the array opened in the parent and inherited: each worker's calls go through its
helper process, chunkd/_relay.py) beside "spawn" (the store pickled to each worker, which
connects directly), and one process alone.

    .venv/bin/python python/benchmarks/fork_workers.py [--repeat N]

A server of its own (chunkd.Server, memory store, TCP); the array: float32 64 x 512 x 512 in 64
chunks of 1 MiB, uncompressed. Each pool reads every chunk (one task per chunk) twice; the first
pass includes the workers' start (and the helpers' start), the second is the steady rate.
Prints medians of --repeat runs (default 3).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import zarr

import chunkd
from chunkd.zarr import ChunkdStore

SHAPE, CHUNKS = (64, 512, 512), (1, 512, 512)
WORKERS = 4
_ARRAY = None  # the parent's array, inherited by forked workers


def _init(store):
    global _ARRAY
    if store is not None:  # spawn: the pickled store, opened here
        _ARRAY = zarr.open_array(store, path="a", mode="r")


def _read(i: int) -> float:
    return float(_ARRAY[i].sum())


def _pool_pass(method: str, store) -> tuple[float, float]:
    global _ARRAY
    _ARRAY = zarr.open_array(store, path="a", mode="r")
    _ARRAY[0]  # the parent has read: its gRPC has started
    context = mp.get_context(method)
    t0 = time.perf_counter()
    with context.Pool(WORKERS, _init, (store if method == "spawn" else None,)) as pool:
        pool.map(_read, range(SHAPE[0]), chunksize=1)
        t1 = time.perf_counter()
        pool.map(_read, range(SHAPE[0]), chunksize=1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(np.prod(SHAPE)) * 4
    with chunkd.Server(store="memory://", listen="tcp", host_cache_bytes="512MiB") as server:
        store = ChunkdStore(server.url)
        z = zarr.create_array(store, name="a", shape=SHAPE, chunks=CHUNKS, dtype="f4")
        z[:] = np.random.default_rng(0).random(SHAPE, dtype="f4")
        reader = store.with_read_only(True)
        rows: dict[str, list[tuple[float, float]]] = {"fork": [], "spawn": [], "one": []}
        for _ in range(args.repeat):
            for method in ("fork", "spawn"):
                rows[method].append(_pool_pass(method, reader))
            a = zarr.open_array(reader, path="a", mode="r")
            t0 = time.perf_counter()
            for i in range(SHAPE[0]):
                a[i].sum()
            rows["one"].append((0.0, time.perf_counter() - t0))
    print(f"{WORKERS} workers, {SHAPE[0]} chunks of 1 MiB per pass, median of {args.repeat}:")
    print("| workers | first pass s (with start) | steady pass s | steady GB/s |")
    print("| --- | --: | --: | --: |")
    for name, label in (("fork", f"fork pool of {WORKERS} (relayed)"),
                        ("spawn", f"spawn pool of {WORKERS} (direct)"),
                        ("one", "one process, no pool")):
        first = statistics.median(r[0] for r in rows[name])
        steady = statistics.median(r[1] for r in rows[name])
        first_s = "" if name == "one" else f"{first:.2f}"
        print(f"| {label} | {first_s} | {steady:.3f} | {nbytes / steady / 1e9:.2f} |")


if __name__ == "__main__":
    main()

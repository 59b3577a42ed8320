#!/usr/bin/env python3
"""Reads a Zarr array of many small chunks through ChunkdStore with get batching on and off.

    .venv/bin/python python/benchmarks/read_small_chunks.py [--repeats 5] [--concurrency 10,64]

The array: float32, 2048 x 4096, chunks 32 x 64 (4096 chunks of 8 KiB, 32 MiB), no compressor,
written once through ChunkdStore to a fresh memory:// server (build/server/chunkd, or --binary)
listening on loopback TCP and a UNIX socket. zarr reads a selection's chunks from concurrent
tasks, ``async.concurrency`` of them in flight (zarr's default is 10), each calling
``store.get``: ``ChunkdStore(batch_gets=True)`` (the default) sends the gets of one loop
iteration as one GetMany call, ``batch_gets=False`` one Get each.

For each transport and zarr concurrency, the rounds alternate on/off (so that the machine's load
spreads over both); the table reports the median and best of --repeats whole-array reads
(``zarr.open_array(store)[:]``, checked equal to the array written), the server calls a read
made (ServerInfo counters: GetMany calls, and Gets as items minus GetMany items) and then the
latency of a lone ``await store.get(key)`` (--lone sequential gets of one 8 KiB chunk per store
in one event loop, alternating between the two stores get by get), on and off: batching must
not delay a get issued alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
import zarr.buffer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO_ROOT, ChunkdServer  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))

import chunkd  # noqa: E402
from chunkd.zarr import ChunkdStore  # noqa: E402

SHAPE = (2048, 4096)
CHUNKS = (32, 64)
DTYPE = "float32"
NCHUNKS = (SHAPE[0] // CHUNKS[0]) * (SHAPE[1] // CHUNKS[1])
CHUNK_BYTES = CHUNKS[0] * CHUNKS[1] * np.dtype(DTYPE).itemsize


def calls(client: chunkd.Client) -> tuple[int, int]:
    """(GetMany calls, items of all gets) so far."""
    counters = client.server_info().counters
    return counters["get_many_calls"], counters["gets"]


async def lone_gets(stores: dict[bool, ChunkdStore], key: str, n: int) -> dict[bool, list]:
    """n sequential gets of one key per store, alternating between the stores get by get (in
    either order), so that both see the same load; the first 10% are left out (warm-up)."""
    proto = zarr.buffer.default_buffer_prototype()
    samples: dict[bool, list[float]] = {on: [] for on in stores}
    for i in range(n):
        for on in (True, False) if i % 2 else (False, True):
            start = time.perf_counter()
            await stores[on].get(key, proto)
            samples[on].append(time.perf_counter() - start)
    return {on: sorted(s[n // 10 :]) for on, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", default="10,64", help="zarr async.concurrency values")
    parser.add_argument("--lone", type=int, default=2000, help="lone gets timed per store")
    parser.add_argument("--binary", type=Path, default=REPO_ROOT / "build" / "server" / "chunkd")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="chunkd-bench-"))
    server = ChunkdServer(args.binary, "memory://", workdir)
    load_before = os.getloadavg()
    rows = []
    lone_rows = []
    try:
        tcp_url = f"chunkd://{server.tcp}/bench"
        expected = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
        zarr.create_array(
            ChunkdStore(tcp_url), name="data", shape=SHAPE, chunks=CHUNKS, dtype=DTYPE,
            compressors=None, fill_value=0.0,
        )[:] = expected
        stores = {
            ("TCP", on): ChunkdStore(tcp_url, read_only=True, batch_gets=on)
            for on in (True, False)
        }
        stores |= {
            ("UNIX", on): ChunkdStore(
                f"chunkd+unix://{server.socket}", path="bench", read_only=True, batch_gets=on
            )
            for on in (True, False)
        }
        with chunkd.Client(server.tcp) as admin:
            for conc in concurrencies:
                for transport in ("TCP", "UNIX"):
                    times = {True: [], False: []}
                    made = {}
                    with zarr.config.set({"async.concurrency": conc}):
                        for on in (True, False):  # warm-up, checked
                            arr = zarr.open_array(stores[transport, on], path="data", mode="r")
                            if not np.array_equal(arr[:], expected):
                                raise SystemExit("the array read differs from the one written")
                        for _ in range(args.repeats):
                            for on in (True, False):
                                arr = zarr.open_array(stores[transport, on], path="data", mode="r")
                                many0, items0 = calls(admin)
                                start = time.perf_counter()
                                got = arr[:]
                                elapsed = time.perf_counter() - start
                                many1, items1 = calls(admin)
                                if not np.array_equal(got, expected):
                                    raise SystemExit("the array read differs")
                                times[on].append(elapsed)
                                made[on] = (many1 - many0, items1 - items0)
                    for on in (True, False):
                        med = statistics.median(times[on])
                        rows.append(
                            f"| {transport} | {conc} | {'on' if on else 'off'} | {med:.3f} | "
                            f"{min(times[on]):.3f} | {NCHUNKS / med:,.0f} | "
                            f"{made[on][0]} | {made[on][1]} |"
                        )
                        print(rows[-1], file=sys.stderr)
            for transport in ("TCP", "UNIX"):
                lone = asyncio.run(
                    lone_gets({on: stores[transport, on] for on in (True, False)},
                              "data/c/0/0", args.lone)
                )
                for on in (True, False):
                    s = lone[on]
                    lone_rows.append(
                        f"| {transport} | {'on' if on else 'off'} | "
                        f"{statistics.median(s) * 1e6:.0f} | {s[len(s) // 10] * 1e6:.0f} | "
                        f"{s[len(s) * 9 // 10] * 1e6:.0f} |"
                    )
                    print(lone_rows[-1], file=sys.stderr)
        load_after = os.getloadavg()
    except BaseException:
        server.stop()
        print(f"the server's log ({server.log_path}):\n{server.log_path.read_text()[-3000:]}",
              file=sys.stderr)
        raise
    else:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    lines = [
        f"Reading a {SHAPE[0]}x{SHAPE[1]} {DTYPE} Zarr array whole ({NCHUNKS} chunks of "
        f"{CHUNK_BYTES // 1024} KiB, no compressor) from a memory:// chunkd server through "
        f"ChunkdStore, get batching on/off; median of {args.repeats} reads, interleaved. "
        "Calls: one read's GetMany calls and its items (all gets, GetMany's and Get's).",
        "",
        "| transport | zarr concurrency | batch_gets | median s | best s | chunks/s | "
        "GetMany calls | gets |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"A lone `await store.get(key)` of one {CHUNK_BYTES // 1024} KiB chunk, {args.lone} "
        "sequential gets per store, alternating, the first 10% left out (µs):",
        "",
        "| transport | batch_gets | median | p10 | p90 |",
        "| --- | --- | ---: | ---: | ---: |",
        *lone_rows,
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min). "
        f"Python {platform.python_version()}, zarr {zarr.__version__}.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

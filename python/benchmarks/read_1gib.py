#!/usr/bin/env python3
"""Reads a 1 GiB Zarr array whole, through zarr's LocalStore and through chunkd, in one run.

    .venv/bin/python python/benchmarks/read_1gib.py [--data DIR] [--repeats 3] [--out FILE]

The array (written once to --data, default /tmp/chunkd-bench-1gib, and reused while its
parameters match): float32, shape 16384 x 16384 (exactly 1 GiB), chunks 1024 x 1024 (256 chunks
of 4 MiB), no compressor (zarr's default bytes codec only: the comparison is about moving
bytes, not decoding them). A real chunkd server (build/server/chunkd, or --binary) serves that
directory on a loopback TCP port and a UNIX socket, with a host cache large enough for all of it
(--host_cache_bytes=2GiB) and its shared-memory segments in a fresh directory under /dev/shm.

Paths, each read with ``zarr.open_array(store, mode="r")[:]`` (zarr's defaults: async
concurrency 10, one event loop thread):

* ``LocalStore``: zarr.storage.LocalStore on the directory (files in the page cache once warm);
* ``chunkd inline, TCP``: ChunkdStore over 127.0.0.1 (bytes in gRPC messages);
* ``chunkd inline, UNIX``: ChunkdStore over the UNIX socket;
* ``chunkd shm, UNIX``: ChunkdStore with delivery="shm" (handles over the UNIX socket, chunks
  read in place from the server's shared memory);
* ``chunkd shm, TCP``: the same over TCP (the handle, not the bytes, crosses the socket);
* and, for scale, ``numpy copy``: a fresh 1 GiB array filled from the one in memory
  (``np.copyto``), which every path above also does at least once (zarr copies each chunk into
  the array it returns).

Every path is read once to warm it (the first chunkd read also fills the server's cache from
the files), then the rounds run interleaved (every path, then every path again) so that the
machine's load spreads over all of them; the table reports the median of --repeats reads (and
the best). Every read is checked equal to the array written. The Markdown table goes to stdout
and to --out (default results/read_1gib-<timestamp>.md at the repository root; results/ is not
committed).
"""

from __future__ import annotations

import argparse
import gc
import json
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
from zarr.storage import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO_ROOT, ChunkdServer  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))

import chunkd  # noqa: E402
from chunkd.zarr import ChunkdStore  # noqa: E402

SHAPE = (16384, 16384)
CHUNKS = (1024, 1024)
DTYPE = "float32"
NBYTES = SHAPE[0] * SHAPE[1] * np.dtype(DTYPE).itemsize  # 1 GiB
PARAMS = {"shape": SHAPE, "chunks": CHUNKS, "dtype": DTYPE, "compressors": None, "seed": 1}


def expected_array() -> np.ndarray:
    # Cheap to make, different in every element and chunk, and not compressible to nothing.
    rng = np.random.default_rng(PARAMS["seed"])
    return rng.standard_normal(SHAPE, dtype=np.float32)


def ensure_data(directory: Path) -> np.ndarray:
    marker = directory / "bench-params.json"
    expected = expected_array()
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(PARAMS)):
        print(f"reusing the array in {directory}", file=sys.stderr)
        return expected
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(f"writing a 1 GiB array to {directory} ...", file=sys.stderr)
    array = zarr.create_array(
        LocalStore(directory), name="data", shape=SHAPE, chunks=CHUNKS, dtype=DTYPE,
        compressors=None, fill_value=0.0,
    )
    array[:] = expected
    marker.write_text(json.dumps(PARAMS))
    return expected


def read_all(store) -> np.ndarray:
    if isinstance(store, np.ndarray):  # the reference row: allocate and copy, nothing else
        out = np.empty_like(store)
        np.copyto(out, store)
        return out
    return zarr.open_array(store, path="data", mode="r")[:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/chunkd-bench-1gib"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--binary", type=Path, default=REPO_ROOT / "build" / "server" / "chunkd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    expected = ensure_data(args.data)
    workdir = Path(tempfile.mkdtemp(prefix="chunkd-bench-"))
    shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-bench-", dir="/dev/shm"))
    server = ChunkdServer(args.binary, args.data, workdir, "--host_cache_bytes=2GiB",
                          f"--shm_dir={shm_dir}", "--fsync=false")
    load_before = os.getloadavg()
    try:
        unix = f"chunkd+unix://{server.socket}"
        tcp = f"chunkd://{server.tcp}"
        paths = {
            "zarr LocalStore (directory)": LocalStore(args.data, read_only=True),
            "ChunkdStore inline, TCP": ChunkdStore(tcp, read_only=True),
            "ChunkdStore inline, UNIX socket": ChunkdStore(unix, read_only=True),
            "ChunkdStore shm, UNIX socket": ChunkdStore(
                unix, read_only=True, delivery="shm", shm_dir=str(shm_dir)
            ),
            "ChunkdStore shm, TCP": ChunkdStore(
                tcp, read_only=True, delivery="shm", shm_dir=str(shm_dir)
            ),
            "(reference: numpy copy of the array in memory)": expected,
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for name, store in paths.items():  # warm-up, checked too
            got = read_all(store)
            if not np.array_equal(got, expected):
                raise SystemExit(f"{name}: the array read differs from the one written")
            del got
            print(f"warmed: {name}", file=sys.stderr)
        for round_ in range(args.repeats):
            for name, store in paths.items():
                gc.collect()
                start = time.perf_counter()
                got = read_all(store)
                elapsed = time.perf_counter() - start
                equal = np.array_equal(got, expected)
                del got
                if not equal:
                    raise SystemExit(f"{name}: the array read differs from the one written")
                times[name].append(elapsed)
                print(f"round {round_ + 1}: {name}: {elapsed:.3f} s", file=sys.stderr)
        with chunkd.Client(server.tcp) as client:
            for store in paths.values():
                if isinstance(store, ChunkdStore):
                    gc.collect()
                    store.flush_releases()
            info = client.server_info()
        load_after = os.getloadavg()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)

    lines = [
        f"Reading a 1 GiB Zarr array whole ({DTYPE}, {SHAPE[0]}x{SHAPE[1]}, 256 chunks of 4 MiB, "
        "no compressor), warm, median of "
        f"{args.repeats} reads per path, interleaved; GB/s = 10^9 bytes/s.",
        "",
        "| path | median s | median GB/s | best GB/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(
            f"| {name} | {median:.3f} | {NBYTES / median / 1e9:.2f} | "
            f"{NBYTES / min(samples) / 1e9:.2f} |"
        )
    counters = info.counters
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min). "
        f"Python {platform.python_version()}, zarr {zarr.__version__}, numpy {np.__version__}, "
        f"zarr async concurrency {zarr.config.get('async.concurrency')}.",
        f"Server: chunkd --host_cache_bytes=2GiB, shm segments in /dev/shm; after the run: "
        f"{counters.get('gets_shm', 0)} shm gets ({counters.get('shm_fallbacks', 0)} fell back "
        f"to inline), {info.leases_active} leases active.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or REPO_ROOT / "results" / f"read_1gib-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

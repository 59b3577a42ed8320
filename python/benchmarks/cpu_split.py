"""Where the CPU of a whole-array Zarr read goes: the reading process and the server, per store.

The profile behind the targets compare.py cannot hold on a 2-core machine: for each store, the
wall time of reading the 64 x 1 MiB float32 array (uncompressed, warm) and the CPU seconds the
reader and the server (chunkd, or nginx's workers) spent on it, per GiB read. A store whose
reader plus server needs more CPU per byte than the cores give it is bound by the machine, not
by waiting.

    .venv/bin/python python/benchmarks/cpu_split.py [--reads 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from obstore.store import HTTPStore
from zarr.storage import LocalStore, MemoryStore, ObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from chunkd.zarr import ChunkdStore  # noqa: E402

GiB = 1 << 30


def server_cpu(pids: list[int]) -> float:
    return sum(benchlib.process_cpu_seconds(p) or 0.0 for p in pids)


def nginx_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [master, *kids]


def measure(name: str, store, reads: int, pids: list[int]) -> dict:
    array = zarr.open_array(store, path="a", mode="r")
    array[...]  # warm
    c0, s0, t0 = time.process_time(), server_cpu(pids), time.perf_counter()
    for _ in range(reads):
        array[...]
    wall = time.perf_counter() - t0
    gib = reads * array.nbytes / GiB
    return {
        "store": name,
        "GB/s": reads * array.nbytes / wall / 1e9,
        "reader CPU s/GiB": (time.process_time() - c0) / gib,
        "server CPU s/GiB": (server_cpu(pids) - s0) / gib,
        "wall s/GiB": wall / gib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=20)
    args = parser.parse_args()
    binary = benchlib.REPO_ROOT / "build" / "server" / "chunkd"
    with tempfile.TemporaryDirectory(prefix="chunkd-cpu-") as tmp:
        root = Path(tmp) / "data"
        data = np.random.default_rng(0).random((256, 256, 256), dtype=np.float32)
        zarr.create_array(LocalStore(root), name="a", shape=data.shape, chunks=(64, 64, 64),
                          dtype="float32", compressors=None)[...] = data
        memory = MemoryStore()
        zarr.create_array(memory, name="a", shape=data.shape, chunks=(64, 64, 64),
                          dtype="float32", compressors=None)[...] = data
        rows = []
        with benchlib.ChunkdServer(binary, root, Path(tmp) / "chunkd") as server, \
                benchlib.NginxServer(root, Path(tmp) / "nginx") as nginx:
            stores = [
                ("MemoryStore", memory, []),
                ("LocalStore", LocalStore(root, read_only=True), []),
                ("ChunkdStore shm", ChunkdStore(server.unix, read_only=True, delivery="shm"),
                 [server.pid]),
                ("ChunkdStore inline UNIX", ChunkdStore(server.unix, read_only=True), [server.pid]),
                ("ChunkdStore inline TCP", ChunkdStore(server.tcp, read_only=True), [server.pid]),
                ("nginx + obstore HTTPStore",
                 ObjectStore(HTTPStore.from_url(nginx.url, client_options={"allow_http": True}),
                             read_only=True),
                 nginx_pids(nginx.pid)),
            ]
            for name, store, pids in stores:
                rows.append(measure(name, store, args.reads, pids))
        cols = list(rows[0])
        print(f"{os.cpu_count()} cores; {args.reads} reads of 64 MiB each, warm, one process\n")
        print("| " + " | ".join(cols) + " |")
        print("|---" + "|--:" * (len(cols) - 1) + "|")
        for r in rows:
            print("| " + " | ".join([r["store"]] + [f"{r[c]:.3f}" for c in cols[1:]]) + " |")


if __name__ == "__main__":
    main()

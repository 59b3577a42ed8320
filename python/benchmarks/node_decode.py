#!/usr/bin/env python3
"""Decoded once per node (issue 21): zarr reads of compressed arrays through zarr's stores,
ChunkdStore, and ChunkdStore with chunkd.zarr.NodeCodecPipeline, in one run.

    .venv/bin/python python/benchmarks/node_decode.py [--quick] [--repeat N] [--procs N]
                                                      [--out DIR] [--no-build]

float32 256 x 256 x 256 in chunks of 64^3 (64 chunks of 1 MiB, compare.py's array), zstd
(zarr's ``ZstdCodec()``) and blosc (zarr's ``BloscCodec()``: zstd, shuffle), warm, read whole
(``zarr.open_array(store, path=..., mode="r")[...]``) by 1 process and by --procs processes (a
spawn pool, each process reading a chunk-aligned 1/N of the array, as compare.py does) through:
zarr's MemoryStore (the encoded chunks in a dict), LocalStore (the directory, page cache),
ChunkdStore with shared memory, and ChunkdStore with shared memory and the node pipeline
(``codec_pipeline.path = "chunkd.zarr.NodeCodecPipeline"``). Rows are interleaved (every store
once, then every store again, starting each repetition with another), and the tables give the
medians of --repeat repetitions (5; 1 with --quick). Every sample's array is compared with the
one written.

The server's counters of derived entries (published productions, hits), read before the first
read and after the last, say how many times each chunk was decoded on the node across all
processes and repetitions; the memory table sets what the derived tier holds against what the
encoded values take. Results: results.md (printed), results.jsonl, env.json in --out (default
results/<timestamp>/ at the repository root). The machine's other load shows in the report's
load averages: the figures of a shared machine swing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import compare  # noqa: E402
from benchlib import REPO_ROOT, log  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))

SHAPE, CHUNKS, DTYPE = compare.SHAPE, compare.CHUNKS, compare.DTYPE
ARRAY_BYTES = compare.ARRAY_BYTES
CHUNK_COUNT = int(np.prod([s // c for s, c in zip(SHAPE, CHUNKS)]))
CODECS = ("zstd", "blosc")
NODE = "chunkd.zarr.NodeCodecPipeline"
STORES = (
    ("memory", "zarr MemoryStore (encoded chunks in a dict)"),
    ("local", "zarr LocalStore (page cache)"),
    ("chunkd-shm", "ChunkdStore, shared memory"),
    ("chunkd-node", "ChunkdStore, shared memory + NodeCodecPipeline"),
)
STORE_NAMES = dict(STORES)
# The server's counters of derived entries (server/services/server_counters.cc).
PUBLISHED, HITS = "derived_published", "derived_hits"


def plan(quick: bool) -> dict:
    return {"repeat": 1, "reads": 1} if quick else {"repeat": 5, "reads": 3}


def write_arrays(data: Path) -> dict:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec
    from zarr.storage import LocalStore

    expected = compare.make_array()
    store = LocalStore(data)
    for codec in CODECS:
        compressor = ZstdCodec() if codec == "zstd" else BloscCodec()
        array = zarr.create_array(store, name=codec, shape=SHAPE, chunks=CHUNKS, dtype=DTYPE,
                                  fill_value=0.0, compressors=compressor)
        array[:] = expected
    return {codec: sum(f.stat().st_size for f in (data / codec / "c").rglob("*") if f.is_file())
            for codec in CODECS}


def open_store(kind: str, setup: dict):
    from zarr.buffer import default_buffer_prototype
    from zarr.storage import LocalStore, MemoryStore

    from chunkd.zarr import ChunkdStore

    data = Path(setup["data"])
    if kind == "memory":
        buffer = default_buffer_prototype().buffer
        return MemoryStore({str(f.relative_to(data)): buffer.from_bytes(f.read_bytes())
                            for codec in CODECS for f in (data / codec).rglob("*") if f.is_file()},
                           read_only=True)
    if kind == "local":
        return LocalStore(data, read_only=True)
    return ChunkdStore(f"chunkd+unix://{setup['socket']}", read_only=True, delivery="shm",
                       shm_dir=setup["shm_dir"], decoded_cache=kind == "chunkd-node")


def worker(index: int, procs: int, conn, barrier, setup: dict) -> None:
    """Reads slab `index` of `procs` on command, as compare.zarr_worker does."""
    import zarr

    default = zarr.config.get("codec_pipeline.path")
    region = compare.slab(index, procs)
    expected = compare.make_array()[region].copy()
    stores: dict[str, object] = {}

    def read(kind: str, codec: str) -> np.ndarray:
        if kind not in stores:
            stores[kind] = open_store(kind, setup)
        pipeline = NODE if kind == "chunkd-node" else default
        with zarr.config.set({"codec_pipeline.path": pipeline}):
            array = zarr.open_array(stores[kind], path=codec, mode="r")
        return array[region]

    while True:
        command = conn.recv()
        if command is None:
            break
        op, kind, codec, *rest = command
        try:
            if op == "warm":
                ok = np.array_equal(read(kind, codec), expected)
                conn.send({"error": None if ok else "the array read differs from the one written"})
                continue
            barrier.wait(timeout=300)
            start = time.perf_counter()
            for _ in range(rest[0]):
                got = read(kind, codec)
            end = time.perf_counter()
            ok = np.array_equal(got, expected)
            del got
            conn.send({"start": start, "end": end,
                       "error": None if ok else "the array read differs from the one written"})
        except BaseException as e:  # noqa: BLE001 - the row says why
            if op == "time":
                barrier.abort()
            conn.send({"error": f"{type(e).__name__}: {e}"})


class Pool(compare.Pool):
    def __init__(self, procs: int, setup: dict) -> None:
        ctx = mp.get_context("spawn")
        self.procs, self.setup = procs, setup
        self.barrier = ctx.Barrier(procs)
        self.conns, self.workers = [], []
        for i in range(procs):
            here, there = ctx.Pipe()
            w = ctx.Process(target=worker, args=(i, procs, there, self.barrier, setup),
                            daemon=True)
            w.start()
            self.conns.append(here)
            self.workers.append(w)


def derived_state(admin) -> dict:
    info = admin.server_info()
    tiers = {t.tier: t for t in info.tiers}
    state = {"published": info.counters.get(PUBLISHED), "hits": info.counters.get(HITS)}
    for name, tier in tiers.items():
        state[f"{name}_used_bytes"] = tier.used_bytes
        state[f"{name}_capacity_bytes"] = tier.capacity_bytes
        state[f"{name}_entries"] = tier.entries
    return state


def measure(p: dict, procs_list: list[int], setup: dict, admin, rows: list, env: dict) -> None:
    pools = {procs: Pool(procs, setup) for procs in procs_list}
    try:
        env["derived_before_warm"] = derived_state(admin)
        compare.time_stores_interleaved(pools, [kind for kind, _ in STORES], CODECS, p, rows)
        env["derived_after"] = derived_state(admin)
    finally:
        for pool in pools.values():
            pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition of one read")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--procs", type=int, default=8, help="processes of the pool (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--no-build", action="store_true", help="use build/ as it is")
    args = parser.parse_args()
    p = plan(args.quick)
    if args.repeat is not None:
        p["repeat"] = max(1, args.repeat)
    compare.slab(0, args.procs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = benchlib.results_dir(args.out)
    benchlib.ensure_built(["chunkd", "chunkd_native"], build=not args.no_build,
                          log_path=out / "logs" / "build.log")
    import chunkd
    import zarr

    work = Path(tempfile.mkdtemp(prefix="chunkd-node-"))
    shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-node-", dir="/dev/shm"))
    rows: list[dict] = []
    env = benchlib.environment(quick=args.quick, plan=p, procs=args.procs, zarr=zarr.__version__,
                               numpy=np.__version__)
    server = None
    try:
        binaries = benchlib.copy_binaries(["chunkd"], work / "bin")
        data = work / "data"
        data.mkdir()
        log(f"writing the arrays into {data}")
        env["stored_bytes"] = write_arrays(data)
        # Half of the host cache for derived entries (both decoded arrays: 128 MiB); a chunkd
        # without derived entries runs the node rows as zarr's pipeline (the report says so).
        derived = (["--derived_cache_fraction=0.5"] if benchlib.server_flag_default(
            binaries["chunkd"], "derived_cache_fraction") is not None else [])
        server = benchlib.ChunkdServer(binaries["chunkd"], data, work / "chunkd",
                                       "--host_cache_bytes=1GiB", *derived,
                                       f"--shm_dir={shm_dir}", "--fsync=false")
        env["chunkd_flags"] = server.args[1:]
        setup = {"data": str(data), "socket": str(server.socket), "shm_dir": str(shm_dir)}
        with chunkd.Client(server.tcp) as admin:
            measure(p, sorted({1, args.procs}), setup, admin, rows, env)
    finally:
        if server is not None:
            server.stop()
            if (work / "chunkd" / "chunkd.log").exists():
                shutil.copy(work / "chunkd" / "chunkd.log", out / "logs" / "chunkd.log")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    benchlib.write_json(out / "env.json", env)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    text = report(rows, env, sorted({1, args.procs}))
    (out / "results.md").write_text(text)
    print(text)
    log(f"results in {out}")
    return 0


def report(rows: list[dict], env: dict, procs_list: list[int]) -> str:
    median, fmt, ratio = compare.median_of, compare.fmt, compare.ratio
    load0, load1 = env.get("loadavg_start") or [], env.get("loadavg_end") or []
    n = max(procs_list)
    md = [f"# Decoded once per node ({'quick' if env['quick'] else 'full'} run)", "",
          f"commit {env.get('commit')}{' (with uncommitted changes)' if env.get('dirty') else ''}, "
          f"{env.get('cpu')}, {env.get('cores')} cores, load average at start "
          f"{', '.join(f'{x:.1f}' for x in load0)}, at the end "
          f"{', '.join(f'{x:.1f}' for x in load1)}; zarr {env.get('zarr')}, numpy "
          f"{env.get('numpy')}. float32 {'x'.join(map(str, SHAPE))}, chunks "
          f"{'x'.join(map(str, CHUNKS))} ({CHUNK_COUNT} chunks of 1 MiB), warm, "
          f"{env['plan']['reads']} whole reads back to back per sample, median of "
          f"{env['plan']['repeat']} interleaved repetitions; GB/s = the array's 64 MiB per "
          "read over the time from the first process's start to the last one's end.", "",
          "| store | codec | " + " | ".join(f"{k} proc GB/s" for k in procs_list) + " |",
          "|---|---|" + "--:|" * len(procs_list)]
    for codec in CODECS:
        for kind, name in STORES:
            cells = []
            for procs in procs_list:
                v = median(rows, "gbps", store=kind, codec=codec, procs=procs)
                cells.append(fmt(v) if v is not None
                             else f"– ({compare.why_not(rows, store=kind, codec=codec, procs=procs)})")
            md.append(f"| {name} | {codec} | " + " | ".join(cells) + " |")
    md += ["", "## Targets (issue 21)", ""]
    for codec in CODECS:
        node_n = median(rows, "gbps", store="chunkd-node", codec=codec, procs=n)
        local_n = median(rows, "gbps", store="local", codec=codec, procs=n)
        node_1 = median(rows, "gbps", store="chunkd-node", codec=codec, procs=1)
        mem_1 = median(rows, "gbps", store="memory", codec=codec, procs=1)
        r_n, r_1 = ratio(node_n, local_n), ratio(node_1, mem_1)
        md.append(f"- {codec}, {n} processes: node pipeline {fmt(r_n)}× LocalStore (target ≥ 2×: "
                  f"{'held' if r_n and r_n >= 2 else 'not held'})")
        md.append(f"- {codec}, 1 process: node pipeline {fmt(r_1)}× MemoryStore (target ≥ 1.5×: "
                  f"{'held' if r_1 and r_1 >= 1.5 else 'not held'})")
    before, after = env.get("derived_before_warm", {}), env.get("derived_after", {})
    if before.get("published") is not None and after.get("published") is not None:
        published = after["published"] - before["published"]
        hits = after["hits"] - before["hits"]
        expected = CHUNK_COUNT * len(CODECS)
        md.append(f"- decodes on the node over the whole run (every process, warm-up and "
                  f"repetitions): {published} productions published for {expected} chunks "
                  f"({'each decoded once' if published == expected else 'NOT once each'}), "
                  f"{hits} derived hits")
    else:
        md.append("- this chunkd keeps no derived entries (no derived_published counter): the "
                  "node pipeline's rows ran as zarr's pipeline")
    md += ["", "## Memory", "", "| what | bytes |", "|---|--:|"]
    for codec, size in env.get("stored_bytes", {}).items():
        md.append(f"| encoded chunks, {codec} (on disk) | {size:,} |")
    for key in ("host_used_bytes", "derived_used_bytes", "derived_capacity_bytes"):
        if key in after:
            md.append(f"| server {key.replace('_', ' ')} | {after[key]:,} |")
    md.append(f"| decoded arrays ({len(CODECS)} × 64 MiB) | {ARRAY_BYTES * len(CODECS):,} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())

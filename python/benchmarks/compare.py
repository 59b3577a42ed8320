#!/usr/bin/env python3
"""The Python client beside the C++ client, and ChunkdStore beside the stores a zarr user would
pick, measured side by side in one run.

    .venv/bin/python python/benchmarks/compare.py [--quick] [--repeat N] [--out DIR]
                                                  [--no-build] [--only gets|zarr] [--procs N]

1. One Get at a time of cached values of 4 KiB, 64 KiB and 1 MiB, from one client with one
   connection: the C++ client (build/bench/chunkd_bench, the driver of bench/run) and the
   Python client (`chunkd.Client.get`), over TCP, over the UNIX socket (inline bytes) and with
   shared memory (`delivery="shm"` over the UNIX socket). p50 latency and requests per second.
2. A Zarr read: float32 256 x 256 x 256 in chunks of 64^3 (64 chunks of 1 MiB),
   `zarr.open_array(store, path=..., mode="r")[...]`, warm, uncompressed and with zstd, through
   zarr's MemoryStore (the chunks in a dict: what zarr itself costs, the ceiling), LocalStore on
   the directory, ChunkdStore inline over TCP and over the UNIX socket and with shared memory,
   zarr's FsspecStore over chunkd's own fsspec filesystem (what `zarr.open("chunkd://...")`
   makes) over TCP and the UNIX socket,
   and the same directory served by nginx read with zarr's ObjectStore over obstore's HTTPStore
   and with zarr's FsspecStore (HTTP through fsspec and aiohttp); in one process, and in --procs
   processes (a spawn pool, each process opening its own stores and reading its slab: a
   chunk-aligned 1/N of the array).
3. Ratios from the run's own medians, and the targets of issue 11 as held / not held.

Fair counting: a value counts once the client has every byte of it. Inline values were written
into the client's memory by the socket; every byte of a shared-memory value (a view of the
server's memory) is read in place by one checksum routine both clients call
(buffer/read_every_byte.h: chunkd_bench --delivery=shm, and chunkd._native._read_every_byte from
Python), and every timed shm Get must have come by shared memory (each reply a read-only view,
and the server's gets_shm counter over the row equal to the Gets counted); a zarr read copies
every chunk into the array it returns. Every value is checked: the Get rows
compare each key's bytes with its file once before timing, the zarr rows compare the array read
with the one written after every timed sample.

The harness builds what it needs (deploy/scripts/build.sh chunkd chunkd_bench chunkd_native: the
server, the C++ driver and the Python client's native module it measures; --no-build checks they
are there instead), installs nginx and the Python peers when missing, starts
one chunkd (a file store over the generated data, 1 GiB cache, a free loopback port, a UNIX
socket and shared-memory segments in directories of its own) and nginx (a free port, its own
configuration) and stops them at the end, so runs beside each other never collide. Rows are
interleaved (every peer once, then every peer again) and the tables give the median of --repeat
repetitions (5; 1 with --quick). It writes results.md (printed), results.csv, results.jsonl
(every repetition), env.json and logs/ into --out (default results/<timestamp>/ at the
repository root; results/ is not committed). --quick: fewer keys, shorter phases, one
repetition: a smoke test whose numbers swing; the full run is the one to quote.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import REPO_ROOT, log  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))

# --- what is measured ---------------------------------------------------------------------------

GET_SIZES = (4096, 65536, 1 << 20)
GET_TRANSPORTS = ("tcp", "unix", "shm")  # inline TCP, inline UNIX socket, shm over the socket
TRANSPORT_NAMES = {"tcp": "inline, TCP", "unix": "inline, UNIX socket",
                   "shm": "shared memory (UNIX socket)"}

SHAPE = (256, 256, 256)
CHUNKS = (64, 64, 64)
DTYPE = "float32"
ARRAY_BYTES = int(np.prod(SHAPE)) * np.dtype(DTYPE).itemsize  # 64 MiB
CODECS = ("uncompressed", "zstd")  # also the arrays' paths in the data directory
SEED = 11

# The zarr stores: (id, name in the tables).
STORES = (
    ("memory", "zarr MemoryStore (a dict: the ceiling)"),
    ("local", "zarr LocalStore (the directory, page cache)"),
    ("chunkd-shm", "ChunkdStore, shared memory (UNIX socket)"),
    ("chunkd-unix", "ChunkdStore inline, UNIX socket"),
    ("chunkd-tcp", "ChunkdStore inline, TCP"),
    ("chunkd-fsspec-tcp", "zarr FsspecStore over chunkd:// (TCP)"),
    ("chunkd-fsspec-unix", "zarr FsspecStore over chunkd+unix://"),
    ("nginx-obstore", "nginx + zarr ObjectStore (obstore HTTPStore)"),
    ("nginx-fsspec", "nginx + zarr FsspecStore (HTTP, aiohttp)"),
)
STORE_NAMES = dict(STORES)

# The Python packages of the remote peers, pinned in python/requirements-dev.txt.
PEER_PACKAGES = ("obstore", "fsspec", "aiohttp")


def plan(quick: bool) -> dict:
    if quick:
        return {"keys": {4096: 512, 65536: 256, 1 << 20: 64}, "warmup": 0.1, "duration": 0.4,
                "repeat": 1, "reads": 2}
    return {"keys": {4096: 4096, 65536: 1024, 1 << 20: 256}, "warmup": 0.3, "duration": 1.0,
            "repeat": 5, "reads": 4}


# --- the data -----------------------------------------------------------------------------------


def make_array() -> np.ndarray:
    """A smooth field plus noise, in steps of 1/16: every element and chunk different, and
    compressible (zstd makes about a third of it), as measured fields often are."""
    rng = np.random.default_rng(SEED)
    axes = [np.linspace(0, 6, n, dtype=np.float32) for n in SHAPE]
    field = (np.sin(axes[0])[:, None, None] * np.cos(axes[1])[None, :, None]
             + axes[2][None, None, :] / 6) * 10
    field = field + rng.standard_normal(SHAPE, dtype=np.float32) * 0.5
    return (np.round(field * 16) / 16).astype(np.float32)


def write_arrays(data: Path) -> dict:
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore

    expected = make_array()
    store = LocalStore(data)
    for codec in CODECS:
        array = zarr.create_array(
            store, name=codec, shape=SHAPE, chunks=CHUNKS, dtype=DTYPE, fill_value=0.0,
            compressors=None if codec == "uncompressed" else ZstdCodec(),  # level 0, as zarr's default
        )
        array[:] = expected
    stored = {codec: sum(f.stat().st_size for f in (data / codec / "c").rglob("*") if f.is_file())
              for codec in CODECS}
    return {"stored_bytes": stored, "array_bytes": ARRAY_BYTES}


def slab(index: int, procs: int) -> tuple[slice, ...]:
    """Process `index`'s share of the array among `procs`: whole chunks, split along the first
    axes (procs must divide the 4 x 4 x 4 chunk grid)."""
    grid = [s // c for s, c in zip(SHAPE, CHUNKS)]
    splits, rest = [], procs
    for g in grid:
        k = np.gcd(rest, g)
        splits.append(int(k))
        rest //= int(k)
    if rest != 1:
        raise ValueError(f"--procs {procs}: must divide the {'x'.join(map(str, grid))} chunk grid")
    out = []
    for axis, (n, k) in enumerate(zip(SHAPE, splits)):
        index, i = divmod(index, k)
        step = n // k
        out.append(slice(i * step, (i + 1) * step))
    return tuple(out)


# --- the Python Get driver (a process of its own, as the C++ driver is) ------------------------


def read_every_byte(view: memoryview) -> int:
    """Reads every byte of `view` once, writing nothing (a sum of the 64-bit words of its whole
    32-byte blocks, then of the bytes left, modulo 2**64): the very routine chunkd_bench runs on a shared-memory value
    (buffer/read_every_byte.h, compiled once into the client library both drivers link), so the
    two shm rows differ by their clients, not by their checksums."""
    from chunkd import _native

    return _native._read_every_byte(view)


def python_get_worker(conn) -> None:
    while True:
        spec = conn.recv()
        if spec is None:
            return
        try:
            row = python_gets(**spec)
        except BaseException as e:  # noqa: BLE001 - reported as the row's reason
            row = {"available": False, "reason": f"{type(e).__name__}: {e}"}
        conn.send(row)


def python_gets(address: str, transport: str, shm_dir: str, prefix: str, size: int, keys: int,
                store_dir: str, warmup: float, duration: float, seed: int,
                server_pid: int) -> dict:
    """One client, one Get at a time, uniform random keys, as chunkd_bench --clients=1."""
    import chunkd

    names = [f"{prefix}/{i:06d}" for i in range(keys)]
    shm = transport == "shm"
    client = (chunkd.Client(address, delivery="shm", shm_dir=shm_dir) if shm
              else chunkd.Client(address))

    def fetch(key: str) -> int:
        view = memoryview(client.get(key))
        if shm:
            # Shared memory comes as a read-only view of the server's memory, inline bytes as a
            # writable buffer: a reply that fell back to inline is an error, as chunkd_bench
            # counts one (its check of GetResult::delivery).
            if not view.readonly:
                raise RuntimeError("asked for shm, the value came inline")
            read_every_byte(view)  # every byte read in place, as chunkd_bench does
        # Inline: every byte was written into the value by the socket already.
        return view.nbytes

    try:
        if shm and client.read(names[0]).delivery != 2:  # 2: DELIVERY_SHM
            return {"available": False,
                    "reason": "the server answered inline (it shares no memory with this process)"}
        # Priming, as the C++ driver's: every key once, its bytes checked against its file.
        mismatches = 0
        for name in names:
            value = client.get(name)
            if memoryview(value).cast("B") != (Path(store_dir) / name).read_bytes():
                mismatches += 1
            del value
        rng = random.Random(seed)
        warm_until = time.perf_counter() + warmup
        while time.perf_counter() < warm_until:
            fetch(names[rng.randrange(keys)])
        latencies: list[int] = []
        errors, first_error, nbytes = 0, "", 0
        counters0 = dict(client.server_info().counters)
        server0, cpu0 = benchlib.process_cpu_seconds(server_pid), time.process_time()
        start = time.perf_counter_ns()
        stop_at = start + int(duration * 1e9)
        end = start
        while end < stop_at:
            t0 = time.perf_counter_ns()
            try:
                n = fetch(names[rng.randrange(keys)])
            except Exception as e:  # noqa: BLE001 - counted, as the C++ driver counts errors
                n, first_error = -1, first_error or f"{type(e).__name__}: {e}"
            end = time.perf_counter_ns()
            if n == size:
                latencies.append(end - t0)
                nbytes += n
            else:
                errors += 1
                first_error = first_error or f"a value of {n} bytes"
        cpu1, server1 = time.process_time(), benchlib.process_cpu_seconds(server_pid)
        counters1 = dict(client.server_info().counters)
    finally:
        client.close()
    seconds = (end - start) / 1e9
    latencies.sort()
    count = len(latencies)
    # The server's own count (only this client talks to it while the row runs): every timed Get
    # of the shm row went by shared memory, none of the others did.
    gets_shm = counters1.get("gets_shm", 0) - counters0.get("gets_shm", 0)
    if gets_shm != (count if shm else 0):
        errors += abs(gets_shm - (count if shm else 0))
        first_error = first_error or (
            f"the server counted {gets_shm} shared-memory Gets for {count} timed Gets")

    def quantile(q: float) -> float | None:
        return latencies[min(count - 1, int(q * count))] / 1e3 if count else None

    row = {"available": count > 0, "requests": count, "seconds": seconds,
           "rps": count / seconds if seconds else None,
           "gbps": nbytes / seconds / 1e9 if seconds else None,
           "p50_us": quantile(0.5), "p99_us": quantile(0.99),
           "client_cpu_us_per_req": (cpu1 - cpu0) / count * 1e6 if count else None,
           "server_cpu_us_per_req": ((server1 - server0) / count * 1e6
                                     if count and server0 is not None and server1 is not None
                                     else None),
           "errors": errors, "mismatches": mismatches, "gets_shm": gets_shm,
           "client_modules": sorted(m for m in sys.modules if m.split(".")[0] == "chunkd")}
    if first_error:
        row["first_error"] = first_error
    if not count:
        row["reason"] = first_error or "no request completed"
    return row


def cpp_gets(bench: Path, address: str, transport: str, shm_dir: str, prefix: str, size: int,
             keys: int, warmup: float, duration: float, seed: int, server_pid: int,
             log_path: Path) -> dict:
    args = [str(bench), "--action=measure", "--workload=hit", "--peer=chunkd",
            f"--delivery={'shm' if transport == 'shm' else 'inline'}", f"--address={address}",
            f"--shm_dir={shm_dir}", f"--prefix={prefix}", f"--size={size}", f"--keys={keys}",
            "--clients=1", f"--warmup={warmup}s", f"--duration={duration}s", f"--seed={seed}",
            f"--server_pid={server_pid}"]
    with open(log_path, "ab") as err:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=err, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("{")), "")
    if not line:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"available": False, "reason": f"chunkd_bench failed ({done.returncode}): {tail[0]}"}
    row = json.loads(line)
    per_req = size / 1e9 * 1e6  # s/GB -> µs per request of `size` bytes
    for name in ("client", "server"):
        v = row.pop(f"{name}_cpu_s_per_gb", None)
        row[f"{name}_cpu_us_per_req"] = v * per_req if v is not None else None
    if row.get("errors") or row.get("mismatches"):
        row.setdefault("first_error", "")
    return {k: v for k, v in row.items() if k not in ("peer", "delivery", "size", "clients")}


# --- the zarr readers (a spawn pool: each process opens its own stores) ------------------------


def open_store(kind: str, setup: dict):
    from zarr.storage import FsspecStore, LocalStore, MemoryStore, ObjectStore

    data = Path(setup["data"])
    if kind == "memory":
        from zarr.buffer import default_buffer_prototype

        buffer = default_buffer_prototype().buffer
        chunks = {}
        for codec in CODECS:
            for f in (data / codec).rglob("*"):
                if f.is_file():
                    chunks[str(f.relative_to(data))] = buffer.from_bytes(f.read_bytes())
        return MemoryStore(chunks, read_only=True)
    if kind == "local":
        return LocalStore(data, read_only=True)
    if kind.startswith("chunkd-fsspec-"):
        # What zarr.open("chunkd://...") makes: zarr's FsspecStore on chunkd's fsspec
        # filesystem (chunkd.fsspec), asynchronous on zarr's loop.
        from chunkd.fsspec import ChunkdFileSystem

        address = (setup["chunkd_tcp"] if kind == "chunkd-fsspec-tcp"
                   else f"unix:{setup['chunkd_socket']}")
        fs = ChunkdFileSystem(address, asynchronous=True, skip_instance_cache=True)
        return FsspecStore(fs, path="", read_only=True)
    if kind.startswith("chunkd-"):
        from chunkd.zarr import ChunkdStore

        if kind == "chunkd-tcp":
            return ChunkdStore(f"chunkd://{setup['chunkd_tcp']}", read_only=True)
        url = f"chunkd+unix://{setup['chunkd_socket']}"
        if kind == "chunkd-unix":
            return ChunkdStore(url, read_only=True)
        return ChunkdStore(url, read_only=True, delivery="shm", shm_dir=setup["shm_dir"])
    if not setup.get("nginx"):
        raise RuntimeError(setup.get("nginx_error") or "nginx is not running")
    if kind == "nginx-obstore":
        from obstore.store import HTTPStore

        return ObjectStore(HTTPStore.from_url(setup["nginx"], client_options={"allow_http": True}),
                           read_only=True)
    if kind == "nginx-fsspec":
        return FsspecStore.from_url(setup["nginx"], read_only=True)
    raise ValueError(f"unknown store {kind}")


def zarr_worker(index: int, procs: int, conn, barrier, setup: dict) -> None:
    """Reads slab `index` of `procs` on command: ("warm", kind, codec) once, checked;
    ("time", kind, codec, reads): after the pool's barrier, `reads` reads back to back,
    answered with their start and end (perf_counter: CLOCK_MONOTONIC, one clock for every
    process) and whether the last one was right."""
    import zarr

    region = slab(index, procs)
    expected = make_array()[region].copy()
    stores: dict[str, object] = {}

    def read(kind: str, codec: str) -> np.ndarray:
        if kind not in stores:
            stores[kind] = open_store(kind, setup)
        return zarr.open_array(stores[kind], path=codec, mode="r")[region]

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
            reads = rest[0]
            gc.collect()
            barrier.wait(timeout=300)
            start = time.perf_counter()
            for _ in range(reads):
                got = read(kind, codec)
            end = time.perf_counter()
            ok = np.array_equal(got, expected)
            del got
            conn.send({"start": start, "end": end,
                       "error": None if ok else "the array read differs from the one written"})
        except BaseException as e:  # noqa: BLE001 - the row says why
            if op == "time":
                barrier.abort()  # the others must not wait for this one
            conn.send({"error": f"{type(e).__name__}: {e}"})
    for store in stores.values():
        close = getattr(store, "close", None)
        if close:
            close()


class Pool:
    """`procs` spawned zarr readers, kept for the whole run (each opens its stores once)."""

    def __init__(self, procs: int, setup: dict) -> None:
        ctx = mp.get_context("spawn")
        self.procs = procs
        self.setup = setup
        self.barrier = ctx.Barrier(procs)
        self.conns, self.workers = [], []
        for i in range(procs):
            here, there = ctx.Pipe()
            worker = ctx.Process(target=zarr_worker, args=(i, procs, there, self.barrier, setup),
                                 daemon=True)
            worker.start()
            self.conns.append(here)
            self.workers.append(worker)

    def ask(self, command: tuple) -> list[dict]:
        for conn in self.conns:
            conn.send(command)
        answers = []
        for conn, worker in zip(self.conns, self.workers):
            while not conn.poll(1):
                if not worker.is_alive():
                    raise RuntimeError(f"a zarr reader died (exit code {worker.exitcode})")
            answers.append(conn.recv())
        if command[0] == "time" and self.barrier.broken:
            self.barrier.reset()
        return answers

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for worker in self.workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()


# --- the run ------------------------------------------------------------------------------------


def ensure_peers() -> None:
    """nginx, hiredis (chunkd_bench) and the Python peers, installed the project's way."""
    have_hiredis = subprocess.run(["pkg-config", "--exists", "hiredis"]).returncode == 0
    if benchlib.nginx_binary() is None or not have_hiredis:
        log("installing nginx and hiredis (deploy/scripts/install-deps.sh all)")
        subprocess.run([str(REPO_ROOT / "deploy" / "scripts" / "install-deps.sh"), "all"],
                       check=False)
    missing = []
    for package in PEER_PACKAGES:
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        pins = [line.strip() for line in
                (REPO_ROOT / "python" / "requirements-dev.txt").read_text().splitlines()
                if line.split("==")[0].strip() in missing]
        log(f"installing {' '.join(pins)} (python/requirements-dev.txt)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins], check=False)


def server_counters(client) -> dict:
    return dict(client.server_info().counters)


def measure_gets(args, p, bench: Path, server, setup: dict, work: Path, out: Path,
                 rows: list, env: dict) -> None:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=python_get_worker, args=(there,), daemon=True)
    worker.start()
    addresses = {"tcp": server.tcp, "unix": server.unix, "shm": server.unix}
    try:
        for rep in range(1, p["repeat"] + 1):
            for size in GET_SIZES:
                keys = p["keys"][size]
                for transport in GET_TRANSPORTS:
                    common = dict(address=addresses[transport], transport=transport,
                                  shm_dir=setup["shm_dir"], prefix=f"get/{size}", size=size,
                                  keys=keys, warmup=p["warmup"], duration=p["duration"],
                                  seed=rep, server_pid=server.pid)
                    # Which client goes first alternates from one repetition to the next.
                    order = ("c++", "python") if rep % 2 else ("python", "c++")
                    for client in order:
                        if client == "c++":
                            row = cpp_gets(bench, log_path=out / "logs" / "chunkd_bench.log",
                                           **common)
                        else:
                            here.send(dict(common, store_dir=str(work / "data")))
                            while not here.poll(1):
                                if not worker.is_alive():
                                    raise RuntimeError("the Python Get driver died")
                            row = here.recv()
                            # Which modules the client loaded (grpcio stubs or a native core),
                            # once for the run rather than in every row.
                            modules = row.pop("client_modules", None)
                            if modules:
                                env.setdefault("python_client_modules", modules)
                        row = {"section": "get", "client": client, "transport": transport,
                               "size": size, "keys": keys, "rep": rep, **row}
                        rows.append(row)
                        log(f"get {client:6} {transport:4} {size:>8} B: " + (
                            f"p50 {row['p50_us']:.0f} µs, {row['rps']:,.0f} req/s"
                            if row.get("available", True) and row.get("rps")
                            else f"not available: {row.get('reason')}"))
    finally:
        here.send(None)
        worker.join(30)
        if worker.is_alive():
            worker.terminate()


def time_stores_interleaved(pools: dict, kinds: list[str], codecs, p: dict, rows: list, *,
                            label: str = "", fields: dict | None = None,
                            watch=None) -> None:
    """Warms every store of `kinds` with every codec in each pool (a store that fails is marked
    not available), then times `p["repeat"]` repetitions of `p["reads"]` whole-array reads,
    one row per (repetition, pool, codec, store) in `rows`. Each repetition starts with another
    store, so that none is always first. `watch(kind)`: None, or a callable run before the
    timing that returns one to run after it with the row (to add the server's counters)."""
    broken: dict[tuple, str] = {}
    for procs, pool in pools.items():
        for codec in codecs:
            for kind in kinds:
                errors = [a["error"] for a in pool.ask(("warm", kind, codec)) if a["error"]]
                if errors:
                    broken[procs, codec, kind] = errors[0]
                    log(f"{label}{kind} {codec} x{procs}: not available: {errors[0]}")
    for rep in range(1, p["repeat"] + 1):
        for procs, pool in pools.items():
            for codec in codecs:
                shift = (rep - 1) % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    row = {**(fields or {}), "store": kind, "codec": codec, "procs": procs,
                           "reads": p["reads"], "rep": rep}
                    if (procs, codec, kind) in broken:
                        rows.append({**row, "available": False,
                                     "reason": broken[procs, codec, kind]})
                        continue
                    finish = watch(kind) if watch else None
                    answers = pool.ask(("time", kind, codec, p["reads"]))
                    errors = [a["error"] for a in answers if a["error"]]
                    if errors:
                        rows.append({**row, "available": False, "reason": errors[0]})
                        log(f"{label}{kind} {codec} x{procs}: failed: {errors[0]}")
                        continue
                    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
                    row.update(available=True, seconds=wall,
                               gbps=ARRAY_BYTES * p["reads"] / wall / 1e9)
                    if finish:
                        finish(row)
                    rows.append(row)
                    log(f"{label}{kind:13} {codec:12} x{procs}: {row['gbps']:.2f} GB/s")


def measure_zarr(args, p, setup: dict, admin, rows: list) -> None:
    pools = {procs: Pool(procs, setup) for procs in sorted({1, args.procs})}

    def watch(kind: str):
        if not kind.startswith("chunkd"):
            return None
        before = server_counters(admin)

        def finish(row: dict) -> None:
            after = server_counters(admin)
            for name in ("gets", "gets_shm", "get_many_calls", "shm_fallbacks",
                         "bytes_served_shm", "bytes_served_inline"):
                row[name] = after.get(name, 0) - before.get(name, 0)
            if kind == "chunkd-shm" and not row["gets_shm"]:
                row["warning"] = "no shared-memory gets: the reads went inline"
        return finish

    try:
        log(f"zarr: warming every store in {', '.join(map(str, pools))} process(es)")
        time_stores_interleaved(pools, [kind for kind, _ in STORES], CODECS, p, rows,
                                label="zarr ", fields={"section": "zarr"}, watch=watch)
    finally:
        for pool in pools.values():
            pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See bench/README.md (\"Python beside C++\") for what each number means.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer keys, shorter phases, one repetition (a smoke test)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of every row, interleaved (default 5; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/<timestamp>/)")
    parser.add_argument("--no-build", action="store_true",
                        help="use the binaries in build/ as they are (fails if they are missing)")
    parser.add_argument("--only", choices=("gets", "zarr"), default=None,
                        help="measure only the Get rows or only the zarr rows")
    parser.add_argument("--procs", type=int, default=8,
                        help="processes of the zarr pool (divides 64: 2, 4, 8, 16...; default 8)")
    args = parser.parse_args()
    p = plan(args.quick)
    if args.repeat is not None:
        if args.repeat < 1:
            parser.error("--repeat takes a count >= 1")
        p["repeat"] = args.repeat
    try:
        slab(0, args.procs)
    except ValueError as e:
        parser.error(str(e))

    # SIGTERM unwinds like Ctrl-C, so the servers stop and the temporary directories go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = benchlib.results_dir(args.out)
    ensure_peers()
    # chunkd_native: the Python client measured here is the module in python/chunkd/, which
    # build.sh builds when .venv exists; without it in the list, the Python rows would measure
    # whatever module the last full build left there.
    benchlib.ensure_built(["chunkd", "chunkd_bench", "chunkd_native"], build=not args.no_build,
                          log_path=out / "logs" / "build.log")
    import chunkd
    import zarr

    work = Path(tempfile.mkdtemp(prefix="chunkd-compare-"))
    shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-compare-", dir="/dev/shm"))
    rows: list[dict] = []
    env = benchlib.environment(quick=args.quick, repeat=p["repeat"], plan=p, procs=args.procs,
                               zarr=zarr.__version__, numpy=np.__version__,
                               zarr_async_concurrency=zarr.config.get("async.concurrency"))
    for package in PEER_PACKAGES:
        try:
            env[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            env[package] = None
    server = nginx = None
    try:
        binaries = benchlib.copy_binaries(["chunkd", "chunkd_bench"], work / "bin")
        data = work / "data"
        data.mkdir()
        log(f"writing the data into {data}")
        for size in GET_SIZES:
            subprocess.run([str(binaries["chunkd_bench"]), "--action=load", f"--dir={data}",
                            f"--prefix=get/{size}", f"--size={size}", f"--keys={p['keys'][size]}"],
                           check=True, stdout=subprocess.DEVNULL)
        env["arrays"] = write_arrays(data)
        server = benchlib.ChunkdServer(binaries["chunkd"], data, work / "chunkd",
                                       "--host_cache_bytes=1GiB", f"--shm_dir={shm_dir}",
                                       "--fsync=false")
        env["chunkd_flags"] = server.args[1:]
        setup = {"data": str(data), "chunkd_tcp": server.tcp, "chunkd_socket": str(server.socket),
                 "shm_dir": str(shm_dir), "nginx": None}
        try:
            nginx = benchlib.NginxServer(data, work / "nginx")
            setup["nginx"] = nginx.url
            env["nginx"] = nginx.version
        except RuntimeError as e:
            setup["nginx_error"] = f"nginx: {e}"
            log(setup["nginx_error"])
        admin = chunkd.Client(server.tcp)
        if args.only in (None, "gets"):
            measure_gets(args, p, binaries["chunkd_bench"], server, setup, work, out, rows, env)
        if args.only in (None, "zarr"):
            measure_zarr(args, p, setup, admin, rows)
        env["server_counters_end"] = server_counters(admin)
        admin.close()
    finally:
        for s in (nginx, server):
            if s is not None:
                s.stop()
        for name, path in (("chunkd.log", work / "chunkd" / "chunkd.log"),
                           ("nginx-error.log", work / "nginx" / "error.log")):
            if path.exists():
                shutil.copy(path, out / "logs" / name)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    benchlib.write_json(out / "env.json", env)
    write_results(out, rows, env)
    text = report(rows, env)
    (out / "results.md").write_text(text)
    print(text)
    log(f"results in {out}")
    return 0


# --- the report ---------------------------------------------------------------------------------


def write_results(out: Path, rows: list[dict], env: dict) -> None:
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})


def median_of(rows: list[dict], field: str, **match) -> float | None:
    """The median of `field` over the usable repetitions of the row `match` names."""
    values = [r[field] for r in rows
              if all(r.get(k) == v for k, v in match.items())
              and r.get("available", True) and r.get(field) is not None]
    return statistics.median(values) if values else None


def why_not(rows: list[dict], **match) -> str:
    reasons = [r.get("reason", "") for r in rows
               if all(r.get(k) == v for k, v in match.items()) and not r.get("available", True)]
    return reasons[0] if reasons else "no row"


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 1 else f"{v:.{digits + 1}g}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def report(rows: list[dict], env: dict) -> str:
    repeat = env["repeat"]
    load0, load1 = env.get("loadavg_start"), env.get("loadavg_end")
    md = [f"# Python beside C++, ChunkdStore beside zarr's stores "
          f"({'quick' if env['quick'] else 'full'} run)", "",
          f"commit {env.get('commit')}{' (with uncommitted changes)' if env.get('dirty') else ''}, "
          f"{env.get('cpu')}, {env.get('cores')} cores, kernel {env.get('kernel')}, load average "
          f"at start {', '.join(f'{x:.1f}' for x in load0 or [])}, at the end "
          f"{', '.join(f'{x:.1f}' for x in load1 or [])}; Python {env.get('python')}, zarr "
          f"{env.get('zarr')} (async concurrency {env.get('zarr_async_concurrency')}), numpy "
          f"{env.get('numpy')}, obstore {env.get('obstore')}, fsspec {env.get('fsspec')}, "
          f"aiohttp {env.get('aiohttp')}, {env.get('nginx', 'no nginx')}.", "",
          f"Every figure is the median of {repeat} repetition{'s' if repeat > 1 else ''}, "
          "interleaved with the other rows (results.jsonl has each one). A value counts once "
          "the client has every byte of it: received from the socket (inline), read in place "
          "in the server's shared memory (shm: a checksum of every byte, the same compiled "
          "routine for both clients, and every timed reply checked to have come by shared "
          "memory), or "
          "decoded into the array a zarr read returns. GB/s are 10⁹ bytes per second."]
    md += get_table(rows)
    md += zarr_tables(rows, env)
    md += ["", "## Targets (issue 11)", "", *targets(rows), ""]
    return "\n".join(md) + "\n"


def get_table(rows: list[dict]) -> list[str]:
    if not any(r["section"] == "get" for r in rows):
        return []
    lines = ["", "## One Get at a time: the C++ client and the Python client", "",
             "One client, one connection, uniform random draws over cached values (the same "
             "server and keys for both, each client drawing with its own generator: the same "
             "distribution, not the same sequence). C++: `build/bench/chunkd_bench --clients=1` "
             "(`chunkd::client::Client::Get`); Python: `chunkd.Client.get` (`delivery=\"shm\"` "
             "for shared memory). CPU: the client process's and the server's, per request.", "",
             "| value | transport | C++ p50 µs | Python p50 µs | Python ÷ C++ p50 | C++ req/s "
             "| Python req/s | Python ÷ C++ req/s | client CPU µs/req C++ / Python "
             "| server CPU µs/req C++ / Python |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for size in GET_SIZES:
        for transport in GET_TRANSPORTS:
            m = {"section": "get", "size": size, "transport": transport}
            cells = {}
            for client in ("c++", "python"):
                for field in ("p50_us", "rps", "client_cpu_us_per_req", "server_cpu_us_per_req"):
                    cells[client, field] = median_of(rows, field, client=client, **m)
            if cells["c++", "rps"] is None and cells["python", "rps"] is None:
                if any(r.get("section") == "get" and r["size"] == size
                       and r["transport"] == transport for r in rows):
                    lines.append(f"| {human(size)} | {TRANSPORT_NAMES[transport]} | not "
                                 f"available: {why_not(rows, **m)} | | | | | | | |")
                continue
            bad = sum((r.get("errors") or 0) + (r.get("mismatches") or 0)
                      for r in rows if all(r.get(k) == v for k, v in m.items()))
            warn = f" ⚠ {bad} errors or wrong values" if bad else ""
            lines.append(
                f"| {human(size)} | {TRANSPORT_NAMES[transport]} | {fmt(cells['c++', 'p50_us'])} "
                f"| {fmt(cells['python', 'p50_us'])} "
                f"| {fmt(ratio(cells['python', 'p50_us'], cells['c++', 'p50_us']))}× "
                f"| {fmt(cells['c++', 'rps'])} | {fmt(cells['python', 'rps'])} "
                f"| {fmt(ratio(cells['python', 'rps'], cells['c++', 'rps']))}×{warn} "
                f"| {fmt(cells['c++', 'client_cpu_us_per_req'])} / "
                f"{fmt(cells['python', 'client_cpu_us_per_req'])} "
                f"| {fmt(cells['c++', 'server_cpu_us_per_req'])} / "
                f"{fmt(cells['python', 'server_cpu_us_per_req'])} |")
    return lines


def zarr_tables(rows: list[dict], env: dict) -> list[str]:
    zrows = [r for r in rows if r["section"] == "zarr"]
    if not zrows:
        return []
    stored = env.get("arrays", {}).get("stored_bytes", {})
    lines = ["", "## Reading a Zarr array whole", "",
             f"float32 {'x'.join(map(str, SHAPE))}, chunks {'x'.join(map(str, CHUNKS))} "
             f"(64 chunks of 1 MiB), warm: `zarr.open_array(store, path=..., mode=\"r\")[...]`, "
             f"{env['plan']['reads']} reads back to back per sample; uncompressed "
             f"({fmt(stored.get('uncompressed', 0) / 2**20)} MiB of chunks) and zstd (zarr's "
             f"`ZstdCodec()`, level 0: {fmt(stored.get('zstd', 0) / 2**20)} MiB). With N "
             "processes (a spawn pool), each opens its own stores and reads a chunk-aligned "
             "1/N of the array, all released together; GB/s is the whole array over the time "
             "from the first start to the last end. ChunkdStore shared memory asks for "
             "`delivery=\"shm\"` over the UNIX socket; nginx serves the same directory "
             "(`worker_processes auto`, sendfile, keep-alive)."]
    for procs in sorted({r["procs"] for r in zrows}):
        lines += ["", f"### {procs} process{'es' if procs > 1 else ''}", "",
                  "| store | uncompressed GB/s | ÷ MemoryStore | ÷ LocalStore | zstd GB/s "
                  "| ÷ MemoryStore | ÷ LocalStore |", "|---|--:|--:|--:|--:|--:|--:|"]
        for kind, name in STORES:
            cells = []
            for codec in CODECS:
                m = {"section": "zarr", "procs": procs, "codec": codec}
                v = median_of(rows, "gbps", store=kind, **m)
                if v is None:
                    cells.append(f"not available: {why_not(rows, store=kind, **m)} | | ")
                    continue
                mem = median_of(rows, "gbps", store="memory", **m)
                local = median_of(rows, "gbps", store="local", **m)
                warn = "".join(f" ⚠ {r['warning']}" for r in rows if r.get("warning")
                               and r.get("store") == kind
                               and all(r.get(k) == x for k, x in m.items()))[:120]
                cells.append(f"{fmt(v)}{warn} | {fmt(ratio(v, mem))}× | {fmt(ratio(v, local))}×")
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def targets(rows: list[dict]) -> list[str]:
    out = ["| target | measured | result | from |", "|---|---|---|---|"]

    def add(name: str, value: float | None, held_if, detail: str) -> None:
        verdict = "not available" if value is None else ("held" if held_if(value) else "not held")
        out.append(f"| {name} | {fmt(value) + '×' if value is not None else '–'} | **{verdict}** "
                   f"| {detail} |")

    def get(client, transport, size, field):
        return median_of(rows, field, section="get", client=client, transport=transport,
                         size=size)

    if any(r["section"] == "get" for r in rows):
        for transport in ("unix", "tcp"):
            for size in GET_SIZES:
                py, cc = get("python", transport, size, "rps"), get("c++", transport, size, "rps")
                add(f"Python `Client.get` inline {transport.upper()}, {human(size)}: ≥ 0.8× the "
                    "C++ client's req/s", ratio(py, cc), lambda v: v >= 0.8,
                    f"{fmt(py)} vs {fmt(cc)} req/s" if py and cc
                    else why_not(rows, section="get", transport=transport, size=size))
        py, cc = get("python", "shm", 1 << 20, "p50_us"), get("c++", "shm", 1 << 20, "p50_us")
        add("Python shared-memory get, 1 MiB (every byte read): p50 ≤ 1.25× the C++ "
            "client's", ratio(py, cc), lambda v: v <= 1.25,
            f"{fmt(py)} vs {fmt(cc)} µs" if py and cc
            else why_not(rows, section="get", transport="shm", size=1 << 20))

    if any(r["section"] == "zarr" for r in rows):
        def z(store, codec="uncompressed", procs=1):
            return median_of(rows, "gbps", section="zarr", store=store, codec=codec, procs=procs)

        def zarr_target(name, a, b, codec, procs, threshold):
            va, vb = z(a, codec, procs), z(b, codec, procs)
            add(name, ratio(va, vb), lambda v: v >= threshold,
                f"{fmt(va)} vs {fmt(vb)} GB/s" if va and vb else
                "; ".join(f"{s}: {why_not(rows, section='zarr', store=s, codec=codec, procs=procs)}"
                          for s, v in ((a, va), (b, vb)) if v is None))

        zarr_target("Zarr, uncompressed, 1 process: ChunkdStore shared memory ≥ 0.9× MemoryStore",
                    "chunkd-shm", "memory", "uncompressed", 1, 0.9)
        zarr_target("Zarr, uncompressed, 1 process: ChunkdStore inline UNIX ≥ 1.0× LocalStore",
                    "chunkd-unix", "local", "uncompressed", 1, 1.0)
        zarr_target("Zarr, uncompressed, 1 process: ChunkdStore inline TCP ≥ 0.8× LocalStore",
                    "chunkd-tcp", "local", "uncompressed", 1, 0.8)
        zarr_target("Zarr, zstd, 1 process: ChunkdStore shared memory ≥ 0.95× MemoryStore",
                    "chunkd-shm", "memory", "zstd", 1, 0.95)
        procs = sorted({r["procs"] for r in rows if r["section"] == "zarr"})
        for n in procs:
            zarr_target(f"Remote, uncompressed, {n} process{'es' if n > 1 else ''}: ChunkdStore "
                        "inline TCP ≥ 1.5× nginx + obstore HTTPStore",
                        "chunkd-tcp", "nginx-obstore", "uncompressed", n, 1.5)
        many = max(procs)
        if many > 1:
            zarr_target(f"Zarr, uncompressed, {many} processes: ChunkdStore shared memory ≥ 1.2× "
                        "LocalStore", "chunkd-shm", "local", "uncompressed", many, 1.2)
    return out


if __name__ == "__main__":
    sys.exit(main())

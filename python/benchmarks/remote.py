#!/usr/bin/env python3
"""chunkd where it lives: in front of an object store tens of milliseconds away.

    .venv/bin/python python/benchmarks/remote.py [--quick] [--rtt_ms 20] [--mbit 0]
                                                 [--repeat N] [--readers 8] [--out DIR]
                                                 [--big | --no-big] [--big_bytes 2GiB]
                                                 [--only arrays|big]
                                                 [--server-flag=--FLAG=VALUE ...]
                                                 [--no-build]
    .venv/bin/python python/benchmarks/remote.py --disk-tier [--disk_dataset_bytes 1GiB]
                                                 [--disk_host_bytes 256MiB] [--rtt_ms 20]
                                                 [--disk_delivery tcp|shm]

The test bed: moto's S3 server on loopback, behind python/benchmarks/latency_proxy.py, which
adds the round-trip time (and, with --mbit, a bandwidth cap) and counts the requests and bytes
that cross the link. Two zarr v3 arrays are written to the bucket directly (not through the
link): `plain`, float32 256^3 in chunks of 64^3 (64 objects of 1 MiB), and `sharded`, the same
array in 16 MiB shards (128 x 128 x 256) of 256 KiB inner chunks (64 x 64 x 16).

Peers, each reading through the same link:
- `direct`: zarr's ObjectStore over obstore's S3Store: what a user picks today;
- `chunkd cold` / `chunkd warm`: a chunkd with --store=s3://... whose S3 endpoint is the link,
  read with ChunkdStore inline over TCP, or with shared memory over its UNIX socket. Cold rows
  start a fresh server for every sample; warm rows read once to fill it, then time.

Workloads: the whole array (GB/s); random single inner chunks of the sharded array (mean time
per chunk, one at a time); --readers processes reading the whole plain array at once (GB/s of all
together, and what crossed the link). Every value read is compared with the array written.
Samples are interleaved (every peer once, then again), tables give medians of --repeat (3;
1 with --quick).

The big object (--big: on by default, off with --quick unless --big is given): --big_bytes
(2 GiB) of random bytes, one object.
- Its last 4 KiB, read cold through a fresh chunkd over S3 (`chunkd.Client.get` with a byte
  range, inline over TCP): the bytes and requests that crossed the link, and the bytes chunkd
  read from its store; beside it the same range read directly with obstore.
- The whole object, read through a fresh chunkd by consecutive 64 MiB ranges (the Python
  client has no streaming read: each range is one Get, its reply streamed in parts), against
  obstore reading it directly with one streamed GET: GB/s, what crossed the link, the server's
  peak RSS (VmHWM) and its peak of read memory if ServerInfo counts one. This read goes to the
  same bytes served by nginx (an http:// store) behind a second latency_proxy.py with the same
  RTT, not to moto: moto 5 answers every ranged GET by reading the whole object and slicing it
  (moto/s3/responses.py, _handle_range_header), so a chunkd reading a 2 GiB object by blocks
  would cost moto 2 GiB of copying per block. A chunkd that reads whole values (before blocks)
  reads the whole object again for every range: the read stops once the link has carried 3x
  the object, and the row says so.
Every byte read is compared with the object written (outside the timed part).

The disk tier (--disk-tier: this section only): a zarr v3 array of --disk_dataset_bytes
(1 GiB) in 1 MiB chunks, 4x the host cache (--disk_host_bytes, 256 MiB), read three times by
slabs through one chunkd with a disk tier (--disk_cache_dir in the run's directory, twice the
dataset's size), against zarr reading S3 directly (obstore through the same link). The server
is killed (SIGKILL) after pass 2 and started again on the same tier: pass 3 should read no
bytes from the store (revalidations aside: conditional requests, 304s) and run at least 0.8x
pass 2. Per pass: time, × direct, bytes chunkd read from its store (backend_read_bytes),
bytes over the link, disk hits; the server's peak RSS (VmHWM) against the host budget plus the
tier's index (disk_index_bytes), and the index's load time at the restart. --disk_delivery:
ChunkdStore inline over TCP (tcp, the default) or with shared memory over the UNIX socket (shm).

--server-flag (repeatable) passes a flag to every chunkd started (e.g.
--server-flag=--block_bytes=1MiB). Writes results.md (printed), results.jsonl and env.json into
--out (default results/<timestamp>/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
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

SHAPE = (256, 256, 256)
PLAIN_CHUNKS = (64, 64, 64)
SHARD_SHAPE = (128, 128, 256)
INNER_CHUNKS = (64, 64, 16)
BUCKET = "chunkd-remote-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
MOTO_SERVER = REPO_ROOT / ".venv" / "bin" / "moto_server"


def make_array() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE, dtype=np.float32)


# --- the test bed -------------------------------------------------------------------------------


class Process:
    """A helper process (moto, the proxy) with its log, stopped with SIGTERM."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        preexec_fn=benchlib._die_with_parent)

    def wait_for(self, ready, what: str, seconds: float = 60) -> None:
        benchlib._wait(self.process, ready, what, self.log_path, seconds)

    def stop(self) -> None:
        benchlib._stop(self.process)
        self._log.close()


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Proxy(Process):
    def __init__(self, upstream: str, rtt_ms: float, mbit: float, work: Path) -> None:
        ready, control = work / "proxy.ready", work / "proxy.control"
        super().__init__([sys.executable, str(Path(__file__).with_name("latency_proxy.py")),
                          f"--upstream={upstream}", f"--rtt_ms={rtt_ms}", f"--mbit={mbit}",
                          f"--ready_file={ready}", f"--control_port_file={control}"],
                         work / "proxy.log")
        self.wait_for(lambda: ready.is_file() and control.is_file(), "latency_proxy")
        self.address = ready.read_text().strip()
        self.url = f"http://{self.address}"
        self._control = int(control.read_text())

    def counters(self, reset: bool = False) -> dict:
        with socket.create_connection(("127.0.0.1", self._control), timeout=10) as s:
            if reset:
                s.sendall(b"reset\n")
            data = b""
            while not data.endswith(b"\n"):
                piece = s.recv(65536)
                if not piece:
                    break
                data += piece
        return json.loads(data)


def s3_client(moto_url: str):
    import boto3

    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def write_arrays(moto_url: str, work: Path) -> None:
    """Writes both arrays with zarr into a directory, then uploads its files to the bucket
    directly (the writes do not cross the link)."""
    import zarr

    local = work / "arrays"
    data = make_array()
    store = zarr.storage.LocalStore(local)
    plain = zarr.create_array(store, name="plain", shape=SHAPE, chunks=PLAIN_CHUNKS,
                              dtype="float32", compressors=None, zarr_format=3)
    plain[...] = data
    sharded = zarr.create_array(store, name="sharded", shape=SHAPE, chunks=INNER_CHUNKS,
                                shards=SHARD_SHAPE, dtype="float32", compressors=None,
                                zarr_format=3)
    sharded[...] = data
    s3 = s3_client(moto_url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, str(f.relative_to(local)))


# --- the readers --------------------------------------------------------------------------------


def open_store(kind: str, setup: dict):
    from zarr.storage import ObjectStore

    if kind == "direct":
        from obstore.store import S3Store

        return ObjectStore(S3Store(BUCKET, endpoint=setup["link"], region="us-east-1",
                                   access_key_id="testing", secret_access_key="testing",
                                   client_options={"allow_http": True}), read_only=True)
    from chunkd.zarr import ChunkdStore

    if kind == "tcp":
        return ChunkdStore(f"chunkd://{setup['chunkd_tcp']}", read_only=True)
    return ChunkdStore(f"chunkd+unix://{setup['chunkd_socket']}", read_only=True, delivery="shm")


def close_store(store) -> None:
    close = getattr(store, "close", None)
    if close:
        close()


def read_whole(kind: str, setup: dict, name: str, expected: np.ndarray) -> float:
    """Seconds to read array `name` whole (opened beforehand), checked."""
    import zarr

    store = open_store(kind, setup)
    try:
        array = zarr.open_array(store, path=name, mode="r")
        start = time.perf_counter()
        got = array[...]
        seconds = time.perf_counter() - start
    finally:
        close_store(store)
    if not np.array_equal(got, expected):
        raise RuntimeError(f"{kind}: the {name} array read differs from the one written")
    return seconds


def inner_chunk_picks(count: int) -> list[tuple[slice, ...]]:
    rng = np.random.default_rng(1)
    grid = [s // c for s, c in zip(SHAPE, INNER_CHUNKS)]
    picks = []
    for _ in range(count):
        index = [int(rng.integers(0, g)) for g in grid]
        picks.append(tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, INNER_CHUNKS)))
    return picks


def read_inner_chunks(kind: str, setup: dict, picks, expected: np.ndarray) -> float:
    """Mean seconds per single inner chunk of the sharded array, read one at a time (the
    mean, not the median: a cold read that fetches a whole shard is paid once per shard)."""
    import zarr

    store = open_store(kind, setup)
    try:
        array = zarr.open_array(store, path="sharded", mode="r")
        times = []
        for region in picks:
            start = time.perf_counter()
            got = array[region]
            times.append(time.perf_counter() - start)
            if not np.array_equal(got, expected[region]):
                raise RuntimeError(f"{kind}: an inner chunk read differs from the one written")
    finally:
        close_store(store)
    return sum(times) / len(times)


def many_reader(kind: str, setup: dict, barrier, conn) -> None:
    import zarr

    expected = make_array()
    store = open_store(kind, setup)
    try:
        array = zarr.open_array(store, path="plain", mode="r")
        barrier.wait(timeout=300)
        start = time.perf_counter()
        got = array[...]
        end = time.perf_counter()
        conn.send({"start": start, "end": end, "ok": bool(np.array_equal(got, expected))})
    except BaseException as e:  # noqa: BLE001 - the row says why
        barrier.abort()
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        close_store(store)


def read_by_many(kind: str, setup: dict, readers: int) -> float:
    """Seconds from the first reader's start to the last one's end, `readers` processes each
    reading the whole plain array."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(readers)
    pipes = [ctx.Pipe() for _ in range(readers)]
    procs = [ctx.Process(target=many_reader, args=(kind, setup, barrier, there), daemon=True)
             for _, there in pipes]
    for p in procs:
        p.start()
    answers = []
    for (here, _), p in zip(pipes, procs):
        while not here.poll(1):
            if not p.is_alive():
                raise RuntimeError(f"a reader died (exit code {p.exitcode})")
        answers.append(here.recv())
    for p in procs:
        p.join(30)
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        raise RuntimeError(errors[0])
    if not all(a["ok"] for a in answers):
        raise RuntimeError(f"{kind}: a reader's array differs from the one written")
    return max(a["end"] for a in answers) - min(a["start"] for a in answers)


# --- the run ------------------------------------------------------------------------------------


class Chunkd:
    """A chunkd over the bucket through the link; fresh (cold) on every start."""

    def __init__(self, binary: Path, link: str, work: Path, flags: list[str]) -> None:
        self.binary, self.link, self.work, self.flags = binary, link, work, flags
        self.server = None
        self.starts = 0

    def start(self) -> dict:
        self.stop()
        self.starts += 1
        self.server = benchlib.ChunkdServer(self.binary, f"s3://{BUCKET}",
                                            self.work / f"chunkd-{self.starts}",
                                            f"--s3_endpoint={self.link}",
                                            "--host_cache_bytes=1GiB", *self.flags,
                                            env={**os.environ, **CREDENTIALS})
        return {"chunkd_tcp": self.server.tcp, "chunkd_socket": str(self.server.socket)}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def measure(args, proxy: Proxy, chunkd: Chunkd, rows: list) -> None:
    expected = make_array()
    picks = inner_chunk_picks(args.inner_chunks)
    total_bytes = expected.nbytes
    link = {"link": proxy.url}

    # Each workload: the peers in order, `repeat` rounds, interleaved.
    def sample(workload: str, peer: str, run) -> None:
        # A cold chunkd is a fresh server whose metadata read (zarr.json) is not counted.
        if peer.startswith("chunkd cold"):
            setup = {**link, **chunkd.start()}
        elif peer.startswith("chunkd warm"):
            if chunkd.server is None:
                chunkd.start()
            setup = {**link, "chunkd_tcp": chunkd.server.tcp,
                     "chunkd_socket": str(chunkd.server.socket)}
        else:
            setup = link
        kind = "direct" if peer == "direct" else ("shm" if peer.endswith("shm") else "tcp")
        if peer.startswith("chunkd warm"):
            run(kind, setup)  # fill the cache (a warm row times the second read)
        proxy.counters(reset=True)
        seconds = run(kind, setup)
        crossed = proxy.counters()
        rows.append({"workload": workload, "peer": peer, "seconds": seconds,
                     "requests": crossed["requests_total"], "bytes": crossed["bytes_down"]})
        log(f"{workload:<22} {peer:<18} {seconds * 1e3:9.2f} ms  "
            f"{crossed['requests_total']:5d} requests  {crossed['bytes_down'] / 2**20:8.1f} MiB")

    peers = ["direct", "chunkd cold tcp", "chunkd cold shm", "chunkd warm tcp",
             "chunkd warm shm"]
    for rep in range(args.repeat):
        for name in ("plain", "sharded"):
            for peer in peers:
                sample(f"{name} whole", peer,
                       lambda kind, setup, name=name: read_whole(kind, setup, name, expected))
        for peer in peers:
            sample("sharded inner chunk", peer,
                   lambda kind, setup: read_inner_chunks(kind, setup, picks, expected))
        for peer in ("direct", "chunkd cold tcp", "chunkd warm tcp", "chunkd warm shm"):
            sample(f"plain x{args.readers} readers", peer,
                   lambda kind, setup: read_by_many(kind, setup, args.readers))
    chunkd.stop()
    for row in rows:
        n = args.readers if "readers" in row["workload"] else 1
        row["gbps"] = (None if row["workload"] == "sharded inner chunk"
                       else n * total_bytes / row["seconds"] / 1e9)


# --- the big object ------------------------------------------------------------------------------

BIG_KEY = "big/big.bin"  # in the bucket; the nginx root holds big/big.bin too
SEGMENT = 64 << 20  # the generator's unit and the size of each ranged read of the whole object
TAIL = 4096
# ServerInfo counters that may hold the peak of the bytes held for reads in flight.
PEAK_READ_COUNTERS = ("read_held_peak_bytes", "read_budget_peak_bytes", "read_bytes_held_peak")


def big_segment(index: int, size: int) -> bytes:
    """Bytes [index * SEGMENT, ...) of the big object (random, reproducible per segment)."""
    return np.random.default_rng([18, index]).bytes(min(SEGMENT, size - index * SEGMENT))


def write_big(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for index in range((size + SEGMENT - 1) // SEGMENT):
            f.write(big_segment(index, size))


def upload_big(moto_url: str, path: Path) -> None:
    """Puts the big object into the bucket directly (not over the link), in 64 MiB parts."""
    from boto3.s3.transfer import TransferConfig

    s3_client(moto_url).upload_file(str(path), BUCKET, BIG_KEY,
                   Config=TransferConfig(multipart_threshold=SEGMENT, multipart_chunksize=SEGMENT,
                                         max_concurrency=2))


def proc_status_bytes(pid: int, field: str) -> int | None:
    """A /proc/PID/status memory line (VmRSS, VmHWM) in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_read_counter(counters: dict) -> tuple[str, int] | None:
    for name in PEAK_READ_COUNTERS:
        if name in counters:
            return name, counters[name]
    return None


def server_counters(address: str) -> dict:
    import chunkd

    with chunkd.Client(address) as c:
        return dict(c.server_info().counters)


class Verifier:
    """Compares what was read with the object on disk, range by range."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def check(self, offset: int, data) -> None:
        if os.pread(self.fd, len(data), offset) != data:
            raise RuntimeError(f"the big object's bytes at {offset} (+{len(data)}) differ from "
                               "those written")

    def close(self) -> None:
        os.close(self.fd)


def read_tail(args, setup: dict, proxy: Proxy, chunkd: Chunkd, verifier: Verifier,
              rows: list) -> None:
    """The last 4 KiB of the big object over S3, cold: through a fresh chunkd, then directly."""
    import chunkd as chunkd_client
    import obstore
    from obstore.store import S3Store

    size = args.big_bytes
    chunkd.start()
    try:
        address = chunkd.server.tcp
        before = server_counters(address)
        proxy.counters(reset=True)
        with chunkd_client.Client(address, timeout=600) as c:
            start = time.perf_counter()
            data = bytes(c.get(BIG_KEY, size - TAIL, size))
            seconds = time.perf_counter() - start
        crossed = proxy.counters()
        after = server_counters(address)
        verifier.check(size - TAIL, data)
        rows.append({"workload": "big: last 4 KiB, S3, cold", "peer": "chunkd cold tcp",
                     "seconds": seconds, "requests": crossed["requests_total"],
                     "bytes": crossed["bytes_down"],
                     "store_bytes": after["backend_read_bytes"] - before["backend_read_bytes"]})
    finally:
        chunkd.stop()
    store = S3Store(BUCKET, endpoint=setup["link"], region="us-east-1", access_key_id="testing",
                    secret_access_key="testing", client_options={"allow_http": True})
    proxy.counters(reset=True)
    start = time.perf_counter()
    data = bytes(obstore.get_range(store, BIG_KEY, start=size - TAIL, end=size))
    seconds = time.perf_counter() - start
    crossed = proxy.counters()
    verifier.check(size - TAIL, data)
    rows.append({"workload": "big: last 4 KiB, S3, cold", "peer": "direct", "seconds": seconds,
                 "requests": crossed["requests_total"], "bytes": crossed["bytes_down"]})
    for row in rows[-2:]:
        log(f"{row['workload']:<28} {row['peer']:<16} {row['seconds'] * 1e3:9.2f} ms  "
            f"{row['requests']:5d} requests  {row['bytes']:12d} bytes over the link")


def read_whole_big(args, binary: Path, work: Path, flags: list[str], verifier: Verifier,
                   rows: list) -> None:
    """The whole big object from nginx behind a link of its own: obstore directly (one
    streamed GET), then a fresh chunkd (consecutive 64 MiB ranges)."""
    import chunkd as chunkd_client
    import obstore
    from obstore.store import HTTPStore

    size = args.big_bytes
    workload = "big: whole, HTTP, cold"
    if benchlib.nginx_binary() is None:
        rows.append({"workload": workload, "peer": "direct", "seconds": None,
                     "error": "nginx is not installed (deploy/scripts/install-deps.sh all)"})
        return
    nginx = benchlib.NginxServer(work / "big-root", work / "nginx")
    link_dir = work / "http-link"
    link_dir.mkdir(exist_ok=True)
    link = Proxy(f"127.0.0.1:{nginx.port}", args.rtt_ms, args.mbit, link_dir)
    try:
        # Directly: one GET, streamed; each 64 MiB gathered is checked with the clock stopped.
        store = HTTPStore.from_url(link.url, client_options={"allow_http": True})
        buffer = bytearray(SEGMENT)
        link.counters(reset=True)
        seconds, offset, filled = 0.0, 0, 0
        start = time.perf_counter()
        for piece in obstore.get(store, BIG_KEY).stream(min_chunk_size=8 << 20):
            piece = memoryview(piece)
            while len(piece):
                n = min(len(piece), SEGMENT - filled)
                buffer[filled:filled + n] = piece[:n]
                filled, piece = filled + n, piece[n:]
                if filled == SEGMENT or offset + filled == size:
                    seconds += time.perf_counter() - start
                    verifier.check(offset, memoryview(buffer)[:filled])
                    offset, filled = offset + filled, 0
                    start = time.perf_counter()
        seconds += time.perf_counter() - start
        if offset + filled != size:
            raise RuntimeError(f"direct: {offset + filled} bytes of the big object, not {size}")
        crossed = link.counters()
        rows.append({"workload": workload, "peer": "direct", "seconds": seconds,
                     "requests": crossed["requests_total"], "bytes": crossed["bytes_down"]})

        # Through chunkd: 64 MiB ranges, one Get each; stopped once the link carried 3x.
        server = benchlib.ChunkdServer(binary, link.url, work / "chunkd-big",
                                       "--host_cache_bytes=1GiB", *flags)
        try:
            rss_start = proc_status_bytes(server.pid, "VmRSS")
            link.counters(reset=True)
            seconds, offset, stopped = 0.0, 0, None
            with chunkd_client.Client(server.tcp, timeout=600) as c:
                while offset < size:
                    end = min(offset + SEGMENT, size)
                    start = time.perf_counter()
                    data = c.get(BIG_KEY, offset, end)
                    seconds += time.perf_counter() - start
                    verifier.check(offset, data)
                    del data
                    offset = end
                    crossed = link.counters()
                    if crossed["bytes_down"] > 3 * size and offset < size:
                        stopped = (f"stopped after {offset >> 20} MiB read: "
                                   f"{crossed['bytes_down'] / 2**30:.1f} GiB had crossed the link")
                        break
            crossed = link.counters()
            counters = server_counters(server.tcp)
            peak = peak_read_counter(counters)
            rows.append({"workload": workload, "peer": "chunkd cold tcp (64 MiB ranges)",
                         "seconds": seconds, "read_bytes": offset,
                         "requests": crossed["requests_total"], "bytes": crossed["bytes_down"],
                         "stopped": stopped, "rss_start": rss_start,
                         "rss_peak": proc_status_bytes(server.pid, "VmHWM"),
                         "peak_read_counter": peak})
        finally:
            server.stop()
    finally:
        link.stop()
        nginx.stop()
    for row in rows[-2:]:
        log(f"{row['workload']:<28} {row['peer']:<16} {row['seconds']:9.2f} s  "
            f"{row['requests']:5d} requests  {row['bytes'] / 2**20:10.1f} MiB over the link"
            + (f"  ({row['stopped']})" if row.get("stopped") else ""))


def measure_big(args, moto_url: str, proxy: Proxy, chunkd: Chunkd, binary: Path, work: Path,
                rows: list) -> None:
    size = args.big_bytes
    path = work / "big-root" / BIG_KEY
    log(f"writing the big object ({size / 2**30:g} GiB) and putting it in S3 (not over the link)")
    write_big(path, size)
    upload_big(moto_url, path)
    verifier = Verifier(path)
    try:
        read_tail(args, {"link": proxy.url}, proxy, chunkd, verifier, rows)
        read_whole_big(args, binary, work, chunkd.flags, verifier, rows)
    finally:
        verifier.close()


def report_big(rows: list, args, binary: Path) -> list[str]:
    """The big object's table and targets."""
    size = args.big_bytes
    block, block_text = benchlib.block_size(binary, args.server_flag)
    read_ahead = next(((flag, value) for flag in ("read_ahead_blocks", "readahead_blocks",
                                                  "read_ahead")
                       for value in [benchlib.server_flag_value(binary, args.server_flag,
                                                                flag)[0]]
                       if value is not None), None)
    lines = ["", f"## A {size / 2**30:g} GiB object", "",
             f"block: {block_text}; read-ahead: "
             f"{f'--{read_ahead[0]}={read_ahead[1]}' if read_ahead else 'no read-ahead flag'}. "
             "The last 4 KiB over S3 (moto); the whole object over HTTP (nginx) behind its own "
             "link of the same RTT: chunkd by consecutive 64 MiB ranges (the Python client has "
             "no streaming read), obstore with one streamed GET. One cold sample each.", "",
             "| read | peer | time | GB/s | × direct | requests | over the link | server RSS "
             "start → peak | peak read memory |",
             "| --- | --- | --: | --: | --: | --: | --: | --: | --: |"]
    by = {(r["workload"], r["peer"]): r for r in rows if r["workload"].startswith("big:")}
    for (workload, peer), r in by.items():
        if r.get("seconds") is None:
            lines.append(f"| {workload} | {peer} | not measured: {r.get('error')} | | | | | | |")
            continue
        direct = by.get((workload, "direct"))
        whole = workload.startswith("big: whole")
        read = r.get("read_bytes", size if whole else TAIL)
        gbps = read / r["seconds"] / 1e9 if whole else None
        ratio = (direct["seconds"] / r["seconds"] * (read / size)
                 if whole and direct and direct.get("seconds") and peer != "direct" else None)
        over = (f"{r['bytes'] / 2**20:.1f} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes']} B")
        rss = (f"{r['rss_start'] / 2**20:.0f} → {r['rss_peak'] / 2**20:.0f} MiB"
               if r.get("rss_peak") else "")
        peak = r.get("peak_read_counter")
        peak_text = (f"{peak[1] / 2**20:.1f} MiB ({peak[0]})" if peak
                     else ("n/a" if "peak_read_counter" in r else ""))
        lines.append(f"| {workload} | {peer} | {r['seconds'] * 1e3:.1f} ms | "
                     f"{'' if gbps is None else f'{gbps:.3f}'} | "
                     f"{'' if ratio is None else f'{ratio:.2f}×'} | {r['requests']} | {over} | "
                     f"{rss} | {peak_text} |")

    lines += ["", f"Targets (issue 18, a {size / 2**30:g} GiB object):"]
    tail = by.get(("big: last 4 KiB, S3, cold", "chunkd cold tcp"))
    if tail is None:
        lines.append("- its last 4 KiB costs at most one block from the store: not measured")
    else:
        text = (f"- its last 4 KiB costs at most one block from the store: "
                f"{tail['store_bytes']} bytes read from the store, {tail['bytes']} bytes "
                f"(HTTP headers included) and {tail['requests']} request(s) over the link")
        if block is None:
            lines.append(f"{text} — not decided: no block size to compare with")
        else:
            held = tail["store_bytes"] <= block
            lines.append(f"{text}; block {block} bytes — {'held' if held else 'NOT held'}")
    whole = by.get(("big: whole, HTTP, cold", "chunkd cold tcp (64 MiB ranges)"))
    if whole is None or whole.get("seconds") is None:
        lines.append("- reading it whole holds at most read-ahead × block size in the server: "
                     "not measured")
    else:
        peak = whole.get("peak_read_counter")
        bound = (block * parse_count(read_ahead[1])
                 if block and read_ahead and parse_count(read_ahead[1]) else None)
        rss = whole["rss_peak"] - whole["rss_start"] if whole.get("rss_peak") else None
        text = ("- reading it whole holds at most read-ahead × block size in the server: "
                + (f"peak read memory {peak[1] / 2**20:.1f} MiB ({peak[0]})" if peak else
                   "peak read memory n/a (ServerInfo has no such counter)")
                + (f", RSS grew {rss / 2**20:.0f} MiB" if rss is not None else ""))
        if peak is None or bound is None:
            lines.append(f"{text} — not decided (needs the counter and a read-ahead flag)")
        else:
            lines.append(f"{text}; read-ahead × block {bound / 2**20:.1f} MiB — "
                         f"{'held' if peak[1] <= bound else 'NOT held'}")
        if whole.get("stopped"):
            lines.append(f"- (the whole read through chunkd was {whole['stopped']}: this chunkd "
                         "reads the whole object again for every range)")
    return lines


# --- the disk tier ------------------------------------------------------------------------------

DISK_CHUNK = (64, 64, 64)  # float32: 1 MiB chunks
DISK_SLAB = 256  # rows of the first axis read at once (64 chunks, 64 MiB)


def disk_shape(dataset_bytes: int) -> tuple[int, int, int]:
    """(rows, 256, 256) float32 of about `dataset_bytes`, whole slabs of DISK_SLAB rows."""
    slab_bytes = DISK_SLAB * 256 * 256 * 4
    return (max(1, round(dataset_bytes / slab_bytes)) * DISK_SLAB, 256, 256)


def disk_slab(index: int) -> np.ndarray:
    """Rows [index * DISK_SLAB, ...) of the dataset (random, reproducible per slab)."""
    return np.random.default_rng([20, index]).random((DISK_SLAB, 256, 256), dtype=np.float32)


def write_disk_dataset(moto_url: str, work: Path, shape: tuple[int, int, int]) -> None:
    """The array `disk` written slab by slab into a directory, then put in the bucket
    directly (not over the link), file by file."""
    import zarr

    local = work / "disk-array"
    store = zarr.storage.LocalStore(local)
    array = zarr.create_array(store, name="disk", shape=shape, chunks=DISK_CHUNK,
                              dtype="float32", compressors=None, zarr_format=3)
    s3 = s3_client(moto_url)
    for i in range(shape[0] // DISK_SLAB):
        array[i * DISK_SLAB:(i + 1) * DISK_SLAB] = disk_slab(i)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, str(f.relative_to(local)))
            f.unlink()


def read_disk_pass(kind: str, setup: dict, shape: tuple[int, int, int]) -> float:
    """Seconds to read the `disk` array slab by slab (each checked, with the clock stopped)."""
    import zarr

    store = open_store(kind, setup)
    try:
        array = zarr.open_array(store, path="disk", mode="r")
        seconds = 0.0
        for i in range(shape[0] // DISK_SLAB):
            start = time.perf_counter()
            got = array[i * DISK_SLAB:(i + 1) * DISK_SLAB]
            seconds += time.perf_counter() - start
            if not np.array_equal(got, disk_slab(i)):
                raise RuntimeError(f"{kind}: slab {i} of the disk array differs from the one "
                                   "written")
            del got
    finally:
        close_store(store)
    return seconds


def wait_index_loaded(address: str, seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        counters = server_counters(address)
        if counters.get("disk_index_loaded") == 1 or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


def measure_disk_tier(args, moto_url: str, proxy: Proxy, binary: Path, work: Path,
                      rows: list) -> None:
    shape = disk_shape(args.disk_dataset_bytes)
    dataset = shape[0] * shape[1] * shape[2] * 4
    log(f"writing the disk-tier dataset ({dataset / 2**20:.0f} MiB in 1 MiB chunks) to S3 "
        "(directly, not over the link)")
    write_disk_dataset(moto_url, work, shape)
    link = {"link": proxy.url}

    proxy.counters(reset=True)
    seconds = read_disk_pass("direct", link, shape)
    crossed = proxy.counters()
    rows.append({"workload": "disk tier", "peer": "direct", "pass": 0, "seconds": seconds,
                 "requests": crossed["requests_total"], "bytes": crossed["bytes_down"]})
    log(f"disk tier: direct {seconds:.2f} s, {crossed['bytes_down'] / 2**20:.0f} MiB over the "
        "link")

    tier = work / "disk-tier"
    flags = [f"--s3_endpoint={proxy.url}", f"--host_cache_bytes={args.disk_host_bytes}",
             f"--disk_cache_dir={tier}", f"--disk_cache_bytes={2 * dataset}", *args.server_flag]
    env = {**os.environ, **CREDENTIALS}
    server = benchlib.ChunkdServer(binary, f"s3://{BUCKET}", work / "chunkd-disk-1", *flags,
                                   env=env)
    restarted = None
    try:
        for number in (1, 2, 3):
            if number == 3:
                # kill -9 after pass 2: what the tier wrote behind the reads must survive.
                server.process.kill()
                server.process.wait()
                restarted = time.perf_counter()
                server = benchlib.ChunkdServer(binary, f"s3://{BUCKET}", work / "chunkd-disk-2",
                                               *flags, env=env)
                loaded = wait_index_loaded(server.tcp)
                rows.append({"workload": "disk tier", "peer": "restart", "pass": 3,
                             "seconds": time.perf_counter() - restarted,
                             "index_load_micros": loaded.get("disk_index_load_micros"),
                             "entries": loaded.get("disk_entries")})
            setup = {**link, "chunkd_tcp": server.tcp, "chunkd_socket": str(server.socket)}
            if number != 2:
                # What the server takes before it holds anything (code, gRPC, arenas).
                rss_start = proc_status_bytes(server.pid, "VmRSS")
            before = server_counters(server.tcp)
            proxy.counters(reset=True)
            seconds = read_disk_pass(args.disk_delivery, setup, shape)
            crossed = proxy.counters()
            after = server_counters(server.tcp)

            def delta(name: str) -> int | None:
                if name not in after:
                    return None
                return after[name] - before.get(name, 0)

            rows.append({"workload": "disk tier", "peer": "chunkd + disk tier",
                         "pass": number, "seconds": seconds,
                         "requests": crossed["requests_total"], "bytes": crossed["bytes_down"],
                         "store_bytes": delta("backend_read_bytes"),
                         "disk_hits": delta("disk_hits"),
                         "revalidations": delta("revalidations"),
                         "rss_start": rss_start,
                         "disk_writes_dropped": delta("disk_writes_dropped"),
                         "rss_peak": proc_status_bytes(server.pid, "VmHWM"),
                         "index_bytes": after.get("disk_index_bytes"),
                         "disk_entries": after.get("disk_entries"),
                         "host_bytes": args.disk_host_bytes})
            r = rows[-1]
            log(f"disk tier: pass {number} {seconds:.2f} s, store {r['store_bytes']} B, link "
                f"{crossed['bytes_down'] / 2**20:.1f} MiB, disk hits {r['disk_hits']}")
    finally:
        server.stop()


def report_disk_tier(rows: list, args) -> list[str]:
    """The disk tier's table and targets."""
    by = {(r["peer"], r["pass"]): r for r in rows if r["workload"] == "disk tier"}
    direct = by.get(("direct", 0))
    shape = disk_shape(args.disk_dataset_bytes)
    dataset = shape[0] * shape[1] * shape[2] * 4
    lines = ["", f"## The disk tier: {dataset / 2**20:.0f} MiB, host cache "
             f"{args.disk_host_bytes / 2**20:.0f} MiB ({dataset / args.disk_host_bytes:.1f}x)",
             "", "Read by slabs of 64 MiB through zarr; chunkd with ChunkdStore "
             f"{'inline over TCP' if args.disk_delivery == 'tcp' else 'with shared memory over its UNIX socket'}. "
             "The server was killed (SIGKILL) after pass 2 and started again on the same tier.",
             "", "| pass | peer | time | × direct | store bytes | over the link | disk hits | "
             "revalidations | server RSS start → peak |", "| --: | --- | --: | --: | --: | --: | "
             "--: | --: | --: |"]
    if direct:
        lines.append(f"| | direct | {direct['seconds']:.2f} s | 1.00× | | "
                     f"{direct['bytes'] / 2**20:.1f} MiB | | | |")
    passes = {}
    for n in (1, 2, 3):
        r = by.get(("chunkd + disk tier", n))
        if r is None:
            continue
        passes[n] = r
        ratio = direct["seconds"] / r["seconds"] if direct else None
        lines.append(f"| {n} | chunkd + disk tier | {r['seconds']:.2f} s | "
                     f"{'' if ratio is None else f'{ratio:.2f}×'} | {r['store_bytes']} | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {r['disk_hits']} | {r['revalidations']} | "
                     f"{r['rss_start'] / 2**20:.0f} → {r['rss_peak'] / 2**20:.0f} MiB |")
    restart = by.get(("restart", 3))
    if restart:
        load = restart.get("index_load_micros")
        lines += ["", f"Restart after kill -9: serving with its index loaded in "
                  f"{restart['seconds']:.2f} s (index load "
                  f"{'n/a' if load is None else f'{load / 1e3:.1f} ms'}, "
                  f"{restart.get('entries')} entries)."]

    def verdict(ok: bool) -> str:
        return "held" if ok else "NOT held"

    lines += ["", "Targets (issue 20):"]
    for n in (2, 3):
        r = passes.get(n)
        if r is None or not direct:
            lines.append(f"- pass {n} ≥ 5× direct: not measured")
            continue
        ratio = direct["seconds"] / r["seconds"]
        lines.append(f"- pass {n} ≥ 5× direct: {ratio:.2f}× — {verdict(ratio >= 5)}")
    if 2 in passes and 3 in passes:
        p2, p3 = passes[2], passes[3]
        lines.append(f"- pass 3 reads no bytes from the store: {p3['store_bytes']} bytes — "
                     f"{verdict(p3['store_bytes'] == 0)}")
        speed = p2["seconds"] / p3["seconds"]
        lines.append(f"- pass 3 ≥ 0.8× pass 2: {speed:.2f}× — {verdict(speed >= 0.8)}")
    for n, r in passes.items():
        if r.get("index_bytes") is None or not r.get("rss_peak"):
            continue
        bound = r["host_bytes"] + r["index_bytes"]
        grown = r["rss_peak"] - r["rss_start"]
        per = r["index_bytes"] / r["disk_entries"] if r.get("disk_entries") else None
        lines.append(f"- server RSS within the host budget + the tier's index (pass {n}): grew "
                     f"{grown / 2**20:.0f} MiB from an idle server's "
                     f"{r['rss_start'] / 2**20:.0f} MiB, budget "
                     f"{r['host_bytes'] / 2**20:.0f} MiB + index "
                     f"{r['index_bytes'] / 2**20:.2f} MiB"
                     f"{'' if per is None else f' ({per:.0f} B per entry)'} — "
                     f"{verdict(grown <= bound)}")
    return lines


def parse_count(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def report(rows: list, args, env: dict, binary: Path) -> str:
    big_rows = [r for r in rows if r["workload"].startswith("big:")]
    disk_rows = [r for r in rows if r["workload"] == "disk tier"]
    rows = [r for r in rows if not r["workload"].startswith("big:") and r not in disk_rows]

    def med(workload, peer, key="seconds"):
        values = [r[key] for r in rows
                  if r["workload"] == workload and r["peer"] == peer and r[key] is not None]
        return statistics.median(values) if values else None

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    lines = [f"# chunkd in front of S3 at {args.rtt_ms:g} ms RTT"
             f"{f', {args.mbit:g} Mbit/s' if args.mbit else ''}", "",
             f"`python/benchmarks/remote.py{' --quick' if args.quick else ''}"
             f"{f' --only {args.only}' if args.only else ''}"
             f"{' --big' if args.big and args.quick else ''}"
             f"{f' --big_bytes {args.big_bytes}' if args.big and args.big_bytes != 2 << 30 else ''}"
             f"{f' --disk-tier --disk_dataset_bytes {args.disk_dataset_bytes}' if args.disk_tier else ''}"
             f"{f' --disk_host_bytes {args.disk_host_bytes}' if args.disk_tier else ''}"
             f"{f' --disk_delivery {args.disk_delivery}' if args.disk_tier else ''}"
             f"{''.join(f' --server-flag={f}' for f in args.server_flag)}` — commit "
             f"{env['commit']}{' (dirty)' if env['dirty'] else ''}, {env['cores']} cores, load "
             f"{env['loadavg_start'][0]:.1f} at the start; "
             f"{'one sample per pass' if args.disk_tier else f'medians of {args.repeat}'}; moto "
             "S3 on loopback behind latency_proxy.py; bytes and requests are what crossed the "
             "link during the timed read."
             + (f" chunkd flags: {' '.join(args.server_flag)}." if args.server_flag else "")]
    if rows:
        lines += ["", "| workload | peer | time | GB/s | × direct | requests | MiB over the link |",
                  "| --- | --- | --: | --: | --: | --: | --: |"]
    for w in workloads:
        base = med(w, "direct")
        for peer in dict.fromkeys(r["peer"] for r in rows if r["workload"] == w):
            s = med(w, peer)
            gbps = med(w, peer, "gbps")
            ratio = base / s if base and s else None
            lines.append(f"| {w} | {peer} | {s * 1e3:.1f} ms | "
                         f"{'' if gbps is None else f'{gbps:.3f}'} | "
                         f"{'' if ratio is None else f'{ratio:.2f}×'} | "
                         f"{med(w, peer, 'requests'):.0f} | {med(w, peer, 'bytes') / 2**20:.1f} |")

    def target(text, workload, peer, threshold):
        base, s = med(workload, "direct"), med(workload, peer)
        if not base or not s:
            return f"- {text}: not measured"
        ratio = base / s
        return f"- {text}: {ratio:.2f}× — {'held' if ratio >= threshold else 'NOT held'}"

    many = f"plain x{args.readers} readers"
    if rows:
        lines += [
            "", f"Targets (issue 18, remote, {args.rtt_ms:g} ms RTT):",
            target("a cold whole-array read through chunkd ≥ 1.0× direct", "plain whole",
                   "chunkd cold tcp", 1.0),
            target("warm ≥ 5× direct over TCP", "plain whole", "chunkd warm tcp", 5.0),
            target("warm ≥ 8× direct with shared memory", "plain whole", "chunkd warm shm", 8.0),
            target("sharded random inner chunks cold ≥ 1.0× direct", "sharded inner chunk",
                   "chunkd cold tcp", 1.0),
            target("sharded random inner chunks warm ≥ 5× direct", "sharded inner chunk",
                   "chunkd warm tcp", 5.0)]
        cold_bytes = med(many, "chunkd cold tcp", "bytes")
        warm_bytes = med(many, "chunkd warm tcp", "bytes")
        if cold_bytes is None or warm_bytes is None:
            lines.append(f"- {args.readers} readers of the same array: the array crosses the "
                         "link once cold and never warm: not measured")
        else:
            size = SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
            lines += [
                f"- {args.readers} readers of the same array: the array crosses the link once "
                f"cold: {cold_bytes / size:.2f}× the array — "
                f"{'held' if cold_bytes <= size * 1.05 else 'NOT held'}",
                f"- {args.readers} readers of the same array: never warm: "
                f"{warm_bytes / 2**20:.2f} MiB over the link (metadata revalidations: under "
                f"1 MiB) — {'held' if warm_bytes < 1 << 20 else 'NOT held'}"]
        asked = args.inner_chunks * INNER_CHUNKS[0] * INNER_CHUNKS[1] * INNER_CHUNKS[2] * 4
        inner_bytes = med("sharded inner chunk", "chunkd cold tcp", "bytes")
        if inner_bytes is not None:
            lines += ["", f"Sharded random inner chunks cold through chunkd moved "
                      f"{inner_bytes / asked:.1f}× the bytes asked over the link "
                      f"({inner_bytes / 2**20:.1f} MiB for {asked / 2**20:.1f} MiB; the ≤ 2× "
                      "target is the file store's: python/benchmarks/sharded_local.py)."]
    if big_rows:
        lines += report_big(big_rows, args, binary)
    if any(r["workload"] == "disk tier" for r in disk_rows):
        lines += report_disk_tier(disk_rows, args)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, fewer chunks")
    parser.add_argument("--rtt_ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap (0: none)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (3; 1 --quick)")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--inner_chunks", type=int, default=None,
                        help="random inner chunks read one at a time (32; 8 --quick)")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                        help="the big object's section (on; off with --quick unless --big)")
    parser.add_argument("--big_bytes", type=benchlib.parse_bytes, default="2GiB",
                        help="the big object's size (2GiB)")
    parser.add_argument("--only", choices=("arrays", "big"),
                        help="run one section only (arrays: the zarr arrays; big: the object)")
    parser.add_argument("--server-flag", dest="server_flag", action="append", default=[],
                        help="a flag passed to every chunkd as it is (repeatable), e.g. "
                             "--server-flag=--block_bytes=1MiB")
    parser.add_argument("--disk-tier", dest="disk_tier", action="store_true",
                        help="the disk tier's section only (3 passes, kill -9 before the third)")
    parser.add_argument("--disk_dataset_bytes", type=benchlib.parse_bytes, default="1GiB",
                        help="the disk-tier dataset's size (1GiB)")
    parser.add_argument("--disk_host_bytes", type=benchlib.parse_bytes, default="256MiB",
                        help="the host cache of the disk-tier run (256MiB)")
    parser.add_argument("--disk_delivery", choices=("tcp", "shm"), default="tcp",
                        help="the disk-tier run's ChunkdStore: inline over TCP (tcp) or shared "
                             "memory over the UNIX socket (shm)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.inner_chunks = args.inner_chunks or (8 if args.quick else 32)
    if args.big is None:
        args.big = not args.quick or args.only == "big"
    if not args.big_bytes or args.big_bytes < TAIL:
        parser.error("--big_bytes: a size of at least 4 KiB (e.g. 2GiB, 512MiB)")
    arrays = args.only in (None, "arrays") and not args.disk_tier
    big = args.big and args.only in (None, "big") and not args.disk_tier

    benchlib.ensure_built(["chunkd", "chunkd_native"], build=not args.no_build)
    if not MOTO_SERVER.exists():
        raise SystemExit(f"{MOTO_SERVER} is missing: deploy/scripts/setup-venv.sh installs "
                         "moto[server]")
    out = benchlib.results_dir(args.out)
    env = benchlib.environment(rtt_ms=args.rtt_ms, mbit=args.mbit,
                               server_flags=args.server_flag,
                               big_bytes=args.big_bytes if big else None)
    binary = benchlib.copy_binaries(["chunkd"], out / "bin")["chunkd"]
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="chunkd-remote-") as tmp:
        work = Path(tmp)
        port = benchlib.free_port()
        moto = Process([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                       out / "logs" / "moto.log")
        proxy = None
        chunkd = None
        try:
            moto.wait_for(lambda: port_answers(port), "moto_server")
            s3_client(f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
            proxy = Proxy(f"127.0.0.1:{port}", args.rtt_ms, args.mbit, work)
            chunkd = Chunkd(binary, proxy.url, work, args.server_flag)
            if arrays:
                log("writing the arrays to S3 (directly, not over the link)")
                write_arrays(f"http://127.0.0.1:{port}", work)
                measure(args, proxy, chunkd, rows)
            if big:
                measure_big(args, f"http://127.0.0.1:{port}", proxy, chunkd, binary, work, rows)
            if args.disk_tier:
                measure_disk_tier(args, f"http://127.0.0.1:{port}", proxy, binary, work, rows)
        finally:
            if chunkd:
                chunkd.stop()
            if proxy:
                proxy.stop()
            moto.stop()
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    benchlib.write_json(out / "env.json", env)
    text = report(rows, args, env, binary)
    (out / "results.md").write_text(text)
    print(text)
    log(f"results in {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""chunkd where it lives: in front of an object store tens of milliseconds away.

    .venv/bin/python python/benchmarks/remote.py [--quick] [--rtt_ms 20] [--mbit 0]
                                                 [--repeat N] [--readers 8] [--out DIR]
                                                 [--no-build]

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
1 with --quick). Writes results.md (printed), results.jsonl and env.json into --out (default
results/<timestamp>/).
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


def write_arrays(moto_url: str, work: Path) -> None:
    """Writes both arrays with zarr into a directory, then uploads its files to the bucket
    directly (the writes do not cross the link)."""
    import boto3
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
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
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

    def __init__(self, binary: Path, link: str, work: Path) -> None:
        self.binary, self.link, self.work = binary, link, work
        self.server = None
        self.starts = 0

    def start(self) -> dict:
        self.stop()
        self.starts += 1
        self.server = benchlib.ChunkdServer(self.binary, f"s3://{BUCKET}",
                                            self.work / f"chunkd-{self.starts}",
                                            f"--s3_endpoint={self.link}",
                                            "--host_cache_bytes=1GiB",
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


def report(rows: list, args, env: dict) -> str:
    def med(workload, peer, key="seconds"):
        values = [r[key] for r in rows
                  if r["workload"] == workload and r["peer"] == peer and r[key] is not None]
        return statistics.median(values) if values else None

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    lines = [f"# chunkd in front of S3 at {args.rtt_ms:g} ms RTT"
             f"{f', {args.mbit:g} Mbit/s' if args.mbit else ''}", "",
             f"`python/benchmarks/remote.py{' --quick' if args.quick else ''}` — commit "
             f"{env['commit']}{' (dirty)' if env['dirty'] else ''}, {env['cores']} cores, load "
             f"{env['loadavg_start'][0]:.1f} at the start; medians of {args.repeat}; moto "
             "S3 on loopback behind latency_proxy.py; bytes and requests are what crossed the "
             "link during the timed read.", "",
             "| workload | peer | time | GB/s | × direct | requests | MiB over the link |",
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
    lines += ["", "Targets (issue: big values by the block):",
              target("cold whole array ≥ 1.0× direct", "plain whole", "chunkd cold tcp", 1.0),
              target("warm ≥ 5× direct over TCP", "plain whole", "chunkd warm tcp", 5.0),
              target("warm ≥ 8× direct with shared memory", "plain whole", "chunkd warm shm", 8.0),
              target("sharded random inner chunks cold ≥ 1.0× direct", "sharded inner chunk",
                     "chunkd cold tcp", 1.0),
              target("sharded random inner chunks warm ≥ 5× direct", "sharded inner chunk",
                     "chunkd warm tcp", 5.0)]
    asked = args.inner_chunks * INNER_CHUNKS[0] * INNER_CHUNKS[1] * INNER_CHUNKS[2] * 4
    inner_bytes = med("sharded inner chunk", "chunkd cold tcp", "bytes")
    if inner_bytes is not None:
        lines.append(f"- sharded random inner chunks cold: bytes over the link ≤ 2× the bytes "
                     f"asked: {inner_bytes / asked:.1f}× ({inner_bytes / 2**20:.1f} MiB for "
                     f"{asked / 2**20:.1f} MiB) — {'held' if inner_bytes <= 2 * asked else 'NOT held'}")
    cold_bytes = med(many, "chunkd cold tcp", "bytes")
    warm_bytes = med(many, "chunkd warm tcp", "bytes")
    if cold_bytes is not None and warm_bytes is not None:
        size = SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
        lines.append(f"- {args.readers} readers: cold moved {cold_bytes / size:.2f}× the array "
                     f"over the link ({'held' if cold_bytes <= size * 1.05 else 'NOT held'}: "
                     f"once), warm {warm_bytes / 2**20:.1f} MiB "
                     f"({'held' if warm_bytes < 1 << 20 else 'NOT held'}: never)")
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
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.inner_chunks = args.inner_chunks or (8 if args.quick else 32)

    benchlib.ensure_built(["chunkd"], build=not args.no_build)
    if not MOTO_SERVER.exists():
        raise SystemExit(f"{MOTO_SERVER} is missing: deploy/scripts/setup-venv.sh installs "
                         "moto[server]")
    out = benchlib.results_dir(args.out)
    env = benchlib.environment(rtt_ms=args.rtt_ms, mbit=args.mbit)
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
            log("writing the arrays to S3 (directly, not over the link)")
            write_arrays(f"http://127.0.0.1:{port}", work)
            proxy = Proxy(f"127.0.0.1:{port}", args.rtt_ms, args.mbit, work)
            chunkd = Chunkd(binary, proxy.url, work)
            measure(args, proxy, chunkd, rows)
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
    text = report(rows, args, env)
    (out / "results.md").write_text(text)
    print(text)
    log(f"results in {out}")


if __name__ == "__main__":
    main()

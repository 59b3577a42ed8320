#!/usr/bin/env python3
"""TensorStore reading a zarr3 array through chunkd, beside TensorStore's own drivers, in one run.

    .venv/bin/python python/benchmarks/tensorstore_read.py [--quick] [--repeats 5] [--out FILE]

The arrays (written once by TensorStore to --data, default /tmp/chunkd-bench-tensorstore, and
reused while their parameters match): zarr3, float32, 256 x 256 x 256 (64 MiB), chunks of
64 x 64 x 64 (64 chunks of 1 MiB), one uncompressed ("raw") and one with zstd level 3 ("zstd");
values are standard normals rounded to 1/256, so that zstd has something to do.

Each path reads the whole array into numpy with ``ts.open(spec).result().read().result()``
(TensorStore's default context: no cache of its own, so every read goes to the key-value store
and every byte is read), warm:

* ``memory``: TensorStore's memory driver holding the array (the ceiling: no I/O at all);
* ``file``: TensorStore's file driver on the directory (files in the page cache);
* ``http (nginx)``: TensorStore's http driver against nginx (Debian's, started here as the
  current user with its own configuration on a free loopback port) serving the directory, what
  a TensorStore user picks today for remote reads;
* ``chunkd (tsgrpc, TCP)``: TensorStore's tsgrpc_kvstore driver against chunkd (build/server/
  chunkd, or --binary) serving the directory over loopback TCP, with a cache that holds both
  arrays; and the same over chunkd's UNIX socket;
* ``8 processes``: 8 processes (spawned) each reading the whole array at once, through one
  chunkd (TCP, and its UNIX socket) and through the file driver: aggregate bytes per second
  of wall time.

Every path is read once to warm it (and checked equal to the array written), then the rounds run
interleaved (every path, then every path again) so the machine's load spreads over all of them;
the table reports the median of --repeats reads and the best, GB/s = 10^9 bytes/s. The targets
of the issue are computed from the run's own rows: through chunkd, in one process, at least 0.8x
the file driver and 1.2x the http driver on nginx; with 8 processes, at least 1.0x the file
driver. --quick: one round (a check that everything runs, not a measurement). The Markdown
table goes to stdout and to --out (default results/tensorstore_read-<timestamp>.md at the
repository root; results/ is not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

REPO_ROOT = Path(__file__).resolve().parents[2]

SHAPE = (256, 256, 256)
CHUNKS = (64, 64, 64)
NBYTES = int(np.prod(SHAPE)) * 4
PARAMS = {"shape": SHAPE, "chunks": CHUNKS, "dtype": "float32", "seed": 3,
          "arrays": ["raw", "zstd"], "zstd_level": 3, "rounding": 256}
PROCESSES = 8


def expected_array() -> np.ndarray:
    rng = np.random.default_rng(PARAMS["seed"])
    data = rng.standard_normal(SHAPE, dtype=np.float32)
    return np.round(data * PARAMS["rounding"]) / PARAMS["rounding"]


def digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def zarr3_metadata(compressed: bool) -> dict:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compressed:
        codecs.append({"name": "zstd", "configuration": {"level": PARAMS["zstd_level"]}})
    return {
        "shape": list(SHAPE),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(CHUNKS)}},
        "chunk_key_encoding": {"name": "default"},
        "data_type": "float32",
        "codecs": codecs,
        "fill_value": 0,
    }


def ensure_data(directory: Path, expected: np.ndarray) -> None:
    marker = directory / "bench-params.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(PARAMS)):
        print(f"reusing the arrays in {directory}", file=sys.stderr)
        return
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name in PARAMS["arrays"]:
        print(f"writing {name} to {directory / name} ...", file=sys.stderr)
        array = ts.open({"driver": "zarr3",
                         "kvstore": {"driver": "file", "path": f"{directory / name}/"},
                         "metadata": zarr3_metadata(name == "zstd")}, create=True).result()
        array.write(expected).result()
    marker.write_text(json.dumps(PARAMS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(process: subprocess.Popen, port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text(errors='replace')}")


class Nginx:
    """Debian's nginx serving `root` on a free loopback port, in the foreground, as the current
    user, with its configuration, pid file, logs and temporary files in `workdir`."""

    BINARIES = ("/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx")

    def __init__(self, root: Path, workdir: Path) -> None:
        binary = os.environ.get("CHUNKD_NGINX") or next(
            (b for b in self.BINARIES if os.access(b, os.X_OK)), None)
        if binary is None:
            raise FileNotFoundError("nginx is not installed (deploy/scripts/install-deps.sh all)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        d = workdir
        conf = f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.log_path = d / "stdout.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.process, self.port, "nginx", d / "error.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Chunkd:
    def __init__(self, binary: Path, store: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "chunkd.sock"
        ready = workdir / "ready"
        self.log_path = workdir / "server.log"
        self.args = [str(binary), f"--listen=127.0.0.1:0,unix:{self.socket}",
                     f"--ready_file={ready}", f"--store={store}", "--host_cache_bytes=1GiB",
                     "--shm=false", "--fsync=false"]
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (ready.is_file() and ready.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chunkd did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        addresses = ready.read_text().split()
        self.tcp = next(a for a in addresses if not a.startswith("unix:"))
        self.unix = f"unix:{self.socket}"

    def counters(self) -> dict:
        sys.path.insert(0, str(REPO_ROOT / "python"))
        import chunkd  # the Python client, for the server's counters only

        with chunkd.Client(self.tcp) as client:
            return client.server_info().counters

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def zarr3_spec(kvstore: dict) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore}


def read_whole(store) -> np.ndarray:
    return store.read().result()


def process_worker(spec: dict, rounds: int, barrier, results) -> None:
    """One of the 8 processes: opens the array, then reads it whole once per round, starting
    with the others (a barrier per round); reports (start, end, digest) per round."""
    try:
        array = ts.open(spec).result()
        read_whole(array)  # this process's first read: connections, metadata
        for _ in range(rounds):
            barrier.wait()
            start = time.monotonic()
            data = read_whole(array)
            end = time.monotonic()
            results.put((start, end, digest(data)))
            del data
    except Exception as e:  # reported, not lost in a child
        results.put(("error", repr(e), ""))
        barrier.abort()


def run_processes(spec: dict, rounds: int, want: str) -> list[float]:
    """Aggregate seconds per round for PROCESSES processes reading the whole array at once."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=process_worker, args=(spec, rounds, barrier, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    samples = [results.get(timeout=600) for _ in range(PROCESSES * rounds)]
    for p in procs:
        p.join(60)
    errors = [s for s in samples if s[0] == "error"]
    if errors:
        raise SystemExit(f"a reading process failed: {errors[0][1]}")
    if any(s[2] != want for s in samples):
        raise SystemExit("a process read an array that differs from the one written")
    # Rounds are separated by the barrier: sort the samples into rounds by start time.
    samples.sort()
    walls = []
    for r in range(rounds):
        group = samples[r * PROCESSES:(r + 1) * PROCESSES]
        walls.append(max(s[1] for s in group) - min(s[0] for s in group))
    return walls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/chunkd-bench-tensorstore"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="one round: checks that every path runs (no measurement)")
    parser.add_argument("--binary", type=Path, default=REPO_ROOT / "build" / "server" / "chunkd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    expected = expected_array()
    want = digest(expected)
    ensure_data(args.data, expected)
    workdir = Path(tempfile.mkdtemp(prefix="chunkd-bench-ts-"))
    server = Chunkd(args.binary, args.data, workdir / "chunkd")
    nginx = None
    http_skipped = ""
    try:
        nginx = Nginx(args.data, workdir / "nginx")
    except FileNotFoundError as e:
        http_skipped = str(e)
    load_before = os.getloadavg()
    rows: dict[tuple[str, str], list[float]] = {}
    try:
        specs: dict[tuple[str, str], dict] = {}
        for name in PARAMS["arrays"]:
            memory = ts.open({"driver": "zarr3", "kvstore": {"driver": "memory"},
                              "metadata": zarr3_metadata(name == "zstd")}, create=True).result()
            memory.write(expected).result()
            specs[(name, "memory")] = memory  # an open TensorStore: the memory store is its own
            specs[(name, "file")] = zarr3_spec({"driver": "file", "path": f"{args.data / name}/"})
            if nginx:
                specs[(name, "http (nginx)")] = zarr3_spec(
                    {"driver": "http", "base_url": f"{nginx.url}/{name}/"})
            specs[(name, "chunkd (tsgrpc, TCP)")] = zarr3_spec(
                {"driver": "tsgrpc_kvstore", "address": server.tcp, "path": f"{name}/"})
            specs[(name, "chunkd (tsgrpc, UNIX socket)")] = zarr3_spec(
                {"driver": "tsgrpc_kvstore", "address": server.unix, "path": f"{name}/"})
        opened = {key: spec if not isinstance(spec, dict) else ts.open(spec).result()
                  for key, spec in specs.items()}
        for key, array in opened.items():  # warm-up (page cache, nginx, chunkd's cache), checked
            if digest(read_whole(array)) != want:
                raise SystemExit(f"{key}: the array read differs from the one written")
            print(f"warmed: {key[0]} {key[1]}", file=sys.stderr)
        times = {key: [] for key in opened}
        for round_ in range(repeats):
            for key, array in opened.items():
                start = time.perf_counter()
                data = read_whole(array)
                elapsed = time.perf_counter() - start
                if digest(data) != want:
                    raise SystemExit(f"{key}: the array read differs from the one written")
                del data
                times[key].append(elapsed)
                print(f"round {round_ + 1}: {key[0]} {key[1]}: {elapsed:.3f} s", file=sys.stderr)
        rows.update(times)
        for name in PARAMS["arrays"]:
            for label in ("chunkd (tsgrpc, TCP)", "chunkd (tsgrpc, UNIX socket)", "file"):
                spec = specs[(name, label)]
                key = (name, f"{PROCESSES} processes, {label}")
                rows[key] = run_processes(spec, repeats, want)
                print(f"{key[0]} {key[1]}: {rows[key]}", file=sys.stderr)
        counters = server.counters()
        load_after = os.getloadavg()
    finally:
        server.stop()
        if nginx:
            nginx.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def gbps(key, best=False) -> float:
        samples = rows[key]
        per_read = NBYTES * (PROCESSES if "processes" in key[1] else 1)
        return per_read / (min(samples) if best else statistics.median(samples)) / 1e9

    lines = [
        f"TensorStore reading a zarr3 float32 {'x'.join(map(str, SHAPE))} array "
        f"({NBYTES >> 20} MiB, chunks {'x'.join(map(str, CHUNKS))} of 1 MiB), whole, warm, into "
        f"numpy; median of {repeats} reads per path, interleaved; GB/s = 10^9 bytes/s "
        f"(for {PROCESSES} processes: all bytes read by all of them per second of wall time).",
        "",
        "| array | path | median s | median GB/s | best GB/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, samples in rows.items():
        lines.append(f"| {key[0]} | {key[1]} | {statistics.median(samples):.3f} | "
                     f"{gbps(key):.2f} | {gbps(key, best=True):.2f} |")
    lines += ["", "Targets (from this run's medians):", ""]
    for name in PARAMS["arrays"]:
        chunkd_one = gbps((name, "chunkd (tsgrpc, TCP)"))
        checks = [("chunkd >= 0.8x file, 1 process", chunkd_one / gbps((name, "file")), 0.8)]
        if nginx:
            checks.append(("chunkd >= 1.2x http on nginx, 1 process",
                           chunkd_one / gbps((name, "http (nginx)")), 1.2))
        many_file = gbps((name, f"{PROCESSES} processes, file"))
        checks.append((f"chunkd >= 1.0x file, {PROCESSES} processes",
                       gbps((name, f"{PROCESSES} processes, chunkd (tsgrpc, TCP)")) / many_file,
                       1.0))
        for what, ratio, target in checks:
            lines.append(f"- {name}: {what}: {ratio:.2f}x, "
                         f"{'held' if ratio >= target else 'NOT held'}")
        lines.append(
            f"- {name}: (over the UNIX socket instead: "
            f"{gbps((name, 'chunkd (tsgrpc, UNIX socket)')) / gbps((name, 'file')):.2f}x file in "
            f"one process, {gbps((name, f'{PROCESSES} processes, chunkd (tsgrpc, UNIX socket)')) / many_file:.2f}x"
            f" with {PROCESSES})")
        if not nginx:
            lines.append(f"- {name}: http on nginx: not measured ({http_skipped})")
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min). "
        f"Python {platform.python_version()}, tensorstore {ts_version()}, numpy {np.__version__}."
        + (" --quick: one round, not a measurement." if args.quick else ""),
        f"Server: chunkd --host_cache_bytes=1GiB over the directory; after the run "
        f"{counters.get('tensorstore_gets', 0)} TensorStore reads, "
        f"{counters.get('backend_reads', 0)} store reads, {counters.get('hits', 0)} cache hits.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or (REPO_ROOT / "results" /
                       f"tensorstore_read-{time.strftime('%Y%m%d-%H%M%S')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


def ts_version() -> str:
    try:
        from importlib.metadata import version

        return version("tensorstore")
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    sys.exit(main())

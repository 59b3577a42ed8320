#!/usr/bin/env python3
"""Sharded Zarr v3 on the file store: what a single inner chunk read through chunkd costs.

    .venv/bin/python python/benchmarks/sharded_local.py [--quick] [--chunks N] [--repeat N]
                          [--cache 32MiB] [--server-flag=--block_bytes=1MiB ...]
                          [--out DIR] [--no-build]

The array: float32 4096 x 4096 (64 MiB of random values), zarr v3, shards of 1024 x 4096
(16 MiB, 4 shards) holding inner chunks of 256 x 256 (256 KiB, 64 per shard), written by
zarr-python with its default codecs (printed in the report) into a directory. A chunkd serves
that directory (--store=DIR) with --host_cache_bytes=--cache (32 MiB) and every --server-flag
given (repeatable, passed as they are: e.g. --server-flag=--block_bytes=1MiB).

Workload: --chunks (16; 8 with --quick) random distinct inner chunks, each read alone as
`array[i*256:(i+1)*256, j*256:(j+1)*256]` with zarr's synchronous API, one after another; the
time is the mean per inner chunk. Peers:
- `LocalStore warm`: zarr's LocalStore on the directory, its files in the page cache (the
  benchmark reads them once before timing);
- `chunkd cold, TCP` / `chunkd cold, shm`: a fresh chunkd (started for every sample, the
  array's zarr.json read before the clock starts), ChunkdStore inline over TCP or with
  shared memory over the UNIX socket: chunks chunkd has not read yet (the files themselves are
  in the page cache, as for LocalStore);
- `chunkd warm, TCP` / `chunkd warm, shm`: the same chunks again from the same server.

Bytes: "asked" is the sum of the stored sizes of the inner chunks read (from the shard indexes;
the shard index reads zarr makes, 1028 bytes per chunk read, are not counted); "from the store"
is what chunkd read from its store meanwhile (ServerInfo's `backend_read_bytes`). With a block
size (`--block_bytes`, read from `chunkd --help` or from --server-flag), the report also gives the
block-aligned floor: the bytes of the distinct blocks that the ranges zarr asks for (indexes and
inner chunks) cover.

Samples are interleaved (every peer once, then again); the table gives medians of --repeat (5;
3 with --quick). Every value read is compared with the array written. Writes results.md
(printed), results.jsonl and env.json into --out (default results/<timestamp>/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import REPO_ROOT, block_size, log  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))

SHAPE = (4096, 4096)
SHARDS = (1024, 4096)
INNER = (256, 256)
DTYPE = "float32"
NAME = "a"
PEERS = ("LocalStore warm", "chunkd cold, TCP", "chunkd cold, shm", "chunkd warm, TCP",
         "chunkd warm, shm")
MIB = 1 << 20


def make_array() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE, dtype=np.float32)


# --- the data -----------------------------------------------------------------------------------


def write_array(root: Path) -> dict:
    """Writes the array with zarr's default codecs; returns its zarr.json."""
    import zarr

    store = zarr.storage.LocalStore(root)
    array = zarr.create_array(store, name=NAME, shape=SHAPE, chunks=INNER, shards=SHARDS,
                              dtype=DTYPE, zarr_format=3)
    array[...] = make_array()
    return json.loads((root / NAME / "zarr.json").read_text())


def describe_codecs(meta: dict) -> str:
    def names(codecs):
        out = []
        for c in codecs:
            conf = c.get("configuration") or {}
            detail = ", ".join(f"{k}={v}" for k, v in conf.items()
                               if k in ("endian", "level", "checksum", "cname", "clevel"))
            out.append(f"{c['name']}({detail})" if detail else c["name"])
        return " → ".join(out)

    shard = meta["codecs"][0]
    conf = shard["configuration"]
    return (f"{shard['name']}: inner chunks [{names(conf['codecs'])}], index "
            f"[{names(conf['index_codecs'])}] at the {conf.get('index_location', 'end')}")


class Layout:
    """Where each inner chunk lies in its shard, read from the shard indexes on disk."""

    def __init__(self, root: Path, meta: dict) -> None:
        conf = meta["codecs"][0]["configuration"]
        if conf.get("index_location", "end") != "end":
            raise SystemExit("the shard index is expected at the end (zarr's default)")
        self.per_shard = tuple(s // c for s, c in zip(SHARDS, INNER))
        n = int(np.prod(self.per_shard))
        # zarr's default index codecs: bytes (little endian) then crc32c: 16 bytes per entry
        # and a 4-byte checksum.
        self.index_bytes = 16 * n + (4 if any(c["name"] == "crc32c"
                                              for c in conf["index_codecs"]) else 0)
        self.root = root
        self.index = {}
        self.shard_size = {}
        for shard in np.ndindex(*(s // c for s, c in zip(SHAPE, SHARDS))):
            path = self.shard_path(shard)
            raw = path.read_bytes()[-self.index_bytes:]
            entries = np.frombuffer(raw, "<u8", count=2 * n).reshape(*self.per_shard, 2)
            size = path.stat().st_size
            present = entries[..., 0] != np.iinfo(np.uint64).max
            if (entries[present].sum(axis=-1) > size - self.index_bytes).any():
                raise SystemExit(f"{path}: the shard index does not fit the shard's size")
            self.index[shard] = entries
            self.shard_size[shard] = size

    def shard_path(self, shard) -> Path:
        return self.root / NAME / "c" / "/".join(str(i) for i in shard)

    def locate(self, chunk) -> tuple[tuple, int, int]:
        """(shard, offset, length) of inner chunk `chunk` (grid coordinates)."""
        shard = tuple(c // p for c, p in zip(chunk, self.per_shard))
        local = tuple(c % p for c, p in zip(chunk, self.per_shard))
        offset, length = (int(v) for v in self.index[shard][local])
        return shard, offset, length

    def asked(self, picks) -> int:
        return sum(self.locate(p)[2] for p in picks)

    def block_floor(self, picks, block: int) -> int:
        """Bytes of the distinct blocks the index and inner-chunk ranges zarr reads cover."""
        blocks = set()
        for p in picks:
            shard, offset, length = self.locate(p)
            size = self.shard_size[shard]
            for start, end in ((size - self.index_bytes, size), (offset, offset + length)):
                blocks.update((shard, b) for b in range(start // block, (end - 1) // block + 1))
        total = 0
        for shard, b in blocks:
            total += min(block, self.shard_size[shard] - b * block)
        return total


def pick_chunks(count: int) -> list[tuple[int, int]]:
    grid = [s // c for s, c in zip(SHAPE, INNER)]
    rng = np.random.default_rng(1)
    flat = rng.choice(grid[0] * grid[1], size=count, replace=False)
    return [(int(f) // grid[1], int(f) % grid[1]) for f in flat]


def region(chunk) -> tuple[slice, ...]:
    return tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk, INNER))


# --- the readers --------------------------------------------------------------------------------


def read_picks(array, picks, expected: np.ndarray) -> float:
    """Mean seconds per inner chunk, each read alone, one after another; every one checked."""
    times = []
    for chunk in picks:
        where = region(chunk)
        start = time.perf_counter()
        got = array[where]
        times.append(time.perf_counter() - start)
        if not np.array_equal(got, expected[where]):
            raise RuntimeError(f"inner chunk {chunk}: the values read differ from those written")
    return sum(times) / len(times)


def server_counters(server: benchlib.ChunkdServer) -> dict:
    import chunkd

    with chunkd.Client(server.tcp) as c:
        return dict(c.server_info().counters)


class Chunkd:
    """Fresh chunkd servers over the directory, each with a shared-memory directory of its own."""

    def __init__(self, binary: Path, root: Path, work: Path, flags: list[str]) -> None:
        self.binary, self.root, self.work, self.flags = binary, root, work, flags
        self.starts = 0

    def start(self) -> benchlib.ChunkdServer:
        self.starts += 1
        shm_dir = Path(tempfile.mkdtemp(prefix="chunkd-bench-", dir="/dev/shm"))
        server = benchlib.ChunkdServer(self.binary, self.root, self.work / f"chunkd-{self.starts}",
                                       f"--shm_dir={shm_dir}", "--fsync=false", *self.flags)
        server.shm_dir = shm_dir
        return server

    @staticmethod
    def stop(server: benchlib.ChunkdServer) -> None:
        server.stop()
        shutil.rmtree(server.shm_dir, ignore_errors=True)


def chunkd_samples(chunkd: Chunkd, transport: str, picks, expected) -> list[dict]:
    """A cold pass then a warm pass of `picks` through a fresh chunkd."""
    import zarr

    from chunkd.zarr import ChunkdStore

    server = chunkd.start()
    store = (ChunkdStore(f"chunkd://{server.tcp}", read_only=True) if transport == "TCP" else
             ChunkdStore(f"chunkd+unix://{server.socket}", read_only=True, delivery="shm",
                         shm_dir=str(server.shm_dir)))
    rows = []
    try:
        array = zarr.open_array(store, path=NAME, mode="r")  # zarr.json: before the clock
        for state in ("cold", "warm"):
            before = server_counters(server)
            seconds = read_picks(array, picks, expected)
            after = server_counters(server)
            rows.append({"peer": f"chunkd {state}, {transport}", "seconds": seconds,
                         "store_bytes": after["backend_read_bytes"] - before["backend_read_bytes"],
                         "store_reads": after["backend_reads"] - before["backend_reads"],
                         "gets": after["gets"] - before["gets"],
                         "get_many_calls": after["get_many_calls"] - before["get_many_calls"]})
    finally:
        store.close()
        Chunkd.stop(server)
    return rows


# --- the run ------------------------------------------------------------------------------------


def report(rows: list, args, env: dict, layout_text: dict) -> str:
    def med(peer, key="seconds"):
        values = [r[key] for r in rows if r["peer"] == peer and r.get(key) is not None]
        return statistics.median(values) if values else None

    asked = layout_text["asked"]
    local = med("LocalStore warm")
    flags = " ".join(args.server_flag) or "none"
    lines = [
        "# Sharded Zarr v3 on the file store: single inner chunks through chunkd", "",
        f"`python/benchmarks/sharded_local.py{' --quick' if args.quick else ''}"
        f"{''.join(f' --server-flag={f}' for f in args.server_flag)}` — commit "
        f"{env['commit']}{' (dirty)' if env['dirty'] else ''}, {env['cores']} cores, load "
        f"{env['loadavg_start'][0]:.1f} at the start; medians of {args.repeat}.", "",
        f"- array: float32 {SHAPE[0]}x{SHAPE[1]}, shards {SHARDS[0]}x{SHARDS[1]} "
        f"({np.prod(SHARDS) * 4 / MIB:g} MiB), inner chunks {INNER[0]}x{INNER[1]} "
        f"({np.prod(INNER) * 4 >> 10} KiB); zarr {layout_text['zarr']} default codecs: "
        f"{layout_text['codecs']}",
        f"- chunkd: --store=DIR --host_cache_bytes={args.cache}; extra flags: {flags}; "
        f"block: {layout_text['block_text']}",
        f"- {args.chunks} random inner chunks, each read alone; asked: "
        f"{asked / MIB:.2f} MiB (their stored sizes; the shard index reads are not counted)", "",
        "| peer | ms per inner chunk | × LocalStore warm | store reads | MiB from the store "
        "| × asked |",
        "| --- | --: | --: | --: | --: | --: |"]
    for peer in PEERS:
        s = med(peer)
        if s is None:
            continue
        store_bytes = med(peer, "store_bytes")
        reads = med(peer, "store_reads")
        lines.append(
            f"| {peer} | {s * 1e3:.2f} | {s / local:.2f}× | "
            f"{'' if reads is None else f'{reads:.0f}'} | "
            f"{'' if store_bytes is None else f'{store_bytes / MIB:.2f}'} | "
            f"{'' if store_bytes is None else f'{store_bytes / asked:.1f}×'} |")
    if layout_text.get("floor") is not None:
        floor = layout_text["floor"]
        lines += ["", f"Block-aligned floor (the distinct blocks the index and chunk ranges "
                  f"cover): {floor / MIB:.2f} MiB = {floor / asked:.2f}× asked."]

    lines += ["", "Targets (issue 18, sharded, file store, 32 MiB cache, random single inner "
              "chunks):"]
    for transport in ("TCP", "shm"):
        peer = f"chunkd cold, {transport}"
        store_bytes = med(peer, "store_bytes")
        if store_bytes is not None:
            ratio = store_bytes / asked
            lines.append(f"- {peer}: store bytes read ≤ 2× the bytes asked: {ratio:.1f}× "
                         f"({store_bytes / MIB:.2f} MiB for {asked / MIB:.2f} MiB) — "
                         f"{'HELD' if ratio <= 2 else 'NOT HELD'}")
        s = med(peer)
        if s is not None:
            ratio = s / local
            lines.append(f"- {peer}: time per inner chunk ≤ 1.5× LocalStore warm: "
                         f"{ratio:.2f}× ({s * 1e3:.2f} ms vs {local * 1e3:.2f} ms) — "
                         f"{'HELD' if ratio <= 1.5 else 'NOT HELD'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and repetitions")
    parser.add_argument("--chunks", type=int, default=None,
                        help="random inner chunks read (16; 8 with --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (5; 3 --quick)")
    parser.add_argument("--cache", default="32MiB", help="chunkd's --host_cache_bytes")
    parser.add_argument("--server-flag", dest="server_flag", action="append", default=[],
                        help="a flag passed to chunkd as it is (repeatable), e.g. "
                             "--server-flag=--block_bytes=1MiB")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    args.chunks = args.chunks or (8 if args.quick else 16)
    args.repeat = args.repeat or (3 if args.quick else 5)

    import zarr

    benchlib.ensure_built(["chunkd", "chunkd_native"], build=not args.no_build)
    out = benchlib.results_dir(args.out)
    env = benchlib.environment(server_flags=args.server_flag, cache=args.cache,
                               chunks=args.chunks, zarr=zarr.__version__)
    binary = benchlib.copy_binaries(["chunkd"], out / "bin")["chunkd"]
    block, block_text = block_size(binary, args.server_flag)
    flags = [f"--host_cache_bytes={args.cache}", *args.server_flag]
    expected = make_array()
    picks = pick_chunks(args.chunks)
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="chunkd-sharded-") as tmp:
        work = Path(tmp)
        root = work / "data"
        log(f"writing the array ({expected.nbytes / MIB:.0f} MiB) to {root}")
        meta = write_array(root)
        layout = Layout(root, meta)
        facts = {"asked": layout.asked(picks), "codecs": describe_codecs(meta),
                 "zarr": zarr.__version__, "block_text": block_text,
                 "floor": layout.block_floor(picks, block) if block else None}
        local = zarr.open_array(zarr.storage.LocalStore(root, read_only=True), path=NAME,
                                mode="r")
        read_picks(local, picks, expected)  # the page cache holds every file read
        chunkd = Chunkd(binary, root, work, flags)
        for rep in range(args.repeat):
            sample = [{"peer": "LocalStore warm", "seconds": read_picks(local, picks, expected)}]
            for transport in ("TCP", "shm"):
                sample += chunkd_samples(chunkd, transport, picks, expected)
            for row in sample:
                row["rep"] = rep
                log(f"rep {rep}: {row['peer']:<18} {row['seconds'] * 1e3:8.2f} ms/chunk"
                    + (f"  {row['store_bytes'] / MIB:8.2f} MiB from the store"
                       if "store_bytes" in row else ""))
            rows += sample
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    benchlib.write_json(out / "env.json", {**env, **facts})
    text = report(rows, args, env, facts)
    (out / "results.md").write_text(text)
    print(text)
    log(f"results in {out}")


if __name__ == "__main__":
    main()

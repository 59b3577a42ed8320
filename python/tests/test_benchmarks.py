"""The benchmark harness's own logic (python/benchmarks/compare.py, benchlib.py) and the bench
driver's shared-memory rows: what decides a figure must be right before any figure is read.
No timing is asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "python" / "benchmarks"))

import benchlib  # noqa: E402
import compare  # noqa: E402
from chunkd_testing import serve_with_shm, start_server  # noqa: E402


@pytest.mark.parametrize("size", [0, 1, 7, 8, 32, 33, 4096 + 3])
def test_read_every_byte_reads_each_byte_once(size):
    """The shm touch (chunkd._native._read_every_byte, the C++ driver's routine) sums every
    64-bit word and every tail byte: changing any byte changes it."""
    data = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    whole = size // 32 * 32  # whole 32-byte blocks as 64-bit words, then the bytes left
    expected = (int(np.frombuffer(bytes(data[:whole]), np.uint64).sum())
                + sum(data[whole:])) % 2**64
    assert compare.read_every_byte(memoryview(data)) == expected
    if size:
        data[-1] ^= 1
        assert compare.read_every_byte(memoryview(data)) != expected


@pytest.mark.parametrize("procs", [1, 2, 4, 8, 16])
def test_slabs_cover_the_array_once_in_whole_chunks(procs):
    seen = np.zeros(compare.SHAPE, dtype=np.int8)
    for i in range(procs):
        region = compare.slab(i, procs)
        for s, chunk in zip(region, compare.CHUNKS):
            assert s.start % chunk == 0 and s.stop % chunk == 0
        seen[region] += 1
    assert (seen == 1).all()


def test_slabs_refuse_a_pool_that_does_not_divide_the_chunks():
    with pytest.raises(ValueError, match="--procs 3"):
        compare.slab(0, 3)


def _get_row(client, transport, size, rps, p50, rep=1, **extra):
    return {"section": "get", "client": client, "transport": transport, "size": size, "rep": rep,
            "available": True, "rps": rps, "p50_us": p50, **extra}


def _zarr_row(store, gbps, codec="uncompressed", procs=1, rep=1):
    return {"section": "zarr", "store": store, "codec": codec, "procs": procs, "rep": rep,
            "available": True, "gbps": gbps}


def _verdicts(rows):
    lines = compare.targets(rows)[2:]
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2] for line in lines}


def test_targets_use_the_medians_and_say_held_not_held_or_not_available():
    rows = []
    for size in compare.GET_SIZES:
        for transport in ("tcp", "unix"):
            # C++ 1000 req/s; Python's repetitions 700, 900, 850: median 850 -> 0.85x, held.
            rows += [_get_row("c++", transport, size, 1000, 100, rep=r) for r in (1, 2, 3)]
            rows += [_get_row("python", transport, size, v, 100, rep=r)
                     for r, v in zip((1, 2, 3), (700, 900, 850))]
    # One slow repetition of Python, TCP, 1 MiB: 700, 900, 100 -> median 700 -> 0.7x, not held.
    next(r for r in rows if r["client"] == "python" and r["transport"] == "tcp"
         and r["size"] == 1 << 20 and r["rep"] == 3)["rps"] = 100
    rows += [_get_row("c++", "shm", 1 << 20, 5000, 200), _get_row("python", "shm", 1 << 20, 10, 300)]
    rows += [_zarr_row("memory", 2.0), _zarr_row("chunkd-shm", 1.9), _zarr_row("local", 1.0),
             _zarr_row("chunkd-unix", 1.0), _zarr_row("chunkd-tcp", 0.5),
             _zarr_row("nginx-obstore", 0.5), _zarr_row("memory", 1.0, codec="zstd"),
             {**_zarr_row("chunkd-shm", None, codec="zstd"), "available": False,
              "reason": "it broke"},
             _zarr_row("chunkd-tcp", 2.0, procs=8), _zarr_row("nginx-obstore", 1.0, procs=8),
             _zarr_row("chunkd-shm", 1.0, procs=8), _zarr_row("local", 1.0, procs=8)]
    v = _verdicts(rows)
    assert v["Python `Client.get` inline UNIX, 4 KiB: ≥ 0.8× the C++ client's req/s"] == "**held**"
    assert v["Python `Client.get` inline TCP, 1 MiB: ≥ 0.8× the C++ client's req/s"] == \
        "**not held**"
    assert v["Python shared-memory get, 1 MiB (every byte read): p50 ≤ 1.25× the C++ "
             "client's"] == "**not held**"  # 1.5x
    assert v["Zarr, uncompressed, 1 process: ChunkdStore shared memory ≥ 0.9× MemoryStore"] == \
        "**held**"  # 0.95x
    assert v["Zarr, uncompressed, 1 process: ChunkdStore inline UNIX ≥ 1.0× LocalStore"] == \
        "**held**"
    assert v["Zarr, uncompressed, 1 process: ChunkdStore inline TCP ≥ 0.8× LocalStore"] == \
        "**not held**"
    assert v["Zarr, zstd, 1 process: ChunkdStore shared memory ≥ 0.95× MemoryStore"] == \
        "**not available**"
    assert v["Remote, uncompressed, 1 process: ChunkdStore inline TCP ≥ 1.5× nginx + obstore "
             "HTTPStore"] == "**not held**"
    assert v["Remote, uncompressed, 8 processes: ChunkdStore inline TCP ≥ 1.5× nginx + obstore "
             "HTTPStore"] == "**held**"
    assert v["Zarr, uncompressed, 8 processes: ChunkdStore shared memory ≥ 1.2× LocalStore"] == \
        "**not held**"
    # The reason of a row that failed reaches the target's line.
    assert any("it broke" in line for line in compare.targets(rows))


def test_nginx_serves_the_directory_and_stops(tmp_path):
    if benchlib.nginx_binary() is None:
        pytest.skip("nginx is not installed (deploy/scripts/install-deps.sh all)")
    root = tmp_path / "root"
    (root / "a" / "c").mkdir(parents=True)
    payload = os.urandom(300_000)
    (root / "a" / "c" / "0").write_bytes(payload)
    nginx = benchlib.NginxServer(root, tmp_path / "nginx")
    try:
        with urllib.request.urlopen(f"{nginx.url}/a/c/0", timeout=10) as reply:
            assert reply.read() == payload
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{nginx.url}/a/zarr.json", timeout=10)
        assert missing.value.code == 404
    finally:
        nginx.stop()
    assert nginx.process.returncode is not None
    assert not nginx._answers()


CHUNKD_BENCH = REPO_ROOT / "build" / "bench" / "chunkd_bench"


@pytest.mark.parametrize("delivery,counts", [("shm", "bytes"), ("shm-handles", "handles")])
def test_chunkd_bench_shm_rows_say_what_they_count(tmp_path, delivery, counts):
    """chunkd_bench --delivery=shm reads every byte of each value in place (and the priming
    check compares the values with what was written), shm-handles counts views and says so."""
    if not os.access(CHUNKD_BENCH, os.X_OK):
        pytest.skip(f"{CHUNKD_BENCH} is not built (deploy/scripts/build.sh chunkd_bench)")
    store = tmp_path / "store"
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        pytest.skip("no /dev/shm")
    segments = Path(tempfile.mkdtemp(prefix="chunkd-test-", dir=shm_dir))
    try:
        subprocess.run([str(CHUNKD_BENCH), "--action=load", f"--dir={store}", "--prefix=t",
                        "--size=65536", "--keys=16"], check=True, capture_output=True)
        socket = tmp_path / "chunkd.sock"
        server = start_server(tmp_path, str(store), f"unix:{socket}", f"--shm_dir={segments}")
        try:
            done = subprocess.run(
                [str(CHUNKD_BENCH), "--action=measure", "--peer=chunkd", f"--delivery={delivery}",
                 f"--address=unix:{socket}", f"--shm_dir={segments}", "--prefix=t",
                 "--size=65536", "--keys=16", "--clients=1", "--warmup=0s", "--duration=0.05s"],
                capture_output=True, text=True, timeout=120)
        finally:
            server.stop()
    finally:
        shutil.rmtree(segments, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["delivery"] == delivery and row["counts"] == counts
    assert row["requests"] > 0 and row["errors"] == 0 and row["mismatches"] == 0


def _python_gets_shm(tmp_path, server) -> dict:
    store = Path(server.store)
    (store / "t").mkdir()
    for i in range(8):
        (store / "t" / f"{i:06d}").write_bytes(bytes([i]) * 4096)
    return compare.python_gets(address=server.address, transport="shm",
                               shm_dir=server.shm_dir, prefix="t", size=4096, keys=8,
                               store_dir=str(store), warmup=0.0, duration=0.05, seed=1,
                               server_pid=server.process.pid)


def test_python_shm_row_counts_only_gets_the_server_served_by_shared_memory(tmp_path):
    with serve_with_shm(tmp_path) as server:
        row = _python_gets_shm(tmp_path, server)
    assert row["available"] and row["requests"] > 0, row
    assert row["errors"] == 0 and row["mismatches"] == 0, row
    assert row["gets_shm"] == row["requests"]


def test_python_shm_row_catches_replies_that_only_look_like_shared_memory(tmp_path, monkeypatch):
    """A client whose values come inline, handed out read-only as shared memory is: the server's
    gets_shm counter, compared with the Gets counted, turns them into errors."""
    import chunkd

    real = chunkd.Client

    class Disguised:
        def __init__(self, address, **_):
            self._client = real(address)

        def get(self, key):
            return memoryview(bytes(self._client.get(key)))  # read-only, as a shm view

        def read(self, key):
            self._client.read(key)
            return type("Result", (), {"delivery": 2})()  # says DELIVERY_SHM

        def __getattr__(self, name):
            return getattr(self._client, name)

    monkeypatch.setattr(chunkd, "Client", Disguised)
    with serve_with_shm(tmp_path) as server:
        row = _python_gets_shm(tmp_path, server)
    assert row["gets_shm"] == 0 and row["requests"] > 0
    assert row["errors"] == row["requests"]
    assert "shared-memory Gets" in row["first_error"]


def test_single_flight_target_needs_a_joined_get(tmp_path):
    """One Get per round reads the store once and joins nothing: one backend read per round,
    but nothing was tested, so the target is not held (it was, before joins were required)."""
    if not os.access(CHUNKD_BENCH, os.X_OK):
        pytest.skip(f"{CHUNKD_BENCH} is not built (deploy/scripts/build.sh chunkd_bench)")
    store = tmp_path / "store"
    store.mkdir()
    server = start_server(tmp_path, str(store))
    try:
        done = subprocess.run(
            [str(CHUNKD_BENCH), "--action=single_flight", f"--address={server.address}",
             f"--dir={store}", "--size=65536", "--clients=1", "--rounds=2"],
            capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["backend_reads"] == [1, 1] and row["errors"] == 0
    assert row["single_flight_joins"] == [0, 0] and row["min_single_flight_joins"] == 0
    assert row["held"] is False


# --- python/benchmarks/sharded_local.py -----------------------------------------------------------

import sharded_local  # noqa: E402


@pytest.fixture
def small_sharded(monkeypatch, tmp_path):
    """sharded_local's array at a test's size: 64 x 64 in shards of 16 x 64, inner chunks 8 x 8
    (4 shards of 2 x 8 inner chunks), zarr's default codecs."""
    monkeypatch.setattr(sharded_local, "SHAPE", (64, 64))
    monkeypatch.setattr(sharded_local, "SHARDS", (16, 64))
    monkeypatch.setattr(sharded_local, "INNER", (8, 8))
    meta = sharded_local.write_array(tmp_path)
    return sharded_local.Layout(tmp_path, meta), meta


def test_sharded_local_layout_reads_the_shard_indexes(small_sharded):
    layout, meta = small_sharded
    assert "zstd" in sharded_local.describe_codecs(meta)
    assert layout.index_bytes == 16 * 16 + 4
    for shard in layout.index:
        # The inner chunks tile the shard before its index, each where the index says.
        ranges = sorted(layout.locate((shard[0] * 2 + i, j))[1:] for i in range(2)
                        for j in range(8))
        end = 0
        for offset, length in ranges:
            assert offset == end and length > 0
            end = offset + length
        assert end + layout.index_bytes == layout.shard_size[shard]
    picks = [(0, 0), (5, 7), (7, 3)]
    assert layout.asked(picks) == sum(layout.locate(p)[2] for p in picks)
    # A 1-byte block: the floor is the ranges themselves (index ranges once per shard).
    shards = {layout.locate(p)[0] for p in picks}
    assert layout.block_floor(picks, 1) == layout.asked(picks) + len(shards) * layout.index_bytes
    # A block larger than any shard: the floor is the touched shards whole.
    assert layout.block_floor(picks, 1 << 30) == sum(layout.shard_size[s] for s in shards)


def test_flag_defaults_are_read_from_chunkd_help():
    binary = REPO_ROOT / "build" / "server" / "chunkd"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} is not built")
    assert benchlib.server_flag_default(binary, "host_cache_bytes") == "1GiB"
    assert benchlib.server_flag_default(binary, "shm_dir") == "/dev/shm"
    assert benchlib.server_flag_default(binary, "no_such_flag") is None
    assert benchlib.block_size(binary, ["--block_bytes=1MiB"]) == (1 << 20, "1MiB (given)")
    assert benchlib.server_flag_value(binary, ["--part_bytes=64KiB"], "part_bytes") == (
        "64KiB", "64KiB (given)")
    assert benchlib.server_flag_value(binary, [], "part_bytes") == (
        "1MiB", "1MiB (--part_bytes default)")
    assert benchlib.server_flag_value(binary, [], "no_such_flag")[0] is None
    assert [benchlib.parse_bytes(t) for t in ("256KiB", "4096", "1 MB", "x")] == [
        256 << 10, 4096, 10**6, None]


def test_sharded_local_targets():
    rows = [{"peer": "LocalStore warm", "seconds": s} for s in (0.001, 0.002, 0.001)]
    rows += [{"peer": "chunkd cold, TCP", "seconds": 0.0014, "store_bytes": 2 * 100,
              "store_reads": 2}]
    rows += [{"peer": "chunkd cold, shm", "seconds": 0.0016, "store_bytes": 2 * 100 + 1,
              "store_reads": 2}]
    args = type("Args", (), {"quick": False, "server_flag": [], "repeat": 3, "cache": "32MiB",
                             "chunks": 2})()
    env = {"commit": "x", "dirty": False, "cores": 2, "loadavg_start": (0.0,)}
    text = sharded_local.report(rows, args, env, {"asked": 100, "codecs": "c", "zarr": "3",
                                                  "block_text": "b", "floor": None})
    lines = [line for line in text.splitlines() if line.startswith("- chunkd cold")]
    assert lines[0].endswith("HELD") and "2.0×" in lines[0]  # bytes, TCP: exactly 2x
    assert lines[1].endswith("HELD") and "1.40×" in lines[1]  # time, TCP: 1.4 / 1.0 ms
    assert lines[2].endswith("NOT HELD")  # bytes, shm: just over 2x
    assert lines[3].endswith("NOT HELD")  # time, shm: 1.6x


# --- python/benchmarks/remote.py --big -------------------------------------------------------------

import remote  # noqa: E402


def _big_rows(store_bytes, peak):
    whole = {"workload": "big: whole, HTTP, cold", "peer": "chunkd cold tcp (64 MiB ranges)",
             "seconds": 2.0, "read_bytes": 2 << 30, "requests": 9000, "bytes": 2 << 30,
             "stopped": None, "rss_start": 20 << 20, "rss_peak": 60 << 20,
             "peak_read_counter": peak}
    return [{"workload": "big: last 4 KiB, S3, cold", "peer": "chunkd cold tcp", "seconds": 0.05,
             "requests": 1, "bytes": store_bytes + 500, "store_bytes": store_bytes},
            {"workload": "big: last 4 KiB, S3, cold", "peer": "direct", "seconds": 0.05,
             "requests": 1, "bytes": 4600},
            {"workload": "big: whole, HTTP, cold", "peer": "direct", "seconds": 4.0,
             "requests": 1, "bytes": 2 << 30},
            whole]


def test_remote_big_targets():
    # Both flags given: the report reads neither from a binary.
    args = type("Args", (), {"big_bytes": 2 << 30, "server_flag": [
        "--block_bytes=256KiB", "--read_ahead_blocks=8"]})()
    nowhere = Path("/nonexistent/chunkd")

    def verdicts(rows):
        lines = remote.report_big(rows, args, nowhere)
        return [line.rsplit(" — ", 1)[1] for line in lines if line.startswith("- ")]

    assert verdicts(_big_rows(256 << 10, ("read_held_peak_bytes", 2 << 20))) == ["held", "held"]
    assert verdicts(_big_rows((256 << 10) + 1, ("read_held_peak_bytes", (2 << 20) + 1))) == [
        "NOT held", "NOT held"]
    assert verdicts(_big_rows(4096, None))[1].startswith("not decided")
    lines = remote.report_big(_big_rows(4096, None), args, nowhere)
    whole = next(line for line in lines if line.startswith("| big: whole") and "chunkd" in line)
    assert "| 1.074 | 2.00× |" in whole  # 2 GiB in 2 s, the direct read took 4 s
    assert "20 → 60 MiB | n/a |" in whole


def _disk_rows(pass3_store_bytes, pass3_seconds, rss_peak):
    common = {"workload": "disk tier", "peer": "chunkd + disk tier", "requests": 0,
              "bytes": 0, "disk_hits": 1024, "revalidations": 1, "rss_start": 30 << 20,
              "index_bytes": 1 << 20, "disk_entries": 1024, "host_bytes": 256 << 20}
    return [{"workload": "disk tier", "peer": "direct", "pass": 0, "seconds": 10.0,
             "requests": 1024, "bytes": 1 << 30},
            {**common, "pass": 1, "seconds": 11.0, "store_bytes": 1 << 30,
             "rss_peak": 200 << 20},
            {**common, "pass": 2, "seconds": 1.0, "store_bytes": 0, "rss_peak": 200 << 20},
            {**common, "pass": 3, "seconds": pass3_seconds, "store_bytes": pass3_store_bytes,
             "rss_peak": rss_peak},
            {"workload": "disk tier", "peer": "restart", "pass": 3, "seconds": 0.5,
             "index_load_micros": 2000, "entries": 1024}]


def test_remote_disk_tier_targets():
    args = type("Args", (), {"disk_dataset_bytes": 1 << 30, "disk_host_bytes": 256 << 20,
                             "disk_delivery": "tcp"})()

    def verdicts(rows):
        lines = remote.report_disk_tier(rows, args)
        return [line.rsplit(" — ", 1)[1] for line in lines if line.startswith("- ")]

    # pass 2, pass 3 vs direct; pass 3 store bytes; pass 3 vs pass 2; RSS of passes 1-3.
    assert verdicts(_disk_rows(0, 1.25, 280 << 20)) == ["held"] * 7
    assert verdicts(_disk_rows(4096, 1.26, (30 << 20) + (257 << 20) + 1)) == [
        "held", "held", "NOT held", "NOT held", "held", "held", "NOT held"]
    lines = remote.report_disk_tier(_disk_rows(0, 1.0, 100 << 20), args)
    assert any("| 3 | chunkd + disk tier | 1.00 s | 10.00× | 0 |" in line for line in lines)
    assert any("index load 2.0 ms, 1024 entries" in line for line in lines)

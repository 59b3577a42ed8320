"""The server's caps on the memory leases pin, seen from the Python client: a greedy reader with
``delivery="shm"`` that keeps every value cannot push the server past its budget, other clients
keep working, and the greedy reader's memory comes back within the lease TTL once it exits or is
killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import chunkd
from chunkd_testing import REPO_ROOT, serve_with_shm

MiB = 1 << 20
TTL_S = 2.0

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
    reason="shared-memory delivery needs Linux and /dev/shm",
)

# Reads every key with delivery="shm", keeps every result, says what it got, and holds them
# until its standard input closes.
GREEDY = textwrap.dedent(
    """
    import sys
    import chunkd
    address, shm_dir, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
    client = chunkd.Client(address, delivery="shm", shm_dir=shm_dir)
    held = [client.read(key) for key in keys]
    assert all(len(r.data) == len(held[0].data) for r in held)
    shm = sum(r.delivery == chunkd.Delivery.SHM for r in held)
    print(f"holding {len(held)} shm {shm}", flush=True)
    sys.stdin.read()
    """
)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _dir_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def _host(info: chunkd.ServerInfo):
    return next(t for t in info.tiers if t.tier == "host")


@pytest.fixture
def capped_server(tmp_path):
    with serve_with_shm(tmp_path, "--host_cache_bytes=64MiB", f"--lease_ttl={TTL_S}s") as server:
        yield server


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_greedy_shm_reader_stays_within_the_budget(capped_server, ending):
    server = capped_server
    keys = [f"greedy/c/{i}" for i in range(200)]
    with chunkd.Client(server.address) as writer:
        for i, key in enumerate(keys):
            writer.put(key, bytes([65 + i % 26]) * MiB)
        limit = 64 * MiB * 1.1 + 64 * MiB

        stop = threading.Event()
        peaks = {"rss": 0, "shm": 0}
        others = {"ops": 0, "errors": []}

        def sample():
            while not stop.is_set():
                peaks["rss"] = max(peaks["rss"], _rss_bytes(server.process.pid))
                peaks["shm"] = max(peaks["shm"], _dir_bytes(server.shm_dir))
                time.sleep(0.01)

        def other_clients():
            with chunkd.Client(
                server.address, delivery="shm", shm_dir=server.shm_dir
            ) as reader, chunkd.Client(server.address) as w:
                i = 0
                while not stop.is_set():
                    key, value = f"other/c/{i % 16}", bytes([97 + i % 4]) * (64 << 10)
                    try:
                        w.put(key, value)
                        assert reader.get(key) == value
                        others["ops"] += 1
                    except Exception as e:  # noqa: BLE001 - reported below
                        others["errors"].append(repr(e))
                    i += 1

        threads = [threading.Thread(target=sample), threading.Thread(target=other_clients)]
        for t in threads:
            t.start()
        greedy = subprocess.Popen(
            [sys.executable, "-c", GREEDY, server.address, server.shm_dir, *keys],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        ended = False
        try:
            try:
                line = greedy.stdout.readline()
                assert line.startswith("holding 200 shm "), line
                shm = int(line.split()[3])
                info = writer.server_info()
                host = _host(info)
                assert (host.max_pinned_bytes, host.max_client_pinned_bytes) == (
                    32 * MiB,
                    16 * MiB,
                )
                # Handles up to the per-client cap, the rest inline.
                assert 0 < shm <= 16, line
                assert host.pinned_bytes <= 32 * MiB
                assert host.pin_refusals_client_cap >= 200 - shm
                time.sleep(0.5)  # the others go on a little
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert others["ops"] > 0 and not others["errors"], others["errors"][:3]
            # Under a sanitizer the server's own bookkeeping (ASan's quarantine and shadow,
            # TSan's shadow) dwarfs the budget: its RSS is bounded in the plain build only.
            if not os.environ.get("CHUNKD_SANITIZER"):
                assert peaks["rss"] <= limit, f"server RSS {peaks['rss'] / MiB:.1f} MiB"
            assert peaks["shm"] <= limit, f"shared memory {peaks['shm'] / MiB:.1f} MiB"

            # The greedy reader goes; its leases end within the TTL (plus the sweep and slack).
            if ending == "kill":
                greedy.send_signal(signal.SIGKILL)
            else:
                greedy.stdin.close()
            ended = True
        finally:
            if not ended:  # a failed check: the reader must not outlive the test
                greedy.kill()
        assert greedy.wait(30) in (0, -signal.SIGKILL)
        start = time.monotonic()
        while time.monotonic() - start < TTL_S * 1.25 + 2:
            info = writer.server_info()
            if info.leases_active == 0 and _host(info).pinned_bytes == 0:
                break
            time.sleep(0.02)
        assert info.leases_active == 0 and _host(info).pinned_bytes == 0
        assert time.monotonic() - start <= TTL_S * 1.25 + 1

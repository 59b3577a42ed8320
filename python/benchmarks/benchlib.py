"""What the Python benchmarks share: the build check, a chunkd server and an nginx started on
free ports and private paths of their own (so that runs beside each other never collide), the
machine's description, and the results folder.

Only chunkd's public surface is used (the ``chunkd`` binary and its flags, the Python package's
public API), so the benchmarks keep working when the client's internals change.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"
BUILD_SCRIPT = REPO_ROOT / "deploy" / "scripts" / "build.sh"

# The build targets and where their binaries land.
BINARIES = {"chunkd": BUILD_DIR / "server" / "chunkd",
            "chunkd_bench": BUILD_DIR / "bench" / "chunkd_bench"}


def native_module() -> Path | None:
    """The Python client's native module as build.sh writes it (python/chunkd/_native*.so)."""
    found = sorted((REPO_ROOT / "python" / "chunkd").glob("_native*.so"))
    return found[0] if found else None



def log(message: str) -> None:
    print(f"bench [{time.strftime('%H:%M:%S')}]: {message}", file=sys.stderr, flush=True)


def ensure_built(targets: list[str], *, build: bool, log_path: Path | None = None) -> None:
    """Builds `targets` with deploy/scripts/build.sh (when `build`), then checks that their
    binaries exist; exits with the command to run when they do not."""
    command = f"{BUILD_SCRIPT.relative_to(REPO_ROOT)} {' '.join(targets)}"
    if build:
        # A build tree configured before hiredis was installed has no chunkd_bench target: a
        # fresh CMake run adds it (as bench/run does).
        if "chunkd_bench" in targets and (BUILD_DIR / "build.ninja").is_file():
            query = subprocess.run(["ninja", "-C", str(BUILD_DIR), "-t", "query", "chunkd_bench"],
                                   capture_output=True)
            if query.returncode != 0:
                subprocess.run(["cmake", "-S", str(REPO_ROOT), "-B", str(BUILD_DIR)],
                               stdout=subprocess.DEVNULL, check=False)
        log(f"building: {command}")
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            done = subprocess.run([str(BUILD_SCRIPT), *targets], cwd=REPO_ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
        finally:
            if log_path:
                out.close()
        if done.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise SystemExit(f"{tail}\nthe build failed ({command}; log: {log_path}); "
                             "--no-build runs the binaries in build/ as they are")
    missing = [str(BINARIES[t]) for t in targets
               if t in BINARIES and not os.access(BINARIES[t], os.X_OK)]
    if "chunkd_native" in targets and native_module() is None:
        missing.append(str(REPO_ROOT / "python" / "chunkd" / "_native*.so"))
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: build them with `{command}` (from "
                         f"{REPO_ROOT}); chunkd_bench needs hiredis: "
                         "`deploy/scripts/install-deps.sh all` installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the benchmark that started it dies, however it dies
    (a server left behind would hold its port and memory)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait(process: subprocess.Popen, ready, what: str, log_path: Path, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            text = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{text}")
        time.sleep(0.02)


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ChunkdServer:
    """A chunkd serving `store` on a free loopback TCP port and a UNIX socket in `workdir`.

    ``tcp`` is ``host:port``, ``unix`` is ``unix:/path``, ``socket`` the socket's path; the
    server's log is ``workdir/chunkd.log``. Extra flags go to chunkd as they are; `env`, when
    given, is the server's whole environment (default: this process's)."""

    def __init__(self, binary: Path, store: str | Path, workdir: Path, *flags: str,
                 env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "chunkd.sock"
        self.unix = f"unix:{self.socket}"
        ready = workdir / "chunkd.ready"
        self.log_path = workdir / "chunkd.log"
        self.args = [str(binary), f"--listen=127.0.0.1:0,unix:{self.socket}",
                     f"--ready_file={ready}", f"--store={store}", *flags]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=_die_with_parent)
        try:
            _wait(self.process, lambda: ready.is_file() and ready.read_text().strip(), "chunkd",
                  self.log_path)
        except BaseException:
            self.stop()
            raise
        self.tcp = next(a for a in ready.read_text().split() if not a.startswith("unix:"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _stop(self.process)
        self._log.close()

    def __enter__(self) -> ChunkdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_bytes(text: str) -> int | None:
    """'256KiB', '1MiB', '1048576', '4 kB': the bytes (chunkd's units), None if unreadable."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B|[kMGT]B|B)?\s*", text)
    if not m:
        return None
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
             "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(m.group(1)) * units.get(m.group(2) or "B", 1)


def server_flag_default(binary: Path, flag: str) -> str | None:
    """The default `chunkd --help` prints for --flag, None when this chunkd has no such flag."""
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    # Abseil's help: "  --name (help text); default: value;" wrapped over lines, each flag's
    # entry starting with "  --" at the start of a line.
    entries = re.split(r"\n(?=\s{2}--)", done.stdout + done.stderr)
    for entry in entries:
        entry = " ".join(entry.split())
        if entry.startswith(f"--{flag} ("):
            m = re.search(r"\); default: (.*?);", entry)
            return m.group(1).strip('"') if m else None
    return None


def server_flag_value(binary: Path, server_flags: list[str], flag: str) -> tuple[str | None, str]:
    """The value of --flag a chunkd started with `server_flags` runs with, and where it comes
    from: the last of `server_flags` that sets it, else the default `--help` prints; None when
    this chunkd has no such flag."""
    for given in reversed(server_flags):
        if given.startswith(f"--{flag}="):
            value = given.split("=", 1)[1]
            return value, f"{value} (given)"
    default = server_flag_default(binary, flag)
    if default is None:
        return None, f"none (this chunkd has no --{flag})"
    return default, f"{default} (--{flag} default)"


def block_size(binary: Path, server_flags: list[str]) -> tuple[int | None, str]:
    """The block size the server runs with (None: it reads whole values), and a description."""
    value, text = server_flag_value(binary, server_flags, "block_bytes")
    if value is None:
        return None, f"{text}: it reads whole values"
    return parse_bytes(value), text


def nginx_binary() -> str | None:
    for candidate in (os.environ.get("CHUNKD_NGINX"), "/usr/sbin/nginx", "/usr/bin/nginx",
                      "/usr/local/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class NginxServer:
    """Debian's nginx serving the files under `root` on a free loopback port, in the foreground,
    with its configuration, pid file, logs and temporary files in `workdir` (as the C++ tests'
    tests/unit/http_s3_test_servers.h starts it), but configured as it would be to serve files:
    `worker_processes auto` (one per core), sendfile, keep-alive connections, no access log
    (nor error lines for the 404s of zarr's probes for Zarr v2 metadata).
    Run as root, its workers stay root (the `user` directive names the current user), so they
    can read a private temporary directory."""

    def __init__(self, root: Path, workdir: Path, workers: str = "auto") -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (deploy/scripts/install-deps.sh all "
                               "installs Debian's nginx-light)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "error.log"
        last = ""
        for _ in range(5):  # a port taken between free_port() and nginx's bind: try another
            self.port = free_port()
            conf = workdir / "nginx.conf"
            user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
            conf.write_text(
                f"daemon off;\nmaster_process on;\nworker_processes {workers};\n{user}"
                f"pid {workdir}/nginx.pid;\nerror_log {self.log_path} warn;\n"
                "events { worker_connections 1024; }\n"
                "http {\n  access_log off;\n  log_not_found off;\n"
                "  default_type application/octet-stream;\n"
                "  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n"
                "  keepalive_timeout 75s;\n  keepalive_requests 1000000;\n"
                f"  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
                f"  fastcgi_temp_path {workdir}/fastcgi;\n  uwsgi_temp_path {workdir}/uwsgi;\n"
                f"  scgi_temp_path {workdir}/scgi;\n"
                f"  server {{\n    listen 127.0.0.1:{self.port};\n    root {root};\n  }}\n}}\n")
            self._log = open(workdir / "stdout.log", "ab")
            self.process = subprocess.Popen(
                [binary, "-e", str(self.log_path), "-p", str(workdir), "-c", str(conf)],
                stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            try:
                _wait(self.process, self._answers, "nginx", self.log_path, seconds=10)
                return
            except RuntimeError as e:
                last = str(e)
                self.stop()
        raise RuntimeError(last)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def version(self) -> str:
        done = subprocess.run([nginx_binary() or "nginx", "-v"], capture_output=True, text=True)
        return done.stderr.strip()

    def stop(self) -> None:
        _stop(self.process)  # SIGTERM: the master stops its workers and exits
        self._log.close()

    def __enter__(self) -> NginxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=REPO_ROOT).stdout.strip()
    except OSError:
        return ""


def environment(**extra: object) -> dict:
    """The run's machine and versions, for env.json and the report's header."""
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"commit": _git("rev-parse", "--short", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "python": platform.python_version(), **extra}


def results_dir(out: Path | None) -> Path:
    """`out`, or a fresh results/<timestamp>/ at the repository root (results/ is not
    committed); never one that another run is writing."""
    if out is None:
        base = REPO_ROOT / "results" / time.strftime("%Y%m%d-%H%M%S")
        out, n = base, 1
        while True:
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                out = base.with_name(f"{base.name}-{n}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    return out.resolve()


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")


def copy_binaries(names: list[str], into: Path) -> dict[str, Path]:
    """Copies of the built binaries in `into`: a build in this tree while the benchmark runs
    (someone else's) must not swap or half-write them under it."""
    into.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in names:
        copies[name] = into / name
        shutil.copy2(BINARIES[name], copies[name])
    return copies

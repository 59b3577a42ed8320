"""Tests of deploy/check_manifests.py: it passes on the real deployment files, and fails, with
the right message, on copies broken one way at a time.

    .venv/bin/python -m pytest deploy/test_check_manifests.py

The flag checks need the built chunkd (build/server/chunkd, or $CHUNKD_BIN); without it those
cases are skipped and the rest run with --skip-binaries. When $CHUNKD_BIN / $CHUNKCTL_BIN are set,
the binaries must exist: those cases then fail instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECKER = HERE / "check_manifests.py"
CHUNKD = Path(os.environ.get("CHUNKD_BIN") or ROOT / "build" / "server" / "chunkd")
CHUNKCTL = Path(os.environ.get("CHUNKCTL_BIN") or ROOT / "build" / "client" / "chunkctl")
HAVE_CHUNKD = CHUNKD.is_file() and os.access(CHUNKD, os.X_OK)
HAVE_CHUNKCTL = CHUNKCTL.is_file() and os.access(CHUNKCTL, os.X_OK)
# Named explicitly (as deploy/scripts/test.sh does), a binary must be there: no silent skips.
needs_chunkd = pytest.mark.skipif(not HAVE_CHUNKD and not os.environ.get("CHUNKD_BIN"),
                                  reason=f"no chunkd binary at {CHUNKD}")
needs_chunkctl = pytest.mark.skipif(not HAVE_CHUNKCTL and not os.environ.get("CHUNKCTL_BIN"),
                                    reason=f"no chunkctl binary at {CHUNKCTL}")


def run_checker(root: Path, binaries: bool | None = None):
    """Runs the checker on root; binaries: True (require them), False (--skip-binaries) or None
    (use them when they exist)."""
    if binaries is None:
        binaries = HAVE_CHUNKD or bool(os.environ.get("CHUNKD_BIN"))
    cmd = [sys.executable, str(CHECKER), "--root", str(root)]
    if binaries:
        cmd += ["--chunkd-bin", str(CHUNKD), "--chunkctl-bin", str(CHUNKCTL)]
    else:
        cmd += ["--skip-binaries"]
    env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_BIN", "CHUNKCTL_BIN")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of the files the checker reads: Dockerfile, .dockerignore, deploy/ and the
    CMakeLists.txt files (for the version and the targets)."""
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(HERE, dst / "deploy",
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "build"))
                       and d not in ("results", "__pycache__")]
        if "CMakeLists.txt" not in filenames:
            continue
        cm = Path(dirpath) / "CMakeLists.txt"
        rel = cm.relative_to(ROOT)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cm, dst / rel)
    return dst


def edit(path: Path, old: str, new: str, count: int = 1):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


# --------------------------------------------------------------------------------------------
# The real files pass.


@needs_chunkd
def test_real_files_pass():
    rc, out, err = run_checker(ROOT, binaries=True)
    assert rc == 0, out + err
    assert "check_manifests: OK" in out


def test_real_files_pass_statically():
    rc, out, err = run_checker(ROOT, binaries=False)
    assert rc == 0, out + err


def test_copy_passes(tree):
    rc, out, err = run_checker(tree)
    assert rc == 0, out + err


@needs_chunkd
def test_missing_binary_is_a_problem(tree):
    cmd = [sys.executable, str(CHECKER), "--root", str(tree), "--chunkd-bin",
           str(tree / "no-such-chunkd")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "chunkd binary not found" in proc.stdout


# --------------------------------------------------------------------------------------------
# Broken copies fail, each with its own message. (file, old, new, expected message regex)

STATIC_BREAKAGES = [
    # The Kubernetes schemas (kubernetes-validate): a misspelt field, a wrong type, a missing
    # required field, an object that is not one.
    ("deploy/k8s/sidecar.yaml", "        - name: app\n          image: chunkd:0.1.0",
     "        - name: app\n          imagee: chunkd:0.1.0",
     r"^deploy/k8s/sidecar.yaml: Deployment/zarr-app: Kubernetes 1.33 schema: "
     r"spec.template.spec.containers.0: Additional properties are not allowed \('imagee' was "
     r"unexpected\)"),
    ("deploy/k8s/node-cache.yaml", "          readinessProbe:", "          readinesProbe:",
     r"DaemonSet/chunkd-node-cache: Kubernetes 1.33 schema: .*'readinesProbe' was unexpected"),
    ("deploy/k8s/sidecar.yaml", "  replicas: 1", "  replicas: one",
     r"Deployment/zarr-app: Kubernetes 1.33 schema: spec.replicas: 'one' is not of type"),
    ("deploy/k8s/node-cache.yaml", "      port: 7878\n      targetPort: grpc", "      targetPort: grpc",
     r"Service/chunkd: Kubernetes 1.33 schema: spec.ports.0: 'port' is a required property"),
    ("deploy/k8s/sidecar.yaml", "apiVersion: apps/v1\n", "",
     r"no apiVersion or kind: not a Kubernetes object"),
    ("deploy/k8s/sidecar.yaml", "replicas: 1", "replicas: [1",
     r"^deploy/k8s/sidecar.yaml: YAML does not parse"),
    ("deploy/k8s/sidecar.yaml", "  replicas: 1\n", "  replicas: 1\n  replicas: 2\n",
     r"YAML does not parse: .*duplicate key 'replicas'"),
    # chunkd's own cross-checks: the image, its port and user, security, volumes, memory, grace.
    ("Dockerfile", "USER 10001:10001", "USER root",
     r"^Dockerfile:\d+: the image runs as root"),
    ("Dockerfile", "EXPOSE 7878", "EXPOSE 7879",
     r"^Dockerfile:\d+: EXPOSE 7879 but the default --listen serves TCP port\(s\) \[7878\]"),
    ("Dockerfile", "HEALTHCHECK --interval", "# HEALTHCHECK --interval",
     r"no HEALTHCHECK CMD that runs chunkctl"),
    ("Dockerfile", "ENTRYPOINT [\"chunkd\"]", "ENTRYPOINT chunkd",
     r"ENTRYPOINT must be \[\"chunkd\"\]"),
    ("Dockerfile", "org.opencontainers.image.version=\"0.1.0\"",
     "org.opencontainers.image.version=\"0.2.0\"",
     r"version=0.2.0 but CMakeLists.txt says project VERSION"),
    ("deploy/k8s/sidecar.yaml", "image: chunkd:0.1.0", "image: chunkd:0.0.9",
     r"container chunkd: image chunkd:0.0.9 is not the Dockerfile's chunkd:0.1.0"),
    ("deploy/k8s/sidecar.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false",
     r"container chunkd: securityContext.readOnlyRootFilesystem is not true"),
    ("deploy/k8s/node-cache.yaml", "              drop: [\"ALL\"]\n          # Native gRPC",
     "              drop: [\"NET_RAW\"]\n          # Native gRPC",
     r"container chunkd: securityContext.capabilities does not drop ALL"),
    ("deploy/k8s/sidecar.yaml", "        runAsUser: 10001\n", "        runAsUser: 10002\n",
     r"container chunkd: runs as uid 10002, the image's USER is 10001"),
    ("deploy/k8s/sidecar.yaml", "            - name: shm\n              mountPath: /dev/shm\n      volumes",
     "      volumes",
     r"container app: shares chunkd's socket but not its /dev/shm volume"),
    ("deploy/k8s/sidecar.yaml", "      terminationGracePeriodSeconds: 30",
     "      terminationGracePeriodSeconds: 5",
     r"terminationGracePeriodSeconds=5 is not longer than --shutdown_grace \(10s\)"),
    ("deploy/k8s/sidecar.yaml", "              memory: 512Mi\n          securityContext:\n",
     "              memory: 512Mi\n          securityContext:\n            runAsUser: 20000\n",
     r"container app: runs as uid 20000 but chunkd \(uid 10001\) makes its socket 0660"),
    ("deploy/k8s/node-cache.yaml", "      containerPort: 7878", "      containerPort: 7879",
     r"container chunkd: listens on TCP port 7878 but declares no containerPort"),
    ("deploy/k8s/node-cache.yaml", "            grpc:\n              port: 7878\n            periodSeconds: 10",
     "            grpc:\n              port: 9999\n            periodSeconds: 10",
     r"readinessProbe grpc port 9999 is not a TCP port chunkd listens on"),
    ("deploy/k8s/node-cache.yaml", "      port: 7878\n      targetPort: grpc",
     "      port: 7878\n      targetPort: grpcc",
     r"Service/chunkd: targetPort grpcc is no containerPort of the selected pods"),
    ("deploy/k8s/node-cache.yaml", "      port: 7878\n      targetPort", "      port: 7000\n      targetPort",
     r"Service/chunkd: port 7000 is not the image's gRPC port 7878"),
    ("deploy/k8s/node-cache.yaml", "            - --listen=unix:/run/chunkd/chunkd.sock,0.0.0.0:7878",
     "            - --listen=unix:/run/chunkd/chunkd.sock,0.0.0.0:7979",
     r"container chunkd: listens on port 7979, the image \(EXPOSE\) uses 7878"),
    ("deploy/k8s/sidecar.yaml", "            - --store=/data", "            - --store=/srv/data",
     r"--store=/srv/data is not an absolute path on a volume"),
    ("deploy/k8s/node-cache.yaml", "--disk_cache_dir=/var/cache/chunkd",
     "--disk_cache_dir=/srv/cache", r"--disk_cache_dir=/srv/cache is not on a volume"),
    ("deploy/k8s/node-cache.yaml", "            - --disk_cache_bytes=1500GiB\n", "",
     r"container chunkd: --disk_cache_dir without --disk_cache_bytes"),
    ("deploy/k8s/node-cache.yaml", "--store=s3://my-bucket/datasets", "--store=/var/cache/chunkd/x",
     r"container chunkd: --disk_cache_dir is for remote stores"),
    ("deploy/k8s/sidecar.yaml", "sizeLimit: 1536Mi", "sizeLimit: 512Mi",
     r"container chunkd: /dev/shm volume 'shm' sizeLimit 512MiB is not above --host_cache_bytes"),
    ("deploy/k8s/node-cache.yaml", "--host_cache_bytes=8GiB", "--host_cache_bytes=16GiB",
     r"container chunkd: memory limit 10GiB is not above --host_cache_bytes \(16GiB\)"),
    ("deploy/compose.yaml", "      - \"127.0.0.1:7878:7878\"", "      - \"127.0.0.1:7878:7879\"",
     r"compose.yaml: service chunkd: publishes container port 7879"),
    ("deploy/compose.yaml", "    image: chunkd:0.1.0\n    # The image's",
     "    image: chunkd:latest\n    # The image's",
     r"service chunkd: image chunkd:latest is not the Dockerfile's chunkd:0.1.0"),
    ("deploy/compose.yaml", "    ipc: shareable\n", "",
     r"service chunkd: service client joins its IPC namespace .* needs `ipc: shareable` here"),
    ("deploy/compose.yaml", "shm_size: \"2gb\"", "shm_size: \"1gb\"",
     r"service chunkd: shm_size 1GiB is not above --host_cache_bytes \(1GiB\)"),
    ("deploy/compose.yaml", "stop_grace_period: 20s", "stop_grace_period: 10s",
     r"stop_grace_period \(10s\) is not longer than --shutdown_grace \(10s\)"),
    ("deploy/compose.yaml", "    read_only: true\n    security_opt:\n      - no-new-privileges:true\n    cap_drop:\n      - ALL\n    volumes:\n      - chunkd-socket:/run/chunkd\n    # The",
     "    security_opt:\n      - no-new-privileges:true\n    cap_drop:\n      - ALL\n    volumes:\n      - chunkd-socket:/run/chunkd\n    # The",
     r"service client: read_only is not true"),
    ("deploy/systemd/chunkd.service", "TimeoutStopSec=20s", "TimeoutStopSec=5s",
     r"chunkd.service:\d+: TimeoutStopSec \(5s\) is not longer than --shutdown_grace \(10s\)"),
    ("deploy/systemd/chunkd.service", "User=chunkd\nGroup=chunkd\n", "",
     r"chunkd.service: runs as root"),
    ("deploy/systemd/chunkd.service", "ProtectSystem=strict", "ProtectSystem=full",
     r"chunkd.service: ProtectSystem= is not strict"),
    ("deploy/systemd/chunkd.service", "--store=/var/lib/chunkd", "--store=/srv/chunkd",
     r"--store=/srv/chunkd is not under StateDirectory="),
    ("deploy/systemd/chunkd.service", "RuntimeDirectory=chunkd\n", "",
     r"socket /run/chunkd/chunkd.sock is outside RuntimeDirectory="),
    ("deploy/systemd/chunkd.service", "KillSignal=SIGTERM", "KillSignal=SIGKILL",
     r"KillSignal=SIGKILL: chunkd drains calls in flight on SIGTERM only"),
]


@pytest.mark.parametrize("rel,old,new,expected", STATIC_BREAKAGES,
                         ids=[f"{b[0]}:{i}" for i, b in enumerate(STATIC_BREAKAGES)])
def test_broken_copy_fails(tree, rel, old, new, expected):
    edit(tree / rel, old, new)
    rc, out, err = run_checker(tree)
    assert rc == 1, f"checker passed a broken {rel}:\n{out}{err}"
    assert re.search(expected, out, re.M), f"expected /{expected}/ in:\n{out}{err}"
    # One clear line per problem, each naming a file.
    for line in out.splitlines():
        assert re.match(r"^[\w./-]+(:\d+)?: ", line), line


def test_unknown_systemd_key_fails(tree):
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    edit(tree / "deploy/systemd/chunkd.service", "\nUMask=0007\n", "\nUMask=0007\nProtectSystm=yes\n")
    rc, out, err = run_checker(tree)
    assert rc == 1
    assert re.search(r"systemd-analyze verify: .*Unknown key( name)? 'ProtectSystm'", out), out


# Breakages only the real binaries can see.
BINARY_BREAKAGES = [
    # A misspelt flag.
    ("deploy/k8s/node-cache.yaml", "            - --host_cache_bytes=8GiB\n",
     "            - --host_cache_size=8GiB\n",
     r"DaemonSet/chunkd-node-cache: container chunkd: --host_cache_size is not a chunkd flag"),
    ("deploy/k8s/sidecar.yaml", "--host_cache_bytes=1GiB", "--host_cache_bytes=1GB!",
     r"container chunkd: chunkd rejects its flags: chunkd: Illegal value '1GB!' specified for "
     r"flag 'host_cache_bytes'"),
    ("deploy/compose.yaml", "      - --shutdown_grace=10s", "      - --shutdown_grace=10",
     r"service chunkd: chunkd rejects its flags: chunkd: Illegal value '10'"),
    # A flag of a later feature (TLS), which belongs in comments until chunkd has it.
    ("deploy/systemd/chunkd.service", "--ready_file=/run/chunkd/ready",
     "--ready_file=/run/chunkd/ready --tls_cert_file=/etc/chunkd/cert.pem",
     r"chunkd.service:\d+: ExecStart: --tls_cert_file is not a chunkd flag"),
    ("Dockerfile", "CMD [\"--listen=0.0.0.0:7878\", \"--store=/data\"]",
     "CMD [\"--listen=0.0.0.0:7878\", \"--store=/data\", \"/data\"]",
     r"Dockerfile:\d+: ENTRYPOINT\+CMD: chunkd takes no positional arguments"),
]


@needs_chunkd
@pytest.mark.parametrize("rel,old,new,expected", BINARY_BREAKAGES,
                         ids=[f"{b[0]}:{i}" for i, b in enumerate(BINARY_BREAKAGES)])
def test_broken_flags_fail(tree, rel, old, new, expected):
    edit(tree / rel, old, new)
    rc, out, err = run_checker(tree, binaries=True)
    assert rc == 1, f"checker passed a broken {rel}:\n{out}{err}"
    assert re.search(expected, out, re.M), f"expected /{expected}/ in:\n{out}{err}"
    # Without the binaries the same copy passes: these need the real flag parser.
    rc, out, err = run_checker(tree, binaries=False)
    assert rc == 0, out + err


@needs_chunkd
@needs_chunkctl
def test_chunkctl_flags_checked(tree):
    edit(tree / "deploy/k8s/sidecar.yaml", "--timeout=2s\", \"health\"]",
         "--deadline=2s\", \"health\"]")
    edit(tree / "deploy/compose.yaml", "  chunkctl --server=unix:/run/chunkd/chunkd.sock info",
         "  chunkctl --server=unix:/run/chunkd/chunkd.sock ping")
    rc, out, err = run_checker(tree, binaries=True)
    assert rc == 1
    assert re.search(r"container chunkd: startupProbe: --deadline is not a chunkctl flag", out), out
    assert re.search(r"service client: 'ping' is not a chunkctl command", out), out


def test_shell_scripts_are_scanned():
    sys.path.insert(0, str(HERE))
    try:
        import check_manifests as cm
    finally:
        sys.path.pop(0)
    script = ("set -e\nwhile true; do\n  FOO=1 chunkctl --server=\"$X\" info && sleep 1\n"
              "done\nexec /usr/local/bin/chunkd --listen=unix:/s --store=memory:// # --later\n")
    found = [(p, a, d) for p, a, d in cm.expand_argv(["/bin/sh", "-c", script])]
    assert [(p, a) for p, a, _ in found] == [
        ("chunkctl", ["chunkctl", "--server=$X", "info"]),
        ("chunkd", ["/usr/local/bin/chunkd", "--listen=unix:/s", "--store=memory://"]),
    ]
    assert cm.parse_duration("1m30s") == 90 and cm.parse_duration("1min 5s") == 65
    assert cm.parse_duration("500ms") == 0.5 and cm.parse_duration(30) == 30
    assert cm.parse_duration("ten") is None
    lst = cm.parse_listen("unix:/run/c.sock,0.0.0.0:7878,[::1]:9")
    assert lst.unix == ["/run/c.sock"] and lst.tcp == [("0.0.0.0", 7878), ("[::1]", 9)]
    assert cm.image_repo_tag("ghcr.io/org/chunkd:0.1.0") == ("chunkd", "0.1.0")
    assert cm.image_repo_tag("localhost:5000/chunkd") == ("chunkd", None)
    assert cm.parse_bytes("1536Mi") == 1536 << 20 and cm.parse_bytes("8GiB") == 8 << 30
    assert cm.parse_bytes("2gb") == 2 << 30 and cm.parse_bytes("1GB") == 10**9
    assert cm.parse_bytes("lots") is None


def test_schemas_need_no_network(tree):
    """kubernetes-validate carries the Kubernetes schemas: the check runs, and still catches a
    misspelt field, in a network namespace with no network at all."""
    prefix = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if not shutil.which("unshare") or subprocess.run(prefix + ["true"]).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare --net)")
    cmd = prefix + [sys.executable, str(CHECKER), "--root", str(tree), "--skip-binaries"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    edit(tree / "deploy/k8s/pool.yaml", "  podManagementPolicy:", "  podManagmentPolicy:")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "'podManagmentPolicy' was unexpected" in proc.stdout, proc.stdout + proc.stderr

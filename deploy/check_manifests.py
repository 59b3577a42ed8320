#!/usr/bin/env python3
"""Checks chunkd's deployment files: Kubernetes objects against the Kubernetes API schemas, and
everything (Dockerfile, manifests, compose file, systemd unit) against chunkd itself.

    python deploy/check_manifests.py [--root DIR] [--chunkd-bin PATH] [--chunkctl-bin PATH]
                                     [--skip-binaries]

Prints one line per problem ("FILE[:LINE]: where: what") and exits 1 if there is any, 0 if none.

- Every YAML file under deploy/ parses, duplicate keys being errors; every object in deploy/k8s/
  is valid for Kubernetes KUBERNETES_VERSION (kubernetes-validate, strict: misspelt or unknown
  fields are errors, as `kubectl apply --validate=strict` has them).
- chunkd's own cross-checks:
  - image: chunkd's image is chunkd:<project VERSION in CMakeLists.txt> everywhere (the
    Dockerfile's LABEL, manifests, compose);
  - port: the Dockerfile's EXPOSE is the TCP port of the image's default --listen, and every
    chunkd container, containerPort, gRPC probe, Service and published port uses it;
  - flags: every chunkd and chunkctl command line (Dockerfile CMD and HEALTHCHECK, container
    args and exec probes, compose commands, systemd Exec lines, `sh -c` scripts in them; not
    comments) uses flags the real `--helpfull` lists, with values the real parser accepts
    (`chunkd FLAGS --version`), and chunkctl subcommands that exist;
  - security: chunkd containers run as non-root (the Dockerfile's USER), with a read-only root
    filesystem, no privilege escalation and no capabilities (compose: read_only, cap_drop ALL,
    no-new-privileges); the systemd unit as a user, ProtectSystem=strict, NoNewPrivileges=yes;
  - what chunkd needs where it runs: its socket and store on volumes (writable directories under
    systemd), /dev/shm memory-backed and larger than --host_cache_bytes, a memory limit above
    it, a stop grace period longer than --shutdown_grace, and containers that use its socket
    sharing its /dev/shm and uid.
  The systemd unit also goes through `systemd-analyze verify` where that exists.

Building and running the image (deploy/scripts/test-image.sh) is what checks the Dockerfile's
own workings: its stages, packages and health check.

The chunkd binary is taken from --chunkd-bin, else $CHUNKD_BIN, else build/server/chunkd under the
root; without it the flag checks fail, unless --skip-binaries is given. chunkctl is taken from
--chunkctl-bin, $CHUNKCTL_BIN or build/client/chunkctl, and is skipped (with a note) if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import kubernetes_validate
except ImportError:  # reported as a problem, with how to install it
    kubernetes_validate = None

# The Kubernetes release whose API the manifests are checked against: native sidecars (an init
# container with restartPolicy: Always) need 1.29 or later.
KUBERNETES_VERSION = "1.33"
# Stores that are not a directory on this machine, so need no volume or writable path.
REMOTE_STORES = ("memory://", "s3://", "http://", "https://")
WORKLOAD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}
SHELLS = {"sh", "bash", "dash"}
# Words that may start a shell command before the program name.
SHELL_PREFIXES = {"while", "until", "do", "then", "else", "elif", "if", "exec", "!", "time",
                  "{", "(", "command"}
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ";;", "(", ")"}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


# ----------------------------------------------------------------------------------------------
# Small parsers


def parse_duration(text) -> float | None:
    """Seconds in an absl / Go / systemd / plain-seconds duration ("10s", "1m30s", "1min 5s",
    "500ms", 30); None if it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "m": 60,
             "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)([a-z]+)", s):
        if m.start() != pos or m.group(2) not in units:
            return None
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    return total if s and pos == len(s) else None


def parse_bytes(text) -> int | None:
    """Bytes in a chunkd ("1GiB", "512MB"), Kubernetes ("1536Mi", "2G") or compose ("2gb")
    size; None if it is not one."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", str(text).strip())
    if not m:
        return None
    units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30,
             "gb": 1 << 30}  # compose: powers of 1024, lower case
    binary = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "KiB": 1 << 10,
              "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    decimal = {"kB": 10**3, "K": 10**3, "MB": 10**6, "M": 10**6, "GB": 10**9, "G": 10**9,
               "T": 10**12, "TB": 10**12}
    unit = m.group(2)
    scale = binary.get(unit) or decimal.get(unit) or (units.get(unit) if unit.islower()
                                                      or not unit else None)
    return int(float(m.group(1)) * scale) if scale else None


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n}B"


@dataclass
class Listen:
    tcp: list = field(default_factory=list)    # (host, port)
    unix: list = field(default_factory=list)   # socket paths


def parse_listen(value: str) -> Listen:
    out = Listen()
    for addr in filter(None, (a.strip() for a in value.split(","))):
        if addr.startswith("unix:"):
            out.unix.append(addr[len("unix:"):].removeprefix("//"))
        elif m := re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]*):(\d+)", addr):
            out.tcp.append((m.group(1), int(m.group(2))))
    return out


def flag_value(argv, name, default=None):
    """The value of --name in argv (the last one wins, as in absl), or default."""
    value = default
    for i, tok in enumerate(argv):
        if tok.startswith((f"--{name}=", f"-{name}=")):
            value = tok.split("=", 1)[1]
        elif tok in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def image_repo_tag(image: str):
    """('chunkd', '0.1.0') for 'registry.example/team/chunkd:0.1.0'."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    repo, _, tag = name.partition(":")
    return repo, tag or None


def shell_commands(script: str):
    """Simple commands (argv lists) of a shell script, enough for the one-liners and loops that
    manifests carry: operators and newlines split commands, keywords and VAR=value prefixes are
    dropped, comments ignored, quotes removed as the shell would (no expansion)."""
    for line in script.replace("\\\n", " ").splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError:
            continue
        cmd = []
        for tok in tokens + [";"]:
            if tok in SHELL_OPERATORS:
                if cmd:
                    yield cmd
                cmd = []
            elif cmd or not (tok in SHELL_PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=.*", tok)):
                cmd.append(tok)


def expand_argv(argv):
    """Every chunkd/chunkctl command line in argv: argv itself, or the commands of its `sh -c`
    script. Yields (program, argv, whether argv itself is the command)."""
    argv = [str(a) for a in argv or []]
    if not argv:
        return
    prog = os.path.basename(argv[0])
    if prog in SHELLS and "-c" in argv[1:]:
        i = argv.index("-c")
        for cmd in shell_commands(argv[i + 1] if i + 1 < len(argv) else ""):
            if os.path.basename(cmd[0]) in ("chunkd", "chunkctl"):
                yield os.path.basename(cmd[0]), cmd, False
    elif prog in ("chunkd", "chunkctl"):
        yield prog, argv, True


def parse_dockerfile(text: str):
    """[(line, KEYWORD, rest)] with continuation lines joined and comments dropped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        start, parts = i + 1, [lines[i].rstrip()]
        i += 1
        if not parts[0].strip() or parts[0].strip().startswith("#"):
            continue
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            if not lines[i].strip().startswith("#"):
                parts.append(lines[i].rstrip())
            else:
                parts.append("\\")
            i += 1
        joined = " ".join(p.strip() for p in parts).rstrip("\\ ")
        keyword, _, rest = joined.partition(" ")
        out.append((start, keyword.upper(), rest.strip()))
    return out


def exec_form(rest: str):
    """argv of an exec-form (JSON) instruction argument, or None for the shell form."""
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_unit(text):
    """{section: [(line, key, value)]} of a systemd unit, continuation lines joined."""
    sections, current, buf, start = {}, None, "", 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        s = line.strip()
        if s.startswith(("#", ";")) or (not buf and not s):
            continue
        start = start if buf else n
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf, logical = "", buf + s
        if m := re.fullmatch(r"\[([\w-]+)\]", logical):
            current = sections.setdefault(m.group(1), [])
        elif current is not None and "=" in logical:
            k, _, v = logical.partition("=")
            current.append((start, k.strip(), v.strip()))
    return sections


class FlagSet:
    """The flags a program's --helpfull lists (Abseil's format: "--name (...); default: X;")."""

    def __init__(self, binary: Path):
        self.flags: dict[str, str | None] = {}
        self.help_text = ""
        self.error = None
        try:
            proc = subprocess.run([str(binary), "--helpfull"], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = f"cannot run {binary} --helpfull: {e}"
            return
        self.help_text = proc.stdout
        for block in re.split(r"(?m)^\s+--(?=\w+ \()", self.help_text)[1:]:
            d = re.search(r"default: (.*?);\s*$", " ".join(block.split()))
            self.flags[re.match(r"\w+", block).group(0)] = d.group(1) if d else None
        if proc.returncode != 0 or not self.flags:
            self.error = f"{binary} --helpfull exits {proc.returncode} and lists no flags"

    def is_bool(self, name):
        return self.flags.get(name) in ("true", "false")

    def known(self, name):
        return name in self.flags or (name.startswith("no") and self.is_bool(name[2:]))

    def split(self, argv):
        """([(name, tokens)], positional) of argv[1:], as Abseil reads them."""
        flags, positional, args, i = [], [], argv[1:], 0
        while i < len(args):
            tok = args[i]
            if tok == "--":
                positional.extend(args[i + 1:])
                break
            if tok.startswith("-") and len(tok) > 1:
                body = tok.lstrip("-")
                name = body.split("=", 1)[0]
                tokens = [tok]
                if "=" not in body and name in self.flags and not self.is_bool(name) \
                        and i + 1 < len(args):
                    i += 1
                    tokens.append(args[i])
                flags.append((name, tokens))
            else:
                positional.append(tok)
            i += 1
        return flags, positional


# ----------------------------------------------------------------------------------------------
# The checker


class Checker:
    def __init__(self, root: Path, chunkd_bin: Path, chunkctl_bin: Path, skip_binaries: bool):
        self.root = root
        self.chunkd_bin, self.chunkctl_bin = chunkd_bin, chunkctl_bin
        self.skip_binaries = skip_binaries
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.commands: list[tuple[str, str, list]] = []  # (where, program, argv)
        self.image = None   # e.g. chunkd:0.1.0
        self.port = None    # e.g. 7878
        self.uid = None     # the Dockerfile's USER
        self.files = 0

    def problem(self, where, msg):
        self.problems.append(f"{where}: {msg}")

    def run(self):
        self.check_dockerfile()
        for path in sorted((self.root / "deploy").rglob("*.y*ml")):
            self.check_yaml(path)
        for unit in sorted((self.root / "deploy" / "systemd").glob("*.service")):
            self.check_unit(unit)
        self.check_commands()

    # -- Dockerfile: the image's name, port and user that everything else must agree with -------

    def check_dockerfile(self):
        name = "Dockerfile"
        self.files += 1
        text = (self.root / name).read_text()
        m = re.search(r"project\s*\([^)]*VERSION\s+([0-9][0-9.]*)",
                      (self.root / "CMakeLists.txt").read_text(), re.S)
        version = m.group(1) if m else None
        final = []  # instructions of the last stage (the image)
        for ins in parse_dockerfile(text):
            final = [] if ins[1] == "FROM" else final + [ins]

        def last(keyword):
            found = [i for i in final if i[1] == keyword]
            return found[-1] if found else (None, None, "")

        labels = dict(t.partition("=")[::2] for _, k, rest in final if k == "LABEL"
                      for t in shlex.split(rest))
        label = labels.get("org.opencontainers.image.version")
        if label != version:
            self.problem(name, f"LABEL org.opencontainers.image.version={label} but "
                         f"CMakeLists.txt says project VERSION {version}")
        self.image = f"{labels.get('org.opencontainers.image.title', 'chunkd')}:{version}"
        line, _, user = last("USER")
        self.uid = user.split(":")[0] or None
        if self.uid in (None, "root", "0"):
            self.problem(f"{name}:{line or 1}", f"the image runs as root (USER {user or 'unset'})")
        elif self.uid.isdigit():
            self.uid = int(self.uid)
        entry, cmd = exec_form(last("ENTRYPOINT")[2]), exec_form(last("CMD")[2] or "[]")
        if entry != ["chunkd"] or cmd is None:
            self.problem(name, "ENTRYPOINT must be [\"chunkd\"] and CMD its arguments in exec "
                         "form (so that SIGTERM reaches chunkd and manifests can replace CMD)")
            return
        line = last("CMD")[0] or last("ENTRYPOINT")[0]
        self.commands.append((f"{name}:{line}: ENTRYPOINT+CMD", "chunkd", entry + cmd))
        listen = parse_listen(flag_value(cmd, "listen", "127.0.0.1:7878"))
        line, _, expose = last("EXPOSE")
        ports = [int(p.split("/")[0]) for p in expose.split() if p.split("/")[0].isdigit()]
        self.port = ports[0] if ports else None
        if [p for _, p in listen.tcp] != ports[:1]:
            self.problem(f"{name}:{line or 1}", f"EXPOSE {expose or '(none)'} but the default "
                         f"--listen serves TCP port(s) {[p for _, p in listen.tcp]}")
        if any(h in LOOPBACK for h, _ in listen.tcp):
            self.problem(name, "the default --listen is loopback-only: unreachable through a "
                         "published port")
        line, _, hc = last("HEALTHCHECK")
        probe = exec_form(hc.split("CMD", 1)[1].strip()) if "CMD" in hc else None
        probes = list(expand_argv(probe))
        if not probes:
            self.problem(f"{name}:{line or 1}", "no HEALTHCHECK CMD that runs chunkctl")
        for prog, argv, _ in probes:
            self.commands.append((f"{name}:{line}: HEALTHCHECK", prog, argv))
            server = parse_listen(flag_value(argv, "server", ""))
            if server.tcp and server.tcp[0][1] != self.port:
                self.problem(f"{name}:{line}", f"HEALTHCHECK probes port {server.tcp[0][1]}, "
                             f"the image serves {self.port}")
        line, _, stop = last("STOPSIGNAL")
        if stop and stop not in ("SIGTERM", "TERM", "15"):
            self.problem(f"{name}:{line}", f"STOPSIGNAL {stop}: chunkd drains on SIGTERM only")

    # -- YAML ------------------------------------------------------------------------------------

    def load_yaml(self, path: Path, rel: str):
        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node, deep=False):
            keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
            for key in {k for k in keys if isinstance(k, str) and keys.count(k) > 1} - {"<<"}:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", node.start_mark)
            return yaml.SafeLoader.construct_mapping(loader, node, deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        try:
            return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]
        except yaml.YAMLError as e:
            self.problem(rel, f"YAML does not parse: {' '.join(str(e).split())}")
            return None

    def check_yaml(self, path: Path):
        rel = str(path.relative_to(self.root))
        self.files += 1
        docs = self.load_yaml(path, rel)
        if docs is None:
            return
        if path.name.startswith(("compose.", "docker-compose.")):
            self.check_compose(rel, docs[0])
        elif "k8s" in path.parts:
            self.check_k8s(rel, docs)

    # -- Kubernetes ------------------------------------------------------------------------------

    def check_k8s(self, rel, docs):
        if kubernetes_validate is None:
            self.problem(rel, "kubernetes-validate is not installed (pip install -r "
                         "python/requirements-dev.txt)")
        workloads, services = [], []
        for n, doc in enumerate(docs, 1):
            where = f"{rel}: {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', n)}"
            if not doc.get("apiVersion") or not doc.get("kind"):
                self.problem(where, "no apiVersion or kind: not a Kubernetes object")
                continue
            if kubernetes_validate is not None:
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    self.problem(where, f"Kubernetes {KUBERNETES_VERSION} schema: "
                                 f"{path + ': ' if path else ''}{e.message}")
                    continue
                except (kubernetes_validate.SchemaNotFoundError,
                        kubernetes_validate.InvalidSchemaError) as e:
                    self.problem(where, f"no Kubernetes {KUBERNETES_VERSION} schema: {e}")
                    continue
            if doc.get("kind") in WORKLOAD_KINDS:
                spec, labels = self.pod_template(doc)
                workloads.append((labels, spec))
                self.check_pod(where, spec)
            elif doc.get("kind") == "Service":
                services.append((where, doc))
        for where, doc in services:  # after every workload of the file: the order is free
            self.check_service(where, doc, workloads)

    @staticmethod
    def pod_template(doc):
        """(pod spec, pod labels) of a workload."""
        if doc["kind"] == "Pod":
            return doc.get("spec") or {}, (doc.get("metadata") or {}).get("labels") or {}
        spec = doc.get("spec") or {}
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        template = spec.get("template") or {}
        return template.get("spec") or {}, (template.get("metadata") or {}).get("labels") or {}

    def is_chunkd_image(self, image) -> bool:
        return isinstance(image, str) and image_repo_tag(image)[0] == "chunkd"

    def check_image(self, where, image):
        if self.is_chunkd_image(image) and image_repo_tag(image) != image_repo_tag(self.image):
            self.problem(where, f"image {image} is not the Dockerfile's {self.image}")

    def check_pod(self, where, spec):
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        pod_sc = spec.get("securityContext") or {}
        containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
        for c in containers:
            cw = f"{where}: container {c['name']}"
            self.check_image(cw, c.get("image"))
            command = c.get("command")
            argv = list(command or []) + list(c.get("args") or [])
            if not command and self.is_chunkd_image(c.get("image")):
                argv = ["chunkd"] + argv  # the image's ENTRYPOINT
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                exec_probe = (c.get(probe_name) or {}).get("exec") or {}
                for prog, a, _ in expand_argv(exec_probe.get("command")):
                    self.commands.append((f"{cw}: {probe_name}", prog, a))
            for prog, a, direct in expand_argv(argv):
                self.commands.append((cw, prog, a))
                if prog == "chunkd" and not direct:
                    self.problem(cw, "chunkd runs inside a shell script: SIGTERM reaches the "
                                 "shell, not chunkd")
                elif prog == "chunkd":
                    self.check_chunkd_container(where, spec, c, a, volumes, pod_sc, containers)

    def check_chunkd_container(self, where, spec, c, argv, volumes, pod_sc, containers):
        cw = f"{where}: container {c['name']}"
        sc = c.get("securityContext") or {}

        def effective(container, key):
            own = container.get("securityContext") or {}
            return own[key] if key in own else pod_sc.get(key)

        listen_flag = flag_value(argv, "listen", "127.0.0.1:7878")
        listen = parse_listen(listen_flag)
        tcp = {p for _, p in listen.tcp}
        declared = {p["containerPort"]: p.get("name") for p in c.get("ports") or []}
        for host, port in listen.tcp:
            if port != self.port:
                self.problem(cw, f"listens on port {port}, the image (EXPOSE) uses {self.port}")
            if port not in declared:
                self.problem(cw, f"listens on TCP port {port} but declares no containerPort")
            if host in LOOPBACK:
                self.problem(cw, f"--listen {host}:{port} is loopback-only: probes and Services "
                             "cannot reach it")
        for port in declared:
            if port not in tcp:
                self.problem(cw, f"containerPort {port} is not served by --listen={listen_flag}")
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (c.get(probe_name) or {}).get("grpc")
            if grpc and grpc.get("port") not in tcp:
                self.problem(cw, f"{probe_name} grpc port {grpc.get('port')} is not a TCP port "
                             f"chunkd listens on ({listen_flag})")
        # Security.
        uid = effective(c, "runAsUser")
        if effective(c, "runAsNonRoot") is not True or uid == 0:
            self.problem(cw, "does not run as non-root (securityContext.runAsNonRoot: true, a "
                         "non-zero runAsUser)")
        if uid is not None and self.uid is not None and uid != self.uid:
            self.problem(cw, f"runs as uid {uid}, the image's USER is {self.uid}")
        if sc.get("readOnlyRootFilesystem") is not True:
            self.problem(cw, "securityContext.readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.problem(cw, "securityContext.allowPrivilegeEscalation is not false")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or \
                (sc.get("capabilities") or {}).get("add"):
            self.problem(cw, "securityContext.capabilities does not drop ALL (and add none)")
        # What chunkd writes must be on volumes: the root filesystem is read-only.
        mounts = {m["mountPath"].rstrip("/") or "/": m for m in c.get("volumeMounts") or []}

        def mount_for(path):
            found = [mp for mp in mounts if path == mp or path.startswith(mp.rstrip("/") + "/")]
            return mounts[max(found, key=len)] if found else None

        socket_volumes = set()
        for sock in listen.unix:
            m = mount_for(os.path.dirname(sock))
            if m is None:
                self.problem(cw, f"socket {sock} is not on a volume (clients could not reach it)")
            else:
                socket_volumes.add(m["name"])
        store = flag_value(argv, "store", "chunkd-data").removeprefix("file://")
        if not store.startswith(REMOTE_STORES) and mount_for(store) is None:
            self.problem(cw, f"--store={store} is not an absolute path on a volume")
        # The disk tier: on a volume (it must outlive the container), with its budget, and only
        # in front of a remote store (chunkd refuses it otherwise: docs/disk-tier.md).
        disk_dir = flag_value(argv, "disk_cache_dir")
        if disk_dir:
            if mount_for(disk_dir) is None:
                self.problem(cw, f"--disk_cache_dir={disk_dir} is not on a volume")
            if not flag_value(argv, "disk_cache_bytes"):
                self.problem(cw, "--disk_cache_dir without --disk_cache_bytes (chunkd refuses it)")
            if not store.startswith(("s3://", "http://", "https://")):
                self.problem(cw, f"--disk_cache_dir is for remote stores (s3, http), not "
                             f"--store={store} (chunkd refuses it)")
        # Memory: the cache lives in /dev/shm segments, charged to chunkd's memory limit.
        # (A value chunkd cannot read is reported by the flag check: 0 here.)
        cache = parse_bytes(flag_value(argv, "host_cache_bytes", "1GiB")) or 0
        limit = parse_bytes(((c.get("resources") or {}).get("limits") or {}).get("memory"))
        if limit is not None and limit <= cache:
            self.problem(cw, f"memory limit {format_bytes(limit)} is not above --host_cache_bytes "
                         f"({format_bytes(cache)})")
        shm = mounts.get("/dev/shm")
        shm_volume = volumes.get(shm["name"]) if shm else None
        if shm_volume is not None:
            empty_dir = shm_volume.get("emptyDir")
            if empty_dir is not None and empty_dir.get("medium") != "Memory":
                self.problem(cw, "/dev/shm is an emptyDir without medium: Memory (not a tmpfs)")
            size = parse_bytes((empty_dir or {}).get("sizeLimit"))
            if size is not None and size <= cache:
                self.problem(cw, f"/dev/shm volume '{shm['name']}' sizeLimit {format_bytes(size)}"
                             f" is not above --host_cache_bytes ({format_bytes(cache)})")
        # Shutdown: the pod's grace period must outlast chunkd's own.
        grace = parse_duration(flag_value(argv, "shutdown_grace", "10s")) or 0
        pod_grace = spec.get("terminationGracePeriodSeconds", 30)
        if pod_grace <= grace:
            self.problem(where, f"terminationGracePeriodSeconds={pod_grace} is not longer than "
                         f"--shutdown_grace ({grace:g}s): calls in flight would be killed")
        # Containers that use chunkd's socket: same /dev/shm (handles map), same uid (the socket
        # is 0660 by default).
        for other in containers:
            names = {m["name"]: m["mountPath"] for m in other.get("volumeMounts") or []}
            if other is c or not socket_volumes & names.keys():
                continue
            if effective(other, "runAsUser") == 0:
                continue  # a root helper that prepares directories
            ow = f"{where}: container {other['name']}"
            if shm and names.get(shm["name"]) != "/dev/shm":
                self.problem(ow, f"shares chunkd's socket but not its /dev/shm volume "
                             f"'{shm['name']}' (shared-memory handles would not map)")
            if flag_value(argv, "unix_socket_mode") is None and effective(other, "runAsUser") != uid:
                self.problem(ow, f"runs as uid {effective(other, 'runAsUser')} but chunkd (uid "
                             f"{uid}) makes its socket 0660: it could not connect")

    def check_service(self, where, svc, workloads):
        spec = svc.get("spec") or {}
        selector = spec.get("selector") or {}
        pods = [p for labels, p in workloads
                if selector and all(labels.get(k) == v for k, v in selector.items())]
        if not pods:
            self.problem(where, f"selector {selector} matches no workload in this file")
        ports = [(p["containerPort"], p.get("name")) for pod in pods
                 for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])
                 for p in c.get("ports") or []]
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port["port"])
            if port["port"] != self.port:
                self.problem(where, f"port {port['port']} is not the image's gRPC port {self.port}")
            if pods and not any(target in cp for cp in ports):
                self.problem(where, f"targetPort {target} is no containerPort of the selected pods")

    # -- compose ---------------------------------------------------------------------------------

    def check_compose(self, rel, doc):
        services = doc.get("services") or {}
        for sname, svc in services.items():
            sw = f"{rel}: service {sname}"
            image = svc.get("image")
            self.check_image(sw, image)
            entry, command = svc.get("entrypoint"), svc.get("command")
            entry = shlex.split(entry) if isinstance(entry, str) else entry
            command = shlex.split(command) if isinstance(command, str) else command
            if entry:
                argv = list(entry) + list(command or [])
            elif self.is_chunkd_image(image):
                argv = ["chunkd"] + list(command or [])
            else:
                argv = list(command or [])
            if self.is_chunkd_image(image):
                # Security, for every container of the image (the client example too).
                if svc.get("read_only") is not True:
                    self.problem(sw, "read_only is not true")
                if svc.get("cap_drop") != ["ALL"] or svc.get("cap_add"):
                    self.problem(sw, "cap_drop is not [ALL] (or cap_add adds some)")
                if "no-new-privileges:true" not in (svc.get("security_opt") or []):
                    self.problem(sw, "security_opt lacks no-new-privileges:true")
                if str(svc.get("user", self.uid)).split(":")[0] in ("0", "root"):
                    self.problem(sw, "runs as root")
            for prog, a, direct in expand_argv(argv):
                self.commands.append((sw, prog, a))
                if prog == "chunkd" and direct:
                    self.check_compose_chunkd(sw, svc, a, services)

    def check_compose_chunkd(self, sw, svc, argv, services):
        listen_flag = flag_value(argv, "listen", "127.0.0.1:7878")
        listen = parse_listen(listen_flag)
        tcp = {p for _, p in listen.tcp}
        for _, port in listen.tcp:
            if port != self.port:
                self.problem(sw, f"listens on port {port}, the image (EXPOSE) uses {self.port}")
        for mapping in svc.get("ports") or []:
            target = mapping.get("target") if isinstance(mapping, dict) else \
                str(mapping).split("/")[0].rsplit(":", 1)[-1]
            if int(target) not in tcp:
                self.problem(sw, f"publishes container port {target}, which --listen="
                             f"{listen_flag} does not serve")
        if not (svc.get("healthcheck") or {}).get("disable") and self.port not in tcp:
            self.problem(sw, f"the image's HEALTHCHECK probes port {self.port}, which "
                         f"--listen={listen_flag} does not serve (override or disable it)")
        cache = parse_bytes(flag_value(argv, "host_cache_bytes", "1GiB")) or 0
        shm_size = parse_bytes(svc.get("shm_size", "64m"))
        if shm_size is None or shm_size <= cache:
            self.problem(sw, f"shm_size {format_bytes(shm_size)} is not above --host_cache_bytes "
                         f"({format_bytes(cache)}): segments would fill /dev/shm")
        grace = parse_duration(flag_value(argv, "shutdown_grace", "10s")) or 0
        stop = parse_duration(svc.get("stop_grace_period", "10s"))
        if stop is None or stop <= grace:
            self.problem(sw, f"stop_grace_period ({stop:g}s) is not longer than --shutdown_grace "
                         f"({grace:g}s)")
        volumes = [str(v).split(":") for v in svc.get("volumes") or []]
        for sock in listen.unix:
            if not any(len(v) > 1 and v[1].rstrip("/") == os.path.dirname(sock) for v in volumes):
                self.problem(sw, f"socket directory {os.path.dirname(sock)} is not a volume")
        for other_name, other in services.items():
            if other.get("ipc") == f"service:{other_name}" or other is svc:
                continue
            if other.get("ipc", "").startswith("service:") and svc.get("ipc") != "shareable":
                self.problem(sw, f"service {other_name} joins its IPC namespace (ipc: "
                             f"{other['ipc']}), which needs `ipc: shareable` here")

    # -- systemd ---------------------------------------------------------------------------------

    def check_unit(self, unit: Path):
        rel = str(unit.relative_to(self.root))
        self.files += 1
        service = parse_unit(unit.read_text()).get("Service", [])

        def get(key, default=None):
            found = [(n, v) for n, k, v in service if k == key]
            return found[-1] if found else (None, default)

        n_exec, exec_start = get("ExecStart", "")
        argv = shlex.split(exec_start.lstrip("-@:+!"))
        if not argv or os.path.basename(argv[0]) != "chunkd":
            self.problem(rel, "ExecStart= does not run chunkd")
            argv = ["chunkd"]
        for n, k, v in service:
            if k.startswith("Exec"):
                for prog, a, _ in expand_argv(shlex.split(v.lstrip("-@:+!"))):
                    self.commands.append((f"{rel}:{n}: {k}", prog, a))
        if get("User")[1] in (None, "root", "0") and get("DynamicUser")[1] != "yes":
            self.problem(rel, "runs as root: set User= (a chunkd user) or DynamicUser=yes")
        if get("ProtectSystem")[1] != "strict":
            self.problem(rel, "ProtectSystem= is not strict")
        if get("NoNewPrivileges")[1] != "yes":
            self.problem(rel, "NoNewPrivileges= is not yes")
        if get("KillSignal", "SIGTERM")[1] not in ("SIGTERM", "TERM", "15"):
            self.problem(rel, f"KillSignal={get('KillSignal')[1]}: chunkd drains calls in flight "
                         "on SIGTERM only")
        grace = parse_duration(flag_value(argv, "shutdown_grace", "10s")) or 0
        n_stop, stop = get("TimeoutStopSec", "90s")
        if (parse_duration(stop) or 0) <= grace:
            self.problem(f"{rel}:{n_stop or n_exec}", f"TimeoutStopSec ({stop}) is not longer "
                         f"than --shutdown_grace ({grace:g}s): systemd would SIGKILL mid-drain")
        writable = ["/dev/shm"] + [f"{base}/{d}" for key, base in (
            ("RuntimeDirectory", "/run"), ("StateDirectory", "/var/lib"),
            ("CacheDirectory", "/var/cache")) for d in (get(key, "")[1]).split()]
        writable += [p.lstrip("-+") for _, k, v in service if k == "ReadWritePaths"
                     for p in v.split()]

        def is_writable(path):
            return any(path == d or path.startswith(d + "/") for d in writable)

        listen = parse_listen(flag_value(argv, "listen", "127.0.0.1:7878"))
        for sock in listen.unix:
            if not is_writable(os.path.dirname(sock)):
                self.problem(f"{rel}:{n_exec}", f"socket {sock} is outside RuntimeDirectory= "
                             "and ReadWritePaths= (ProtectSystem=strict makes it read-only)")
        store = flag_value(argv, "store", "chunkd-data").removeprefix("file://")
        if not store.startswith(REMOTE_STORES) and not is_writable(store):
            self.problem(f"{rel}:{n_exec}", f"--store={store} is not under StateDirectory= or "
                         "ReadWritePaths= (ProtectSystem=strict makes it read-only)")
        ready = flag_value(argv, "ready_file")
        if ready and not is_writable(os.path.dirname(ready)):
            self.problem(f"{rel}:{n_exec}", f"--ready_file={ready} is not in a writable directory")
        self.systemd_verify(unit, rel)

    def systemd_verify(self, unit: Path, rel: str):
        tool = shutil.which("systemd-analyze")
        if not tool:
            self.notes.append(f"{rel}: no systemd-analyze here; not verified by systemd")
            return
        # verify insists that the binaries exist: point them at the built ones (or /bin/true).
        text = unit.read_text()
        for prog, binary in (("chunkd", self.chunkd_bin), ("chunkctl", self.chunkctl_bin)):
            real = str(binary.resolve()) if binary.exists() else "/bin/true"
            text = re.sub(r"(?<![\w/.-])/[\w/.-]*/" + prog + r"(?=\s|$)", real, text)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / unit.name
            copy.write_text(text)
            proc = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True,
                                  text=True, timeout=60)
            out = (proc.stdout + proc.stderr).replace(str(copy), rel)
        ours = [ln.strip() for ln in out.splitlines() if unit.name in ln]
        for line in ours:
            self.problem(rel, f"systemd-analyze verify: {line}")
        if proc.returncode != 0 and not ours:
            self.problem(rel, f"systemd-analyze verify exits {proc.returncode}: {out.strip()}")

    # -- flags, against the real binaries ------------------------------------------------------

    def check_commands(self):
        if self.skip_binaries:
            self.notes.append("--skip-binaries: flags not checked against chunkd and chunkctl")
            return
        sets = {}
        for prog, binary in (("chunkd", self.chunkd_bin), ("chunkctl", self.chunkctl_bin)):
            if not binary.exists():
                if prog == "chunkd":
                    self.problem("check_manifests", f"chunkd binary not found at {binary}: build "
                                 "it, pass --chunkd-bin or $CHUNKD_BIN, or --skip-binaries")
                else:
                    self.notes.append(f"no chunkctl at {binary}: its flags were not checked")
                continue
            sets[prog] = FlagSet(binary)
            if sets[prog].error:
                self.problem("check_manifests", sets.pop(prog).error)
        for where, prog, argv in self.commands:
            flags = sets.get(prog)
            if flags is None:
                continue
            parsed, positional = flags.split(argv)
            for name, _ in parsed:
                if not flags.known(name):
                    self.problem(where, f"--{name} is not a {prog} flag ({prog} --helpfull does "
                                 "not list it)")
            known = [t for name, tokens in parsed if flags.known(name) for t in tokens]
            if prog == "chunkd":
                if positional:
                    self.problem(where, f"chunkd takes no positional arguments, got "
                                 f"{' '.join(positional)!r}")
                # The real parser checks the values; --version stops right after parsing.
                proc = subprocess.run([str(self.chunkd_bin)] + known + ["--version"],
                                      capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    self.problem(where, f"chunkd rejects its flags: {proc.stderr.strip()}")
            elif not positional:
                self.problem(where, "chunkctl is run without a command")
            elif not re.search(rf"chunkctl \[--server=ADDR\] {re.escape(positional[0])}\b",
                               flags.help_text):
                self.problem(where, f"'{positional[0]}' is not a chunkctl command (chunkctl "
                             "--help lists them)")


def main(argv=None):
    root_default = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=root_default,
                        help="repository root (default: the parent of deploy/)")
    parser.add_argument("--chunkd-bin", type=Path, help="chunkd binary (default: $CHUNKD_BIN "
                        "or ROOT/build/server/chunkd)")
    parser.add_argument("--chunkctl-bin", type=Path, help="chunkctl binary (default: "
                        "$CHUNKCTL_BIN or ROOT/build/client/chunkctl)")
    parser.add_argument("--skip-binaries", action="store_true",
                        help="do not check flags against the binaries")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    chunkd_bin = args.chunkd_bin or Path(os.environ.get("CHUNKD_BIN")
                                         or root / "build" / "server" / "chunkd")
    chunkctl_bin = args.chunkctl_bin or Path(os.environ.get("CHUNKCTL_BIN")
                                             or root / "build" / "client" / "chunkctl")
    checker = Checker(root, chunkd_bin, chunkctl_bin, args.skip_binaries)
    checker.run()
    for note in checker.notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in checker.problems:
        print(problem)
    if checker.problems:
        print(f"check_manifests: {len(checker.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_manifests: OK ({checker.files} files, {len(checker.commands)} command lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Checks chunkd's deployment files: the Dockerfile, Kubernetes manifests, compose file and
systemd unit, each on its own and against each other.

    python deploy/check_manifests.py [--root DIR] [--chunkd-bin PATH] [--chunkctl-bin PATH]
                                     [--skip-binaries]

Prints one line per problem ("FILE[:LINE]: where: what") and exits 1 if there is any, 0 if none.

What it checks:
  - every YAML file under deploy/ parses (duplicate keys are an error);
  - Kubernetes objects have apiVersion, kind and metadata.name; workloads have containers, each
    with a name, an image and args or a command, and no misspelt fields; volume mounts name
    declared volumes; Services select a workload and target one of its ports;
  - the image (chunkd:<version in CMakeLists.txt>, from the Dockerfile's labels) and the gRPC port
    (the Dockerfile's EXPOSE) agree across the Dockerfile, the manifests, compose and systemd;
  - every --flag given to chunkd in a command that runs (container args, compose commands,
    ExecStart, CMD, shell scripts in them) is listed by the real `chunkd --helpfull`, and the real
    flag parser accepts its value (`chunkd FLAGS --version`); chunkctl's flags and subcommands
    likewise when a chunkctl binary is there (flags only in comments are not checked);
  - the Dockerfile: a build stage that runs install-deps.sh build, a runtime stage on the
    BASE_IMAGE argument that runs install-deps.sh runtime and copies only built binaries (CMake
    targets that exist), a non-root USER, a HEALTHCHECK, EXPOSE = the port of the default --listen;
  - containers that run chunkd: non-root, read-only root filesystem, no privilege escalation,
    their socket, store and /dev/shm on volumes, a termination grace longer than --shutdown_grace;
    containers sharing chunkd's socket also share its /dev/shm and can connect (same uid);
  - the systemd unit: `systemd-analyze verify` when available, and always a structural check
    (non-root, ProtectSystem=strict, the socket/store under RuntimeDirectory/StateDirectory,
    KillSignal=SIGTERM, TimeoutStopSec longer than --shutdown_grace).

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

try:
    import yaml
except ImportError:  # pragma: no cover - reported as a problem below
    yaml = None

# Stores that are not a directory on this machine, so need no volume or writable path.
REMOTE_STORES = ("memory://", "s3://", "http://", "https://")

WORKLOAD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}

CONTAINER_FIELDS = {
    "name", "image", "command", "args", "workingDir", "ports", "envFrom", "env", "resources",
    "resizePolicy", "restartPolicy", "restartPolicyRules", "volumeMounts", "volumeDevices",
    "livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "terminationMessagePath",
    "terminationMessagePolicy", "imagePullPolicy", "securityContext", "stdin", "stdinOnce", "tty",
}
POD_SPEC_FIELDS = {
    "volumes", "initContainers", "containers", "ephemeralContainers", "restartPolicy",
    "terminationGracePeriodSeconds", "activeDeadlineSeconds", "dnsPolicy", "nodeSelector",
    "serviceAccountName", "serviceAccount", "automountServiceAccountToken", "nodeName",
    "hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "securityContext",
    "imagePullSecrets", "hostname", "subdomain", "affinity", "schedulerName", "tolerations",
    "hostAliases", "priorityClassName", "priority", "dnsConfig", "readinessGates",
    "runtimeClassName", "enableServiceLinks", "preemptionPolicy", "overhead",
    "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers", "schedulingGates",
    "resourceClaims", "resources",
}
PROBE_FIELDS = {
    "exec", "httpGet", "tcpSocket", "grpc", "initialDelaySeconds", "timeoutSeconds",
    "periodSeconds", "successThreshold", "failureThreshold", "terminationGracePeriodSeconds",
}
SECURITY_CONTEXT_FIELDS = {
    "allowPrivilegeEscalation", "appArmorProfile", "capabilities", "privileged", "procMount",
    "readOnlyRootFilesystem", "runAsGroup", "runAsNonRoot", "runAsUser", "seLinuxOptions",
    "seccompProfile", "windowsOptions",
}
SHELLS = {"sh", "bash", "dash"}
# Words that may start a shell command before the program name.
SHELL_PREFIXES = {"while", "until", "do", "then", "else", "elif", "if", "exec", "!", "time",
                  "{", "(", "command"}
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ";;", "(", ")"}


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
    if not s:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
             "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60,
             "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400,
             "day": 86400, "days": 86400}
    total = 0.0
    pos = 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)([a-zµ]+)", s):
        if m.start() != pos or m.group(2) not in units:
            return None
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    return total if pos == len(s) else None


def parse_bytes(text) -> int | None:
    """Bytes in a size as chunkd (8GiB, 1GB), Kubernetes (1536Mi, 2G) or Docker (2gb, 512m)
    write it; None if it is not one. Docker's k/m/g are powers of 1024, as in docker run."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        return None
    units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30,
             "gb": 1 << 30, "t": 1 << 40, "tb": 1 << 40}
    exact = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "Ki": 1 << 10,
             "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "kB": 1000, "KB": 1000, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "K": 1000, "M": 10**6, "G": 10**9, "T": 10**12}
    unit = m.group(2)
    if unit in exact:
        factor = exact[unit]
    elif unit.lower() in units:
        factor = units[unit.lower()]
    else:
        return None
    return int(float(m.group(1)) * factor)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n}B"


@dataclass
class Listen:
    tcp_ports: list = field(default_factory=list)   # (host, port)
    unix_paths: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def parse_listen(value: str) -> Listen:
    out = Listen()
    for addr in [a.strip() for a in value.split(",") if a.strip()]:
        if addr.startswith("unix-abstract:"):
            continue
        if addr.startswith("unix:"):
            path = addr[len("unix:"):]
            if path.startswith("//"):
                path = path[2:]
            if not path.startswith("/"):
                out.errors.append(f"unix socket path in '{addr}' is not absolute")
            out.unix_paths.append(path)
            continue
        m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]*):(\d+)", addr)
        if not m:
            out.errors.append(f"'{addr}' is neither HOST:PORT nor unix:/path")
            continue
        out.tcp_ports.append((m.group(1), int(m.group(2))))
    return out


def flag_value(argv, name):
    """The value of --name in argv (last one wins, like absl), or None."""
    value = None
    for i, tok in enumerate(argv):
        if tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
        elif tok == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def image_repo_tag(image: str):
    """('chunkd', '0.1.0') for 'registry.example/team/chunkd:0.1.0'."""
    name = image.split("@", 1)[0]
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        last, tag = last.split(":", 1)
        name = name[: -(len(tag) + 1)]
    return name.rsplit("/", 1)[-1], tag


def shell_commands(script: str):
    """Simple commands (argv lists) in a shell script, good enough for the one-liners and loops
    that manifests carry: operators and newlines split commands, keywords and VAR=value prefixes
    are dropped. Quotes are removed the way the shell would (no expansion)."""
    lines = script.replace("\\\n", " ").splitlines()
    for line in lines:
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
                continue
            if not cmd and (tok in SHELL_PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tok)):
                continue
            cmd.append(tok)


def expand_argv(argv):
    """Every chunkd/chunkctl invocation in argv: argv itself, or the commands of an `sh -c`
    script. Yields (program basename, argv, whether argv itself is the invocation)."""
    if not argv:
        return
    prog = os.path.basename(str(argv[0]))
    if prog in SHELLS:
        if "-c" in argv[1:]:
            i = argv.index("-c")
            if i + 1 < len(argv):
                for cmd in shell_commands(str(argv[i + 1])):
                    if cmd and os.path.basename(cmd[0]) in ("chunkd", "chunkctl"):
                        yield os.path.basename(cmd[0]), cmd, False
        return
    if prog in ("chunkd", "chunkctl"):
        yield prog, [str(a) for a in argv], True


# ----------------------------------------------------------------------------------------------
# The binaries


class FlagSet:
    """Flags a program lists in its --helpfull output."""

    def __init__(self, binary: Path, name: str):
        self.binary = binary
        self.name = name
        self.flags: dict[str, str | None] = {}  # name -> default (as printed)
        self.help_text = ""
        self.absl = False
        self.error = None
        try:
            proc = subprocess.run([str(binary), "--helpfull"], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = f"cannot run {binary} --helpfull: {e}"
            return
        self.help_text = proc.stdout + proc.stderr
        blocks = re.split(r"(?m)^\s+--(?=[A-Za-z0-9_]+ \()", self.help_text)
        for block in blocks[1:]:
            m = re.match(r"([A-Za-z0-9_]+) \(", block)
            d = re.search(r"default: (.*?);\s*$", " ".join(block.split()))
            self.flags[m.group(1)] = d.group(1) if d else None
            self.absl = True
        if not self.absl:  # not absl's format: any --name mentioned counts as listed
            for m in re.finditer(r"--([A-Za-z0-9][A-Za-z0-9_-]*)", self.help_text):
                self.flags.setdefault(m.group(1), None)
        if not self.flags:
            self.error = f"{binary} --helpfull lists no flags (exit {proc.returncode})"

    def is_bool(self, flag):
        return self.flags.get(flag) in ("true", "false")

    def split(self, argv):
        """(flags as (name, token, takes_next), positional args) of argv[1:]."""
        flags, positional = [], []
        args = argv[1:]
        i = 0
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
                    tokens.append(args[i + 1])
                    i += 1
                flags.append((name, tokens))
            else:
                positional.append(tok)
            i += 1
        return flags, positional

    def known(self, name):
        if name in self.flags:
            return True
        return name.startswith("no") and self.is_bool(name[2:])


# ----------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    line: int
    keyword: str
    rest: str


def parse_dockerfile(text: str):
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        start = i + 1
        i += 1
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = [raw.rstrip()]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            nxt = lines[i]
            i += 1
            if nxt.strip().startswith("#"):
                parts.append("\\")  # comment lines inside a continuation are dropped
                continue
            parts.append(nxt.rstrip())
        if parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
        joined = " ".join(p.strip() for p in parts)
        keyword, _, rest = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), rest.strip()))
    return out


def exec_or_shell(rest: str):
    """argv of an exec-form (JSON) or shell-form instruction argument."""
    if rest.startswith("["):
        try:
            value = json.loads(rest)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value, True
        except json.JSONDecodeError:
            pass
        return None, True
    return ["/bin/sh", "-c", rest], False


def substitute_args(text: str, args: dict):
    def repl(m):
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = args.get(name)
        return value if value else (default or "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                  repl, text)


def dockerignore_patterns(path: Path):
    if not path.exists():
        return None
    pats = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line)
    return pats


def _glob_regex(pattern: str):
    """A .dockerignore pattern as a regex: ** spans directories, * and ? do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, patterns) -> bool:
    """Whether path rel (relative to the build context) is excluded: a pattern that matches the
    path or one of its parent directories excludes it; later `!patterns` re-include."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for pat in patterns or []:
        neg = pat.startswith("!")
        body = (pat[1:] if neg else pat).strip().strip("/")
        if body.startswith("./"):
            body = body[2:]
        rx = _glob_regex(body)
        if any(rx.match(pre) for pre in prefixes):
            ignored = not neg
    return ignored


# ----------------------------------------------------------------------------------------------
# The checker


@dataclass
class Invocation:
    where: str
    prog: str
    argv: list


class Checker:
    def __init__(self, root: Path, chunkd_bin: Path | None, chunkctl_bin: Path | None,
                 skip_binaries: bool):
        self.root = root
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.invocations: list[Invocation] = []
        self.chunkd_bin = chunkd_bin
        self.chunkctl_bin = chunkctl_bin
        self.skip_binaries = skip_binaries
        self.image = None          # canonical image, e.g. chunkd:0.1.0
        self.port = None           # canonical gRPC port, e.g. 7878
        self.image_binaries = set()  # basenames copied into the runtime image
        self.files_checked = 0

    def problem(self, where, msg):
        self.problems.append(f"{where}: {msg}")

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    # -- entry point ---------------------------------------------------------------------------

    def run(self):
        if yaml is None:
            self.problem("check_manifests", "PyYAML is not installed (pip install pyyaml)")
            return
        self.check_dockerfile()
        self.check_yaml_files()
        self.check_systemd()
        self.check_invocations()
        self.check_runtime_libraries()

    # -- Dockerfile ----------------------------------------------------------------------------

    def cmake_version(self):
        path = self.root / "CMakeLists.txt"
        if not path.exists():
            return None
        m = re.search(r"project\s*\([^)]*VERSION\s+([0-9][0-9.]*)", path.read_text(), re.S)
        return m.group(1) if m else None

    def cmake_files(self):
        """CMakeLists.txt files of the sources (not of build trees or hidden folders)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "build"))
                           and d not in ("results", "__pycache__", "node_modules")]
            if "CMakeLists.txt" in filenames:
                yield Path(dirpath) / "CMakeLists.txt"

    def cmake_targets(self):
        targets = {}
        for path in self.cmake_files():
            rel = path.relative_to(self.root)
            for m in re.finditer(r"add_executable\s*\(\s*([A-Za-z0-9_.+-]+)", path.read_text()):
                targets[m.group(1)] = str(rel.parent)
        return targets

    def check_dockerfile(self):
        path = self.root / "Dockerfile"
        name = "Dockerfile"
        if not path.exists():
            self.problem(name, "missing")
            return
        self.files_checked += 1
        instrs = parse_dockerfile(path.read_text())
        ignore = dockerignore_patterns(self.root / ".dockerignore")
        if ignore is None:
            self.problem(".dockerignore", "missing (the build context would include build/, "
                         ".venv/ and .git)")
        else:
            self.files_checked += 1
            for must in ("build/", ".venv/", "results/", ".git/"):
                if not dockerignored(must.rstrip("/") + "/x", ignore):
                    self.problem(".dockerignore", f"does not exclude {must}")

        global_args = {}
        stages = []  # dicts: name, image, line, instrs
        for ins in instrs:
            if ins.keyword == "FROM":
                toks = ins.rest.split()
                toks = [t for t in toks if not t.startswith("--")]
                stage = {"name": None, "image_expr": toks[0] if toks else "", "line": ins.line,
                         "instrs": []}
                if len(toks) >= 3 and toks[1].upper() == "AS":
                    stage["name"] = toks[2]
                stage["image"] = substitute_args(stage["image_expr"], global_args)
                stages.append(stage)
            elif not stages:
                if ins.keyword == "ARG":
                    k, _, v = ins.rest.partition("=")
                    global_args[k.strip()] = v.strip().strip('"')
            else:
                stages[-1]["instrs"].append(ins)

        if len(stages) < 2:
            self.problem(name, f"has {len(stages)} stage(s); expected a build stage and a "
                         "runtime stage")
            if not stages:
                return
        final = stages[-1]
        builders = stages[:-1]
        if "BASE_IMAGE" not in global_args:
            self.problem(name, "no `ARG BASE_IMAGE=...` before the first FROM")
        elif not re.search(r"\$\{?BASE_IMAGE\b", final["image_expr"]):
            self.problem(f"{name}:{final['line']}", "the runtime stage does not start FROM "
                         "${BASE_IMAGE}")
        if final["image"] != "debian:12-slim":
            self.problem(f"{name}:{final['line']}", f"runtime stage image defaults to "
                         f"'{final['image']}', expected debian:12-slim")
        if builders and builders[0]["image"] not in ("debian:12", "debian:bookworm"):
            self.problem(f"{name}:{builders[0]['line']}", f"build stage image defaults to "
                         f"'{builders[0]['image']}', expected debian:12")

        def runs(stage, word):
            return [i for i in stage["instrs"] if i.keyword == "RUN"
                    and re.search(r"install-deps\.sh\s+" + word + r"\b", i.rest)]

        if not any(runs(s, "build") for s in builders):
            self.problem(name, "no build stage runs `deploy/scripts/install-deps.sh build`")
        if not runs(final, "runtime"):
            self.problem(f"{name}:{final['line']}", "the runtime stage does not run "
                         "`install-deps.sh runtime`")
        for bad in runs(final, "build") + runs(final, "all"):
            self.problem(f"{name}:{bad.line}", "the runtime stage installs build dependencies")

        # COPY sources from the context exist and are not excluded by .dockerignore.
        for st in stages:
            for ins in st["instrs"]:
                if ins.keyword not in ("COPY", "ADD"):
                    continue
                toks = shlex.split(ins.rest)
                if any(t.startswith("--from") for t in toks):
                    continue
                srcs = [t for t in toks if not t.startswith("--")][:-1]
                for src in srcs:
                    if src in (".", "./"):
                        continue
                    if not (self.root / src).exists():
                        self.problem(f"{name}:{ins.line}", f"COPY source '{src}' does not exist")
                    elif dockerignored(src.strip("/"), ignore):
                        self.problem(f"{name}:{ins.line}", f"COPY source '{src}' is excluded "
                                     "by .dockerignore")

        # The runtime stage copies only built binaries, which are CMake targets that the build
        # stage builds.
        targets = self.cmake_targets()
        builder_names = {s["name"] for s in builders if s["name"]} | {str(i) for i in
                                                                      range(len(builders))}
        build_text = " ".join(i.rest for s in builders for i in s["instrs"] if i.keyword == "RUN")
        copied_from_build = False
        for ins in final["instrs"]:
            if ins.keyword != "COPY":
                continue
            toks = shlex.split(ins.rest)
            frm = [t.split("=", 1)[1] for t in toks if t.startswith("--from=")]
            if not frm:
                continue
            if frm[0] not in builder_names:
                self.problem(f"{name}:{ins.line}", f"COPY --from={frm[0]} names no build stage")
                continue
            copied_from_build = True
            srcs = [t for t in toks if not t.startswith("--")][:-1]
            for src in srcs:
                base = os.path.basename(src.rstrip("/"))
                if base not in targets:
                    self.problem(f"{name}:{ins.line}", f"copies '{src}' into the runtime image, "
                                 f"but no CMakeLists.txt has add_executable({base})")
                    continue
                expected = f"build/{targets[base]}/{base}".replace("/./", "/")
                if not src.endswith(expected):
                    self.problem(f"{name}:{ins.line}", f"copies '{src}', but CMake puts target "
                                 f"{base} at <build dir>/{targets[base]}/{base}")
                if not re.search(r"\bninja\b[^&;]*\b" + re.escape(base) + r"\b", build_text) \
                        and not re.search(r"--target\s+[^&;]*\b" + re.escape(base) + r"\b",
                                          build_text):
                    self.problem(f"{name}:{ins.line}", f"copies {base}, but the build stage "
                                 f"does not build target {base}")
                self.image_binaries.add(base)
        if not copied_from_build:
            self.problem(f"{name}:{final['line']}", "the runtime stage copies nothing from the "
                         "build stage")

        def last(keyword):
            found = [i for i in final["instrs"] if i.keyword == keyword]
            return found[-1] if found else None

        user = last("USER")
        if user is None:
            self.problem(f"{name}:{final['line']}", "the runtime stage sets no USER (it would "
                         "run as root)")
        else:
            uid = user.rest.split(":")[0].strip()
            if uid in ("root", "0"):
                self.problem(f"{name}:{user.line}", f"USER {user.rest} is root; chunkd must run "
                             "as a non-root user")

        # Image identity: labels title/version; version = the CMake project version.
        labels = {}
        for ins in final["instrs"]:
            if ins.keyword == "LABEL":
                for tok in shlex.split(ins.rest):
                    k, _, v = tok.partition("=")
                    labels[k] = v
        title = labels.get("org.opencontainers.image.title")
        version = labels.get("org.opencontainers.image.version")
        cmake_version = self.cmake_version()
        if not title or not version:
            self.problem(name, "the runtime stage lacks LABEL org.opencontainers.image.title / "
                         ".version (they name the image the manifests must use)")
        else:
            if cmake_version and version != cmake_version:
                self.problem(name, f"LABEL org.opencontainers.image.version={version} but "
                             f"CMakeLists.txt says project VERSION {cmake_version}")
            self.image = f"{title}:{version}"

        entry = last("ENTRYPOINT")
        entry_argv = None
        if entry is None:
            self.problem(name, "no ENTRYPOINT (expected [\"chunkd\"])")
        else:
            entry_argv, is_exec = exec_or_shell(entry.rest)
            if not is_exec or not entry_argv or os.path.basename(entry_argv[0]) != "chunkd":
                self.problem(f"{name}:{entry.line}", "ENTRYPOINT must be the exec form "
                             "[\"chunkd\", ...] (so that SIGTERM reaches chunkd)")
                entry_argv = None
        cmd = last("CMD")
        listen = None
        if entry_argv is not None:
            cmd_argv = []
            if cmd is not None:
                cmd_argv, is_exec = exec_or_shell(cmd.rest)
                if not is_exec or cmd_argv is None:
                    self.problem(f"{name}:{cmd.line}", "CMD must be the exec form [\"--flag=...\"]"
                                 " (its elements are chunkd's arguments)")
                    cmd_argv = []
            argv = entry_argv + cmd_argv
            self.invocations.append(Invocation(f"{name}:{(cmd or entry).line}: ENTRYPOINT+CMD",
                                               "chunkd", argv))
            listen = flag_value(argv, "listen")
        if listen is None:
            listen = "127.0.0.1:7878"
        tcp = parse_listen(listen).tcp_ports

        exposes = [i for i in final["instrs"] if i.keyword == "EXPOSE"]
        ports = []
        for ins in exposes:
            for tok in ins.rest.split():
                m = re.fullmatch(r"(\d+)(/tcp)?", tok)
                if m:
                    ports.append((int(m.group(1)), ins.line))
        if not ports:
            self.problem(name, "no EXPOSE of the gRPC port")
        else:
            self.port = ports[0][0]
            listen_ports = {p for _, p in tcp}
            if not listen_ports:
                self.problem(name, f"the default --listen={listen} has no TCP port to match "
                             f"EXPOSE {self.port}")
            for p, line in ports:
                if p not in listen_ports and listen_ports:
                    self.problem(f"{name}:{line}", f"EXPOSE {p} but the default --listen serves "
                                 f"port(s) {', '.join(map(str, sorted(listen_ports)))}")
            for h, p in tcp:
                if h in ("127.0.0.1", "localhost", "[::1]"):
                    self.problem(name, f"the default --listen={listen} is loopback-only: "
                                 "unreachable through the published port")

        hc = last("HEALTHCHECK")
        if hc is None:
            self.problem(f"{name}:{final['line']}", "the runtime stage has no HEALTHCHECK")
        else:
            m = re.search(r"(?:^|\s)(CMD|NONE)(?:\s+|$)(.*)$", hc.rest)
            if not m or m.group(1) == "NONE":
                self.problem(f"{name}:{hc.line}", "HEALTHCHECK is NONE or has no CMD")
            else:
                argv, _ = exec_or_shell(m.group(2).strip())
                if argv is None:
                    self.problem(f"{name}:{hc.line}", "HEALTHCHECK CMD is not valid JSON")
                else:
                    found = list(expand_argv(argv))
                    if not found:
                        self.problem(f"{name}:{hc.line}", "HEALTHCHECK does not call chunkctl "
                                     "(or another gRPC health probe shipped in the image)")
                    for prog, a, _ in found:
                        self.invocations.append(Invocation(f"{name}:{hc.line}: HEALTHCHECK",
                                                           prog, a))
                        if prog not in self.image_binaries:
                            self.problem(f"{name}:{hc.line}", f"HEALTHCHECK runs {prog}, which "
                                         "the runtime stage does not copy in")
                        server = flag_value(a, "server")
                        if prog == "chunkctl" and server and self.port:
                            sl = parse_listen(server)
                            if sl.tcp_ports and sl.tcp_ports[0][1] != self.port:
                                self.problem(f"{name}:{hc.line}", f"HEALTHCHECK probes port "
                                             f"{sl.tcp_ports[0][1]}, the image serves {self.port}")
        stop = last("STOPSIGNAL")
        if stop is not None and stop.rest.strip() not in ("SIGTERM", "15", "TERM"):
            self.problem(f"{name}:{stop.line}", f"STOPSIGNAL {stop.rest}: chunkd drains calls in "
                         "flight on SIGTERM only")

    # -- YAML ----------------------------------------------------------------------------------

    def load_yaml(self, path: Path):
        class Loader(yaml.SafeLoader):
            pass

        def construct_mapping(loader, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                try:
                    key = loader.construct_object(key_node, deep=True)
                    hash(key)
                except Exception:
                    continue
                if key in seen and key != "<<":
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return yaml.SafeLoader.construct_mapping(loader, node, deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        try:
            return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            self.problem(self.rel(path), f"YAML does not parse: {msg}")
            return None

    def check_yaml_files(self):
        deploy = self.root / "deploy"
        files = sorted(p for p in deploy.rglob("*") if p.suffix in (".yaml", ".yml")
                       and p.is_file())
        k8s = self.root / "deploy" / "k8s"
        if not any(p.parent == k8s for p in files):
            self.problem("deploy/k8s", "no Kubernetes manifests")
        compose_seen = False
        for path in files:
            self.files_checked += 1
            docs = self.load_yaml(path)
            if docs is None:
                continue
            if path.name in ("compose.yaml", "compose.yml", "docker-compose.yaml",
                             "docker-compose.yml"):
                compose_seen = True
                if len(docs) != 1 or not isinstance(docs[0], dict):
                    self.problem(self.rel(path), "a compose file must be one mapping")
                else:
                    self.check_compose(path, docs[0])
            elif k8s in path.parents:
                self.check_k8s(path, docs)
        if not compose_seen:
            self.problem("deploy/compose.yaml", "missing")

    # -- Kubernetes ----------------------------------------------------------------------------

    def check_k8s(self, path: Path, docs):
        rel = self.rel(path)
        workloads = []
        services = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict):
                self.problem(rel, f"document {i + 1} is not a mapping")
                continue
            missing = [k for k in ("apiVersion", "kind") if not doc.get(k)]
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"),
                                                                         dict) else None
            if not name:
                missing.append("metadata.name")
            where = f"{rel}: {doc.get('kind', '?')}/{name or f'document {i + 1}'}"
            if missing:
                self.problem(where, f"missing {', '.join(missing)}")
            kind = doc.get("kind")
            if kind in WORKLOAD_KINDS:
                spec = self.pod_spec(doc)
                if spec is None:
                    self.problem(where, "no pod template (spec.template.spec)")
                    continue
                workloads.append((where, doc, spec))
                self.check_pod(where, doc, spec)
            elif kind == "Service":
                services.append((where, doc))
        for where, svc in services:
            self.check_service(where, svc, workloads)

    @staticmethod
    def pod_spec(doc):
        kind = doc.get("kind")
        spec = doc.get("spec") or {}
        if kind == "Pod":
            return spec if isinstance(spec, dict) else None
        if kind == "CronJob":
            spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
        tmpl = spec.get("template") if isinstance(spec, dict) else None
        if not isinstance(tmpl, dict) or not isinstance(tmpl.get("spec"), dict):
            return None
        return tmpl["spec"]

    @staticmethod
    def pod_labels(doc):
        if doc.get("kind") == "Pod":
            return (doc.get("metadata") or {}).get("labels") or {}
        spec = doc.get("spec") or {}
        if doc.get("kind") == "CronJob":
            spec = (spec.get("jobTemplate") or {}).get("spec") or {}
        return ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}

    def is_chunkd_image(self, image) -> bool:
        return isinstance(image, str) and image_repo_tag(image)[0] == "chunkd"

    def check_image(self, where, image):
        if not self.image:
            return
        repo, tag = image_repo_tag(image)
        want_repo, want_tag = image_repo_tag(self.image)
        if repo == want_repo and tag != want_tag:
            self.problem(where, f"image {image} does not match the Dockerfile's {self.image}")

    def check_pod(self, where, doc, spec):
        for key in spec:
            if key not in POD_SPEC_FIELDS:
                self.problem(where, f"unknown pod spec field '{key}'")
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            self.problem(where, "no containers")
            containers = []
        inits = spec.get("initContainers") or []
        volumes = {v.get("name"): v for v in spec.get("volumes") or [] if isinstance(v, dict)}
        pod_sc = spec.get("securityContext") or {}
        grace = spec.get("terminationGracePeriodSeconds", 30)
        all_containers = [(c, True) for c in inits] + [(c, False) for c in containers]
        chunkd_servers = []  # (container, argv, listen)
        for c, is_init in all_containers:
            if not isinstance(c, dict):
                self.problem(where, "a container is not a mapping")
                continue
            cname = c.get("name")
            cw = f"{where}: container {cname or '?'}"
            if not cname:
                self.problem(cw, "missing name")
            for key in c:
                if key not in CONTAINER_FIELDS:
                    self.problem(cw, f"unknown container field '{key}'")
            image = c.get("image")
            if not image:
                self.problem(cw, "missing image")
            else:
                self.check_image(cw, image)
            if not c.get("args") and not c.get("command"):
                self.problem(cw, "has neither args nor command")
            for k in ("command", "args"):
                if k in c and not (isinstance(c[k], list) and all(isinstance(a, (str, int, float))
                                                                  and not isinstance(a, bool)
                                                                  for a in c[k])):
                    self.problem(cw, f"{k} must be a list of strings")
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(probe_name)
                if probe is None:
                    continue
                if not isinstance(probe, dict):
                    self.problem(cw, f"{probe_name} is not a mapping")
                    continue
                for key in probe:
                    if key not in PROBE_FIELDS:
                        self.problem(cw, f"unknown {probe_name} field '{key}'")
                handlers = [k for k in ("exec", "httpGet", "tcpSocket", "grpc") if k in probe]
                if len(handlers) != 1:
                    self.problem(cw, f"{probe_name} needs exactly one of exec, httpGet, "
                                 "tcpSocket, grpc")
                if "exec" in probe:
                    for prog, a, direct in expand_argv((probe["exec"] or {}).get("command") or []):
                        self.invocations.append(Invocation(f"{cw}: {probe_name}", prog, a))
                        self.check_image_has(cw, image, prog)
            sc = c.get("securityContext") or {}
            for key in sc:
                if key not in SECURITY_CONTEXT_FIELDS:
                    self.problem(cw, f"unknown securityContext field '{key}'")
            mounts = c.get("volumeMounts") or []
            for m in mounts:
                if m.get("name") not in volumes:
                    self.problem(cw, f"volumeMount '{m.get('name')}' names no volume of the pod")
            command = c.get("command")
            args = [str(a) for a in c.get("args") or []]
            if command:
                argv = [str(a) for a in command] + args
            elif self.is_chunkd_image(image):
                argv = ["chunkd"] + args  # the image's ENTRYPOINT
            else:
                argv = []
            for prog, a, direct in expand_argv(argv):
                self.invocations.append(Invocation(cw, prog, a))
                self.check_image_has(cw, image, prog)
                if prog == "chunkd" and direct:
                    chunkd_servers.append((c, a))
                elif prog == "chunkd":
                    self.problem(cw, "chunkd runs inside a shell script: SIGTERM reaches the "
                                 "shell, not chunkd (exec it as the container's command)")
        for c, argv in chunkd_servers:
            self.check_chunkd_container(where, spec, c, argv, volumes, pod_sc, grace,
                                        all_containers)

    def check_image_has(self, where, image, prog):
        if self.is_chunkd_image(image) and self.image_binaries and prog not in self.image_binaries:
            self.problem(where, f"runs {prog}, which the image does not contain")

    @staticmethod
    def effective(c, pod_sc, key):
        sc = c.get("securityContext") or {}
        return sc[key] if key in sc else pod_sc.get(key)

    def check_chunkd_container(self, where, spec, c, argv, volumes, pod_sc, grace,
                               all_containers):
        cw = f"{where}: container {c.get('name')}"
        listen_s = flag_value(argv, "listen") or "127.0.0.1:7878"
        listen = parse_listen(listen_s)
        for e in listen.errors:
            self.problem(cw, f"--listen: {e}")
        ports = {p.get("containerPort"): p.get("name") for p in c.get("ports") or []}
        tcp_ports = {p for _, p in listen.tcp_ports}
        for h, p in listen.tcp_ports:
            if self.port and p != self.port:
                self.problem(cw, f"listens on port {p}, the image (EXPOSE) uses {self.port}")
            if p not in ports:
                self.problem(cw, f"listens on TCP port {p} but declares no containerPort {p}")
            if h in ("127.0.0.1", "localhost", "[::1]"):
                self.problem(cw, f"--listen {h}:{p} is loopback-only: probes and Services "
                             "cannot reach it (use 0.0.0.0 or a unix socket)")
        for p in ports:
            if p not in tcp_ports:
                self.problem(cw, f"containerPort {p} is not served by --listen={listen_s}")
        # Probes.
        for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(probe_name) or {}
            if "grpc" in probe:
                port = (probe["grpc"] or {}).get("port")
                if port not in tcp_ports:
                    self.problem(cw, f"{probe_name} grpc port {port} is not a TCP port chunkd "
                                 f"listens on ({listen_s})")
        if "readinessProbe" not in c and not (c.get("restartPolicy") == "Always"
                                              and "startupProbe" in c):
            self.problem(cw, "no readinessProbe")
        if "livenessProbe" not in c:
            self.problem(cw, "no livenessProbe")
        # Security.
        run_as_user = self.effective(c, pod_sc, "runAsUser")
        if self.effective(c, pod_sc, "runAsNonRoot") is not True:
            self.problem(cw, "securityContext.runAsNonRoot is not true")
        if run_as_user == 0:
            self.problem(cw, "runs as uid 0")
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            self.problem(cw, "securityContext.readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.problem(cw, "securityContext.allowPrivilegeEscalation is not false")
        # Paths chunkd writes must be on volumes (the root filesystem is read-only).
        mounts = {m.get("mountPath", "").rstrip("/") or "/": m for m in c.get("volumeMounts") or []}

        def mount_for(path):
            best = None
            for mp, m in mounts.items():
                if path == mp or path.startswith(mp.rstrip("/") + "/"):
                    if best is None or len(mp) > len(best[0]):
                        best = (mp, m)
            return best

        socket_mounts = []
        for sock in listen.unix_paths:
            m = mount_for(os.path.dirname(sock))
            if m is None:
                self.problem(cw, f"socket {sock} is not on a volume (the root filesystem is "
                             "read-only, and clients could not reach it)")
            else:
                socket_mounts.append((sock, m))
        store = flag_value(argv, "store") or "chunkd-data"
        if not store.startswith(REMOTE_STORES):
            sp = store[len("file://"):] if store.startswith("file://") else store
            if not sp.startswith("/"):
                self.problem(cw, f"--store={store} is relative: give an absolute path on a volume")
            elif mount_for(sp) is None:
                self.problem(cw, f"--store={store} is not on a volume")
        shm = mounts.get("/dev/shm")
        if shm is not None:
            vol = volumes.get(shm.get("name")) or {}
            ok = ((vol.get("emptyDir") or {}).get("medium") == "Memory") or "hostPath" in vol
            if not ok:
                self.problem(cw, "/dev/shm is mounted from a volume that is neither a "
                             "memory-backed emptyDir nor a hostPath (tmpfs)")
        # Memory: the limit holds the cache; a memory-backed /dev/shm holds the segments.
        cache = parse_bytes(flag_value(argv, "host_cache_bytes") or "1GiB")
        limit = parse_bytes(((c.get("resources") or {}).get("limits") or {}).get("memory"))
        if cache is not None and limit is not None and limit <= cache:
            self.problem(cw, f"memory limit {format_bytes(limit)} is not above --host_cache_bytes "
                         f"({format_bytes(cache)})")
        shm_on = (flag_value(argv, "shm") or "true").lower() not in ("false", "0", "no")
        if "--noshm" in argv:
            shm_on = False
        if shm is not None and shm_on and cache is not None:
            vol = volumes.get(shm.get("name")) or {}
            size = parse_bytes((vol.get("emptyDir") or {}).get("sizeLimit"))
            if size is not None and size <= cache:
                self.problem(cw, f"/dev/shm volume '{shm.get('name')}' sizeLimit "
                             f"{format_bytes(size)} is not above --host_cache_bytes "
                             f"({format_bytes(cache)}): segments would fill it")
        # Shutdown.
        sg = parse_duration(flag_value(argv, "shutdown_grace") or "10s")
        if sg is None:
            self.problem(cw, "--shutdown_grace is not a duration")
        elif isinstance(grace, (int, float)) and grace <= sg:
            self.problem(where, f"terminationGracePeriodSeconds={grace} is not longer than "
                         f"--shutdown_grace ({sg:g}s): calls in flight would be killed")
        # Other containers that use chunkd's socket.
        has_mode_flag = flag_value(argv, "unix_socket_mode") is not None
        for other, _ in all_containers:
            if other is c or not isinstance(other, dict):
                continue
            ow = f"{where}: container {other.get('name')}"
            omounts = {m.get("mountPath", "").rstrip("/"): m for m in other.get("volumeMounts")
                       or []}
            shares_socket = any(m.get("name") == sm[1].get("name")
                                for sock, sm in socket_mounts for m in omounts.values())
            if not shares_socket:
                continue
            if shm is not None:
                oshm = omounts.get("/dev/shm")
                if oshm is None or oshm.get("name") != shm.get("name"):
                    self.problem(ow, f"shares chunkd's socket but not its /dev/shm volume "
                                 f"'{shm.get('name')}' (shared-memory handles would not map)")
            ouid = self.effective(other, pod_sc, "runAsUser")
            if not has_mode_flag and ouid != run_as_user:
                if (other.get("securityContext") or {}).get("runAsUser") == 0:
                    continue  # a root helper (e.g. preparing host directories)
                self.problem(ow, f"runs as uid {ouid} but chunkd (uid {run_as_user}) creates its "
                             "socket 0755, so it could not connect (run both as one uid)")

    def check_service(self, where, svc, workloads):
        spec = svc.get("spec") or {}
        selector = spec.get("selector") or {}
        targets = [(w, d, s) for w, d, s in workloads
                   if selector and all(self.pod_labels(d).get(k) == v for k, v in selector.items())]
        if not targets:
            self.problem(where, f"selector {selector} matches no workload in this file")
            return
        for port in spec.get("ports") or []:
            p = port.get("port")
            target = port.get("targetPort", p)
            if self.port and p != self.port:
                self.problem(where, f"port {p} differs from the image's gRPC port {self.port}")
            resolved = False
            for _, _, pod in targets:
                for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                    for cp in c.get("ports") or []:
                        if cp.get("containerPort") == target or cp.get("name") == target:
                            resolved = True
            if not resolved:
                self.problem(where, f"targetPort {target} is no containerPort of the selected "
                             "pods")

    # -- compose -------------------------------------------------------------------------------

    def check_compose(self, path: Path, doc):
        rel = self.rel(path)
        services = doc.get("services")
        if not isinstance(services, dict) or not services:
            self.problem(rel, "no services")
            return
        declared_volumes = set((doc.get("volumes") or {}).keys())
        chunkd_services = []
        for sname, svc in services.items():
            sw = f"{rel}: service {sname}"
            if not isinstance(svc, dict):
                self.problem(sw, "is not a mapping")
                continue
            image = svc.get("image")
            if not image and not svc.get("build"):
                self.problem(sw, "has neither image nor build")
            if image:
                self.check_image(sw, image)
            if svc.get("build"):
                build = svc["build"]
                ctx = build if isinstance(build, str) else build.get("context", ".")
                dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                                  "Dockerfile")
                if not (path.parent / ctx / dockerfile).resolve().exists():
                    self.problem(sw, f"build context {ctx} has no {dockerfile}")
                elif (path.parent / ctx).resolve() != self.root.resolve():
                    self.problem(sw, f"build context {ctx} is not the repository root")
            for v in svc.get("volumes") or []:
                src = v.split(":", 1)[0] if isinstance(v, str) else (v or {}).get("source")
                if isinstance(v, str) and ":" not in v:
                    continue
                if src and not src.startswith((".", "/", "~")) and src not in declared_volumes:
                    self.problem(sw, f"volume '{src}' is not declared under top-level volumes")
            deps = svc.get("depends_on") or []
            for dep in (deps.keys() if isinstance(deps, dict) else deps):
                if dep not in services:
                    self.problem(sw, f"depends_on names unknown service '{dep}'")
            for ns in ("ipc", "pid", "network_mode"):
                val = svc.get(ns)
                if isinstance(val, str) and val.startswith("service:"):
                    other = val.split(":", 1)[1]
                    if other not in services:
                        self.problem(sw, f"{ns}: {val} names an unknown service")
                    elif ns == "ipc" and services[other].get("ipc") != "shareable":
                        self.problem(sw, f"ipc: {val} needs `ipc: shareable` on {other}")
            entry = svc.get("entrypoint")
            command = svc.get("command")
            if isinstance(entry, str):
                entry = shlex.split(entry)
            if isinstance(command, str):
                command = shlex.split(command)
            if entry:
                argv = [str(a) for a in entry] + [str(a) for a in command or []]
            elif self.is_chunkd_image(image) and command is not None:
                argv = ["chunkd"] + [str(a) for a in command]
            elif self.is_chunkd_image(image):
                argv = []  # the image's defaults (checked with the Dockerfile)
            else:
                argv = [str(a) for a in command or []]
            for prog, a, direct in expand_argv(argv):
                self.invocations.append(Invocation(sw, prog, a))
                self.check_image_has(sw, image, prog)
                if prog == "chunkd" and direct:
                    chunkd_services.append((sname, svc, a))
            hc = svc.get("healthcheck") or {}
            test = hc.get("test")
            if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
                targv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", " ".join(test[1:])]
                for prog, a, direct in expand_argv(targv):
                    self.invocations.append(Invocation(f"{sw}: healthcheck", prog, a))
        for sname, svc, argv in chunkd_services:
            sw = f"{rel}: service {sname}"
            listen_s = flag_value(argv, "listen") or "127.0.0.1:7878"
            listen = parse_listen(listen_s)
            for e in listen.errors:
                self.problem(sw, f"--listen: {e}")
            tcp = {p for _, p in listen.tcp_ports}
            for h, p in listen.tcp_ports:
                if self.port and p != self.port:
                    self.problem(sw, f"listens on port {p}, the image (EXPOSE) uses {self.port}")
            for spec in svc.get("ports") or []:
                if isinstance(spec, dict):
                    target = spec.get("target")
                else:
                    target = str(spec).split("/")[0].rsplit(":", 1)[-1]
                try:
                    target = int(target)
                except (TypeError, ValueError):
                    self.problem(sw, f"cannot read port mapping {spec!r}")
                    continue
                if target not in tcp:
                    self.problem(sw, f"publishes container port {target}, which --listen="
                                 f"{listen_s} does not serve")
            hc = svc.get("healthcheck") or {}
            if not hc.get("disable") and "test" not in hc and self.port:
                if not any(p == self.port and h not in ("[::1]",) for h, p in listen.tcp_ports):
                    self.problem(sw, f"the image's HEALTHCHECK probes 127.0.0.1:{self.port}, "
                                 f"which --listen={listen_s} does not serve (override or disable "
                                 "healthcheck)")
            cache = parse_bytes(flag_value(argv, "host_cache_bytes") or "1GiB")
            shm_on = (flag_value(argv, "shm") or "true").lower() not in ("false", "0", "no") \
                and "--noshm" not in argv
            shm_size = parse_bytes(svc.get("shm_size", "64m"))
            if shm_on and cache is not None and shm_size is not None and shm_size <= cache:
                self.problem(sw, f"shm_size {format_bytes(shm_size)} is not above "
                             f"--host_cache_bytes ({format_bytes(cache)}): segments in /dev/shm "
                             "would fill it")
            sg = parse_duration(flag_value(argv, "shutdown_grace") or "10s")
            stop = parse_duration(svc.get("stop_grace_period", "10s"))
            if sg is not None and stop is not None and stop <= sg:
                self.problem(sw, f"stop_grace_period ({stop:g}s) is not longer than "
                             f"--shutdown_grace ({sg:g}s)")
            for sock in listen.unix_paths:
                d = os.path.dirname(sock)
                mounted = [v for v in svc.get("volumes") or [] if isinstance(v, str)
                           and len(v.split(":")) >= 2 and v.split(":")[1].rstrip("/") == d]
                if not mounted:
                    self.problem(sw, f"socket directory {d} is not a volume (clients cannot "
                                 "reach the socket)")

    # -- systemd -------------------------------------------------------------------------------

    @staticmethod
    def parse_unit(text):
        sections = {}
        current = None
        errors = []
        logical = []
        buf = ""
        start = 0
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not buf and (not s or s.startswith(("#", ";"))):
                continue
            if buf and s.startswith(("#", ";")):
                continue
            if not buf:
                start = n
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            buf += s
            logical.append((start, buf))
            buf = ""
        if buf:
            logical.append((start, buf))
        for n, line in logical:
            m = re.fullmatch(r"\[([A-Za-z0-9_-]+)\]", line)
            if m:
                current = m.group(1)
                sections.setdefault(current, [])
                continue
            if current is None:
                errors.append((n, "assignment outside of any [Section]"))
                continue
            if "=" not in line:
                errors.append((n, f"'{line}' is not KEY=VALUE"))
                continue
            k, _, v = line.partition("=")
            sections[current].append((n, k.strip(), v.strip()))
        return sections, errors

    def check_systemd(self):
        units = sorted((self.root / "deploy" / "systemd").glob("*.service"))
        if not units:
            self.problem("deploy/systemd", "no .service unit")
            return
        for unit in units:
            self.files_checked += 1
            self.check_unit(unit)

    def check_unit(self, unit: Path):
        rel = self.rel(unit)
        sections, errors = self.parse_unit(unit.read_text())
        for n, e in errors:
            self.problem(f"{rel}:{n}", e)
        for sec in ("Unit", "Service", "Install"):
            if sec not in sections:
                self.problem(rel, f"no [{sec}] section")
        svc = sections.get("Service", [])

        def get(key):
            vals = [(n, v) for n, k, v in svc if k == key]
            return vals[-1] if vals else (None, None)

        n_exec, exec_start = get("ExecStart")
        argv = []
        if not exec_start:
            self.problem(rel, "no ExecStart=")
        else:
            try:
                argv = shlex.split(exec_start.lstrip("-@:+!"))
            except ValueError as e:
                self.problem(f"{rel}:{n_exec}", f"ExecStart does not parse: {e}")
            if argv and not argv[0].startswith("/"):
                self.problem(f"{rel}:{n_exec}", "ExecStart must name an absolute path")
            if argv and os.path.basename(argv[0]) != "chunkd":
                self.problem(f"{rel}:{n_exec}", "ExecStart does not run chunkd")
            elif argv:
                self.invocations.append(Invocation(f"{rel}:{n_exec}: ExecStart", "chunkd", argv))
        for n, k, v in svc:
            if k in ("ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost"):
                try:
                    a = shlex.split(v.lstrip("-@:+!"))
                except ValueError as e:
                    self.problem(f"{rel}:{n}", f"{k} does not parse: {e}")
                    continue
                for prog, pa, _ in expand_argv(a):
                    self.invocations.append(Invocation(f"{rel}:{n}: {k}", prog, pa))

        user = get("User")[1]
        dynamic = (get("DynamicUser")[1] or "no").lower() in ("yes", "true", "1", "on")
        if not dynamic and (not user or user in ("root", "0")):
            self.problem(rel, "runs as root: set User= (a chunkd user) or DynamicUser=yes")
        if get("ProtectSystem")[1] != "strict":
            self.problem(rel, "ProtectSystem= is not strict")
        if (get("NoNewPrivileges")[1] or "").lower() not in ("yes", "true", "1", "on") and not dynamic:
            self.problem(rel, "NoNewPrivileges= is not yes")
        kill = get("KillSignal")[1]
        if kill is not None and kill not in ("SIGTERM", "TERM", "15"):
            self.problem(rel, f"KillSignal={kill}: chunkd drains calls in flight on SIGTERM only")
        sg = parse_duration(flag_value(argv, "shutdown_grace") or "10s")
        n_stop, stop = get("TimeoutStopSec")
        if stop is None:
            stop = get("TimeoutSec")[1]
        stop_s = parse_duration(stop) if stop is not None else 90.0
        if stop is not None and stop_s is None:
            self.problem(f"{rel}:{n_stop}", f"TimeoutStopSec={stop} is not a duration")
        elif sg is not None and stop_s is not None and stop_s <= sg:
            self.problem(f"{rel}:{n_stop or n_exec}", f"TimeoutStopSec ({stop_s:g}s) is not longer "
                         f"than --shutdown_grace ({sg:g}s): systemd would SIGKILL chunkd mid-drain")
        runtime_dirs = [f"/run/{d}" for d in (get("RuntimeDirectory")[1] or "").split()]
        state_dirs = [f"/var/lib/{d}" for d in (get("StateDirectory")[1] or "").split()]
        cache_dirs = [f"/var/cache/{d}" for d in (get("CacheDirectory")[1] or "").split()]
        rw = []
        for n, k, v in svc:
            if k == "ReadWritePaths":
                rw += [p.lstrip("-+") for p in v.split()]
        writable = runtime_dirs + state_dirs + cache_dirs + rw + ["/dev/shm"]

        def is_writable(p):
            return any(p == d or p.startswith(d.rstrip("/") + "/") for d in writable)

        if argv:
            listen = parse_listen(flag_value(argv, "listen") or "127.0.0.1:7878")
            for e in listen.errors:
                self.problem(f"{rel}:{n_exec}", f"--listen: {e}")
            for sock in listen.unix_paths:
                if not is_writable(os.path.dirname(sock)):
                    self.problem(f"{rel}:{n_exec}", f"socket {sock} is outside RuntimeDirectory="
                                 "/ReadWritePaths= (ProtectSystem=strict makes it read-only)")
            for h, p in listen.tcp_ports:
                if self.port and p != self.port:
                    self.problem(f"{rel}:{n_exec}", f"listens on port {p}, the image uses "
                                 f"{self.port}")
            store = flag_value(argv, "store") or "chunkd-data"
            if not store.startswith(REMOTE_STORES):
                sp = store[len("file://"):] if store.startswith("file://") else store
                if not sp.startswith("/") or not is_writable(sp):
                    self.problem(f"{rel}:{n_exec}", f"--store={store} is not under StateDirectory="
                                 "/ReadWritePaths= (ProtectSystem=strict makes it read-only)")
            ready = flag_value(argv, "ready_file")
            if ready and not is_writable(os.path.dirname(ready)):
                self.problem(f"{rel}:{n_exec}", f"--ready_file={ready} is not in a writable "
                             "directory")
        self.systemd_verify(unit, rel)

    def systemd_verify(self, unit: Path, rel: str):
        tool = shutil.which("systemd-analyze")
        if not tool:
            self.notes.append(f"{rel}: systemd-analyze not found; checked structure only")
            return
        text = unit.read_text()
        # verify insists that the binaries exist: point them at the built ones (or /bin/true).
        for prog, binary in (("chunkd", self.chunkd_bin), ("chunkctl", self.chunkctl_bin)):
            real = str(binary.resolve()) if binary and binary.exists() else "/bin/true"
            text = re.sub(r"(?<![\w/.-])/[\w/.-]*/" + prog + r"(?=\s|$)", real, text)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / unit.name
            copy.write_text(text)
            try:
                proc = subprocess.run([tool, "verify", "--man=no", str(copy)],
                                      capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                self.notes.append(f"{rel}: systemd-analyze verify did not run: {e}")
                return
            out = (proc.stdout + proc.stderr).replace(str(copy), rel)
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        ours = [ln for ln in lines if rel in ln or unit.name in ln]
        for ln in ours:
            self.problem(rel, f"systemd-analyze verify: {ln}")
        if proc.returncode != 0 and not ours:
            self.problem(rel, f"systemd-analyze verify failed (exit {proc.returncode}): "
                         f"{' | '.join(lines[:3])}")

    # -- flags ---------------------------------------------------------------------------------

    def check_invocations(self):
        if self.skip_binaries:
            self.notes.append("--skip-binaries: flags were not checked against chunkd/chunkctl")
            return
        chunkd = None
        if not self.chunkd_bin or not self.chunkd_bin.exists():
            self.problem("check_manifests", f"chunkd binary not found at {self.chunkd_bin}: build "
                         "it (ninja -C build chunkd), pass --chunkd-bin or $CHUNKD_BIN, or "
                         "--skip-binaries")
        else:
            chunkd = FlagSet(self.chunkd_bin, "chunkd")
            if chunkd.error:
                self.problem("check_manifests", chunkd.error)
                chunkd = None
        chunkctl = None
        if self.chunkctl_bin and self.chunkctl_bin.exists():
            chunkctl = FlagSet(self.chunkctl_bin, "chunkctl")
            if chunkctl.error:
                self.problem("check_manifests", chunkctl.error)
                chunkctl = None
        elif any(i.prog == "chunkctl" for i in self.invocations):
            self.notes.append(f"chunkctl binary not found at {self.chunkctl_bin}: chunkctl flags "
                              "not checked")
        for inv in self.invocations:
            fs = chunkd if inv.prog == "chunkd" else chunkctl
            if fs is None:
                continue
            flags, positional = fs.split(inv.argv)
            known_tokens = []
            for name, tokens in flags:
                if not fs.known(name):
                    self.problem(inv.where, f"--{name} is not a {inv.prog} flag "
                                 f"({inv.prog} --helpfull does not list it)")
                else:
                    known_tokens += tokens
            if inv.prog == "chunkd":
                if positional:
                    self.problem(inv.where, f"chunkd takes no positional arguments, got "
                                 f"{' '.join(positional)!r}")
                # The real parser checks the values; --version stops right after parsing.
                try:
                    proc = subprocess.run([str(self.chunkd_bin)] + known_tokens + ["--version"],
                                          capture_output=True, text=True, timeout=30)
                except (OSError, subprocess.TimeoutExpired) as e:
                    self.problem(inv.where, f"cannot run chunkd to check flag values: {e}")
                    continue
                if proc.returncode != 0:
                    errs = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                            if "ERROR" in ln] or [f"exit {proc.returncode}"]
                    for e in errs:
                        self.problem(inv.where, f"chunkd rejects its flags: {e}")
            elif inv.prog == "chunkctl":
                if not positional:
                    self.problem(inv.where, "chunkctl is run without a subcommand")
                elif not re.search(r"(?<![\w-])" + re.escape(positional[0]) + r"(?![\w-])",
                                   fs.help_text):
                    self.problem(inv.where, f"chunkctl subcommand '{positional[0]}' is not in "
                                 "chunkctl --helpfull")


    def package_closure(self, packages):
        """The packages and everything they depend on (Depends, Pre-Depends; any alternative),
        from the local dpkg database (fast), or from apt-cache for packages not installed here."""
        proc = subprocess.run(["dpkg-query", "-W", "-f",
                               "${Package}\\t${Provides}\\t${Depends}\\t${Pre-Depends}\\t${Status}\\n"],
                              capture_output=True, text=True, timeout=60)
        deps, provides = {}, {}
        for line in proc.stdout.splitlines():
            f = line.split("\t")
            if len(f) < 5 or "installed" not in f[4].split():
                continue
            deps[f[0]] = [re.split(r"[\s(:]", alt.strip())[0]
                          for rel in (f[2] + "," + f[3]).split(",") if rel.strip()
                          for alt in rel.split("|") if alt.strip()]
            for pv in f[1].split(","):
                if pv.strip():
                    provides.setdefault(re.split(r"[\s(]", pv.strip())[0], []).append(f[0])
        missing = [p for p in packages if p not in deps]
        if missing:
            if not shutil.which("apt-cache"):
                self.notes.append(f"{', '.join(missing)} not installed here and no apt-cache: "
                                  "runtime libraries not checked")
                return None
            q = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends",
                                "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                                "--no-enhances"] + missing, capture_output=True, text=True,
                               timeout=120)
            names = {ln.strip().split(":")[0] for ln in q.stdout.splitlines()
                     if ln and not ln.startswith(" ")}
            if q.returncode != 0 or not names:
                self.notes.append("apt-cache depends failed (run apt-get update?): runtime "
                                  "libraries not checked")
                return None
            for n in names:
                deps.setdefault(n, [])
        seen = set()
        todo = list(packages)
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            todo.extend(deps.get(p, []))
            todo.extend(provides.get(p, []))
        return seen

    # -- runtime libraries ---------------------------------------------------------------------

    def check_runtime_libraries(self):
        """Every shared library of the binaries the image carries comes from a package that
        `install-deps.sh runtime` installs, or from one of their dependencies."""
        if self.skip_binaries:
            return
        script = self.root / "deploy" / "scripts" / "install-deps.sh"
        m = re.search(r"runtime_pkgs=\(([^)]*)\)", script.read_text()) if script.exists() else None
        if not m:
            self.problem("deploy/scripts/install-deps.sh", "no runtime_pkgs=(...) list")
            return
        runtime = m.group(1).split()
        if not (shutil.which("ldd") and shutil.which("dpkg-query")):
            self.notes.append("ldd/dpkg-query missing: runtime libraries not checked")
            return
        closure = self.package_closure(runtime)
        if closure is None:
            return
        needed = []  # (prog, lib, path)
        for prog, binary in (("chunkd", self.chunkd_bin), ("chunkctl", self.chunkctl_bin)):
            if prog not in self.image_binaries or not binary or not binary.exists():
                continue
            out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                                 timeout=30).stdout
            for line in out.splitlines():
                lm = re.match(r"\s*(\S+) => (/\S+)", line)
                if lm:
                    needed.append((prog,) + lm.groups())
        if not needed:
            return
        # One dpkg-query for all: a library may be known under /lib or /usr/lib (merged /usr).
        candidates = {}
        for _, _, path in needed:
            candidates[path] = [path, path.replace("/lib/", "/usr/lib/", 1)
                                if path.startswith("/lib/") else path, os.path.realpath(path)]
        all_paths = sorted({c for cands in candidates.values() for c in cands})
        q = subprocess.run(["dpkg-query", "-S"] + all_paths, capture_output=True, text=True,
                           timeout=60)
        owner_of = {}
        for line in q.stdout.splitlines():
            pkgs, _, path = line.partition(": ")
            owner_of[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
        for prog, lib, path in needed:
            owner = next((owner_of[c] for c in candidates[path] if c in owner_of), None)
            if owner is None:
                self.problem("deploy/scripts/install-deps.sh", f"{prog} links {lib} ({path}), "
                             "which no Debian package provides: the runtime image lacks it")
            elif owner not in closure:
                self.problem("deploy/scripts/install-deps.sh", f"{prog} links {lib} from "
                             f"package {owner}, which `install-deps.sh runtime` does not "
                             "install (add it to runtime_pkgs)")


def main(argv=None):
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=here.parent,
                        help="repository root (default: the parent of deploy/)")
    parser.add_argument("--chunkd-bin", type=Path, default=None,
                        help="chunkd binary (default: $CHUNKD_BIN or ROOT/build/server/chunkd)")
    parser.add_argument("--chunkctl-bin", type=Path, default=None,
                        help="chunkctl binary (default: $CHUNKCTL_BIN or "
                        "ROOT/build/client/chunkctl)")
    parser.add_argument("--skip-binaries", action="store_true",
                        help="do not check flags against the binaries")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    chunkd_bin = args.chunkd_bin or (Path(os.environ["CHUNKD_BIN"]) if os.environ.get("CHUNKD_BIN")
                                     else root / "build" / "server" / "chunkd")
    chunkctl_bin = args.chunkctl_bin or (Path(os.environ["CHUNKCTL_BIN"])
                                         if os.environ.get("CHUNKCTL_BIN")
                                         else root / "build" / "client" / "chunkctl")
    checker = Checker(root, chunkd_bin, chunkctl_bin, args.skip_binaries)
    checker.run()
    for note in checker.notes:
        print(f"note: {note}", file=sys.stderr)
    for p in checker.problems:
        print(p)
    if checker.problems:
        print(f"check_manifests: {len(checker.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_manifests: OK ({checker.files_checked} files, {len(checker.invocations)} "
          "command lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

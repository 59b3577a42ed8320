#!/usr/bin/env python3
"""Generates the gRPC stubs of the chunkd wire contract into python/chunkd/_proto/.

    python python/tools/gen_proto.py [--force] [--check]

Source: proto/chunkd/v1/chunkd.proto at the repository root (the one source of truth for the
messages). Output: chunkd/_proto/{chunkd_pb2.py, chunkd_pb2.pyi, chunkd_pb2_grpc.py,
__init__.py}. The folder is generated at build/install time and never committed.

Idempotent: a stamp file records a hash of the .proto and the grpcio-tools version; when both
match, nothing is rewritten. --check exits 1 when the stubs are missing or stale.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # python/
REPO_ROOT = PACKAGE_DIR.parent
PROTO_DIR = REPO_ROOT / "proto" / "chunkd" / "v1"
PROTO_FILES = ("chunkd.proto",)
OUT_DIR = PACKAGE_DIR / "chunkd" / "_proto"
STAMP = OUT_DIR / ".stamp"
OUTPUTS = ("__init__.py", "chunkd_pb2.py", "chunkd_pb2.pyi", "chunkd_pb2_grpc.py")

INIT_TEXT = '''"""Generated gRPC stubs of proto/chunkd/v1/chunkd.proto (by python/tools/gen_proto.py).

Do not edit or commit: regenerate with deploy/scripts/setup-venv.sh.
"""
'''


def _tools_version() -> str:
    try:
        from importlib.metadata import version

        return version("grpcio-tools")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in PROTO_FILES:
        h.update(name.encode())
        h.update((PROTO_DIR / name).read_bytes())
    h.update(_tools_version().encode())
    return h.hexdigest()


def is_current() -> bool:
    if not all((OUT_DIR / name).is_file() for name in OUTPUTS):
        return False
    try:
        return STAMP.read_text().strip() == _fingerprint()
    except OSError:
        return False


def generate(force: bool = False) -> bool:
    """Generates the stubs unless they are current. Returns True when files were written."""
    for name in PROTO_FILES:
        if not (PROTO_DIR / name).is_file():
            raise SystemExit(f"gen_proto: {PROTO_DIR / name} not found")
    if not force and is_current():
        return False
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit(
            "gen_proto: grpcio-tools is not installed; "
            "run deploy/scripts/setup-venv.sh (or pip install grpcio-tools)"
        ) from e
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    # The virtual include path maps the .proto to chunkd/_proto/, so the generated modules import
    # each other as `chunkd._proto.chunkd_pb2`; the proto package (chunkd.v1, the wire names)
    # is unchanged.
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-Ichunkd/_proto={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(PROTO_DIR / name) for name in PROTO_FILES],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_proto: protoc failed")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        generated = Path(tmp) / "chunkd" / "_proto"
        (generated / "__init__.py").write_text(INIT_TEXT)
        for name in OUTPUTS:
            # Replace atomically so a concurrent import never sees half a file.
            target = OUT_DIR / name
            staging = OUT_DIR / f".{name}.tmp"
            shutil.copyfile(generated / name, staging)
            os.replace(staging, target)
    STAMP.write_text(_fingerprint() + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even when current")
    parser.add_argument("--check", action="store_true", help="exit 1 when missing or stale")
    args = parser.parse_args(argv)
    if args.check:
        ok = is_current()
        print(f"gen_proto: stubs in {OUT_DIR} are {'current' if ok else 'missing or stale'}")
        return 0 if ok else 1
    wrote = generate(force=args.force)
    print(f"gen_proto: {'generated' if wrote else 'up to date:'} {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

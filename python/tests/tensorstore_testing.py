"""Helpers for the TensorStore tests: chunkd's TensorStore key-value service, reached by the real
``tensorstore`` wheel's ``tsgrpc_kvstore`` driver, and TensorStore's StorageGeneration bytes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import tensorstore as ts

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
TS_PROTOS = ("tensorstore_grpc/common.proto", "tensorstore_grpc/kvstore/kvstore.proto")

# TensorStore's StorageGeneration (tensorstore/kvstore/generation.h, 0.1.74 and later): ""
# unknown (a condition that did not hold), "\x02" no value, "\x00" + bytes a stored version.
UNKNOWN = b""
NO_VALUE = b"\x02"
# The generation TensorStore's conformance suite uses for "matches nothing"
# (tensorstore/kvstore/test_util/internal.cc: StorageGeneration::FromValues(1415926535897932)).
MISMATCH = b"\x00" + (1415926535897932).to_bytes(8, "little")


def kvstore_spec(address: str, path: str = "") -> dict:
    spec = {"driver": "tsgrpc_kvstore", "address": address}
    if path:
        spec["path"] = path
    return spec


def open_kvstore(address: str, path: str = "") -> "ts.KvStore":
    return ts.KvStore.open(kvstore_spec(address, path)).result()


def is_regular(generation: bytes) -> bool:
    """A stored value's generation (StorageGeneration::IsCleanValidValue)."""
    return len(generation) > 1 and generation[0] == 0


def assert_value(result, value: bytes, generation: bytes | None = None) -> None:
    assert result.state == "value", result
    assert result.value == value, (len(result.value), len(value))
    if generation is not None:
        assert result.stamp.generation == generation, result


def assert_missing(result) -> None:
    assert result.state == "missing", result
    assert result.value == b""
    assert result.stamp.generation != UNKNOWN, result


def assert_aborted(result) -> None:
    assert result.state == "unspecified", result
    assert result.value == b""


def generate_stubs(out_dir: Path):
    """Python modules of chunkd's copy of TensorStore's protos (grpcio-tools, into `out_dir`):
    returns (common_pb2, kvstore_pb2, kvstore_pb2_grpc), for calls the driver cannot make."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *TS_PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    sys.path.insert(0, str(out_dir))
    try:
        return (importlib.import_module("tensorstore_grpc.common_pb2"),
                importlib.import_module("tensorstore_grpc.kvstore.kvstore_pb2"),
                importlib.import_module("tensorstore_grpc.kvstore.kvstore_pb2_grpc"))
    finally:
        sys.path.remove(str(out_dir))

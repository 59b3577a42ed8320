"""The generated gRPC stubs, with a clear error when they were not generated."""

from __future__ import annotations

try:
    from chunkd._proto import chunkd_pb2 as pb
    from chunkd._proto import chunkd_pb2_grpc as pb_grpc
except ImportError as _e:  # pragma: no cover - exercised by test_stubs via a subprocess
    raise ImportError(
        "chunkd: the gRPC stubs (chunkd/_proto/chunkd_pb2*.py) are missing. They are generated "
        "from proto/chunkd/v1/chunkd.proto at install time: run deploy/scripts/setup-venv.sh "
        "from the repository root, or `python python/tools/gen_proto.py` (needs grpcio-tools). "
        f"Import error: {_e}"
    ) from _e

__all__ = ["pb", "pb_grpc"]

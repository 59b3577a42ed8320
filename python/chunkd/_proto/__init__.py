"""Generated gRPC stubs of proto/chunkd/v1/chunkd.proto (by python/tools/gen_proto.py).

Do not edit or commit: regenerate with deploy/scripts/setup-venv.sh.
"""

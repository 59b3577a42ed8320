"""chunkd's TensorStore key-value service on the wire: its .proto files against the descriptor
the tensorstore wheel carries, and the requests the Python API cannot make (reads with
generation_if_equal, malformed requests, drivers older than 0.1.86), with raw gRPC calls through
stubs generated from proto/tensorstore_grpc/."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from tensorstore_testing import MISMATCH, NO_VALUE, generate_stubs, open_kvstore, ts

SERVICE = "tensorstore_grpc.kvstore.KvStoreService"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return generate_stubs(tmp_path_factory.mktemp("ts-stubs"))


@pytest.fixture
def raw(server, stubs):
    _, pb, pbg = stubs
    with grpc.insecure_channel(server.address) as channel:
        yield pb, pbg.KvStoreServiceStub(channel)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def wheel_descriptor(name: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto `name` as protoc embedded it in the tensorstore wheel's extension
    module: found by its leading name field, then walked field by field to its end."""
    so = next(Path(ts.__file__).parent.glob("_tensorstore*.so"))
    data = so.read_bytes()
    encoded = name.encode()
    start = data.find(b"\x0a" + bytes([len(encoded)]) + encoded)
    assert start >= 0, f"{name} is not in {so}"
    # Top-level fields of FileDescriptorProto and their wire types.
    known = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 0, 11: 0, 12: 2, 14: 0}
    i = start
    while i < len(data):
        tag, j = _varint(data, i)
        if known.get(tag >> 3) != (tag & 7):
            break
        if tag & 7 == 2:
            length, j = _varint(data, j)
            j += length
        else:
            _, j = _varint(data, j)
        i = j
    return descriptor_pb2.FileDescriptorProto.FromString(data[start:i])


def wire_shape(fd: descriptor_pb2.FileDescriptorProto) -> dict:
    """What the wire format depends on: every field's number, type, label and presence, enum
    values, and the methods' messages and streaming."""
    F = descriptor_pb2.FieldDescriptorProto
    out = {}

    def message(prefix, m):
        for f in m.field:
            kind, type_name = f.type, f.type_name.rsplit(".", 1)[-1]
            if kind == F.TYPE_ENUM and f.type_name == ".google.rpc.Code":
                kind, type_name = F.TYPE_INT32, ""  # a varint either way (see common.proto)
            out[f"{prefix}{m.name}.{f.name}"] = (f.number, kind, f.label, f.proto3_optional,
                                                 type_name)
        for e in m.enum_type:
            for v in e.value:
                out[f"{prefix}{m.name}.{e.name}.{v.name}"] = v.number
        for nested in m.nested_type:
            message(f"{prefix}{m.name}.", nested)

    for m in fd.message_type:
        message(f"{fd.package}.", m)
    for s in fd.service:
        for method in s.method:
            out[f"{fd.package}.{s.name}/{method.name}"] = (
                method.input_type, method.output_type, method.client_streaming,
                method.server_streaming)
    return out


def test_protos_match_the_wheels_wire_format(stubs):
    common_pb2, kvstore_pb2, _ = stubs
    for wheel_name, ours in [("tensorstore/kvstore/tsgrpc/common.proto", common_pb2),
                             ("tensorstore/kvstore/tsgrpc/kvstore.proto", kvstore_pb2)]:
        mine = descriptor_pb2.FileDescriptorProto()
        ours.DESCRIPTOR.CopyToProto(mine)
        theirs = wheel_descriptor(wheel_name)
        assert theirs.package == mine.package
        assert wire_shape(theirs) == wire_shape(mine), wheel_name


def read_all(stub, request):
    """Every message of a Read, and the first one."""
    messages = list(stub.Read(request, timeout=30))
    return messages[0], b"".join(m.value_part for m in messages), messages


def test_reads_with_generation_if_equal(raw, prefix):
    """TestKeyValueStoreReadOps' if_equal cases (the Python API has no if_equal on reads)."""
    pb, stub = raw
    key = f"{prefix}/eq".encode()
    write = stub.Write(iter([pb.WriteRequest(key=key, value_part=b"_kvstore_value_")]))
    g = write.generation_and_timestamp.generation
    first, value, _ = read_all(stub, pb.ReadRequest(key=key, generation_if_equal=g))
    assert first.state == pb.ReadResponse.VALUE and value == b"_kvstore_value_"
    for condition in (MISMATCH, NO_VALUE, b"\x00" + bytes(8), b"not a generation"):
        first, value, _ = read_all(stub, pb.ReadRequest(key=key, generation_if_equal=condition))
        assert first.state == pb.ReadResponse.UNSPECIFIED, condition
        assert first.generation_and_timestamp.generation == g
        assert value == b""
    # Both conditions, each holding.
    first, value, _ = read_all(
        stub, pb.ReadRequest(key=key, generation_if_equal=g, generation_if_not_equal=MISMATCH))
    assert first.state == pb.ReadResponse.VALUE
    # A missing key is MISSING whatever the conditions (as TensorStore's stores answer).
    missing = f"{prefix}/missing".encode()
    for condition in (MISMATCH, NO_VALUE):
        first, _, _ = read_all(stub, pb.ReadRequest(key=missing, generation_if_equal=condition))
        assert first.state == pb.ReadResponse.MISSING
        assert first.generation_and_timestamp.generation == NO_VALUE


def test_large_values_come_in_parts_of_at_most_one_mebibyte(raw, prefix):
    pb, stub = raw
    key = f"{prefix}/big".encode()
    data = os.urandom((3 << 20) + 1)
    parts = [pb.WriteRequest(key=key, value_part=data[i:i + (1 << 20)])
             for i in range(0, len(data), 1 << 20)]
    stub.Write(iter(parts), timeout=30)
    first, value, messages = read_all(stub, pb.ReadRequest(key=key))
    assert value == data
    assert len(messages) == 4
    assert all(len(m.value_part) <= 1 << 20 for m in messages)
    assert first.state == pb.ReadResponse.VALUE
    assert all(not m.HasField("generation_and_timestamp") for m in messages[1:])


def test_byte_ranges_as_drivers_before_0_1_86_send_them(raw, prefix, stubs):
    """exclusive_max was a plain int64 before 0.1.86: absent (0) could not be told from a
    "stat" read, and -1 meant "to the end". chunkd reads an absent one as "to the end"."""
    common_pb2, pb, _ = stubs
    _, stub = raw
    key = f"{prefix}/r".encode()
    stub.Write(iter([pb.WriteRequest(key=key, value_part=b"0123456789")]))
    cases = [(common_pb2.ByteRange(inclusive_min=3), b"3456789"),
             (common_pb2.ByteRange(inclusive_min=3, exclusive_max=-1), b"3456789"),
             (common_pb2.ByteRange(inclusive_min=-4), b"6789"),
             (common_pb2.ByteRange(inclusive_min=2, exclusive_max=4), b"23"),
             (common_pb2.ByteRange(inclusive_min=0, exclusive_max=0), b"")]
    for byte_range, want in cases:
        _, value, _ = read_all(stub, pb.ReadRequest(key=key, byte_range=byte_range))
        assert value == want, byte_range


def expect_code(code, call):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


def test_malformed_requests_get_clear_statuses(raw, prefix, stubs):
    common_pb2, pb, _ = stubs
    _, stub = raw
    key = f"{prefix}/m".encode()
    stub.Write(iter([pb.WriteRequest(key=key, value_part=b"0123456789")]))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for byte_range in (common_pb2.ByteRange(inclusive_min=-1, exclusive_max=5),
                       common_pb2.ByteRange(inclusive_min=5, exclusive_max=2),
                       common_pb2.ByteRange(inclusive_min=0, exclusive_max=-2)):
        details = expect_code(invalid, lambda: read_all(stub, pb.ReadRequest(
            key=key, byte_range=byte_range)))
        assert "byte range" in details
    bad_time = pb.ReadRequest(key=key)
    bad_time.staleness_bound.seconds = 1
    bad_time.staleness_bound.nanos = -1
    assert "staleness_bound" in expect_code(invalid, lambda: read_all(stub, bad_time))
    assert "neither a key nor a range" in expect_code(
        invalid, lambda: stub.Delete(pb.DeleteRequest(), timeout=10))
    assert "key is empty" in expect_code(
        invalid, lambda: stub.Delete(pb.DeleteRequest(key=b""), timeout=10))
    assert "before its first message" in expect_code(
        invalid, lambda: stub.Write(iter([]), timeout=10))
    assert "'..' segment" in expect_code(
        invalid, lambda: stub.Write(iter([pb.WriteRequest(key=b"../x", value_part=b"v")]),
                                    timeout=10))
    assert "starts with '/'" in expect_code(invalid, lambda: list(stub.List(
        pb.ListRequest(range=common_pb2.KeyRange(inclusive_min=b"/a", exclusive_max=b"/b")),
        timeout=10)))


def test_only_the_first_write_message_names_the_key(raw, prefix):
    pb, stub = raw
    key = f"{prefix}/first".encode()
    stub.Write(iter([pb.WriteRequest(key=key, value_part=b"ab"),
                     pb.WriteRequest(key=b"../elsewhere", value_part=b"cd")]), timeout=10)
    _, value, _ = read_all(stub, pb.ReadRequest(key=key))
    assert value == b"abcd"


def test_a_reader_that_cancels_leaves_the_server_serving(raw, prefix, server):
    pb, stub = raw
    key = f"{prefix}/c".encode()
    data = os.urandom(8 << 20)
    stub.Write(iter(pb.WriteRequest(key=key, value_part=data[i:i + (1 << 20)])
                    for i in range(0, len(data), 1 << 20)), timeout=30)
    call = stub.Read(pb.ReadRequest(key=key), timeout=30)
    next(call)
    call.cancel()
    # And a listing cancelled after its first page.
    for i in range(5):
        stub.Write(iter([pb.WriteRequest(key=f"{prefix}/l/{i}".encode(), value_part=b"v")]))
    listing = stub.List(pb.ListRequest(), timeout=30)
    next(listing)
    listing.cancel()
    _, value, _ = read_all(stub, pb.ReadRequest(key=key))
    assert value == data
    kv = open_kvstore(server.address, f"{prefix}/l/")
    assert sorted(kv.list().result()) == [b"0", b"1", b"2", b"3", b"4"]


def test_concurrent_readers_and_writers_never_see_torn_values(server, prefix):
    kv = open_kvstore(server.address, f"{prefix}/")
    values = [bytes([i]) * (1 << 20) for i in range(4)]
    kv.write(b"v", values[0]).result()
    errors = []

    def reader():
        for _ in range(20):
            got = kv.read(b"v").result().value
            if got not in values:
                errors.append(len(got))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        kv.write(b"v", values[i % 4]).result()
    for t in threads:
        t.join()
    assert errors == []

// Tests of proto/wire/raw_message.h: hand-assembled messages with a data field, read back by
// FieldReader and by protobuf itself.
#include "proto/wire/raw_message.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "buffer/cpu/buffer.h"
#include "chunkd/v1/chunkd.pb.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd::wire {
namespace {

using buffer::cpu::Buffer;
using chunkd::testing::RandomBytes;

std::vector<grpc::Slice> Slices(const grpc::ByteBuffer& message) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(message.Dump(&slices).ok());
  return slices;
}

std::string Flatten(const grpc::ByteBuffer& message) {
  std::string out;
  for (const grpc::Slice& s : Slices(message)) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// A ByteBuffer holding `bytes` cut into slices of `piece` bytes (0: one slice).
grpc::ByteBuffer FromBytes(const std::string& bytes, size_t piece = 0) {
  std::vector<grpc::Slice> slices;
  if (piece == 0) piece = bytes.size() + 1;
  for (size_t i = 0; i < bytes.size(); i += piece) {
    slices.emplace_back(bytes.substr(i, piece));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

v1::GetHeader SampleHeader(uint64_t length) {
  v1::GetHeader header;
  header.set_total_size(length + 7);
  header.set_generation(0x1234567890ABCDEFull);
  header.set_range_start(7);
  header.set_length(length);
  return header;
}

// Field 1 holding `header`, encoded by hand.
std::string EncodeHeaderField(const v1::GetHeader& header) {
  std::string body = header.SerializeAsString();
  std::string head;
  AppendLengthDelimitedHeader(&head, 1, body.size());
  head += body;
  return head;
}

struct Decoded {
  bool ok = false;
  bool has_header = false;
  v1::GetHeader header;
  bool has_data = false;
  std::string data;
};

// Walks a GetResponse with FieldReader, as the client does.
Decoded Decode(const grpc::ByteBuffer& message) {
  Decoded out;
  FieldReader reader(message);
  while (!reader.done()) {
    uint32_t field, wire_type;
    if (!reader.NextField(&field, &wire_type)) return out;
    if (field == 1 && wire_type == 2) {
      uint64_t length;
      std::string body;
      if (!reader.ReadVarint(&length) || !reader.ReadString(length, &body)) return out;
      if (!out.header.ParseFromString(body)) return out;
      out.has_header = true;
    } else if (field == kDataField && wire_type == 2) {
      uint64_t length;
      if (!reader.ReadVarint(&length)) return out;
      std::string data(length, '\0');
      if (!reader.ReadBytes(data.data(), length)) return out;
      out.data += data;
      out.has_data = true;
    } else if (!reader.SkipField(wire_type)) {
      return out;
    }
  }
  out.ok = true;
  return out;
}

TEST(RawMessageTest, AppendVarint) {
  auto varint = [](uint64_t v) {
    std::string s;
    AppendVarint(&s, v);
    return s;
  };
  EXPECT_EQ(varint(0), std::string("\x00", 1));
  EXPECT_EQ(varint(1), "\x01");
  EXPECT_EQ(varint(127), "\x7f");
  EXPECT_EQ(varint(128), "\x80\x01");
  EXPECT_EQ(varint(300), "\xac\x02");
  EXPECT_EQ(varint(~0ull), "\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01");
  std::string tag;
  AppendLengthDelimitedHeader(&tag, kDataField, 5);
  EXPECT_EQ(tag, "\x7a\x05");  // (15 << 3) | 2 = 122
}

class EncodeWithDataTest : public ::testing::TestWithParam<size_t> {};

INSTANTIATE_TEST_SUITE_P(Sizes, EncodeWithDataTest,
                         ::testing::Values(0, 10, (16 << 10) - 1, 16 << 10, 100 << 10));

TEST_P(EncodeWithDataTest, RoundTrip) {
  const size_t size = GetParam();
  const std::string bytes = RandomBytes(size, size + 3);
  const v1::GetHeader header = SampleHeader(size);
  const Buffer data = Buffer::CopyOf(bytes);
  grpc::ByteBuffer message = EncodeWithData(EncodeHeaderField(header), data);

  // Small data is copied next to the header; large data is referenced in place.
  std::vector<grpc::Slice> slices = Slices(message);
  if (size < (16 << 10)) {
    ASSERT_EQ(slices.size(), 1u);
  } else {
    ASSERT_EQ(slices.size(), 2u);
    EXPECT_EQ(static_cast<const void*>(slices[1].begin()), static_cast<const void*>(data.data()))
        << "large data must not be copied";
    EXPECT_EQ(slices[1].size(), size);
  }

  std::string flat = Flatten(message);
  std::string want_head = EncodeHeaderField(header);
  if (size > 0) AppendLengthDelimitedHeader(&want_head, kDataField, size);
  EXPECT_EQ(flat.size(), want_head.size() + size);
  EXPECT_EQ(message.Length(), flat.size());
  EXPECT_TRUE(flat == want_head + bytes);

  // FieldReader reads back what went in.
  Decoded d = Decode(message);
  ASSERT_TRUE(d.ok);
  ASSERT_TRUE(d.has_header);
  EXPECT_EQ(d.header.SerializeAsString(), header.SerializeAsString());
  EXPECT_EQ(d.has_data, size > 0);  // empty data adds no field
  EXPECT_TRUE(d.data == bytes);

  // So does protobuf.
  v1::GetResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(flat));
  ASSERT_TRUE(parsed.has_header());
  EXPECT_EQ(parsed.header().total_size(), size + 7);
  EXPECT_EQ(parsed.header().generation(), 0x1234567890ABCDEFull);
  EXPECT_EQ(parsed.header().range_start(), 7u);
  EXPECT_EQ(parsed.header().length(), size);
  EXPECT_EQ(parsed.data().size(), size);
  EXPECT_TRUE(parsed.data() == bytes);

  // And the same bytes, however they are cut into slices.
  for (size_t piece : {1, 3, 4096}) {
    Decoded again = Decode(FromBytes(flat, piece));
    ASSERT_TRUE(again.ok) << piece;
    EXPECT_EQ(again.header.length(), size) << piece;
    EXPECT_TRUE(again.data == bytes) << piece;
  }
}

TEST(RawMessageTest, ReferencedDataOutlivesTheCallersBuffer) {
  grpc::ByteBuffer message;
  const std::string bytes = RandomBytes(200 << 10, 9);
  {
    Buffer data = Buffer::CopyOf(bytes);
    message = EncodeWithData("", data);
  }
  // Only the message holds the buffer now.
  Decoded d = Decode(message);
  ASSERT_TRUE(d.ok);
  EXPECT_FALSE(d.has_header);
  EXPECT_TRUE(d.data == bytes);
}

TEST(RawMessageTest, CopyThresholdIsAParameter) {
  const Buffer data = Buffer::CopyOf("0123456789");
  EXPECT_EQ(Slices(EncodeWithData("", data, /*copy_below=*/0)).size(), 2u);
  EXPECT_EQ(Slices(EncodeWithData("", data, /*copy_below=*/11)).size(), 1u);
  EXPECT_EQ(Flatten(EncodeWithData("", data, 0)),
            "\x7a\x0a"
            "0123456789");
}

TEST(RawMessageTest, PartSequenceCutsAValueIntoReferencedParts) {
  std::string bytes = RandomBytes((3 << 20) + 5, 9);
  Buffer value = Buffer::CopyOf(bytes);
  PartSequence parts(value, /*field=*/4, /*part_bytes=*/1 << 20);
  std::string joined;
  std::vector<size_t> sizes;
  bool first = true;
  while (!parts.done()) {
    size_t part = 0;
    grpc::ByteBuffer message = parts.Next(first ? std::string("\x18\x02") : "", &part);
    std::vector<grpc::Slice> slices = Slices(message);
    // Large parts travel as a slice that points into the value (small ones are copied).
    if (part >= (16 << 10)) {
      EXPECT_EQ(reinterpret_cast<const std::byte*>(slices.back().begin()),
                value.data() + joined.size());
    }
    std::string flat = Flatten(message);
    std::string head = first ? std::string("\x18\x02") : "";
    AppendLengthDelimitedHeader(&head, 4, part);
    ASSERT_EQ(flat.substr(0, head.size()), head);
    joined += flat.substr(head.size());
    sizes.push_back(part);
    first = false;
  }
  EXPECT_EQ(joined, bytes);
  EXPECT_EQ(sizes, (std::vector<size_t>{1 << 20, 1 << 20, 1 << 20, 5}));
}

TEST(RawMessageTest, PartSequenceOfAnEmptyValueIsOneMessage) {
  PartSequence parts(Buffer(), kDataField, 1 << 20);
  EXPECT_FALSE(parts.done());
  size_t part = 7;
  EXPECT_EQ(Flatten(parts.Next("head", &part)), "head");
  EXPECT_EQ(part, 0u);
  EXPECT_TRUE(parts.done());
}

TEST(RawMessageTest, PutRequestParses) {
  v1::PutHeader header;
  header.set_key("arr/c/0/0");
  header.set_size(5);
  std::string body = header.SerializeAsString();
  std::string head;
  AppendLengthDelimitedHeader(&head, 1, body.size());
  head += body;
  v1::PutRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(EncodeWithData(head, Buffer::CopyOf("hello")))));
  EXPECT_EQ(parsed.header().key(), "arr/c/0/0");
  EXPECT_EQ(parsed.header().size(), 5u);
  EXPECT_EQ(parsed.data(), "hello");
}

TEST(RawMessageTest, ReadsMessagesProtobufWrote) {
  v1::GetResponse response;
  *response.mutable_header() = SampleHeader(3);
  response.set_data("abc");
  Decoded d = Decode(FromBytes(response.SerializeAsString(), 2));
  ASSERT_TRUE(d.ok);
  EXPECT_EQ(d.header.length(), 3u);
  EXPECT_EQ(d.data, "abc");
}

TEST(RawMessageTest, SkipsUnknownFieldsOfEveryWireType) {
  std::string msg;
  AppendVarint(&msg, (20 << 3) | 0);  // varint
  AppendVarint(&msg, 1ull << 40);
  AppendVarint(&msg, (21 << 3) | 1);  // fixed64
  msg.append(8, 'x');
  AppendVarint(&msg, (22 << 3) | 5);  // fixed32
  msg.append(4, 'y');
  AppendLengthDelimitedHeader(&msg, 23, 3);
  msg += "zzz";
  AppendLengthDelimitedHeader(&msg, kDataField, 2);
  msg += "ok";
  Decoded d = Decode(FromBytes(msg, 5));
  ASSERT_TRUE(d.ok);
  EXPECT_EQ(d.data, "ok");
}

TEST(RawMessageTest, RejectsTruncatedInput) {
  for (size_t size : {size_t{10}, size_t{300}}) {
    const std::string bytes = RandomBytes(size, 5);
    std::string header_field = EncodeHeaderField(SampleHeader(size));
    std::string flat = Flatten(EncodeWithData(header_field, Buffer::CopyOf(bytes)));
    ASSERT_TRUE(Decode(FromBytes(flat)).ok);
    // Cutting anywhere except between the two fields leaves a field unfinished.
    for (size_t cut = 1; cut < flat.size(); ++cut) {
      if (cut == header_field.size()) continue;
      for (size_t piece : {size_t{0}, size_t{1}, size_t{7}}) {
        EXPECT_FALSE(Decode(FromBytes(flat.substr(0, cut), piece)).ok)
            << "accepted " << cut << " of " << flat.size() << " bytes, pieces of " << piece;
      }
    }
    // Cut between the fields: a valid message holding only the header.
    Decoded head_only = Decode(FromBytes(flat.substr(0, header_field.size())));
    EXPECT_TRUE(head_only.ok);
    EXPECT_FALSE(head_only.has_data);
  }
  // A referenced data slice cut short.
  const Buffer big = Buffer::CopyOf(RandomBytes(100 << 10, 8));
  std::string head;
  AppendLengthDelimitedHeader(&head, kDataField, big.size());
  grpc::Slice parts[2] = {grpc::Slice(head), ReferenceSlice(big.Slice(0, big.size() - 1))};
  EXPECT_FALSE(Decode(grpc::ByteBuffer(parts, 2)).ok);
}

TEST(RawMessageTest, RejectsMalformedInput) {
  // Field number 0.
  EXPECT_FALSE(Decode(FromBytes(std::string("\x02\x00", 2))).ok);
  // A varint longer than ten bytes.
  EXPECT_FALSE(Decode(FromBytes(std::string(11, '\x80') + "\x01")).ok);
  // Groups (wire types 3 and 4) and invalid wire types are not skipped.
  EXPECT_FALSE(Decode(FromBytes("\xa3\x01")).ok);  // field 20, wire type 3
  EXPECT_FALSE(Decode(FromBytes("\xa6\x01")).ok);  // field 20, wire type 6
  // A length beyond the message.
  EXPECT_FALSE(Decode(FromBytes("\x7a\x10"
                                "abc"))
                   .ok);
  // The low-level reads report the end of input.
  FieldReader reader(FromBytes("\x08"));
  uint32_t field, wire_type;
  ASSERT_TRUE(reader.NextField(&field, &wire_type));
  EXPECT_EQ(field, 1u);
  EXPECT_EQ(wire_type, 0u);
  uint64_t v;
  EXPECT_FALSE(reader.ReadVarint(&v));
  char c;
  EXPECT_FALSE(reader.ReadBytes(&c, 1));
  // An empty message is done at once.
  grpc::ByteBuffer empty;
  EXPECT_TRUE(FieldReader(empty).done());
}

// Found by tests/fuzz/replies_fuzz.cc: a length field of 2^56 made ReadString size its string
// to it (allocating, or throwing) before finding the message far shorter.
TEST(RawMessageTest, ALengthPastTheMessageAllocatesNothing) {
  std::string bytes;
  AppendLengthDelimitedHeader(&bytes, 1, uint64_t{1} << 56);
  bytes += "abc";
  FieldReader reader(FromBytes(bytes, 2));
  uint32_t field, wire_type;
  uint64_t length;
  ASSERT_TRUE(reader.NextField(&field, &wire_type));
  ASSERT_TRUE(reader.ReadVarint(&length));
  EXPECT_EQ(reader.remaining(), 3u);
  std::string out;
  EXPECT_FALSE(reader.ReadString(length, &out));
  EXPECT_LT(out.capacity(), 1024u);
  EXPECT_EQ(reader.remaining(), 3u);  // a failed read takes nothing
  EXPECT_TRUE(reader.ReadString(3, &out));
  EXPECT_EQ(out, "abc");
  EXPECT_TRUE(reader.done());
}

}  // namespace
}  // namespace chunkd::wire

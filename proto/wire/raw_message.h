// Encoding and decoding of messages that carry value bytes (chunkd.v1's GetResponse.data and
// PutRequest.data, TensorStore's ReadResponse.value_part) straight from and into chunk buffers,
// without the copies that building or parsing a protobuf message object would make.
//
// Protobuf's wire format is a concatenation of fields, so a message is written as the encoded
// small fields (a header) followed by the data field (tag, length, bytes); the bytes travel as a
// gRPC slice that refers to the buffer. The reader walks the fields of a received message
// across gRPC's slices and copies a data field once, into the caller's memory.
#ifndef CHUNKD_PROTO_WIRE_RAW_MESSAGE_H_
#define CHUNKD_PROTO_WIRE_RAW_MESSAGE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "buffer/cpu/buffer.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"

namespace chunkd::wire {

// Field number of the `data` field in GetResponse and PutRequest.
inline constexpr uint32_t kDataField = 15;

void AppendVarint(std::string* out, uint64_t value);
// Appends the tag and length of a length-delimited field.
void AppendLengthDelimitedHeader(std::string* out, uint32_t field, uint64_t length);

// A slice that refers to `bytes` without copying; it keeps the buffer alive until gRPC is done.
grpc::Slice ReferenceSlice(const buffer::cpu::Buffer& bytes);
// A slice that takes `bytes` over (grpc::Slice(std::string) would copy them).
grpc::Slice OwningSlice(std::string bytes);

// `head` (already encoded fields) followed by field `field` holding `data`. Data smaller than
// `copy_below` bytes is copied into one slice with the head (a reference costs more than
// copying a few KiB); larger data is referenced. Empty data adds no field.
grpc::ByteBuffer EncodeWithField(std::string head, uint32_t field, const buffer::cpu::Buffer& data,
                                 size_t copy_below = 16 << 10);
// EncodeWithField with chunkd.v1's data field (15).
grpc::ByteBuffer EncodeWithData(std::string head, const buffer::cpu::Buffer& data,
                                size_t copy_below = 16 << 10);

// A value sent as a series of messages, each carrying the next part of it (at most
// `part_bytes`) in field `field`, as a slice that refers to the value. The first message
// usually carries a header before its part; a value of 0 bytes still makes one message.
//
//   PartSequence parts(value, kDataField, 1 << 20);
//   do { Send(parts.Next(first ? header : "")); } while (!parts.done());
class PartSequence {
 public:
  PartSequence() = default;
  PartSequence(buffer::cpu::Buffer value, uint32_t field, size_t part_bytes);

  // The next message: `head` followed by the next part. `*part` (if given) gets the number of
  // value bytes it carries.
  grpc::ByteBuffer Next(std::string head, size_t* part = nullptr);
  // True once every byte was handed out by Next (after the first Next for an empty value).
  bool done() const { return started_ && sent_ == value_.size(); }

 private:
  buffer::cpu::Buffer value_;
  uint32_t field_ = kDataField;
  size_t part_bytes_ = 1 << 20;
  size_t sent_ = 0;
  bool started_ = false;
};

// Walks the fields of one received message.
class FieldReader {
 public:
  explicit FieldReader(const grpc::ByteBuffer& message);

  bool done() const { return slice_ == slices_.size(); }
  // Bytes read or skipped so far (to find the end of a nested message).
  uint64_t consumed() const { return consumed_; }
  // Bytes of the message not read yet.
  uint64_t remaining() const { return size_ - consumed_; }
  // Reads the next field's number and wire type. False on malformed input.
  bool NextField(uint32_t* field, uint32_t* wire_type);
  bool ReadVarint(uint64_t* value);
  // Copies the next `length` bytes to `out`; false, reading nothing, when fewer remain.
  bool ReadBytes(void* out, size_t length);
  // The same into `out`, which is sized only once the bytes are known to be there: a length
  // field is whatever the sender wrote.
  bool ReadString(size_t length, std::string* out);
  // Skips the value of a field of `wire_type` (for fields this reader does not know).
  bool SkipField(uint32_t wire_type);

 private:
  std::vector<grpc::Slice> slices_;
  size_t slice_ = 0;
  size_t offset_ = 0;  // within slices_[slice_]
  uint64_t consumed_ = 0;
  uint64_t size_ = 0;  // of the whole message
};

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_RAW_MESSAGE_H_

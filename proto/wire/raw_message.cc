#include "proto/wire/raw_message.h"

#include <algorithm>
#include <cstring>

#include "proto/wire/handoff.h"

namespace chunkd::wire {
namespace {

// gRPC frees a slice on whichever thread drops its last reference, ordered after its creation
// by gRPC's own refcount, which TSan cannot see: the creator's Started and this Completed say it.
void ReleaseBufferRef(void* user_data) {
  Completed(user_data);
  delete static_cast<buffer::cpu::Buffer*>(user_data);
}
void ReleaseString(void* user_data) {
  Completed(user_data);
  delete static_cast<std::string*>(user_data);
}

}  // namespace

void AppendVarint(std::string* out, uint64_t value) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void AppendLengthDelimitedHeader(std::string* out, uint32_t field, uint64_t length) {
  AppendVarint(out, (static_cast<uint64_t>(field) << 3) | 2);
  AppendVarint(out, length);
}

grpc::Slice ReferenceSlice(const buffer::cpu::Buffer& bytes) {
  auto* ref = new buffer::cpu::Buffer(bytes);
  Started(ref);
  return grpc::Slice(const_cast<std::byte*>(ref->data()), ref->size(), &ReleaseBufferRef, ref);
}

grpc::Slice OwningSlice(std::string bytes) {
  // Small strings live inside the object, and gRPC inlines small slices anyway: copy those.
  if (bytes.size() < 256) return grpc::Slice(bytes);
  auto* owned = new std::string(std::move(bytes));
  Started(owned);
  return grpc::Slice(owned->data(), owned->size(), &ReleaseString, owned);
}

grpc::ByteBuffer EncodeWithData(std::string head, const buffer::cpu::Buffer& data,
                                size_t copy_below) {
  return EncodeWithField(std::move(head), kDataField, data, copy_below);
}

grpc::ByteBuffer EncodeWithField(std::string head, uint32_t field, const buffer::cpu::Buffer& data,
                                 size_t copy_below) {
  if (!data.empty()) AppendLengthDelimitedHeader(&head, field, data.size());
  if (data.size() < copy_below) {
    head.append(data.view());
    grpc::Slice slice = OwningSlice(std::move(head));
    return grpc::ByteBuffer(&slice, 1);
  }
  grpc::Slice slices[2] = {OwningSlice(std::move(head)), ReferenceSlice(data)};
  return grpc::ByteBuffer(slices, 2);
}

PartSequence::PartSequence(buffer::cpu::Buffer value, uint32_t field, size_t part_bytes)
    : value_(std::move(value)), field_(field), part_bytes_(std::max<size_t>(part_bytes, 1)) {}

grpc::ByteBuffer PartSequence::Next(std::string head, size_t* part) {
  size_t n = std::min(part_bytes_, value_.size() - sent_);
  grpc::ByteBuffer message = EncodeWithField(std::move(head), field_, value_.Slice(sent_, n));
  sent_ += n;
  started_ = true;
  if (part != nullptr) *part = n;
  return message;
}

FieldReader::FieldReader(const grpc::ByteBuffer& message) {
  (void)message.Dump(&slices_);
  // Empty slices would make done() lie; drop them.
  slices_.erase(std::remove_if(slices_.begin(), slices_.end(),
                               [](const grpc::Slice& s) { return s.size() == 0; }),
                slices_.end());
  for (const grpc::Slice& s : slices_) size_ += s.size();
}

bool FieldReader::ReadBytes(void* out, size_t length) {
  if (length > remaining()) return false;
  auto* dst = static_cast<std::byte*>(out);
  while (length > 0) {
    if (slice_ == slices_.size()) return false;
    const grpc::Slice& s = slices_[slice_];
    size_t n = std::min(length, s.size() - offset_);
    if (dst != nullptr) {
      std::memcpy(dst, s.begin() + offset_, n);
      dst += n;
    }
    offset_ += n;
    consumed_ += n;
    length -= n;
    if (offset_ == s.size()) ++slice_, offset_ = 0;
  }
  return true;
}

bool FieldReader::ReadVarint(uint64_t* value) {
  uint64_t result = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    uint8_t byte;
    if (!ReadBytes(&byte, 1)) return false;
    result |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if ((byte & 0x80) == 0) {
      *value = result;
      return true;
    }
  }
  return false;
}

bool FieldReader::NextField(uint32_t* field, uint32_t* wire_type) {
  uint64_t tag;
  if (!ReadVarint(&tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF) return false;
  *field = static_cast<uint32_t>(tag >> 3);
  *wire_type = static_cast<uint32_t>(tag & 7);
  return true;
}

bool FieldReader::ReadString(size_t length, std::string* out) {
  if (length > remaining()) return false;
  out->resize(length);
  return ReadBytes(out->data(), length);
}

bool FieldReader::SkipField(uint32_t wire_type) {
  uint64_t n;
  switch (wire_type) {
    case 0:
      return ReadVarint(&n);
    case 1:
      return ReadBytes(nullptr, 8);
    case 2:
      return ReadVarint(&n) && ReadBytes(nullptr, n);
    case 5:
      return ReadBytes(nullptr, 4);
    default:
      return false;
  }
}

}  // namespace chunkd::wire

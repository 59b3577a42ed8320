#include "buffer/cpu/buffer.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace chunkd::buffer::cpu {
namespace {
// A broken REQUIRES: is a bug in the caller; fail loudly rather than read out of bounds.
void Require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "chunkd::buffer: requirement failed: %s\n", what);
    std::abort();
  }
}
}  // namespace

Buffer::Buffer(std::shared_ptr<const Block> block)
    : data_(block ? block->data() : nullptr), size_(block ? block->size() : 0) {
  block_ = std::move(block);
}

Buffer Buffer::CopyOf(std::string_view bytes) {
  auto mutable_buffer = MutableBuffer::Allocate(bytes.size());
  Require(mutable_buffer.ok(), "heap allocation");  // the heap allocator throws instead
  if (!bytes.empty()) std::memcpy(mutable_buffer->data(), bytes.data(), bytes.size());
  return std::move(*mutable_buffer).Freeze();
}

Buffer Buffer::Slice(size_t offset, size_t length) const {
  Require(offset <= size_ && length <= size_ - offset, "Slice within the buffer");
  return Buffer(block_, data_ + offset, length);
}

std::optional<ShmLocation> Buffer::shm_location() const {
  if (!block_) return std::nullopt;
  auto location = block_->shm_location();
  if (location) location->offset += offset_in_block();
  return location;
}

absl::StatusOr<MutableBuffer> MutableBuffer::Allocate(size_t size, HostAllocator& allocator) {
  auto block = allocator.Allocate(size);
  if (!block.ok()) return block.status();
  return MutableBuffer(*std::move(block));
}

Buffer MutableBuffer::Freeze() && {
  return Buffer(std::shared_ptr<const Block>(std::move(block_)));
}

}  // namespace chunkd::buffer::cpu

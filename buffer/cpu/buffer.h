// Host chunk buffers: chunkd::buffer::cpu, in the spirit of zarr.buffer.cpu.
//
// A Buffer is an immutable view of bytes in host memory that shares ownership of the block it
// lives in: copying a Buffer or slicing it copies no bytes. A MutableBuffer is the writable
// stage before a buffer is published: fill it, then Freeze() it into a Buffer.
#ifndef CHUNKD_BUFFER_CPU_BUFFER_H_
#define CHUNKD_BUFFER_CPU_BUFFER_H_

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "buffer/memory.h"

namespace chunkd::buffer::cpu {

class Buffer {
 public:
  // An empty buffer (size 0).
  Buffer() = default;

  // Views all of `block`.
  explicit Buffer(std::shared_ptr<const Block> block);

  // A copy of `bytes` in heap memory.
  static Buffer CopyOf(std::string_view bytes);

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  std::string_view view() const { return {reinterpret_cast<const char*>(data_), size_}; }

  // A view of [offset, offset + length) of this buffer, sharing its block.
  // REQUIRES: offset + length <= size().
  Buffer Slice(size_t offset, size_t length) const;

  MemoryKind kind() const { return block_ ? block_->kind() : MemoryKind::kHost; }
  // The block this buffer views (null for an empty default buffer) and where in it.
  const std::shared_ptr<const Block>& block() const { return block_; }
  size_t offset_in_block() const {
    return block_ ? static_cast<size_t>(data_ - block_->data()) : 0;
  }

  // Shared-memory location of these bytes, when the buffer lives in a shared arena.
  std::optional<ShmLocation> shm_location() const;

 private:
  Buffer(std::shared_ptr<const Block> block, const std::byte* data, size_t size)
      : block_(std::move(block)), data_(data), size_(size) {}

  std::shared_ptr<const Block> block_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// A buffer being filled. Not thread-safe; one writer until Freeze().
class MutableBuffer {
 public:
  MutableBuffer() = default;
  explicit MutableBuffer(std::shared_ptr<Block> block) : block_(std::move(block)) {}

  // Allocates `size` bytes from `allocator` (uninitialized).
  static absl::StatusOr<MutableBuffer> Allocate(size_t size,
                                                HostAllocator& allocator = HeapAllocator());

  std::byte* data() const { return block_ ? block_->data() : nullptr; }
  size_t size() const { return block_ ? block_->size() : 0; }
  std::span<std::byte> bytes() const { return {data(), size()}; }

  // Publishes the bytes; this object is left empty.
  Buffer Freeze() &&;

 private:
  std::shared_ptr<Block> block_;
};

}  // namespace chunkd::buffer::cpu

#endif  // CHUNKD_BUFFER_CPU_BUFFER_H_

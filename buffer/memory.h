// Memory blocks shared by chunk buffers of every kind.
//
// A Block is one allocation (a heap block, a range of a shared-memory arena, a range of a
// device segment). Buffers view a byte range of a block and keep it alive through shared
// ownership, so a reader, a gRPC send or a lease can outlive the cache entry that made it.
#ifndef CHUNKD_BUFFER_MEMORY_H_
#define CHUNKD_BUFFER_MEMORY_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace chunkd::buffer {

enum class MemoryKind {
  kHost,        // ordinary process memory
  kHostShared,  // a range of a shared-memory segment another process on the host can map
  kHostPinned,  // page-locked host memory registered with CUDA
  kDevice,      // GPU memory
};

const char* MemoryKindName(MemoryKind kind);

// Where a block of shared host memory lives, so that a colocated process can map it.
struct ShmLocation {
  std::string segment;        // file name of the segment in the shared-memory directory
  uint64_t segment_size = 0;  // size of the whole segment
  uint64_t offset = 0;        // of the block within the segment
};

// One allocation. Thread-safe: a block's bytes are written once, before it is published, and
// only read afterwards.
class Block {
 public:
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  virtual ~Block() = default;

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  MemoryKind kind() const { return kind_; }

  // Set for kHostShared blocks.
  virtual std::optional<ShmLocation> shm_location() const { return std::nullopt; }

  // Pins: while a lease (a colocated reader mapping these bytes) holds the block, the cache
  // neither evicts it nor counts it as free. Thread-safe.
  void Pin() const { pins_.fetch_add(1, std::memory_order_relaxed); }
  void Unpin() const { pins_.fetch_sub(1, std::memory_order_release); }
  bool pinned() const { return pins_.load(std::memory_order_acquire) > 0; }

 protected:
  Block(std::byte* data, size_t size, MemoryKind kind) : data_(data), size_(size), kind_(kind) {}

 private:
  std::byte* const data_;
  const size_t size_;
  const MemoryKind kind_;
  mutable std::atomic<int> pins_{0};
};

// Hands out host blocks. The host cache and the backends allocate chunk memory through one of
// these, so that where chunk memory lives (heap, shared-memory arena, pinned) is one decision.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // Returns a block of exactly `size` bytes, uninitialized. RESOURCE_EXHAUSTED when the
  // allocator has no room. Thread-safe.
  virtual absl::StatusOr<std::shared_ptr<Block>> Allocate(size_t size) = 0;
  virtual MemoryKind kind() const = 0;
};

// The process heap (64-byte aligned). RESOURCE_EXHAUSTED when the heap cannot give the block
// (sizes no allocation can have included).
HostAllocator& HeapAllocator();

// Allocates from `primary` and, when it has no room (RESOURCE_EXHAUSTED), from the heap; so a
// full shared-memory directory makes chunks heap-backed (served inline) instead of failing.
class FallbackAllocator final : public HostAllocator {
 public:
  explicit FallbackAllocator(std::shared_ptr<HostAllocator> primary)
      : primary_(std::move(primary)) {}
  absl::StatusOr<std::shared_ptr<Block>> Allocate(size_t size) override;
  MemoryKind kind() const override { return primary_->kind(); }
  uint64_t fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<HostAllocator> primary_;
  std::atomic<uint64_t> fallbacks_{0};
};

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_MEMORY_H_

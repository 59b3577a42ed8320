#include "buffer/memory.h"

#include <cstdint>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace chunkd::buffer {

const char* MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kHostShared:
      return "host-shared";
    case MemoryKind::kHostPinned:
      return "host-pinned";
    case MemoryKind::kDevice:
      return "device";
  }
  return "unknown";
}

namespace {

constexpr size_t kAlignment = 64;

class HeapBlock final : public Block {
 public:
  HeapBlock(std::byte* data, size_t size) : Block(data, size, MemoryKind::kHost) {}
  ~HeapBlock() override { std::free(data()); }
};

class HeapAllocatorImpl final : public HostAllocator {
 public:
  absl::StatusOr<std::shared_ptr<Block>> Allocate(size_t size) override {
    // No allocation can hold more than PTRDIFF_MAX bytes; refusing those first also keeps the
    // rounding below from wrapping around (which made a tiny block for a huge size).
    if (size > static_cast<size_t>(PTRDIFF_MAX) - kAlignment) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", size, " bytes"));
    }
    // aligned_alloc wants a multiple of the alignment; a zero-byte block still gets a pointer.
    size_t rounded = (size + kAlignment - 1) / kAlignment * kAlignment;
    if (rounded == 0) rounded = kAlignment;
    void* p = std::aligned_alloc(kAlignment, rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("out of memory allocating ", size, " bytes"));
    }
    return std::make_shared<HeapBlock>(static_cast<std::byte*>(p), size);
  }
  MemoryKind kind() const override { return MemoryKind::kHost; }
};

}  // namespace

HostAllocator& HeapAllocator() {
  static HeapAllocatorImpl* allocator = new HeapAllocatorImpl();
  return *allocator;
}

absl::StatusOr<std::shared_ptr<Block>> FallbackAllocator::Allocate(size_t size) {
  auto block = primary_->Allocate(size);
  if (block.ok() || !absl::IsResourceExhausted(block.status())) return block;
  fallbacks_.fetch_add(1, std::memory_order_relaxed);
  return HeapAllocator().Allocate(size);
}

}  // namespace chunkd::buffer

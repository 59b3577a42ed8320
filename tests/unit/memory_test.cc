// Host memory blocks and allocators (buffer/memory.h).
#include "buffer/memory.h"

#include <cstdint>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"

namespace chunkd::buffer {
namespace {

TEST(HeapAllocatorTest, AllocatesAlignedBlocksOfTheSizeAsked) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{1} << 20}) {
    auto block = HeapAllocator().Allocate(size);
    ASSERT_TRUE(block.ok()) << block.status();
    EXPECT_EQ((*block)->size(), size);
    EXPECT_EQ(reinterpret_cast<uintptr_t>((*block)->data()) % 64, 0u);
    if (size > 0) std::memset((*block)->data(), 0xab, size);
  }
}

// A size that no allocation can have is an error, not a crash: rounding it up to the alignment
// used to wrap around to a tiny block that claimed the huge size.
TEST(HeapAllocatorTest, ImpossibleSizesAreRefused) {
  for (size_t size : {std::numeric_limits<size_t>::max(), std::numeric_limits<size_t>::max() - 3,
                      size_t{1} << 63}) {
    auto block = HeapAllocator().Allocate(size);
    ASSERT_FALSE(block.ok()) << size;
    EXPECT_EQ(block.status().code(), absl::StatusCode::kResourceExhausted);
  }
}

}  // namespace
}  // namespace chunkd::buffer

// Shared-memory arena (buffer/shm_arena.h): sizes no segment can hold.
#include "buffer/shm_arena.h"

#include <cstdint>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd::buffer {
namespace {

// A size near 2^64 is refused with RESOURCE_EXHAUSTED: rounding it up to a page used to wrap
// around to a zero-length extent, whose failed allocation was then used as an offset.
TEST(ShmArenaTest, ImpossibleSizesAreRefused) {
  testing::TempDir dir;
  ShmArenaOptions options;
  options.directory = dir.path();
  options.segment_bytes = 1 << 20;
  auto arena = ShmArena::Create(options);
  ASSERT_TRUE(arena.ok()) << arena.status();
  for (size_t size : {std::numeric_limits<size_t>::max(), std::numeric_limits<size_t>::max() - 4095,
                      std::numeric_limits<size_t>::max() - 4096, size_t{1} << 63}) {
    auto block = (*arena)->Allocate(size);
    ASSERT_FALSE(block.ok()) << size;
    EXPECT_EQ(block.status().code(), absl::StatusCode::kResourceExhausted) << block.status();
  }
  // The arena still works.
  auto block = (*arena)->Allocate(5000);
  ASSERT_TRUE(block.ok()) << block.status();
  std::memset((*block)->data(), 0x5a, 5000);
  EXPECT_EQ((*arena)->allocated_bytes(), 8192u);
}

}  // namespace
}  // namespace chunkd::buffer

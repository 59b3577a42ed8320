// Tests of server/common/crc32c.h against published CRC-32C check values (RFC 3720, B.4).
#include "server/common/crc32c.h"

#include <string>

#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c(""), 0u);
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
}

// Any split, at any alignment, gives the crc of the whole (the hardware path handles the
// unaligned head and the tail byte by byte).
TEST(Crc32cTest, ExtendEqualsWhole) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 131 + 7));
  for (size_t start = 0; start < 9; ++start) {
    const absl::string_view tail = absl::string_view(data).substr(start);
    const uint32_t whole = Crc32c(tail);
    for (size_t split : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{13}, tail.size()}) {
      uint32_t crc = Crc32cExtend(0, tail.data(), split);
      crc = Crc32cExtend(crc, tail.data() + split, tail.size() - split);
      EXPECT_EQ(crc, whole) << "start " << start << " split " << split;
    }
  }
}

}  // namespace
}  // namespace chunkd::server

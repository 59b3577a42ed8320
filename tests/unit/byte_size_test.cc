// Tests of server/common/byte_size.h: the byte count flag type.
#include "server/common/byte_size.h"

#include <cstdint>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using ::testing::HasSubstr;

uint64_t Parse(const std::string& text) {
  ByteSize size{12345};
  std::string error;
  EXPECT_TRUE(AbslParseFlag(text, &size, &error)) << text << ": " << error;
  EXPECT_TRUE(error.empty()) << text << ": " << error;
  return size.bytes;
}

TEST(ByteSizeTest, ParsesNumbersAndUnits) {
  EXPECT_EQ(Parse("0"), 0u);
  EXPECT_EQ(Parse("4096"), 4096u);
  EXPECT_EQ(Parse("64KiB"), 64u * 1024);
  EXPECT_EQ(Parse("1GiB"), 1ull << 30);
  EXPECT_EQ(Parse("1.5GiB"), 3ull << 29);
  EXPECT_EQ(Parse("512MiB"), 512ull << 20);
  EXPECT_EQ(Parse("2TiB"), 2ull << 40);
  EXPECT_EQ(Parse("10MB"), 10000000u);
  EXPECT_EQ(Parse("3kB"), 3000u);
  EXPECT_EQ(Parse("2GB"), 2000000000u);
  EXPECT_EQ(Parse("1k"), 1024u);
  EXPECT_EQ(Parse("1K"), 1024u);
  EXPECT_EQ(Parse("3M"), 3u << 20);
  EXPECT_EQ(Parse("1g"), 1ull << 30);
  EXPECT_EQ(Parse("100B"), 100u);
  EXPECT_EQ(Parse("1e9"), 1000000000u);
  EXPECT_EQ(Parse(" 8 MiB "), 8u << 20);
}

TEST(ByteSizeTest, RefusesBadInput) {
  for (const std::string bad :
       {"abc", "-1", "-1KiB", "1XB", "", "KiB", "1.2.3", "1 2", "GiB1", "99999999999TiB"}) {
    ByteSize size{777};
    std::string error;
    EXPECT_FALSE(AbslParseFlag(bad, &size, &error)) << "'" << bad << "' -> " << size.bytes;
    EXPECT_THAT(error, HasSubstr("not a byte size")) << bad;
    EXPECT_EQ(size.bytes, 777u) << "a refused value must leave the flag unchanged: " << bad;
  }
}

TEST(ByteSizeTest, UnparsePicksTheLargestExactUnit) {
  EXPECT_EQ(AbslUnparseFlag(ByteSize{0}), "0");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{1000}), "1000");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{4096}), "4KiB");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{64 << 10}), "64KiB");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{1ull << 30}), "1GiB");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{3ull << 29}), "1536MiB");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{5ull << 40}), "5TiB");
}

TEST(ByteSizeTest, RoundTrip) {
  for (uint64_t bytes : {0ull, 1ull, 1000ull, 1023ull, 1024ull, 4096ull, 10000000ull, 65536ull,
                         3ull << 29, 1ull << 30, 7ull << 40, (1ull << 40) + 1, 123456789ull}) {
    std::string text = AbslUnparseFlag(ByteSize{bytes});
    EXPECT_EQ(Parse(text), bytes) << text;
  }
  for (const std::string text : {"64KiB", "1GiB", "1.5GiB", "10MB", "1k"}) {
    uint64_t bytes = Parse(text);
    EXPECT_EQ(Parse(AbslUnparseFlag(ByteSize{bytes})), bytes) << text;
  }
}

TEST(ByteSizeTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.0 KiB");
  EXPECT_EQ(FormatBytes(3ull << 29), "1.5 GiB");
  EXPECT_EQ(FormatBytes(2ull << 40), "2.0 TiB");
}

}  // namespace
}  // namespace chunkd::server

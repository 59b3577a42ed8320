// Tests of proto/wire/byte_range.h: validation and Zarr's range semantics.
#include "server/common/byte_range.h"

#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using ::testing::HasSubstr;

void ExpectResolves(const ByteRange& range, uint64_t size, uint64_t start, uint64_t length) {
  ASSERT_TRUE(range.Validate().ok()) << range.ToString();
  ResolvedRange r = Resolve(range, size);
  EXPECT_EQ(r.start, start) << range.ToString() << " of " << size;
  EXPECT_EQ(r.length, length) << range.ToString() << " of " << size;
  EXPECT_LE(r.start + r.length, size) << range.ToString() << " of " << size;
}

TEST(ByteRangeTest, ValidAndInvalid) {
  EXPECT_TRUE(ByteRange::All().Validate().ok());
  EXPECT_TRUE(ByteRange::Bounded(0, 0).Validate().ok());
  EXPECT_TRUE(ByteRange::Bounded(5, 5).Validate().ok());
  EXPECT_TRUE(ByteRange::Bounded(0, 10).Validate().ok());
  EXPECT_TRUE(ByteRange::FromOffset(0).Validate().ok());
  EXPECT_TRUE(ByteRange::Suffix(0).Validate().ok());

  for (const ByteRange& bad :
       {ByteRange::Bounded(-1, 5), ByteRange::Bounded(0, -1), ByteRange::Bounded(-5, -1),
        ByteRange::Bounded(10, 5), ByteRange::Bounded(1, 0), ByteRange::FromOffset(-1),
        ByteRange::Suffix(-1), ByteRange::FromOffset(std::numeric_limits<int64_t>::min())}) {
    absl::Status s = bad.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad.ToString() << ": " << s;
    EXPECT_FALSE(s.message().empty());
  }
  EXPECT_THAT(std::string(ByteRange::Bounded(10, 5).Validate().message()),
              HasSubstr("ends before it starts"));
  EXPECT_THAT(std::string(ByteRange::Bounded(-1, 5).Validate().message()), HasSubstr("negative"));
  EXPECT_THAT(std::string(ByteRange::Suffix(-3).Validate().message()), HasSubstr("negative"));
}

TEST(ByteRangeTest, ToString) {
  EXPECT_EQ(ByteRange::All().ToString(), "all");
  EXPECT_EQ(ByteRange::Bounded(3, 7).ToString(), "[3, 7)");
  EXPECT_EQ(ByteRange::FromOffset(4).ToString(), "[4, end)");
  EXPECT_EQ(ByteRange::Suffix(9).ToString(), "last 9 bytes");
}

TEST(ByteRangeTest, ResolveWithinValue) {
  ExpectResolves(ByteRange::All(), 100, 0, 100);
  ExpectResolves(ByteRange::Bounded(10, 20), 100, 10, 10);
  ExpectResolves(ByteRange::Bounded(0, 100), 100, 0, 100);
  ExpectResolves(ByteRange::Bounded(7, 7), 100, 7, 0);
  ExpectResolves(ByteRange::FromOffset(30), 100, 30, 70);
  ExpectResolves(ByteRange::FromOffset(0), 100, 0, 100);
  ExpectResolves(ByteRange::Suffix(10), 100, 90, 10);
  ExpectResolves(ByteRange::Suffix(100), 100, 0, 100);
}

TEST(ByteRangeTest, ResolvePastTheEnd) {
  // A range that runs past the end returns what exists.
  ExpectResolves(ByteRange::Bounded(90, 200), 100, 90, 10);
  ExpectResolves(ByteRange::Bounded(0, std::numeric_limits<int64_t>::max()), 100, 0, 100);
  // Starting past the end: nothing.
  ExpectResolves(ByteRange::Bounded(150, 200), 100, 100, 0);
  ExpectResolves(ByteRange::Bounded(100, 100), 100, 100, 0);
  ExpectResolves(ByteRange::FromOffset(100), 100, 100, 0);
  ExpectResolves(ByteRange::FromOffset(1000), 100, 100, 0);
  ExpectResolves(ByteRange::FromOffset(std::numeric_limits<int64_t>::max()), 100, 100, 0);
  // A suffix longer than the value selects all of it; suffix 0 selects nothing.
  ExpectResolves(ByteRange::Suffix(1000), 100, 0, 100);
  ExpectResolves(ByteRange::Suffix(std::numeric_limits<int64_t>::max()), 100, 0, 100);
  ExpectResolves(ByteRange::Suffix(0), 100, 100, 0);
}

TEST(ByteRangeTest, ResolveOnEmptyValue) {
  ExpectResolves(ByteRange::All(), 0, 0, 0);
  ExpectResolves(ByteRange::Bounded(0, 0), 0, 0, 0);
  ExpectResolves(ByteRange::Bounded(0, 10), 0, 0, 0);
  ExpectResolves(ByteRange::Bounded(5, 10), 0, 0, 0);
  ExpectResolves(ByteRange::FromOffset(0), 0, 0, 0);
  ExpectResolves(ByteRange::FromOffset(3), 0, 0, 0);
  ExpectResolves(ByteRange::Suffix(0), 0, 0, 0);
  ExpectResolves(ByteRange::Suffix(5), 0, 0, 0);
}

TEST(ByteRangeTest, ResolveHugeValue) {
  const uint64_t size = 1ull << 40;
  ExpectResolves(ByteRange::Suffix(1), size, size - 1, 1);
  ExpectResolves(ByteRange::Bounded(size - 10, size + 10), size, size - 10, 10);
}

// TensorStore's rule: a range must lie within the value.
TEST(ByteRangeTest, ResolveWithinRequiresTheRangeInsideTheValue) {
  auto within = [](const ByteRange& range, uint64_t size) { return ResolveWithin(range, size); };
  EXPECT_EQ(within(ByteRange::All(), 10)->length, 10u);
  EXPECT_EQ(within(ByteRange::Bounded(1, 3), 10)->start, 1u);
  EXPECT_EQ(within(ByteRange::Bounded(1, 3), 10)->length, 2u);
  EXPECT_EQ(within(ByteRange::Bounded(10, 10), 10)->length, 0u);
  EXPECT_EQ(within(ByteRange::FromOffset(10), 10)->length, 0u);
  EXPECT_EQ(within(ByteRange::Suffix(10), 10)->start, 0u);
  EXPECT_EQ(within(ByteRange::Suffix(0), 10)->start, 10u);
  EXPECT_EQ(within(ByteRange::All(), 0)->length, 0u);
  for (const ByteRange& range : {ByteRange::Bounded(1, 11), ByteRange::Bounded(11, 12),
                                 ByteRange::FromOffset(11), ByteRange::Suffix(11)}) {
    absl::StatusOr<ResolvedRange> r = within(range, 10);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange) << range.ToString();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("10 bytes"));
  }
  EXPECT_EQ(within(ByteRange::Suffix(std::numeric_limits<int64_t>::max()), 10).status().code(),
            absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace chunkd::server

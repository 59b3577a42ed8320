// Tests of server/services/service_core.h: the read and write rules every service applies.
#include "server/services/service_core.h"

#include <map>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/backend/memory/memory_backend.h"

namespace chunkd::server {
namespace {

CachedValue Value(const std::string& bytes, Generation g) {
  return CachedValue{buffer::cpu::Buffer::CopyOf(bytes), g};
}

TEST(SliceForReadTest, ConditionsComeBeforeTheRange) {
  CachedValue v = Value("0123456789", 5);
  Conditions wrong;
  wrong.if_generation_match = 6;
  // A range past the end does not hide a failed condition.
  for (RangeRule rule : {RangeRule::kClip, RangeRule::kWithin}) {
    auto slice = SliceForRead(v, "k", ByteRange::FromOffset(20), wrong, rule);
    EXPECT_EQ(slice.status().code(), absl::StatusCode::kFailedPrecondition) << slice.status();
  }
}

TEST(SliceForReadTest, ClipOrRequireWithin) {
  CachedValue v = Value("0123456789", 5);
  auto clipped = SliceForRead(v, "k", ByteRange::Bounded(8, 20), {}, RangeRule::kClip);
  ASSERT_TRUE(clipped.ok()) << clipped.status();
  EXPECT_EQ(clipped->bytes.view(), "89");
  EXPECT_EQ(clipped->start, 8u);
  EXPECT_EQ(clipped->total_size, 10u);
  EXPECT_EQ(clipped->generation, 5u);
  auto refused = SliceForRead(v, "arr/k", ByteRange::Bounded(8, 20), {}, RangeRule::kWithin);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "\"arr/k\"")) << refused.status();
  auto within = SliceForRead(v, "k", ByteRange::Suffix(3), {}, RangeRule::kWithin);
  ASSERT_TRUE(within.ok());
  EXPECT_EQ(within->bytes.view(), "789");
  // The slice refers to the cached bytes: no copy.
  EXPECT_EQ(within->bytes.data(), v.value.data() + 7);
}

class ServiceCoreTest : public ::testing::Test {
 protected:
  ServiceCore& Core(ServiceOptions options) {
    store_ = std::make_unique<ChunkStore>(NewMemoryBackend(BackendOptions{}), ChunkStoreOptions{});
    core_ = std::make_unique<ServiceCore>(store_.get(), options);
    return *core_;
  }
  std::unique_ptr<ChunkStore> store_;
  std::unique_ptr<ServiceCore> core_;
};

TEST_F(ServiceCoreTest, WriteChecks) {
  ServiceOptions options;
  options.read_only = true;
  options.max_value_bytes = 100;
  ServiceCore& core = Core(options);
  absl::Status s = core.CheckWritable("deletes");
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StrContains(s.message(), "deletes are refused")) << s;
  EXPECT_TRUE(core.CheckValueSize("k", 100).ok());
  s = core.CheckValueSize("k", 101);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(s.message(), "--max_value_bytes")) << s;
}

TEST_F(ServiceCoreTest, PutBudgetIsSharedAndAlwaysAdmitsOneWrite) {
  ServiceOptions options;
  options.max_inflight_put_bytes = 100;
  ServiceCore& core = Core(options);
  EXPECT_TRUE(core.ReservePutBytes(60));
  EXPECT_FALSE(core.ReservePutBytes(60));
  core.ReleasePutBytes(60);
  // Alone, a write larger than the budget still goes (it is bounded by max_value_bytes)...
  EXPECT_TRUE(core.ReservePutBytes(500));
  core.ReleasePutBytes(500);
  // ... also when it reserves part by part.
  EXPECT_TRUE(core.ReservePutBytes(80));
  EXPECT_TRUE(core.ReservePutBytes(80, /*held=*/80));
  EXPECT_TRUE(core.ReservePutBytes(80, /*held=*/160));
  // Not while another write holds some: 240 held by the first, 10 by another.
  EXPECT_FALSE(core.ReservePutBytes(10));
  core.ReleasePutBytes(240);
  EXPECT_TRUE(core.ReservePutBytes(10));
  EXPECT_FALSE(core.ReservePutBytes(100, /*held=*/0));
  core.ReleasePutBytes(10);
}

TEST_F(ServiceCoreTest, CountersOfEveryServiceExportUnderTheirPrefix) {
  ServiceCore& core = Core(ServiceOptions{});
  CallCounters a, b;
  core.AddCounters("", &a);
  core.AddCounters("tensorstore_", &b);
  a.gets = 3;
  b.puts = 2;
  std::map<std::string, uint64_t> out;
  core.ExportCounters([&](const std::string& name, uint64_t v) { out[name] = v; });
  EXPECT_EQ(out["gets"], 3u);
  EXPECT_EQ(out["tensorstore_puts"], 2u);
  EXPECT_EQ(out["tensorstore_gets"], 0u);
  EXPECT_EQ(out.size(), 14u);
}

TEST_F(ServiceCoreTest, SubmittedWritesAndDeletesAreCounted) {
  ServiceCore& core = Core(ServiceOptions{});
  CallCounters counters;
  absl::Notification wrote;
  core.SubmitWrite("k", buffer::cpu::Buffer::CopyOf("abc"), {}, &counters,
                   [&](absl::StatusOr<ValueInfo> info) {
                     EXPECT_TRUE(info.ok()) << info.status();
                     wrote.Notify();
                   });
  wrote.WaitForNotification();
  EXPECT_EQ(counters.puts.load(), 1u);
  EXPECT_EQ(counters.bytes_written.load(), 3u);
  absl::Notification deleted;
  core.SubmitDelete("k", {}, &counters, [&](absl::Status s) {
    EXPECT_TRUE(s.ok()) << s;
    deleted.Notify();
  });
  deleted.WaitForNotification();
  absl::Notification missing;
  core.SubmitDelete("k", {}, &counters, [&](absl::Status s) {
    EXPECT_TRUE(absl::IsNotFound(s)) << s;
    missing.Notify();
  });
  missing.WaitForNotification();
  EXPECT_EQ(counters.deletes.load(), 1u);
}

}  // namespace
}  // namespace chunkd::server

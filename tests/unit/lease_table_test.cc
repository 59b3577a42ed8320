// The lease table's caps on pinned memory: all holders together, one holder, per tier and GPU.
#include "server/store/lease_table.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "buffer/gpu/buffer.h"
#include "buffer/gpu/host_standin.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;

buffer::cpu::Buffer HostValue(size_t size) {
  return buffer::cpu::Buffer::CopyOf(std::string(size, 'v'));
}

LeaseTableOptions Capped(uint64_t max, uint64_t per_holder) {
  LeaseTableOptions options;
  options.host = {max, per_holder, "--max_pinned_fraction=0.5 of --host_cache_bytes",
                  "--max_client_pinned_fraction=0.25 of --host_cache_bytes"};
  options.device = {max, per_holder, "device cap", "device client cap"};
  return options;
}

TEST(LeaseTableTest, OneHolderStopsAtItsCapAndOthersAtTheTotal) {
  LeaseTable leases(Capped(3 * kMiB, 2 * kMiB));
  std::vector<buffer::cpu::Buffer> values;
  for (int i = 0; i < 5; ++i) values.push_back(HostValue(kMiB));
  ASSERT_TRUE(leases.Grant("a", values[0]).ok());
  ASSERT_TRUE(leases.Grant("a", values[1]).ok());
  absl::StatusOr<uint64_t> third = leases.Grant("a", values[2]);
  ASSERT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.status().message(), HasSubstr("--max_client_pinned_fraction=0.25"));
  EXPECT_THAT(third.status().message(), HasSubstr("per client"));
  // Another holder still has room, up to the cap of everyone together.
  ASSERT_TRUE(leases.Grant("b", values[2]).ok());
  absl::StatusOr<uint64_t> fourth = leases.Grant("b", values[3]);
  ASSERT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(fourth.status().message(), HasSubstr("--max_pinned_fraction=0.5"));
  EXPECT_THAT(fourth.status().message(), HasSubstr("all clients"));

  LeaseStats s = leases.stats();
  EXPECT_EQ(s.active, 3u);
  EXPECT_EQ(s.host.pinned_bytes, 3 * kMiB);
  EXPECT_EQ(s.host.holders, 2u);
  EXPECT_EQ(s.host.max_bytes, 3 * kMiB);
  EXPECT_EQ(s.host.max_holder_bytes, 2 * kMiB);
  EXPECT_EQ(s.host.refused_holder, 1u);
  EXPECT_EQ(s.host.refused_total, 1u);
  EXPECT_EQ(s.device.pinned_bytes, 0u);
}

TEST(LeaseTableTest, ABlockCountsOnceAndInFullWhateverTheRange) {
  LeaseTable leases(Capped(2 * kMiB, 1 * kMiB));
  buffer::cpu::Buffer value = HostValue(kMiB);
  // A 100-byte range keeps the whole block alive: it counts the block's size.
  ASSERT_TRUE(leases.Grant("a", value.Slice(0, 100)).ok());
  EXPECT_EQ(leases.stats().host.pinned_bytes, kMiB);
  EXPECT_EQ(leases.stats().bytes, 100u);
  // More leases on the same block pin nothing more, for this holder or another: readers of one
  // hot chunk are never refused.
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(leases.Grant("a", value).ok());
    ASSERT_TRUE(leases.Grant(absl::StrCat("reader-", i), value).ok());
  }
  EXPECT_EQ(leases.stats().host.pinned_bytes, kMiB);
  EXPECT_EQ(leases.stats().host.holders, 11u);
  // "a" is at its cap: a second block is refused.
  EXPECT_EQ(leases.Grant("a", HostValue(kMiB)).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(LeaseTableTest, ReleasedAndExpiredLeasesGiveTheirRoomBack) {
  LeaseTableOptions options = Capped(2 * kMiB, 2 * kMiB);
  options.ttl = absl::Milliseconds(100);
  LeaseTable leases(options);
  buffer::cpu::Buffer a = HostValue(kMiB), b = HostValue(kMiB), c = HostValue(kMiB);
  uint64_t a1 = *leases.Grant("x", a);
  uint64_t a2 = *leases.Grant("x", a);
  ASSERT_TRUE(leases.Grant("x", b).ok());
  ASSERT_FALSE(leases.Grant("x", c).ok());
  // One of a's two leases going frees nothing; the second frees a's megabyte.
  leases.Release({a1});
  EXPECT_EQ(leases.stats().host.pinned_bytes, 2 * kMiB);
  ASSERT_FALSE(leases.Grant("x", c).ok());
  leases.Release({a2});
  EXPECT_EQ(leases.stats().host.pinned_bytes, kMiB);
  ASSERT_TRUE(leases.Grant("x", c).ok());
  // A holder that stops renewing (a client that died) gets everything back within the TTL.
  absl::SleepFor(absl::Milliseconds(150));
  leases.ExpireNow();
  LeaseStats s = leases.stats();
  EXPECT_EQ(s.active, 0u);
  EXPECT_EQ(s.host.pinned_bytes, 0u);
  EXPECT_EQ(s.host.holders, 0u);
  EXPECT_EQ(s.bytes, 0u);
  EXPECT_FALSE(a.block()->pinned());
}

// One holder asking for the same small value over and over takes one lease per item: its
// count is capped per holder, so the others keep their shared memory.
TEST(LeaseTableTest, OneHolderStopsAtItsLeaseCountAndOthersGoOn) {
  LeaseTableOptions options;
  options.max_holder_leases = 4;
  LeaseTable leases(options);
  buffer::cpu::Buffer small = HostValue(4096);
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(*leases.Grant("greedy", small));
  absl::StatusOr<uint64_t> fifth = leases.Grant("greedy", small);
  ASSERT_EQ(fifth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(fifth.status().message(), HasSubstr("the most one client may hold"));
  EXPECT_TRUE(leases.Grant("other", small).ok());
  EXPECT_EQ(leases.stats().refused_count, 1u);
  // Released leases make room again.
  leases.Release({ids[0]});
  EXPECT_TRUE(leases.Grant("greedy", small).ok());
}

// A lease that follows a process the server watches does not expire while the process lives,
// however long it goes unrenewed; once the process has gone, its TTL runs.
TEST(LeaseTableTest, ProcessBoundLeasesLiveAsLongAsTheirProcess) {
  LeaseTableOptions options;
  options.ttl = absl::Milliseconds(100);
  LeaseTable leases(options);
  buffer::cpu::Buffer value = HostValue(4096);
  auto life = std::make_shared<ProcessLife>(1234);
  uint64_t bound = *leases.Grant(LeaseHolder{"unix:pid=1234", life}, value);
  uint64_t plain = *leases.Grant("ipv4:127.0.0.1:1", value);
  absl::SleepFor(absl::Milliseconds(300));
  leases.ExpireNow();
  EXPECT_EQ(leases.stats().active, 1u);
  EXPECT_EQ(leases.stats().process_bound, 1u);
  EXPECT_EQ(leases.Renew({bound, plain}), std::vector<uint64_t>{plain});
  EXPECT_TRUE(value.block()->pinned());
  life->MarkExited();
  leases.ExpireNow();  // the TTL counts from now
  EXPECT_EQ(leases.stats().active, 1u);
  absl::SleepFor(absl::Milliseconds(150));
  leases.ExpireNow();
  EXPECT_EQ(leases.stats().active, 0u);
  EXPECT_EQ(leases.stats().process_bound, 0u);
  EXPECT_FALSE(value.block()->pinned());
}

// A process asking again for a block it holds gets the same lease, counted once more: repeats
// take no room. TTL leases are not shared.
TEST(LeaseTableTest, AProcessAskingForABlockAgainSharesItsLease) {
  LeaseTableOptions options;
  options.max_holder_leases = 2;
  LeaseTable leases(options);
  buffer::cpu::Buffer small = HostValue(4096), other = HostValue(4096);
  auto life = std::make_shared<ProcessLife>(42);
  LeaseHolder holder{"unix:pid=42", life};
  uint64_t first = *leases.Grant(holder, small);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(*leases.Grant(holder, small), first);
  EXPECT_EQ(leases.stats().active, 1u);
  EXPECT_TRUE(leases.Grant(holder, other).ok());  // a second block: a second lease
  // TTL leases of the same block stay apart.
  EXPECT_NE(*leases.Grant("tcp", small), *leases.Grant("tcp", small));
  EXPECT_EQ(leases.stats().active, 4u);
  // Each release takes one grant back; the last frees the lease.
  std::vector<uint64_t> ids(100, first);
  EXPECT_TRUE(leases.Release(ids).empty());
  EXPECT_EQ(leases.stats().active, 4u);
  EXPECT_TRUE(leases.Release({first}).empty());
  EXPECT_EQ(leases.stats().active, 3u);
  EXPECT_EQ(leases.Release({first}), std::vector<uint64_t>{first});
}

// A lease granted `until_renewed` (a reply still being sent) has no TTL until the call renews
// it at its end: a long GetMany cannot let its first leases lapse before the client sees them.
TEST(LeaseTableTest, UntilRenewedLeasesStartTheirTtlAtTheFirstRenewal) {
  LeaseTableOptions options;
  options.ttl = absl::Milliseconds(100);
  LeaseTable leases(options);
  buffer::cpu::Buffer value = HostValue(4096);
  uint64_t id = *leases.Grant(LeaseHolder{"x", nullptr}, value, /*until_renewed=*/true);
  absl::SleepFor(absl::Milliseconds(250));
  leases.ExpireNow();
  EXPECT_EQ(leases.stats().active, 1u);
  EXPECT_TRUE(leases.Renew({id}).empty());
  absl::SleepFor(absl::Milliseconds(150));
  leases.ExpireNow();
  EXPECT_EQ(leases.stats().active, 0u);
}

TEST(LeaseTableTest, EachGpuHasItsOwnCapsApartFromHostMemory) {
  auto api = buffer::gpu::NewHostStandInDeviceApi(2);
  LeaseTable leases(Capped(2 * kMiB, 2 * kMiB));
  auto block = [&](int device) {
    auto b = buffer::gpu::AllocateDeviceBlock(*api, device, kMiB);
    EXPECT_TRUE(b.ok()) << b.status();
    return std::shared_ptr<const buffer::Block>(*std::move(b));
  };
  std::vector<std::shared_ptr<const buffer::Block>> blocks;
  for (int i = 0; i < 6; ++i) blocks.push_back(block(i % 2));
  // Two megabytes on each GPU (blocks 0, 2 on GPU 0; 1, 3 on GPU 1), then GPU 0 is full.
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(leases.Grant("g", blocks[i], kMiB).ok()) << i;
  absl::StatusOr<uint64_t> refused = leases.Grant("g", blocks[4], kMiB);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("GPU memory"));
  // Host memory is a pool of its own.
  ASSERT_TRUE(leases.Grant("g", HostValue(kMiB)).ok());
  LeaseStats s = leases.stats();
  EXPECT_EQ(s.device.pinned_bytes, 4 * kMiB);
  EXPECT_EQ(s.device.max_bytes, 2 * kMiB);  // per GPU
  EXPECT_EQ(s.device.refused_total + s.device.refused_holder, 1u);
  EXPECT_EQ(s.host.pinned_bytes, kMiB);
}

TEST(LeaseTableTest, NoCapsByDefault) {
  LeaseTable leases(LeaseTableOptions{});
  std::vector<buffer::cpu::Buffer> values;
  for (int i = 0; i < 64; ++i) {
    values.push_back(HostValue(kMiB));
    ASSERT_TRUE(leases.Grant("one", values.back()).ok());
  }
  EXPECT_EQ(leases.stats().host.pinned_bytes, 64 * kMiB);
}

}  // namespace
}  // namespace chunkd::server

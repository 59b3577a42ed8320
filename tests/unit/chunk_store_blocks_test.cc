// Tests of the block path of server/store/chunk_store.h: ranges read only the blocks they
// cover, single flight per block, one version per read, read-ahead, values larger than the
// cache, and the read budget.
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "server/backend/memory/memory_backend.h"
#include "server/common/byte_range.h"
#include "server/store/chunk_store.h"
#include "tests/unit/forwarding_backend.h"
#include "tests/unit/hold_gate.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;

constexpr uint64_t kBlock = 64 << 10;

// A memory backend seen as a remote store: every ranged read is counted (calls and bytes) and
// can be held, or preceded by a change of the stored value (a writer behind chunkd's back).
class RangeCountingBackend final : public testing::ForwardingBackend {
 public:
  RangeCountingBackend() : ForwardingBackend(NewMemoryBackend(BackendOptions{})) {}

  absl::StatusOr<Buffer> Read(absl::string_view key, ValueInfo* info) override {
    whole_reads_.fetch_add(1);
    return inner_->Read(key, info);
  }
  absl::StatusOr<Buffer> ReadRange(absl::string_view key, uint64_t offset, uint64_t length,
                                   ValueInfo* info) override {
    auto serial = Enter();
    auto result = inner_->ReadRange(key, offset, length, info);
    Count(result);
    return result;
  }
  absl::StatusOr<Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                    ValueInfo* info) override {
    auto serial = Enter();
    auto result = inner_->ReadSuffix(key, length, info);
    Count(result);
    return result;
  }
  absl::StatusOr<Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset, uint64_t length,
                                          const ValueInfo& expected, ValueInfo* info) override {
    auto serial = Enter();
    auto result = inner_->ReadRangeIfMatch(key, offset, length, expected, info);
    Count(result);
    return result;
  }

  // Runs before every ranged read (on the I/O thread).
  void BeforeEachRead(std::function<void()> hook) {
    absl::MutexLock lock(&mu_);
    hook_ = std::move(hook);
  }
  void Hold() { gate_.Hold(); }
  void Release() { gate_.Release(); }
  void AwaitEntered(int n) { gate_.AwaitEntered(n); }
  int reads() const { return reads_.load(); }
  int whole_reads() const { return whole_reads_.load(); }
  uint64_t bytes() const { return bytes_.load(); }

  Generation Put(const std::string& key, const std::string& value) {
    auto info = inner_->Write(key, Buffer::CopyOf(value), {});
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->generation : 0;
  }

 private:
  // Waits while reads are held, then runs the hook. With a hook, the read that follows runs
  // under the returned lock: each read sees the version its own hook wrote.
  std::unique_ptr<absl::MutexLock> Enter() {
    gate_.Pass();
    std::function<void()> hook;
    {
      absl::MutexLock lock(&mu_);
      hook = hook_;
    }
    if (!hook) return nullptr;
    auto serial = std::make_unique<absl::MutexLock>(&serial_);
    hook();
    return serial;
  }
  void Count(const absl::StatusOr<Buffer>& result) {
    reads_.fetch_add(1);
    if (result.ok()) bytes_.fetch_add(result->size());
  }

  std::atomic<int> reads_{0}, whole_reads_{0};
  std::atomic<uint64_t> bytes_{0};
  testing::HoldGate gate_;
  absl::Mutex mu_;
  std::function<void()> hook_ ABSL_GUARDED_BY(mu_);
  absl::Mutex serial_;
};

ChunkStoreOptions BlockOptions() {
  ChunkStoreOptions o;
  o.cache.capacity_bytes = 64 << 20;
  o.io_threads = 4;
  o.block_bytes = kBlock;
  o.read_ahead_blocks = 4;  // whole reads up to 256 KiB in one request
  return o;
}

struct Fixture {
  explicit Fixture(ChunkStoreOptions options = BlockOptions()) {
    auto owned = std::make_unique<RangeCountingBackend>();
    backend = owned.get();
    store = std::make_unique<ChunkStore>(std::move(owned), options);
  }
  RangeCountingBackend* backend;
  std::unique_ptr<ChunkStore> store;
};

// A value whose every byte says where it is (and which version it belongs to).
std::string Pattern(size_t size, char version) {
  std::string s(size, version);
  for (size_t i = 0; i < size; i += 997) s[i] = static_cast<char>('0' + (i / 997) % 10);
  return s;
}

// The bytes [start, start + length) of the value from a read's answer (a whole value is
// answered whole, a part of one from its offset).
std::string_view RangeOf(const CachedValue& v, uint64_t start, uint64_t length) {
  EXPECT_LE(v.offset, start);
  return v.value.view().substr(start - v.offset, length);
}

ReadOptions Any() {
  ReadOptions o;
  o.validated_since = absl::InfinitePast();
  return o;
}

TEST(ChunkStoreBlocksTest, ARangeReadsOnlyTheBlocksItCovers) {
  Fixture f;
  const std::string value = Pattern(4 << 20, 'a');
  f.backend->Put("shard", value);
  auto got = f.store->ReadAndWait("shard", Any(), ByteRange::Bounded(100 << 10, 200 << 10));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->offset, 100u << 10);
  EXPECT_EQ(got->size(), value.size());
  EXPECT_TRUE(got->value.view() == value.substr(100 << 10, 100 << 10));
  // Blocks 1 to 3 (64 KiB each), in one request: not the 4 MiB value.
  EXPECT_EQ(f.backend->reads(), 1);
  EXPECT_EQ(f.backend->bytes(), 3 * kBlock);
  EXPECT_EQ(f.backend->whole_reads(), 0);
  // Again, and a range inside those blocks: from the cache.
  auto again = f.store->ReadAndWait("shard", Any(), ByteRange::Bounded(130 << 10, 140 << 10));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->value.view() == value.substr(130 << 10, 10 << 10));
  EXPECT_EQ(f.backend->reads(), 1);
  EXPECT_EQ(f.store->counters().blocks_read, 3u);
}

TEST(ChunkStoreBlocksTest, ASuffixIsOneRequestAndCachesTheLastBlocks) {
  Fixture f;
  const std::string value = Pattern((4 << 20) + 1000, 'a');
  f.backend->Put("shard", value);
  // Zarr's shard index: the last 16 * n + 4 bytes.
  auto index = f.store->ReadAndWait("shard", Any(), ByteRange::Suffix(1028));
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_TRUE(index->value.view() == value.substr(value.size() - 1028));
  EXPECT_EQ(f.backend->reads(), 1);
  EXPECT_LE(f.backend->bytes(), 3 * kBlock);
  // The index again, and the bytes just before it: no request.
  ASSERT_TRUE(f.store->ReadAndWait("shard", Any(), ByteRange::Suffix(1028)).ok());
  auto before = f.store->ReadAndWait("shard", Any(),
                                     ByteRange::Bounded(value.size() - 5000, value.size() - 1028));
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_TRUE(before->value.view() == value.substr(value.size() - 5000, 5000 - 1028));
  EXPECT_EQ(f.backend->reads(), 1);
}

TEST(ChunkStoreBlocksTest, ConcurrentReadersOfOneBlockReadItOnce) {
  Fixture f;
  const std::string value = Pattern(2 << 20, 'a');
  f.backend->Put("shard", value);
  ASSERT_TRUE(f.store->ReadAndWait("shard", Any(), ByteRange::Suffix(10)).ok());
  const int before = f.backend->reads();
  f.backend->Hold();
  constexpr int kReaders = 16;
  std::vector<absl::StatusOr<CachedValue>> results(kReaders);
  std::atomic<int> done{0};
  for (int i = 0; i < kReaders; ++i) {
    // Different ranges, all within block 5.
    uint64_t start = 5 * kBlock + i * 100;
    f.store->Read("shard", ByteRange::Bounded(start, start + 1000), Any(),
                  [&, i](absl::StatusOr<CachedValue> r) {
                    results[i] = std::move(r);
                    done.fetch_add(1);
                  });
  }
  f.backend->AwaitEntered(before + 1);
  f.backend->Release();
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (done.load() < kReaders && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(done.load(), kReaders);
  for (int i = 0; i < kReaders; ++i) {
    ASSERT_TRUE(results[i].ok()) << results[i].status();
    EXPECT_TRUE(results[i]->value.view() == value.substr(5 * kBlock + i * 100, 1000));
  }
  EXPECT_EQ(f.backend->reads(), before + 1);
  EXPECT_EQ(f.store->counters().single_flight_joins, kReaders - 1u);
}

TEST(ChunkStoreBlocksTest, AValueChangedBetweenTwoBlocksIsReadAgainAtTheNewVersion) {
  Fixture f;
  const std::string a = Pattern(1 << 20, 'a'), b = Pattern(1 << 20, 'b');
  Generation first = f.backend->Put("k", a);
  // Block 0 is cached at version a.
  ASSERT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, 10)).ok());
  // The store changes before the next block is read.
  Generation second = f.backend->Put("k", b);
  ASSERT_NE(first, second);
  auto got = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(1000, 3 * kBlock));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->generation, second);
  EXPECT_TRUE(got->value.view() == b.substr(1000, 3 * kBlock - 1000));  // never a mix
  EXPECT_GE(f.store->counters().changed_during_read, 1u);
  // And from then on the new version, from the cache.
  auto again = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, 10));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->value.view() == b.substr(0, 10));
}

TEST(ChunkStoreBlocksTest, AValueThatKeepsChangingFailsWithAbortedNeverMixed) {
  Fixture f;
  f.backend->Put("k", Pattern(2 << 20, 'a'));
  ASSERT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, 10)).ok());
  std::atomic<int> version{0};
  f.backend->BeforeEachRead([&] {
    f.backend->Put("k", Pattern(2 << 20, static_cast<char>('c' + version.fetch_add(1) % 20)));
  });
  // 20 blocks: more than one request (16 blocks at most), each finding another version.
  auto got = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, 20 * kBlock));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kAborted) << got.status();
  EXPECT_NE(got.status().message().find("changed"), std::string::npos) << got.status();
}

TEST(ChunkStoreBlocksTest, AWriteThroughTheStoreRetiresTheOldBlocks) {
  Fixture f;
  f.backend->Put("k", Pattern(1 << 20, 'a'));
  ASSERT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, 3 * kBlock)).ok());
  const std::string b = Pattern(1 << 20, 'b');
  ASSERT_TRUE(f.store->Write("k", Buffer::CopyOf(b), {}).ok());
  auto got = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(10, 2 * kBlock));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(RangeOf(*got, 10, 2 * kBlock - 10) == b.substr(10, 2 * kBlock - 10));
}

TEST(ChunkStoreBlocksTest, AChangeBehindTheStoresBackIsFoundByValidation) {
  ChunkStoreOptions options = BlockOptions();
  options.freshness.revalidate_after = absl::ZeroDuration();
  Fixture f(options);
  f.backend->Put("k", Pattern(1 << 20, 'a'));
  ASSERT_TRUE(f.store->ReadAndWait("k", ReadOptions(), ByteRange::Bounded(0, kBlock)).ok());
  const std::string b = Pattern(1 << 20, 'b');
  f.backend->Put("k", b);
  auto got = f.store->ReadAndWait("k", ReadOptions(), ByteRange::Bounded(0, kBlock));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->value.view() == b.substr(0, kBlock));
  EXPECT_GE(f.store->counters().stale_invalidations, 1u);
}

TEST(ChunkStoreBlocksTest, AValueLargerThanTheCacheReadsWholeAndByRange) {
  ChunkStoreOptions options = BlockOptions();
  options.cache.capacity_bytes = 1 << 20;
  Fixture f(options);
  const std::string value = Pattern(8 << 20, 'a');
  f.backend->Put("big", value);
  // Whole, in one answer (joined from blocks under the read budget).
  auto whole = f.store->ReadAndWait("big", Any());
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_TRUE(whole->value.view() == value);
  EXPECT_EQ(f.store->read_budget().held_bytes, value.size());
  whole = absl::UnknownError("dropped");
  EXPECT_EQ(f.store->read_budget().held_bytes, 0u);
  // Whole, piece by piece as Get streams it: each piece of the first one's version.
  ReadOptions piecewise = Any();
  piecewise.max_extent_bytes = f.store->whole_read_bytes();
  std::string streamed;
  auto first = f.store->ReadAndWait("big", piecewise);
  ASSERT_TRUE(first.ok()) << first.status();
  streamed.append(first->value.view());
  piecewise.if_generation = first->generation;
  piecewise.max_extent_bytes = f.store->block_bytes();
  while (streamed.size() < value.size()) {
    auto piece =
        f.store->ReadAndWait("big", piecewise, ByteRange::Bounded(streamed.size(), value.size()));
    ASSERT_TRUE(piece.ok()) << piece.status();
    ASSERT_EQ(piece->offset, streamed.size());
    ASSERT_LE(piece->value.size(), kBlock);
    streamed.append(piece->value.view());
  }
  EXPECT_TRUE(streamed == value);
  // The first part was joined from blocks (held until dropped); the pieces after it were
  // views of cached blocks.
  EXPECT_EQ(f.store->read_budget().held_bytes, first->value.size());
  first = absl::UnknownError("dropped");
  EXPECT_EQ(f.store->read_budget().held_bytes, 0u);
  // By range.
  auto range = f.store->ReadAndWait("big", Any(), ByteRange::Bounded(5 << 20, (5 << 20) + 100));
  ASSERT_TRUE(range.ok());
  EXPECT_TRUE(range->value.view() == value.substr(5 << 20, 100));
  EXPECT_LE(f.store->cache()->stats().used_bytes, 1u << 20);
}

TEST(ChunkStoreBlocksTest, ASequentialReaderGetsTheNextBlocksAhead) {
  Fixture f;
  const std::string value = Pattern(2 << 20, 'a');
  f.backend->Put("k", value);
  ASSERT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(0, kBlock)).ok());
  ASSERT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(kBlock, 2 * kBlock)).ok());
  EXPECT_EQ(f.store->counters().read_ahead_blocks, 4u);  // blocks 2 to 5
  // They arrive in the cache without anyone asking.
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (f.store->counters().blocks_read < 6 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  const int reads = f.backend->reads();
  auto ahead = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(2 * kBlock, 6 * kBlock - 1));
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_TRUE(ahead->value.view() == value.substr(2 * kBlock, 4 * kBlock - 1));
  // Its blocks were there; the one request since fetches the next ones ahead (6 to 9).
  EXPECT_EQ(f.store->counters().read_ahead_blocks, 8u);
  while (f.store->counters().blocks_read < 10 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(f.backend->reads(), reads + 1);
}

TEST(ChunkStoreBlocksTest, TheReadBudgetRefusesPastItAndIsGivenBack) {
  ChunkStoreOptions options = BlockOptions();
  options.read_budget_bytes = 1 << 20;
  Fixture f(options);
  f.backend->Put("k", Pattern(4 << 20, 'a'));
  // Ranges over several blocks are joined into one buffer under the budget.
  auto held = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(10, 800 << 10));
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(f.store->read_budget().held_bytes, (800u << 10) - 10);
  auto refused = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(20, 800 << 10));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("--read_budget_bytes"), std::string::npos);
  EXPECT_EQ(f.store->read_budget().refusals, 1u);
  // A range within one block is a view of it: no budget needed.
  EXPECT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(kBlock, 2 * kBlock)).ok());
  held = absl::UnknownError("dropped");
  EXPECT_EQ(f.store->read_budget().held_bytes, 0u);
  EXPECT_TRUE(f.store->ReadAndWait("k", Any(), ByteRange::Bounded(20, 800 << 10)).ok());
  EXPECT_GE(f.store->read_budget().peak_held_bytes, (800u << 10) - 20);
}

TEST(ChunkStoreBlocksTest, SmallValuesAreStillOneWholeRead) {
  Fixture f;
  const std::string value = Pattern(200 << 10, 'a');  // below whole_read_bytes (256 KiB)
  f.backend->Put("c/0", value);
  auto got = f.store->ReadAndWait("c/0", Any());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->whole());
  EXPECT_TRUE(got->value.view() == value);
  EXPECT_EQ(f.backend->reads(), 1);
  // A range of it afterwards is served from the whole entry.
  auto range = f.store->ReadAndWait("c/0", Any(), ByteRange::Bounded(100, 200));
  ASSERT_TRUE(range.ok());
  EXPECT_TRUE(range->whole());
  EXPECT_EQ(f.backend->reads(), 1);
}

TEST(ChunkStoreBlocksTest, RangesOfMissingKeysAreNotFound) {
  Fixture f;
  EXPECT_EQ(f.store->ReadAndWait("none", Any(), ByteRange::Bounded(0, 10)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->ReadAndWait("none", Any(), ByteRange::Suffix(10)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->ReadAndWait("none", Any(), ByteRange::FromOffset(10)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ChunkStoreBlocksTest, AnEmptyRangeAsksOnlyForTheSize) {
  Fixture f;
  f.backend->Put("k", Pattern(1 << 20, 'a'));
  auto empty = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(10, 10));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->value.size(), 0u);
  EXPECT_EQ(empty->size(), 1u << 20);
  EXPECT_EQ(f.backend->reads(), 0);  // a Stat, no bytes
}

TEST(ChunkStoreBlocksTest, RangesPastTheEndAreClipped) {
  Fixture f;
  const std::string value = Pattern(300 << 10, 'a');
  f.backend->Put("k", value);
  auto past = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(290 << 10, 400 << 10));
  ASSERT_TRUE(past.ok()) << past.status();
  EXPECT_TRUE(past->value.view() == value.substr(290 << 10));
  auto beyond = f.store->ReadAndWait("k", Any(), ByteRange::Bounded(500 << 10, 600 << 10));
  ASSERT_TRUE(beyond.ok()) << beyond.status();
  EXPECT_EQ(beyond->value.size(), 0u);
  EXPECT_EQ(beyond->size(), value.size());
  auto offset = f.store->ReadAndWait("k", Any(), ByteRange::FromOffset(100 << 10));
  ASSERT_TRUE(offset.ok()) << offset.status();
  EXPECT_TRUE(offset->value.view() == value.substr(100 << 10));
}

}  // namespace
}  // namespace chunkd::server

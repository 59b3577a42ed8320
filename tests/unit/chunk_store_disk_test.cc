// The chunk store over a real disk tier (server/store/disk_tier.h) and a store that validates
// as a remote one does: reads written behind, served from disk by a store that starts empty (a
// restart), once however many readers miss at once; a copy older than the read's bound
// confirmed with a conditional request (no bytes) or replaced; writes drop the tier's copy.
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "buffer/cpu/buffer.h"
#include "gtest/gtest.h"
#include "server/backend/memory/memory_backend.h"
#include "server/store/chunk_store.h"
#include "server/store/disk_tier.h"
#include "tests/support/test_support.h"
#include "tests/unit/forwarding_backend.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;

// A memory store that validates as a remote one (Backend's defaults: kRemote, 60 s), counting
// what it is asked.
class RemoteLikeBackend final : public testing::ForwardingBackend {
 public:
  RemoteLikeBackend() : ForwardingBackend(NewMemoryBackend(BackendOptions{})) {}
  absl::StatusOr<Buffer> ReadRange(absl::string_view key, uint64_t offset, uint64_t length,
                                   ValueInfo* info) override {
    reads.fetch_add(1);
    return inner_->ReadRange(key, offset, length, info);
  }
  absl::StatusOr<Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset, uint64_t length,
                                          const ValueInfo& expected, ValueInfo* info) override {
    reads.fetch_add(1);
    return inner_->ReadRangeIfMatch(key, offset, length, expected, info);
  }
  absl::StatusOr<Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                    ValueInfo* info) override {
    reads.fetch_add(1);
    return inner_->ReadSuffix(key, length, info);
  }
  // Conditional requests: a GET with the cached etag, or a HEAD.
  absl::StatusOr<std::optional<Buffer>> ReadIfChanged(absl::string_view key,
                                                      const ValueInfo& cached,
                                                      ValueInfo* info) override {
    conditional.fetch_add(1);
    return inner_->ReadIfChanged(key, cached, info);
  }
  absl::StatusOr<bool> IsCurrent(absl::string_view key, const ValueInfo& cached) override {
    conditional.fetch_add(1);
    return inner_->IsCurrent(key, cached);
  }
  std::atomic<int> reads{0}, conditional{0};
};

class ChunkStoreDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DiskTierOptions options;
    options.dir = dir_.Join("tier");
    options.capacity_bytes = 64 << 20;
    auto tier = DiskTier::Open(options, &buffer::HeapAllocator());
    ASSERT_TRUE(tier.ok()) << tier.status();
    tier_ = *std::move(tier);
    auto backend = std::make_unique<RemoteLikeBackend>();
    backend_ = backend.get();
    // The store of record outlives every ChunkStore of a test (a "restart" is a new store).
    shared_ = std::move(backend);
  }

  // A fresh store (an empty host cache) over the same backend and tier.
  std::unique_ptr<ChunkStore> NewStore() {
    ChunkStoreOptions options;
    options.cache.capacity_bytes = 16 << 20;
    options.io_threads = 4;
    options.disk = tier_.get();
    return std::make_unique<ChunkStore>(std::make_unique<Borrowed>(shared_.get()), options);
  }

  // Writes to the store of record behind chunkd's back.
  void StoreValue(const std::string& key, const std::string& bytes) {
    ASSERT_TRUE(backend_->inner().Write(key, Buffer::CopyOf(bytes), Conditions()).ok());
  }

  // Hands the shared backend to a ChunkStore without giving it away.
  class Borrowed final : public testing::ForwardingBackend {
   public:
    explicit Borrowed(Backend* backend) : ForwardingBackend(nullptr), backend_(backend) {}
    absl::string_view kind() const override { return "remote-like"; }
    std::string location() const override { return "test://"; }
    absl::StatusOr<Buffer> Read(absl::string_view key, ValueInfo* info) override {
      return backend_->Read(key, info);
    }
    absl::StatusOr<Buffer> ReadRange(absl::string_view key, uint64_t offset, uint64_t length,
                                     ValueInfo* info) override {
      return backend_->ReadRange(key, offset, length, info);
    }
    absl::StatusOr<Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                      ValueInfo* info) override {
      return backend_->ReadSuffix(key, length, info);
    }
    absl::StatusOr<Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset, uint64_t length,
                                            const ValueInfo& expected, ValueInfo* info) override {
      return backend_->ReadRangeIfMatch(key, offset, length, expected, info);
    }
    absl::StatusOr<ValueInfo> Stat(absl::string_view key) override { return backend_->Stat(key); }
    absl::StatusOr<bool> IsCurrent(absl::string_view key, const ValueInfo& cached) override {
      return backend_->IsCurrent(key, cached);
    }
    absl::StatusOr<std::optional<Buffer>> ReadIfChanged(absl::string_view key,
                                                        const ValueInfo& cached,
                                                        ValueInfo* info) override {
      return backend_->ReadIfChanged(key, cached, info);
    }
    absl::StatusOr<ValueInfo> Write(absl::string_view key, Buffer value,
                                    const Conditions& conditions) override {
      return backend_->Write(key, std::move(value), conditions);
    }
    absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
      return backend_->Delete(key, conditions);
    }
    absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                     bool directory) override {
      return backend_->List(prefix, directory);
    }

   private:
    Backend* backend_;
  };

  // Waits until the tier holds `entries` entries (its index loaded, its writes done).
  void AwaitEntries(uint64_t entries) {
    tier_->Flush();
    absl::Time deadline = absl::Now() + absl::Seconds(60);
    while ((!tier_->stats().index_loaded || tier_->stats().entries < entries) &&
           absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_GE(tier_->stats().entries, entries);
  }

  testing::TempDir dir_;
  std::unique_ptr<DiskTier> tier_;
  std::unique_ptr<Backend> shared_;
  RemoteLikeBackend* backend_ = nullptr;
};

TEST_F(ChunkStoreDiskTest, ReadsAreWrittenBehindAndServedFromDiskByARestartedStore) {
  const std::string small = testing::RandomBytes(100000, 1);
  const std::string large = testing::RandomBytes((5 << 20) + 3, 2);  // read by the block
  StoreValue("small", small);
  StoreValue("large", large);
  {
    auto store = NewStore();
    for (const char* key : {"small", "large"}) {
      auto got = store->ReadAndWait(key);
      ASSERT_TRUE(got.ok()) << key << ": " << got.status();
    }
    EXPECT_GT(backend_->reads.load(), 0);
  }
  AwaitEntries(1 + (large.size() + (256 << 10) - 1) / (256 << 10));
  backend_->reads = 0;
  auto store = NewStore();
  auto got = store->ReadAndWait("small");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->value.view() == small);
  // A range of the large value: its record comes from the tier, its blocks from disk.
  auto part = store->ReadAndWait("large", ReadOptions(), ByteRange::Bounded(300000, 900000));
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_TRUE(part->value.view() == std::string_view(large).substr(300000, 600000));
  EXPECT_EQ(part->generation, store->backend().Stat("large")->generation);
  EXPECT_EQ(backend_->reads.load(), 0);
  EXPECT_EQ(backend_->conditional.load(), 0);
  EXPECT_GE(store->counters().disk_promotions, 1u + 3u);
}

TEST_F(ChunkStoreDiskTest, ConcurrentMissesReadTheDiskOnce) {
  const std::string value = testing::RandomBytes(200000, 3);
  StoreValue("k", value);
  ASSERT_TRUE(NewStore()->ReadAndWait("k").ok());
  AwaitEntries(1);
  auto store = NewStore();
  std::vector<std::thread> readers;
  std::atomic<int> good{0};
  for (int i = 0; i < 8; ++i) {
    readers.emplace_back([&] {
      auto got = store->ReadAndWait("k");
      if (got.ok() && got->value.view() == value) good.fetch_add(1);
    });
  }
  for (auto& t : readers) t.join();
  EXPECT_EQ(good.load(), 8);
  EXPECT_EQ(store->counters().disk_promotions, 1u);
  EXPECT_EQ(tier_->stats().hits, 1u);
}

TEST_F(ChunkStoreDiskTest, ACopyOlderThanTheBoundIsConfirmedOrReplaced) {
  const std::string value = testing::RandomBytes(50000, 4);
  StoreValue("k", value);
  ASSERT_TRUE(NewStore()->ReadAndWait("k").ok());
  AwaitEntries(1);
  // A bound after the copy was written: one conditional request, a 304, no bytes.
  absl::SleepFor(absl::Milliseconds(5));
  ReadOptions now;
  now.validated_since = absl::Now();
  backend_->reads = 0;
  {
    auto store = NewStore();
    auto got = store->ReadAndWait("k", now);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(got->value.view() == value);
    EXPECT_GE(got->validated, *now.validated_since);
    EXPECT_EQ(backend_->conditional.load(), 1);
    EXPECT_EQ(backend_->reads.load(), 0);
    EXPECT_EQ(store->counters().revalidations_not_modified, 1u);
  }
  // Changed behind chunkd's back: the new bytes, and the tier's copy replaced.
  const std::string changed = testing::RandomBytes(60000, 5);
  StoreValue("k", changed);
  now.validated_since = absl::Now();
  {
    auto store = NewStore();
    auto got = store->ReadAndWait("k", now);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(got->value.view() == changed);
    EXPECT_EQ(store->counters().stale_invalidations, 1u);
  }
  tier_->Flush();
  auto store = NewStore();
  ReadOptions any;
  any.validated_since = absl::InfinitePast();
  auto got = store->ReadAndWait("k", any);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->value.view() == changed);
  EXPECT_EQ(store->counters().disk_promotions, 1u);
}

TEST_F(ChunkStoreDiskTest, WritesDeletesAndInvalidationsDropTheTiersCopy) {
  StoreValue("k", "old bytes");
  StoreValue("gone", "soon deleted");
  StoreValue("other", "old too");
  {
    auto store = NewStore();
    ASSERT_TRUE(store->ReadAndWait("k").ok());
    ASSERT_TRUE(store->ReadAndWait("gone").ok());
    ASSERT_TRUE(store->ReadAndWait("other").ok());
  }
  AwaitEntries(3);
  {
    auto store = NewStore();
    ASSERT_TRUE(store->Write("k", Buffer::CopyOf("new bytes"), Conditions()).ok());
    ASSERT_TRUE(store->Delete("gone", Conditions()).ok());
    // Another writer changed it; a pool client says so (StatRequest.invalidate).
    StoreValue("other", "new too");
    store->Invalidate("other");
  }
  ReadOptions any;
  any.validated_since = absl::InfinitePast();  // would take any copy the tier still had
  auto store = NewStore();
  auto got = store->ReadAndWait("k", any);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::string(got->value.view()), "new bytes");
  EXPECT_TRUE(absl::IsNotFound(store->ReadAndWait("gone", any).status()));
  auto other = store->ReadAndWait("other", any);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(std::string(other->value.view()), "new too");
}

}  // namespace
}  // namespace chunkd::server

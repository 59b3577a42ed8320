// Tests of server/store/chunk_store.h: single flight, hits and misses, write-through, stale reads
// that must not be cached, deletes, and the bounded I/O queue.
#include "server/store/chunk_store.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "server/backend/file/file_backend.h"
#include "server/backend/memory/memory_backend.h"
#include "tests/support/test_support.h"
#include "tests/unit/forwarding_backend.h"
#include "tests/unit/hold_gate.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;

// Wraps a real backend: counts reads and can hold them. A held read has already read the
// inner backend, so it returns the value as it was before anything that happens meanwhile.
// Reports holds_values_in_memory() == false, so that the store puts a cache in front of it.
class TestBackend final : public testing::ForwardingBackend {
 public:
  explicit TestBackend(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}

  absl::string_view kind() const override { return "test"; }
  std::string location() const override { return "test://"; }

  absl::StatusOr<Buffer> Read(absl::string_view key, ValueInfo* info) override {
    reads_.fetch_add(1);
    auto result = inner_->Read(key, info);
    gate_.Pass();
    return result;
  }
  // Ranged reads go through Read above (counted, holdable), as the Backend default does.
  absl::StatusOr<Buffer> ReadRange(absl::string_view key, uint64_t offset, uint64_t length,
                                   ValueInfo* info) override {
    return Backend::ReadRange(key, offset, length, info);
  }
  absl::StatusOr<ValueInfo> Write(absl::string_view key, Buffer value,
                                  const Conditions& conditions) override {
    writes_.fetch_add(1);
    auto info = inner_->Write(key, std::move(value), conditions);
    if (info.ok() && fail_after_landing_.load()) {
      return absl::DeadlineExceededError("timed out (after the write landed)");
    }
    return info;
  }
  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    absl::Status s = inner_->Delete(key, conditions);
    if (s.ok() && fail_after_landing_.load()) return absl::UnavailableError("connection lost");
    return s;
  }
  // Revalidations are counted, and held like reads.
  absl::StatusOr<std::optional<Buffer>> ReadIfChanged(absl::string_view key,
                                                      const ValueInfo& cached,
                                                      ValueInfo* info) override {
    revalidations_.fetch_add(1);
    auto result = store_down_.load()
                      ? absl::StatusOr<std::optional<Buffer>>(absl::UnavailableError("store down"))
                      : inner_->ReadIfChanged(key, cached, info);
    gate_.Pass();
    return result;
  }

  // Writes and deletes land, then report a failure (an outcome the caller cannot know).
  void FailAfterLanding(bool on) { fail_after_landing_ = on; }
  // Revalidations fail as with an unreachable store.
  void StoreDown(bool on) { store_down_ = on; }
  int revalidations() const { return revalidations_.load(); }
  int reads() const { return reads_.load(); }
  int writes() const { return writes_.load(); }

  // Reads started from now on wait until Release().
  void Hold() { gate_.Hold(); }
  void Release() { gate_.Release(); }
  // Waits until `n` reads in total have reached the hold point.
  void AwaitReadsEntered(int n) { gate_.AwaitEntered(n); }

 private:
  std::atomic<int> reads_{0}, writes_{0}, revalidations_{0};
  std::atomic<bool> fail_after_landing_{false}, store_down_{false};
  testing::HoldGate gate_;
};

struct Fixture {
  explicit Fixture(ChunkStoreOptions options = DefaultOptions()) {
    auto owned = std::make_unique<TestBackend>(NewMemoryBackend(BackendOptions{}));
    backend = owned.get();
    store = std::make_unique<ChunkStore>(std::move(owned), options);
  }
  static ChunkStoreOptions DefaultOptions() {
    ChunkStoreOptions o;
    o.cache.capacity_bytes = 16 << 20;
    o.io_threads = 4;
    return o;
  }
  // Stores `value` in the backend only, behind the cache's back.
  Generation Seed(const std::string& key, const std::string& value) {
    auto info = backend->inner().Write(key, Buffer::CopyOf(value), {});
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->generation : 0;
  }

  TestBackend* backend;
  std::unique_ptr<ChunkStore> store;
};

// Collects the results of asynchronous reads.
class Results {
 public:
  ChunkStore::ReadCallback Callback() {
    return [this](absl::StatusOr<CachedValue> result) {
      absl::MutexLock lock(&mu_);
      results_.push_back(std::move(result));
    };
  }
  // Waits for `n` results (20 s at most) and returns them.
  std::vector<absl::StatusOr<CachedValue>> Await(size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return results_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(20));
    return results_;
  }
  size_t size() {
    absl::MutexLock lock(&mu_);
    return results_.size();
  }

 private:
  absl::Mutex mu_;
  std::vector<absl::StatusOr<CachedValue>> results_ ABSL_GUARDED_BY(mu_);
};

TEST(ChunkStoreTest, MemoryBackendGetsNoCache) {
  ChunkStore store(NewMemoryBackend(BackendOptions{}), ChunkStoreOptions{});
  EXPECT_EQ(store.cache(), nullptr);
  ASSERT_TRUE(store.Write("k", Buffer::CopyOf("v"), {}).ok());
  auto v = store.ReadAndWait("k");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->value.view(), "v");
  EXPECT_EQ(store.ReadAndWait("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(ChunkStoreTest, ConcurrentMissesReadOnce) {
  Fixture f;
  ASSERT_NE(f.store->cache(), nullptr);
  const std::string value = std::string(100000, 'z');
  Generation generation = f.Seed("arr/c/0", value);
  f.backend->Hold();
  Results results;
  constexpr int kReaders = 16;
  {
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kReaders; ++i) {
      threads.emplace_back([&] {
        ready.fetch_add(1);
        while (ready.load() < kReaders) std::this_thread::yield();
        f.store->Read("arr/c/0", results.Callback());
      });
    }
    for (std::thread& t : threads) t.join();
  }
  f.backend->AwaitReadsEntered(1);
  EXPECT_EQ(results.size(), 0u);  // everyone waits for the one read
  f.backend->Release();
  auto all = results.Await(kReaders);
  ASSERT_EQ(all.size(), static_cast<size_t>(kReaders));
  for (const auto& r : all) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->value.view(), value);
    EXPECT_EQ(r->generation, generation);
  }
  EXPECT_EQ(f.backend->reads(), 1);
  ChunkStoreCounters c = f.store->counters();
  EXPECT_EQ(c.backend_reads, 1u);
  EXPECT_EQ(c.single_flight_joins, static_cast<uint64_t>(kReaders - 1));
  EXPECT_EQ(c.backend_read_bytes, value.size());
  // Now cached: more reads cost nothing.
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(f.store->ReadAndWait("arr/c/0").ok());
  EXPECT_EQ(f.backend->reads(), 1);
}

TEST(ChunkStoreTest, ConcurrentMissesWithoutHoldingReadAtMostOnceEach) {
  // Without holding the backend, many bursts of concurrent misses on fresh keys: each key is
  // read from the backend exactly once, since its first read fills the cache.
  Fixture f;
  constexpr int kKeys = 50, kReaders = 8;
  for (int k = 0; k < kKeys; ++k) f.Seed(absl::StrCat("k", k), absl::StrCat("value", k));
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kReaders; ++t) {
    threads.emplace_back([&] {
      for (int k = 0; k < kKeys; ++k) {
        auto v = f.store->ReadAndWait(absl::StrCat("k", k));
        if (!v.ok() || v->value.view() != absl::StrCat("value", k)) bad.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(f.backend->reads(), kKeys);
}

TEST(ChunkStoreTest, MissThenHit) {
  Fixture f;
  Generation generation = f.Seed("a/b", "hello");
  auto first = f.store->ReadAndWait("a/b");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->value.view(), "hello");
  EXPECT_EQ(first->generation, generation);
  EXPECT_EQ(f.backend->reads(), 1);
  HostCacheStats s = f.store->cache()->stats();
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.hits, 0u);

  auto second = f.store->ReadAndWait("a/b");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->value.view(), "hello");
  EXPECT_EQ(second->generation, generation);
  EXPECT_EQ(f.backend->reads(), 1);
  s = f.store->cache()->stats();
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(f.store->counters().backend_reads, 1u);

  // A hit calls back on the caller's thread, before Read returns.
  bool called = false;
  f.store->Read("a/b", [&](absl::StatusOr<CachedValue> r) {
    called = true;
    EXPECT_TRUE(r.ok());
  });
  EXPECT_TRUE(called);
}

TEST(ChunkStoreTest, MissingKeyIsNotFoundAndNotCached) {
  Fixture f;
  for (int i = 0; i < 3; ++i) {
    auto r = f.store->ReadAndWait("nope");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
    EXPECT_NE(r.status().message().find("nope"), absl::string_view::npos) << r.status();
  }
  EXPECT_EQ(f.backend->reads(), 3);
  // A missing key is an answer of the store, not a failed read.
  EXPECT_EQ(f.store->counters().backend_read_errors, 0u);
  EXPECT_EQ(f.store->counters().backend_not_found, 3u);
  // The key appears later: the next read finds it.
  f.Seed("nope", "now here");
  auto r = f.store->ReadAndWait("nope");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->value.view(), "now here");
}

TEST(ChunkStoreTest, WriteGoesThroughAndUpdatesCache) {
  Fixture f;
  f.Seed("k", "old");
  ASSERT_TRUE(f.store->ReadAndWait("k").ok());  // cached: "old"
  ASSERT_EQ(f.backend->reads(), 1);

  auto info = f.store->Write("k", Buffer::CopyOf("new value"), {});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 9u);
  EXPECT_EQ(f.backend->writes(), 1);
  // In the backend before Write returned.
  ValueInfo stored;
  auto in_backend = f.backend->inner().Read("k", &stored);
  ASSERT_TRUE(in_backend.ok());
  EXPECT_EQ(in_backend->view(), "new value");
  EXPECT_EQ(stored.generation, info->generation);
  // And in the cache.
  auto cached = f.store->cache()->Peek("k");
  ASSERT_TRUE(cached.has_value());
  EXPECT_EQ(cached->value.view(), "new value");
  EXPECT_EQ(cached->generation, info->generation);
  auto read = f.store->ReadAndWait("k");
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->value.view(), "new value");
  EXPECT_EQ(read->generation, info->generation);
  EXPECT_EQ(f.backend->reads(), 1);  // served from the cache
  EXPECT_EQ(f.store->counters().writes, 1u);

  auto stat = f.store->Stat("k");
  ASSERT_TRUE(stat.ok());
  EXPECT_EQ(stat->size, 9u);
  EXPECT_EQ(stat->generation, info->generation);
}

TEST(ChunkStoreTest, FailedConditionalWriteChangesNothing) {
  Fixture f;
  auto first = f.store->Write("k", Buffer::CopyOf("one"), {});
  ASSERT_TRUE(first.ok());
  Conditions create_only;
  create_only.if_generation_match = 0;
  auto second = f.store->Write("k", Buffer::CopyOf("two"), create_only);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  auto read = f.store->ReadAndWait("k");
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->value.view(), "one");
  EXPECT_EQ(read->generation, first->generation);
  EXPECT_EQ(f.store->counters().writes, 1u);
}

// A read that fetched the old value is held; a write lands; the read finishes. The old value
// must not end up in the cache.
void StaleReadTest(size_t value_size) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.cache.capacity_bytes = 1 << 20;  // max entry 256 KiB
  Fixture f(options);
  const std::string old_value(value_size, 'o'), new_value(value_size, 'n');
  Generation old_generation = f.Seed("k", old_value);
  f.backend->Hold();
  Results results;
  f.store->Read("k", results.Callback());
  f.backend->AwaitReadsEntered(1);

  auto info = f.store->Write("k", Buffer::CopyOf(new_value), {});
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_NE(info->generation, old_generation);
  f.backend->Release();
  auto first = results.Await(1);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_TRUE(first[0].ok());
  // It overlapped the write: either version, whole (a value larger than a whole read goes on
  // by the block, at the version its first part had or, when that changed, the new one).
  if (first[0]->generation == old_generation) {
    EXPECT_TRUE(first[0]->value.view() == old_value);
  } else {
    EXPECT_EQ(first[0]->generation, info->generation);
    EXPECT_TRUE(first[0]->value.view() == new_value);
  }

  if (auto cached = f.store->cache()->Peek("k")) {
    EXPECT_EQ(cached->generation, info->generation);
    EXPECT_EQ(cached->value.view(), new_value);
  }
  auto after = f.store->ReadAndWait("k");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->generation, info->generation);
  EXPECT_TRUE(after->value.view() == new_value);
  auto again = f.store->ReadAndWait("k");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->generation, info->generation);
}

TEST(ChunkStoreTest, ReadInFlightDuringWriteIsNotCached) { StaleReadTest(1000); }

TEST(ChunkStoreTest, ReadInFlightDuringWriteOfUncacheableValueIsNotCached) {
  // The new value is too large for the cache, so the write cannot overwrite a stale entry:
  // the held read must not insert the old value either.
  StaleReadTest(300 << 10);
}

TEST(ChunkStoreTest, ReadStartedAfterWriteReturnedSeesTheWrite) {
  // A read in flight fetched the old value; a write of a value too large for the cache lands
  // and returns. A read that starts after that must see the new value: it may not join the
  // old flight, whose result is older than the acknowledged write.
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.cache.capacity_bytes = 1 << 20;  // max entry 256 KiB
  Fixture f(options);
  const std::string old_value(300 << 10, 'o'), new_value(300 << 10, 'n');
  Generation old_generation = f.Seed("k", old_value);
  f.backend->Hold();
  Results before;
  f.store->Read("k", before.Callback());
  f.backend->AwaitReadsEntered(1);
  auto info = f.store->Write("k", Buffer::CopyOf(new_value), {});
  ASSERT_TRUE(info.ok()) << info.status();
  Results after;
  f.store->Read("k", after.Callback());
  f.backend->Release();
  auto b = before.Await(1);
  auto a = after.Await(1);
  ASSERT_EQ(b.size(), 1u);
  ASSERT_EQ(a.size(), 1u);
  ASSERT_TRUE(b[0].ok());
  ASSERT_TRUE(a[0].ok());
  // `before` overlapped the write: either version, never a mix.
  EXPECT_TRUE(b[0]->value.view() == (b[0]->generation == old_generation ? old_value : new_value));
  EXPECT_EQ(a[0]->generation, info->generation);
  EXPECT_TRUE(a[0]->value.view() == new_value);
}

TEST(ChunkStoreTest, ReadInFlightDuringDeleteIsNotCached) {
  Fixture f;
  f.Seed("k", "old");
  f.backend->Hold();
  Results results;
  f.store->Read("k", results.Callback());
  f.backend->AwaitReadsEntered(1);
  ASSERT_TRUE(f.store->Delete("k", {}).ok());
  f.backend->Release();
  ASSERT_EQ(results.Await(1).size(), 1u);
  EXPECT_FALSE(f.store->cache()->Peek("k").has_value());
  auto after = f.store->ReadAndWait("k");
  EXPECT_EQ(after.status().code(), absl::StatusCode::kNotFound) << after.status();
}

TEST(ChunkStoreTest, DeleteRemovesFromCacheAndBackend) {
  Fixture f;
  ASSERT_TRUE(f.store->Write("k", Buffer::CopyOf("v"), {}).ok());
  ASSERT_TRUE(f.store->ReadAndWait("k").ok());
  ASSERT_TRUE(f.store->cache()->Peek("k").has_value());
  ASSERT_TRUE(f.store->Delete("k", {}).ok());
  EXPECT_FALSE(f.store->cache()->Peek("k").has_value());
  EXPECT_EQ(f.backend->inner().Stat("k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->ReadAndWait("k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->Stat("k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->Delete("k", {}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->counters().deletes, 1u);
}

TEST(ChunkStoreTest, DeleteOfKeyRemovedBehindTheCacheDropsTheCachedCopy) {
  Fixture f;
  f.Seed("k", "v");
  ASSERT_TRUE(f.store->ReadAndWait("k").ok());
  ASSERT_TRUE(f.backend->inner().Delete("k", {}).ok());  // someone else removed it
  EXPECT_EQ(f.store->Delete("k", {}).code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(f.store->cache()->Peek("k").has_value());
}

TEST(ChunkStoreTest, ConditionalDeleteWithWrongGenerationKeepsCache) {
  Fixture f;
  auto info = f.store->Write("k", Buffer::CopyOf("v"), {});
  ASSERT_TRUE(info.ok());
  Conditions wrong;
  wrong.if_generation_match = info->generation + 1;
  EXPECT_EQ(f.store->Delete("k", wrong).code(), absl::StatusCode::kFailedPrecondition);
  auto read = f.store->ReadAndWait("k");
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->value.view(), "v");
}

TEST(ChunkStoreTest, FullIoQueueRefusesWithUnavailable) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.io_threads = 1;
  options.max_queued_io = 1;
  Fixture f(options);
  f.Seed("k", "v");

  absl::Notification running, release;
  ASSERT_TRUE(f.store
                  ->Submit([&] {
                    running.Notify();
                    release.WaitForNotification();
                  })
                  .ok());
  running.WaitForNotification();  // the one I/O thread is busy; the queue is empty
  absl::Notification queued_ran;
  ASSERT_TRUE(f.store->Submit([&] { queued_ran.Notify(); }).ok());  // fills the queue

  absl::Status refused = f.store->Submit([] {});
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;

  Results results;
  f.store->Read("k", results.Callback());
  auto r = results.Await(1);  // refused at once, on this thread
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].status().code(), absl::StatusCode::kUnavailable) << r[0].status();
  EXPECT_EQ(f.store->counters().overloaded, 2u);
  EXPECT_EQ(f.backend->reads(), 0);

  release.Notify();
  // Once the queue drains, the key is readable: the refused flight left nothing behind.
  ASSERT_TRUE(queued_ran.WaitForNotificationWithTimeout(absl::Seconds(20)));
  auto ok = f.store->ReadAndWait("k");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->value.view(), "v");
  EXPECT_EQ(f.backend->reads(), 1);
}

TEST(ChunkStoreTest, ConcurrentReadersAndWritersSeeWholeValues) {
  // Readers and writers of a few keys at once: every read returns a value some writer wrote
  // for that key, and after the writers stop the cache agrees with the backend.
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.cache.capacity_bytes = 64 << 10;  // small: evictions and misses happen
  Fixture f(options);
  constexpr int kKeys = 4, kWriters = 4, kReaders = 4, kWrites = 100;
  for (int k = 0; k < kKeys; ++k) f.Seed(absl::StrCat("k", k), absl::StrCat("k", k, ":seed"));
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      for (int i = 0; i < kWrites; ++i) {
        std::string key = absl::StrCat("k", (w + i) % kKeys);
        std::string value = absl::StrCat(key, ":", w, ":", i, ":", std::string(i * 37, 'x'));
        if (!f.store->Write(key, Buffer::CopyOf(value), {}).ok()) bad.fetch_add(1);
      }
    });
  }
  for (int r = 0; r < kReaders; ++r) {
    threads.emplace_back([&, r] {
      int i = 0;
      while (!stop.load()) {
        std::string key = absl::StrCat("k", (r + i++) % kKeys);
        auto v = f.store->ReadAndWait(key);
        if (!v.ok() || v->value.view().substr(0, key.size() + 1) != key + ":") bad.fetch_add(1);
      }
    });
  }
  for (int w = 0; w < kWriters; ++w) threads[w].join();
  stop = true;
  for (size_t i = kWriters; i < threads.size(); ++i) threads[i].join();
  EXPECT_EQ(bad.load(), 0);
  for (int k = 0; k < kKeys; ++k) {
    std::string key = absl::StrCat("k", k);
    ValueInfo info;
    auto stored = f.backend->inner().Read(key, &info);
    ASSERT_TRUE(stored.ok());
    auto read = f.store->ReadAndWait(key);
    ASSERT_TRUE(read.ok());
    EXPECT_EQ(read->generation, info.generation) << key;
    EXPECT_EQ(read->value.view(), stored->view()) << key;
  }
}

// A write whose outcome is unknown (a timeout after it landed) must not leave the old value
// cached: the next read asks the store.
TEST(ChunkStoreTest, FailedWriteOrDeleteDropsTheCachedCopy) {
  Fixture f;
  f.Seed("k", "old");
  ASSERT_EQ(f.store->ReadAndWait("k")->value.view(), "old");
  f.backend->FailAfterLanding(true);
  auto write = f.store->Write("k", Buffer::CopyOf("new"), {});
  EXPECT_EQ(write.status().code(), absl::StatusCode::kDeadlineExceeded);
  f.backend->FailAfterLanding(false);
  auto read = f.store->ReadAndWait("k");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->value.view(), "new");

  f.backend->FailAfterLanding(true);
  EXPECT_EQ(f.store->Delete("k", {}).code(), absl::StatusCode::kUnavailable);
  f.backend->FailAfterLanding(false);
  EXPECT_EQ(f.store->ReadAndWait("k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f.store->counters().failed_write_invalidations, 2u);
}

// A read in flight when a write fails must not cache what it read (it may predate the write).
TEST(ChunkStoreTest, FailedWriteMarksTheReadInFlightStale) {
  Fixture f;
  f.Seed("k", "old");
  f.backend->Hold();
  Results results;
  f.store->Read("k", results.Callback());
  f.backend->AwaitReadsEntered(1);
  f.backend->FailAfterLanding(true);
  EXPECT_FALSE(f.store->Write("k", Buffer::CopyOf("new"), {}).ok());
  f.backend->FailAfterLanding(false);
  f.backend->Release();
  ASSERT_EQ(results.Await(1).size(), 1u);
  EXPECT_FALSE(f.store->cache()->Peek("k").has_value());
  EXPECT_EQ(f.store->ReadAndWait("k")->value.view(), "new");
}

// Remote stores (the test backend validates as one): a cached copy is served until the policy's
// interval has passed or a request's bound asks for a newer one; then one conditional request.
TEST(ChunkStoreTest, HitIsRevalidatedOnlyWhenOlderThanTheBound) {
  Fixture f;  // default policy: 60 s
  f.Seed("k", "v1");
  ASSERT_EQ(f.store->ReadAndWait("k")->value.view(), "v1");
  f.Seed("k", "v2");                                         // behind the cache's back
  EXPECT_EQ(f.store->ReadAndWait("k")->value.view(), "v1");  // within the interval
  EXPECT_EQ(f.backend->revalidations(), 0);
  // A bound older than the copy: served.
  EXPECT_EQ(f.store->ReadAndWait("k", ReadOptions{absl::Now() - absl::Hours(1)})->value.view(),
            "v1");
  EXPECT_EQ(f.backend->revalidations(), 0);
  // A bound of now: revalidated, the change is seen and cached.
  absl::Time before = absl::Now();
  auto fresh = f.store->ReadAndWait("k", ReadOptions{absl::Now()});
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->value.view(), "v2");
  EXPECT_GE(fresh->validated, before);
  EXPECT_EQ(f.backend->revalidations(), 1);
  EXPECT_EQ(f.store->ReadAndWait("k")->value.view(), "v2");
  // Unchanged: validated again, nothing read.
  int reads = f.backend->reads();
  EXPECT_EQ(f.store->ReadAndWait("k", ReadOptions{absl::Now()})->value.view(), "v2");
  ChunkStoreCounters c = f.store->counters();
  EXPECT_EQ(c.revalidations, 2u);
  EXPECT_EQ(c.stale_invalidations, 1u);
  EXPECT_EQ(f.backend->reads(), reads);
  // Removed behind the cache's back.
  ASSERT_TRUE(f.backend->inner().Delete("k", {}).ok());
  EXPECT_EQ(f.store->ReadAndWait("k", ReadOptions{absl::Now()}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(f.store->cache()->Peek("k").has_value());
}

// A store that cannot answer a revalidation does not fail reads under the policy that the cache
// can answer; a read with a bound of its own is refused rather than served older than it asked.
TEST(ChunkStoreTest, RevalidationErrorServesTheCachedCopyWithinThePolicyOnly) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.freshness.revalidate_after = absl::ZeroDuration();  // the policy asks on every hit
  Fixture f(options);
  f.Seed("k", "v1");
  auto first = f.store->ReadAndWait("k");
  ASSERT_TRUE(first.ok());
  f.backend->StoreDown(true);
  auto read = f.store->ReadAndWait("k");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->value.view(), "v1");
  EXPECT_EQ(read->validated, first->validated);  // its age shows
  EXPECT_EQ(f.store->counters().revalidation_errors, 1u);
  auto bounded = f.store->ReadAndWait("k", ReadOptions{absl::Now()});
  EXPECT_EQ(bounded.status().code(), absl::StatusCode::kUnavailable) << bounded.status();
  EXPECT_EQ(f.store->counters().revalidation_errors, 2u);
  // A bound the cached copy meets is served without asking the store.
  auto loose = f.store->ReadAndWait("k", ReadOptions{first->validated - absl::Seconds(1)});
  ASSERT_TRUE(loose.ok()) << loose.status();
  EXPECT_EQ(loose->value.view(), "v1");
  f.backend->StoreDown(false);
  f.Seed("k", "v2");
  EXPECT_EQ(f.store->ReadAndWait("k", ReadOptions{absl::Now()})->value.view(), "v2");
}

TEST(ChunkStoreTest, ZeroIntervalRevalidatesEveryHit) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.freshness.revalidate_after = absl::ZeroDuration();
  Fixture f(options);
  f.Seed("k", "v1");
  ASSERT_EQ(f.store->ReadAndWait("k")->value.view(), "v1");
  f.Seed("k", "v2");
  EXPECT_EQ(f.store->ReadAndWait("k")->value.view(), "v2");
  EXPECT_EQ(f.store->ReadAndWait("k")->value.view(), "v2");
  EXPECT_EQ(f.backend->revalidations(), 2);
}

// Eight readers of a copy due for revalidation: one conditional request, every reader answered.
TEST(ChunkStoreTest, ConcurrentRevalidationsOfOneKeyAreOneRequest) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.freshness.revalidate_after = absl::Milliseconds(200);
  Fixture f(options);
  f.Seed("k", "v1");
  ASSERT_TRUE(f.store->ReadAndWait("k").ok());
  absl::SleepFor(absl::Milliseconds(250));  // the copy is now due
  f.Seed("k", "v2");
  f.backend->Hold();
  Results results;
  f.store->Read("k", results.Callback());
  f.backend->AwaitReadsEntered(2);  // the first miss, then this revalidation
  for (int i = 1; i < 8; ++i) f.store->Read("k", results.Callback());
  f.backend->Release();
  auto all = results.Await(8);
  ASSERT_EQ(all.size(), 8u);
  for (const auto& r : all) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->value.view(), "v2");
  }
  EXPECT_EQ(f.backend->revalidations(), 1);
  EXPECT_EQ(f.store->counters().single_flight_joins, 7u);
}

TEST(ChunkStoreTest, MetadataIsRevalidatedEveryReadAndImmutablePrefixesNever) {
  ChunkStoreOptions options = Fixture::DefaultOptions();
  options.freshness.revalidate_after = absl::InfiniteDuration();
  options.freshness.immutable_prefixes = {"snap/"};
  Fixture f(options);
  for (const char* key : {"a/zarr.json", "a/.zarray", "a/c/0", "snap/zarr.json"}) {
    f.Seed(key, "v1");
    ASSERT_TRUE(f.store->ReadAndWait(key).ok());
    f.Seed(key, "v2");
  }
  EXPECT_EQ(f.store->ReadAndWait("a/zarr.json")->value.view(), "v2");
  EXPECT_EQ(f.store->ReadAndWait("a/.zarray")->value.view(), "v2");
  EXPECT_EQ(f.store->ReadAndWait("a/c/0")->value.view(), "v1");  // interval: never
  EXPECT_EQ(f.backend->revalidations(), 2);
  // Immutable: not even a request's bound makes it ask.
  EXPECT_EQ(f.store->ReadAndWait("snap/zarr.json", ReadOptions{absl::Now()})->value.view(), "v1");
  EXPECT_EQ(f.backend->revalidations(), 2);
}

// The file store: fresh by default. Every change made behind chunkd's back is seen at the next
// read; each hit costs one stat on the caller's thread.
class FileStoreFreshness : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = OpenFileBackend(dir_.path(), BackendOptions{});
    ASSERT_TRUE(backend.ok()) << backend.status();
    store_ = std::make_unique<ChunkStore>(*std::move(backend), Fixture::DefaultOptions());
  }
  std::string Read(const std::string& key) {
    auto v = store_->ReadAndWait(key);
    return v.ok() ? std::string(v->value.view()) : std::string(v.status().message());
  }
  // File times come from a coarse clock (a few ms): a change within one tick of the previous
  // one, same size, keeps the modification time. Wait one out, as a real writer's would.
  static void NextTick() { absl::SleepFor(absl::Milliseconds(20)); }

  chunkd::testing::TempDir dir_;
  std::unique_ptr<ChunkStore> store_;
};

TEST_F(FileStoreFreshness, ChangesBehindChunkdsBackAreSeenAtTheNextRead) {
  using chunkd::testing::WriteFile;
  ASSERT_EQ(::mkdir(dir_.Join("a").c_str(), 0755), 0);
  WriteFile(dir_.Join("a/k"), "first");
  EXPECT_EQ(Read("a/k"), "first");
  EXPECT_EQ(Read("a/k"), "first");  // a hit, validated
  // Overwritten in place, same size.
  NextTick();
  WriteFile(dir_.Join("a/k"), "again");
  EXPECT_EQ(Read("a/k"), "again");
  // Replaced by rename.
  WriteFile(dir_.Join("a/tmp"), "renamed in");
  ASSERT_EQ(std::rename(dir_.Join("a/tmp").c_str(), dir_.Join("a/k").c_str()), 0);
  EXPECT_EQ(Read("a/k"), "renamed in");
  // Deleted.
  ASSERT_EQ(::unlink(dir_.Join("a/k").c_str()), 0);
  EXPECT_EQ(store_->ReadAndWait("a/k").status().code(), absl::StatusCode::kNotFound);
  // A new key.
  WriteFile(dir_.Join("a/new"), "new");
  EXPECT_EQ(Read("a/new"), "new");
  ChunkStoreCounters c = store_->counters();
  EXPECT_EQ(c.stale_invalidations, 3u);
  EXPECT_GE(c.revalidations_not_modified, 1u);
  // A hit is not read again.
  uint64_t reads = store_->counters().backend_reads;
  EXPECT_EQ(Read("a/new"), "new");
  EXPECT_EQ(store_->counters().backend_reads, reads);
}

}  // namespace
}  // namespace chunkd::server

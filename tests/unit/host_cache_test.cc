// Tests of server/store/host_cache.h: byte budget, admission, eviction order of both policies,
// S3-FIFO's scan resistance and miss ratio on a Zipf trace, and concurrent use.
#include "server/store/host_cache.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/cpu/buffer.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;

CachedValue Value(size_t size, Generation generation = 1, char fill = 'v') {
  return CachedValue{Buffer::CopyOf(std::string(size, fill)), generation};
}

HostCacheOptions Options(uint64_t capacity, EvictionPolicy policy, double fraction = 0.25) {
  HostCacheOptions o;
  o.capacity_bytes = capacity;
  o.max_entry_fraction = fraction;
  o.policy = policy;
  o.shards = 8;
  return o;
}

class HostCachePolicyTest : public ::testing::TestWithParam<EvictionPolicy> {};

INSTANTIATE_TEST_SUITE_P(Policies, HostCachePolicyTest,
                         ::testing::Values(EvictionPolicy::kS3Fifo, EvictionPolicy::kLru),
                         [](const auto& info) {
                           return std::string(EvictionPolicyName(info.param));
                         });

TEST(HostCacheTest, ParsePolicyNames) {
  EXPECT_EQ(ParseEvictionPolicy("s3fifo"), EvictionPolicy::kS3Fifo);
  EXPECT_EQ(ParseEvictionPolicy("s3-fifo"), EvictionPolicy::kS3Fifo);
  EXPECT_EQ(ParseEvictionPolicy("lru"), EvictionPolicy::kLru);
  EXPECT_EQ(ParseEvictionPolicy("fifo"), std::nullopt);
  EXPECT_STREQ(EvictionPolicyName(EvictionPolicy::kLru), "lru");
  EXPECT_STREQ(EvictionPolicyName(EvictionPolicy::kS3Fifo), "s3fifo");
}

TEST_P(HostCachePolicyTest, LookupInsertPeekCounts) {
  HostCache cache(Options(10000, GetParam()));
  EXPECT_EQ(cache.capacity_bytes(), 10000u);
  EXPECT_EQ(cache.max_entry_bytes(), 2500u);
  EXPECT_EQ(cache.policy(), GetParam());
  EXPECT_FALSE(cache.Lookup("k").has_value());
  ASSERT_TRUE(cache.Insert("k", Value(100, 7, 'x')));
  auto hit = cache.Lookup("k");
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->value.view(), std::string(100, 'x'));
  EXPECT_EQ(hit->generation, 7u);
  auto peek = cache.Peek("k");
  ASSERT_TRUE(peek.has_value());
  EXPECT_EQ(peek->generation, 7u);
  EXPECT_FALSE(cache.Peek("other").has_value());

  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.capacity_bytes, 10000u);
  EXPECT_EQ(s.hits, 1u);  // Peek counts nothing
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.inserts, 1u);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.used_bytes, 100u);
  EXPECT_EQ(s.evictions, 0u);
}

TEST_P(HostCachePolicyTest, NeverOverBudget) {
  constexpr uint64_t kCapacity = 1 << 20;
  HostCache cache(Options(kCapacity, GetParam()));
  std::mt19937_64 rng(42);
  std::vector<std::string> keys;
  for (int i = 0; i < 300; ++i) keys.push_back(absl::StrCat("arr/c/", i));
  uint64_t admitted = 0, refused = 0;
  for (int i = 0; i < 3000; ++i) {
    const std::string& key = keys[rng() % keys.size()];
    size_t size = 1 + rng() % (300 << 10);  // some above the 256 KiB admission limit
    bool ok = cache.Insert(key, Value(size, i + 1));
    EXPECT_EQ(ok, size <= cache.max_entry_bytes()) << size;
    ok ? ++admitted : ++refused;
    if (rng() % 3 == 0) cache.Lookup(keys[rng() % keys.size()]);
    HostCacheStats s = cache.stats();
    ASSERT_LE(s.used_bytes, kCapacity) << "after insert " << i;
  }
  // The accounting matches what is actually cached.
  uint64_t bytes = 0, entries = 0;
  for (const std::string& key : keys) {
    if (auto v = cache.Peek(key)) bytes += v->value.size(), ++entries;
  }
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.used_bytes, bytes);
  EXPECT_EQ(s.entries, entries);
  EXPECT_EQ(s.inserts, admitted);
  EXPECT_EQ(s.not_admitted, refused);
  EXPECT_GT(refused, 0u);
  EXPECT_GT(s.evictions, 0u);
  EXPECT_GT(s.evicted_bytes, 0u);
  EXPECT_GT(entries, 0u);
}

TEST_P(HostCachePolicyTest, OversizedValueIsNotAdmittedAndFlushesNothing) {
  HostCache cache(Options(1000, GetParam()));
  ASSERT_EQ(cache.max_entry_bytes(), 250u);
  ASSERT_TRUE(cache.Insert("a", Value(200)));
  ASSERT_TRUE(cache.Insert("b", Value(200)));
  ASSERT_TRUE(cache.Insert("c", Value(250)));  // exactly the limit is admitted
  EXPECT_FALSE(cache.Insert("big", Value(251)));
  EXPECT_FALSE(cache.Insert("huge", Value(5000)));
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.not_admitted, 2u);
  EXPECT_EQ(s.entries, 3u);
  EXPECT_EQ(s.used_bytes, 650u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_TRUE(cache.Peek("a").has_value());
  EXPECT_TRUE(cache.Peek("b").has_value());
  EXPECT_TRUE(cache.Peek("c").has_value());
  EXPECT_FALSE(cache.Peek("big").has_value());
  EXPECT_FALSE(cache.Peek("huge").has_value());
}

TEST_P(HostCachePolicyTest, OversizedReplacementDropsTheOldValue) {
  // A newer value that is too large must not leave the older one behind as if it were current.
  HostCache cache(Options(1000, GetParam()));
  ASSERT_TRUE(cache.Insert("k", Value(100, 1)));
  EXPECT_FALSE(cache.Insert("k", Value(900, 2)));
  EXPECT_FALSE(cache.Peek("k").has_value());
  EXPECT_EQ(cache.stats().used_bytes, 0u);
  EXPECT_EQ(cache.stats().entries, 0u);
}

TEST_P(HostCachePolicyTest, InsertReplacesAndAccountsOnce) {
  HostCache cache(Options(10000, GetParam()));
  ASSERT_TRUE(cache.Insert("k", Value(100, 1, 'a')));
  ASSERT_TRUE(cache.Insert("k", Value(300, 2, 'b')));
  ASSERT_TRUE(cache.Insert("k", Value(200, 3, 'c')));
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.used_bytes, 200u);
  EXPECT_EQ(s.inserts, 3u);
  auto v = cache.Lookup("k");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->generation, 3u);
  EXPECT_EQ(v->value.view(), std::string(200, 'c'));
  // Replacing many times never drifts the accounting.
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(cache.Insert("k", Value(50 + i, 10 + i)));
  EXPECT_EQ(cache.stats().used_bytes, 149u);
  EXPECT_EQ(cache.stats().entries, 1u);
}

TEST_P(HostCachePolicyTest, Erase) {
  HostCache cache(Options(10000, GetParam()));
  ASSERT_TRUE(cache.Insert("a", Value(100)));
  ASSERT_TRUE(cache.Insert("b", Value(300)));
  cache.Erase("a");
  cache.Erase("missing");  // no effect
  EXPECT_FALSE(cache.Peek("a").has_value());
  EXPECT_FALSE(cache.Lookup("a").has_value());
  EXPECT_TRUE(cache.Peek("b").has_value());
  EXPECT_EQ(cache.stats().used_bytes, 300u);
  EXPECT_EQ(cache.stats().entries, 1u);
  cache.Erase("b");
  EXPECT_EQ(cache.stats().used_bytes, 0u);
  EXPECT_EQ(cache.stats().entries, 0u);
  EXPECT_EQ(cache.stats().evictions, 0u);  // erasing is not evicting
  // The cache is usable after being emptied.
  ASSERT_TRUE(cache.Insert("a", Value(10)));
  EXPECT_TRUE(cache.Peek("a").has_value());
}

TEST_P(HostCachePolicyTest, ValuesOutliveEviction) {
  // A value handed out stays valid after the cache evicts or replaces it.
  HostCache cache(Options(1000, GetParam()));
  ASSERT_TRUE(cache.Insert("k", Value(200, 1, 'q')));
  auto held = cache.Lookup("k");
  ASSERT_TRUE(held.has_value());
  for (int i = 0; i < 50; ++i) cache.Insert(absl::StrCat("other", i), Value(200));
  cache.Erase("k");
  EXPECT_EQ(held->value.view(), std::string(200, 'q'));
}

TEST(HostCacheLruTest, EvictsLeastRecentlyUsed) {
  HostCache cache(Options(1000, EvictionPolicy::kLru));
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(cache.Insert(absl::StrCat("k", i), Value(100)));
  EXPECT_EQ(cache.stats().used_bytes, 1000u);
  EXPECT_EQ(cache.stats().evictions, 0u);
  // Touch k0 and k1: now k2 is the least recently used, then k3.
  ASSERT_TRUE(cache.Lookup("k0"));
  ASSERT_TRUE(cache.Lookup("k1"));
  ASSERT_TRUE(cache.Insert("k10", Value(100)));
  EXPECT_FALSE(cache.Peek("k2").has_value());
  EXPECT_TRUE(cache.Peek("k0").has_value());
  EXPECT_TRUE(cache.Peek("k1").has_value());
  ASSERT_TRUE(cache.Insert("k11", Value(100)));
  EXPECT_FALSE(cache.Peek("k3").has_value());
  // Touching k4 saves it; k5 goes next. Peek does not count as a use.
  ASSERT_TRUE(cache.Peek("k5"));
  ASSERT_TRUE(cache.Lookup("k4"));
  ASSERT_TRUE(cache.Insert("k12", Value(100)));
  EXPECT_TRUE(cache.Peek("k4").has_value());
  EXPECT_FALSE(cache.Peek("k5").has_value());
  // A 250-byte value evicts the three least recent 100-byte ones (k6, k7, k8).
  ASSERT_TRUE(cache.Insert("big", Value(250)));
  EXPECT_FALSE(cache.Peek("k6").has_value());
  EXPECT_FALSE(cache.Peek("k7").has_value());
  EXPECT_FALSE(cache.Peek("k8").has_value());
  EXPECT_TRUE(cache.Peek("k9").has_value());
  EXPECT_TRUE(cache.Peek("big").has_value());
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.evictions, 6u);
  EXPECT_EQ(s.evicted_bytes, 600u);
  EXPECT_EQ(s.used_bytes, 950u);
}

// Inserts `hot` keys, hits each of them a few times, then scans `cold` keys once each
// (read-through: a miss, then an insert). Returns how many hot keys are still cached.
int HotKeysAfterScan(EvictionPolicy policy, int hot, int cold) {
  HostCache cache(Options(100 * 1000, policy));  // room for 100 values of 1000 bytes
  for (int i = 0; i < hot; ++i) cache.Insert(absl::StrCat("hot", i), Value(1000));
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < hot; ++i) EXPECT_TRUE(cache.Lookup(absl::StrCat("hot", i)));
  }
  for (int i = 0; i < cold; ++i) {
    std::string key = absl::StrCat("cold", i);
    EXPECT_FALSE(cache.Lookup(key));
    cache.Insert(key, Value(1000));
    EXPECT_LE(cache.stats().used_bytes, 100u * 1000);
  }
  int kept = 0;
  for (int i = 0; i < hot; ++i) kept += cache.Peek(absl::StrCat("hot", i)).has_value();
  return kept;
}

TEST(HostCacheS3FifoTest, OneHitWonderScanKeepsWorkingSet) {
  EXPECT_EQ(HotKeysAfterScan(EvictionPolicy::kS3Fifo, 20, 2000), 20);
  // LRU, the baseline, loses the working set to the scan.
  EXPECT_EQ(HotKeysAfterScan(EvictionPolicy::kLru, 20, 2000), 0);
}

TEST(HostCacheS3FifoTest, NewEntryHitOnceSurvivesScan) {
  // An entry hit once while in the small queue is promoted to the main queue instead of
  // being evicted when the small queue fills.
  HostCache cache(Options(100 * 1000, EvictionPolicy::kS3Fifo));
  for (int i = 0; i < 150; ++i) {
    std::string key = absl::StrCat("k", i);
    cache.Insert(key, Value(1000));
    if (i == 0) {
      ASSERT_TRUE(cache.Lookup(key));
    }
  }
  EXPECT_TRUE(cache.Peek("k0").has_value());
  EXPECT_FALSE(cache.Peek("k1").has_value());  // never hit: evicted first
  EXPECT_TRUE(cache.Peek("k149").has_value());
  EXPECT_LE(cache.stats().used_bytes, 100u * 1000);
}

TEST(HostCacheS3FifoTest, GhostHitGoesToMainQueue) {
  // A key evicted from the small queue and requested again soon is remembered (ghost) and
  // re-enters the main queue, where a following scan does not push it out at once.
  HostCache cache(Options(100 * 1000, EvictionPolicy::kS3Fifo));
  for (int i = 0; i < 101; ++i) cache.Insert(absl::StrCat("k", i), Value(1000));
  ASSERT_FALSE(cache.Peek("k0").has_value());  // evicted from the small queue
  ASSERT_TRUE(cache.Insert("k0", Value(1000)));
  for (int i = 0; i < 500; ++i) cache.Insert(absl::StrCat("scan", i), Value(1000));
  EXPECT_TRUE(cache.Peek("k0").has_value());
}

// A deterministic Zipf(alpha) sampler over ranks [0, n).
class Zipf {
 public:
  Zipf(size_t n, double alpha, uint64_t seed) : rng_(seed) {
    cdf_.resize(n);
    double sum = 0;
    for (size_t i = 0; i < n; ++i)
      cdf_[i] = (sum += 1.0 / std::pow(static_cast<double>(i + 1), alpha));
    for (double& c : cdf_) c /= sum;
  }
  size_t Next() {
    double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    return std::min<size_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin(),
                            cdf_.size() - 1);
  }

 private:
  std::mt19937_64 rng_;
  std::vector<double> cdf_;
};

struct TraceResult {
  double miss_ratio = 0;
  uint64_t max_used = 0;
};

// Replays a read-through Zipf trace: Lookup, and on a miss Insert.
TraceResult ReplayZipf(EvictionPolicy policy, bool mixed_sizes) {
  constexpr size_t kKeys = 10000;
  constexpr size_t kRequests = 200000;
  std::mt19937_64 rng(7);
  std::vector<size_t> sizes(kKeys);
  uint64_t total = 0;
  for (size_t i = 0; i < kKeys; ++i) {
    sizes[i] = mixed_sizes ? 256 + rng() % 3840 : 1000;
    total += sizes[i];
  }
  // Keys in a random order of popularity, so popularity does not follow insertion order.
  std::vector<std::string> keys(kKeys);
  for (size_t i = 0; i < kKeys; ++i) keys[i] = absl::StrCat("arr/c/", i / 100, "/", i % 100);
  for (size_t i = kKeys - 1; i > 0; --i) std::swap(keys[i], keys[rng() % (i + 1)]);
  std::vector<CachedValue> values(kKeys);
  for (size_t i = 0; i < kKeys; ++i) values[i] = Value(sizes[i]);

  HostCache cache(Options(total / 10, policy));
  Zipf zipf(kKeys, 1.0, 12345);
  TraceResult result;
  for (size_t r = 0; r < kRequests; ++r) {
    size_t k = zipf.Next();
    if (!cache.Lookup(keys[k])) cache.Insert(keys[k], values[k]);
    if (r % 1000 == 0) result.max_used = std::max(result.max_used, cache.stats().used_bytes);
  }
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.hits + s.misses, kRequests);
  EXPECT_LE(s.used_bytes, total / 10);
  result.max_used = std::max(result.max_used, s.used_bytes);
  result.miss_ratio = static_cast<double>(s.misses) / static_cast<double>(kRequests);
  return result;
}

TEST(HostCacheS3FifoTest, ZipfMissRatioNoWorseThanLru) {
  for (bool mixed : {false, true}) {
    TraceResult s3 = ReplayZipf(EvictionPolicy::kS3Fifo, mixed);
    TraceResult lru = ReplayZipf(EvictionPolicy::kLru, mixed);
    SCOPED_TRACE(absl::StrCat(mixed ? "mixed sizes" : "equal sizes", ": s3fifo miss ratio ",
                              s3.miss_ratio, ", lru ", lru.miss_ratio));
    EXPECT_LE(s3.miss_ratio, lru.miss_ratio);
    // Sanity: a 10% cache on Zipf(1.0) serves a good share of requests, but not all.
    EXPECT_GT(s3.miss_ratio, 0.05);
    EXPECT_LT(s3.miss_ratio, 0.6);
    EXPECT_LT(lru.miss_ratio, 0.7);
    std::cout << (mixed ? "mixed" : "equal") << " sizes: s3fifo miss ratio " << s3.miss_ratio
              << ", lru " << lru.miss_ratio << "\n";
  }
}

// Value bytes that name their key and generation, so that a reader can check what it got.
std::string Payload(const std::string& key, uint64_t generation, size_t size) {
  std::string head = absl::StrCat(key, "#", generation, "#");
  std::string out = head;
  out.resize(std::max(size, head.size()), static_cast<char>('a' + generation % 26));
  return out;
}

TEST_P(HostCachePolicyTest, ConcurrentUseKeepsConsistentStats) {
  constexpr int kThreads = 8;
  constexpr int kOpsPerThread = 20000;
  constexpr uint64_t kCapacity = 256 << 10;
  HostCache cache(Options(kCapacity, GetParam(), 0.1));
  std::vector<std::string> keys;
  for (int i = 0; i < 200; ++i) keys.push_back(absl::StrCat("k/", i));
  std::atomic<uint64_t> lookups{0}, inserted{0}, refused{0}, bad_values{0};
  std::atomic<uint64_t> next_generation{1};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      for (int i = 0; i < kOpsPerThread; ++i) {
        const std::string& key = keys[rng() % keys.size()];
        int op = static_cast<int>(rng() % 10);
        if (op < 6) {
          lookups.fetch_add(1);
          if (auto v = cache.Lookup(key)) {
            std::string expected =
                Payload(key, v->generation, v->value.size()).substr(0, v->value.size());
            if (v->value.view() != expected) bad_values.fetch_add(1);
          }
        } else if (op < 9) {
          uint64_t generation = next_generation.fetch_add(1);
          size_t size = 64 + rng() % (30 << 10);  // some above the 25.6 KiB limit
          CachedValue value{Buffer::CopyOf(Payload(key, generation, size)), generation};
          (cache.Insert(key, std::move(value)) ? inserted : refused).fetch_add(1);
        } else {
          cache.Erase(key);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bad_values.load(), 0u);
  HostCacheStats s = cache.stats();
  EXPECT_EQ(s.hits + s.misses, lookups.load());
  EXPECT_EQ(s.inserts, inserted.load());
  EXPECT_EQ(s.not_admitted, refused.load());
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.evictions, 0u);
  uint64_t bytes = 0, entries = 0;
  for (const std::string& key : keys) {
    if (auto v = cache.Peek(key)) bytes += v->value.size(), ++entries;
  }
  EXPECT_EQ(s.used_bytes, bytes);
  EXPECT_EQ(s.entries, entries);
  EXPECT_LE(s.used_bytes, kCapacity);
}

}  // namespace
}  // namespace chunkd::server

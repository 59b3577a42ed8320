// The byte-budgeted host cache in front of a backend.
//
// The index is sharded so that readers of different keys do not contend. Eviction is S3-FIFO
// (Yang et al., SOSP 2023: a small FIFO for new entries, a main FIFO with reinsertion, a ghost
// queue of recently evicted keys) accounted in bytes, because chunk sizes are unequal; LRU is
// kept as an option for comparison. With S3-FIFO a hit only bumps an atomic counter under its
// shard's lock; with LRU every hit also takes the policy lock to move the entry.
//
// Entries whose memory is pinned by a lease are skipped by eviction; pinned values that leave
// the cache (replaced or deleted) still count against the budget until their leases end, so
// the memory the cache accounts for never exceeds it.
//
// No lock is held while doing I/O: the cache only stores buffers; reading and writing the
// backend is the caller's job (see server/store/chunk_store.h).
#ifndef CHUNKD_SERVER_STORE_HOST_CACHE_H_
#define CHUNKD_SERVER_STORE_HOST_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "server/backend/backend.h"

namespace chunkd::server {

enum class EvictionPolicy { kS3Fifo, kLru };

// "s3fifo" or "lru".
std::optional<EvictionPolicy> ParseEvictionPolicy(absl::string_view name);
const char* EvictionPolicyName(EvictionPolicy policy);

struct CachedValue {
  CachedValue() = default;
  CachedValue(buffer::cpu::Buffer value, Generation generation,
              absl::Time validated = absl::InfinitePast(), std::string etag = {})
      : value(std::move(value)),
        generation(generation),
        validated(validated),
        etag(std::move(etag)) {}

  buffer::cpu::Buffer value;
  Generation generation = 0;
  // When the store last said this is its current version: the start of the read that fetched
  // it, or of the last validation that found it unchanged. What a read's staleness bound is
  // measured against.
  absl::Time validated = absl::InfinitePast();
  // The store's validator (an HTTP ETag) for conditional requests; empty for other stores.
  std::string etag;

  // Which bytes of the stored value `value` holds: [offset, offset + value.size()) of a value
  // of size() bytes. A block, or a range read by the block, has a total_size; a value held
  // whole has none.
  uint64_t offset = 0;
  std::optional<uint64_t> total_size;
  uint64_t size() const { return total_size.value_or(value.size()); }
  bool whole() const { return offset == 0 && size() == value.size(); }
};

struct HostCacheOptions {
  uint64_t capacity_bytes = 1ull << 30;
  // Values larger than this fraction of the capacity bypass the cache instead of flushing it.
  double max_entry_fraction = 0.25;
  EvictionPolicy policy = EvictionPolicy::kS3Fifo;
  size_t shards = 32;
};

struct HostCacheStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t entries = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t inserts = 0;
  uint64_t evictions = 0;
  uint64_t evicted_bytes = 0;
  uint64_t not_admitted = 0;  // values too large for the cache
  // Leased (pinned) values no longer in the cache (replaced, deleted): still in memory until
  // their leases end, and counted against the budget until then.
  uint64_t detached_pinned_bytes = 0;
};

class HostCache {
 public:
  explicit HostCache(const HostCacheOptions& options);
  ~HostCache();
  HostCache(const HostCache&) = delete;
  HostCache& operator=(const HostCache&) = delete;

  // The cached value under `key`, counting a hit or a miss. Thread-safe.
  std::optional<CachedValue> Lookup(absl::string_view key);
  // Like Lookup, without counting or touching the eviction state.
  std::optional<CachedValue> Peek(absl::string_view key) const;

  // Stores `value` under `key`, replacing any entry, and evicts until the cache is within its
  // budget. Returns false (and caches nothing) when the value is too large to admit, or when
  // pinned entries leave no room for it.
  bool Insert(absl::string_view key, CachedValue value);

  // Removes `key` if present.
  void Erase(absl::string_view key);
  // Removes `key` if its cached generation is `generation` (not a newer value put meanwhile).
  void EraseIfGeneration(absl::string_view key, Generation generation);
  // Records that the store still held `generation` under `key` at `when`, if that is the
  // cached generation; returns whether it was.
  bool MarkValidated(absl::string_view key, Generation generation, absl::Time when);

  // The size above which values are not admitted.
  uint64_t max_entry_bytes() const { return max_entry_bytes_; }
  uint64_t capacity_bytes() const { return capacity_; }
  EvictionPolicy policy() const { return policy_; }
  HostCacheStats stats() const;

 private:
  enum class Queue : uint8_t { kSmall, kMain };
  struct Node {
    std::string key;
    CachedValue value;
    uint64_t bytes = 0;
    Queue queue = Queue::kSmall;
    std::atomic<uint8_t> frequency{0};  // S3-FIFO: hits since insertion or reinsertion, capped
    std::list<Node>::iterator self;
  };
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, Node*> index ABSL_GUARDED_BY(mu);
  };

  Shard& ShardFor(absl::string_view key) const;
  // Evicts entries until `used_ <= capacity_`.
  void EvictLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  // Removes `node` from the index and its queue, and frees it.
  void RemoveLocked(Node* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  // Forgets detached pinned blocks whose leases have ended.
  void SweepDetachedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  uint64_t AccountedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_) {
    return small_bytes_ + main_bytes_ + detached_bytes_;
  }
  // Each evicts one entry; false when every candidate is pinned.
  bool EvictFromSmallLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  bool EvictFromMainLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  bool EvictLruLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  void RememberGhostLocked(absl::string_view key, uint64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);
  bool TakeGhostLocked(absl::string_view key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(policy_mu_);

  const uint64_t capacity_;
  const uint64_t max_entry_bytes_;
  const EvictionPolicy policy_;
  std::vector<std::unique_ptr<Shard>> shards_;

  // Lock order: policy_mu_, then a shard's mu.
  mutable absl::Mutex policy_mu_;
  // S3-FIFO: new entries enter `small_`; LRU: only `main_` is used, most recent at the front.
  std::list<Node> small_ ABSL_GUARDED_BY(policy_mu_);
  std::list<Node> main_ ABSL_GUARDED_BY(policy_mu_);
  uint64_t small_bytes_ ABSL_GUARDED_BY(policy_mu_) = 0;
  uint64_t main_bytes_ ABSL_GUARDED_BY(policy_mu_) = 0;
  // Ghost queue: hashes of keys recently evicted from `small_`, bounded in bytes by the main
  // queue's share of the budget.
  std::list<std::pair<uint64_t, uint64_t>> ghost_ ABSL_GUARDED_BY(policy_mu_);
  absl::flat_hash_map<uint64_t, std::list<std::pair<uint64_t, uint64_t>>::iterator> ghost_index_
      ABSL_GUARDED_BY(policy_mu_);
  uint64_t ghost_bytes_ ABSL_GUARDED_BY(policy_mu_) = 0;
  std::vector<std::shared_ptr<const buffer::Block>> detached_ ABSL_GUARDED_BY(policy_mu_);
  uint64_t detached_bytes_ ABSL_GUARDED_BY(policy_mu_) = 0;

  std::atomic<uint64_t> used_bytes_{0};
  std::atomic<uint64_t> entries_{0};
  std::atomic<uint64_t> hits_{0}, misses_{0}, inserts_{0}, evictions_{0}, evicted_bytes_{0},
      not_admitted_{0};
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_HOST_CACHE_H_

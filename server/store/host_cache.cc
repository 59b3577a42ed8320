#include "server/store/host_cache.h"

#include <algorithm>

#include "absl/hash/hash.h"

namespace chunkd::server {
namespace {

// S3-FIFO parameters from the paper: the small queue holds 10% of the bytes and frequencies
// are capped at 3. An entry moves from the small queue to the main one when it was hit at least
// once while in the small queue (the paper's reference implementation's default).
constexpr double kSmallFraction = 0.10;
constexpr uint8_t kMaxFrequency = 3;
constexpr uint8_t kPromoteFrequency = 1;

uint64_t GhostHash(absl::string_view key) {
  // Stable within the process; collisions only cost a wrong guess about admission.
  return absl::HashOf(key);
}

}  // namespace

std::optional<EvictionPolicy> ParseEvictionPolicy(absl::string_view name) {
  if (name == "s3fifo" || name == "s3-fifo") return EvictionPolicy::kS3Fifo;
  if (name == "lru") return EvictionPolicy::kLru;
  return std::nullopt;
}

const char* EvictionPolicyName(EvictionPolicy policy) {
  return policy == EvictionPolicy::kLru ? "lru" : "s3fifo";
}

HostCache::HostCache(const HostCacheOptions& options)
    : capacity_(options.capacity_bytes),
      max_entry_bytes_(static_cast<uint64_t>(static_cast<double>(options.capacity_bytes) *
                                             std::clamp(options.max_entry_fraction, 0.0, 1.0))),
      policy_(options.policy) {
  size_t n = std::max<size_t>(1, options.shards);
  shards_.reserve(n);
  for (size_t i = 0; i < n; ++i) shards_.push_back(std::make_unique<Shard>());
}

HostCache::~HostCache() = default;

HostCache::Shard& HostCache::ShardFor(absl::string_view key) const {
  return *shards_[absl::HashOf(key) % shards_.size()];
}

std::optional<CachedValue> HostCache::Lookup(absl::string_view key) {
  Shard& shard = ShardFor(key);
  if (policy_ == EvictionPolicy::kLru) {
    absl::MutexLock policy_lock(&policy_mu_);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.index.find(key);
    if (it == shard.index.end()) {
      misses_.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    main_.splice(main_.begin(), main_, it->second->self);
    hits_.fetch_add(1, std::memory_order_relaxed);
    return it->second->value;
  }
  absl::MutexLock lock(&shard.mu);
  auto it = shard.index.find(key);
  if (it == shard.index.end()) {
    misses_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  Node* node = it->second;
  uint8_t f = node->frequency.load(std::memory_order_relaxed);
  if (f < kMaxFrequency) node->frequency.store(f + 1, std::memory_order_relaxed);
  hits_.fetch_add(1, std::memory_order_relaxed);
  return node->value;
}

std::optional<CachedValue> HostCache::Peek(absl::string_view key) const {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.index.find(key);
  if (it == shard.index.end()) return std::nullopt;
  return it->second->value;
}

bool HostCache::Insert(absl::string_view key, CachedValue value) {
  uint64_t bytes = value.value.size();
  absl::MutexLock policy_lock(&policy_mu_);
  {
    Shard& shard = ShardFor(key);
    Node* old = nullptr;
    {
      absl::MutexLock lock(&shard.mu);
      auto it = shard.index.find(key);
      if (it != shard.index.end()) old = it->second;
    }
    if (old != nullptr) RemoveLocked(old);
  }
  if (bytes > max_entry_bytes_ || bytes > capacity_) {
    not_admitted_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  std::list<Node>* queue = &main_;
  Queue which = Queue::kMain;
  if (policy_ == EvictionPolicy::kS3Fifo && !TakeGhostLocked(key)) {
    queue = &small_;
    which = Queue::kSmall;
  }
  queue->emplace_front();
  Node* node = &queue->front();
  node->self = queue->begin();
  node->key = std::string(key);
  node->value = std::move(value);
  node->bytes = bytes;
  node->queue = which;
  (which == Queue::kSmall ? small_bytes_ : main_bytes_) += bytes;
  {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    shard.index[node->key] = node;
  }
  used_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  entries_.fetch_add(1, std::memory_order_relaxed);
  inserts_.fetch_add(1, std::memory_order_relaxed);
  EvictLocked();
  if (AccountedLocked() > capacity_) {
    // Pinned entries fill the budget: serve this value without caching it.
    Shard& shard = ShardFor(key);
    Node* inserted = nullptr;
    {
      absl::MutexLock lock(&shard.mu);
      auto it = shard.index.find(key);
      if (it != shard.index.end()) inserted = it->second;
    }
    if (inserted != nullptr) RemoveLocked(inserted);
    inserts_.fetch_sub(1, std::memory_order_relaxed);
    not_admitted_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void HostCache::Erase(absl::string_view key) {
  absl::MutexLock policy_lock(&policy_mu_);
  Shard& shard = ShardFor(key);
  Node* node = nullptr;
  {
    absl::MutexLock lock(&shard.mu);
    auto it = shard.index.find(key);
    if (it == shard.index.end()) return;
    node = it->second;
  }
  RemoveLocked(node);
}

void HostCache::EraseIfGeneration(absl::string_view key, Generation generation) {
  absl::MutexLock policy_lock(&policy_mu_);
  Shard& shard = ShardFor(key);
  Node* node = nullptr;
  {
    absl::MutexLock lock(&shard.mu);
    auto it = shard.index.find(key);
    if (it == shard.index.end() || it->second->value.generation != generation) return;
    node = it->second;
  }
  RemoveLocked(node);
}

bool HostCache::MarkValidated(absl::string_view key, Generation generation, absl::Time when) {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.index.find(key);
  if (it == shard.index.end() || it->second->value.generation != generation) return false;
  // Lookups copy the value under this lock, so the time is never read half written.
  CachedValue& value = it->second->value;
  value.validated = std::max(value.validated, when);
  return true;
}

void HostCache::RemoveLocked(Node* node) {
  {
    Shard& shard = ShardFor(node->key);
    absl::MutexLock lock(&shard.mu);
    shard.index.erase(node->key);
  }
  used_bytes_.fetch_sub(node->bytes, std::memory_order_relaxed);
  entries_.fetch_sub(1, std::memory_order_relaxed);
  if (const auto& block = node->value.value.block(); block && block->pinned()) {
    detached_.push_back(block);
    detached_bytes_ += node->bytes;
  }
  if (node->queue == Queue::kSmall) {
    small_bytes_ -= node->bytes;
    small_.erase(node->self);
  } else {
    main_bytes_ -= node->bytes;
    main_.erase(node->self);
  }
}

void HostCache::SweepDetachedLocked() {
  for (size_t i = 0; i < detached_.size();) {
    if (!detached_[i]->pinned()) {
      detached_bytes_ -= detached_[i]->size();
      detached_[i] = std::move(detached_.back());
      detached_.pop_back();
    } else {
      ++i;
    }
  }
}

void HostCache::EvictLocked() {
  SweepDetachedLocked();
  while (AccountedLocked() > capacity_) {
    bool evicted;
    if (policy_ == EvictionPolicy::kLru) {
      evicted = EvictLruLocked();
    } else if (!small_.empty() &&
               (small_bytes_ >= static_cast<uint64_t>(capacity_ * kSmallFraction) ||
                main_.empty())) {
      evicted = EvictFromSmallLocked() || EvictFromMainLocked();
    } else {
      evicted = EvictFromMainLocked() || EvictFromSmallLocked();
    }
    if (!evicted) return;  // everything left is pinned
  }
}

bool HostCache::EvictLruLocked() {
  // From the least recently used end, skipping pinned entries.
  for (auto it = main_.rbegin(); it != main_.rend(); ++it) {
    Node* victim = &*it;
    if (victim->value.value.block() && victim->value.value.block()->pinned()) continue;
    evictions_.fetch_add(1, std::memory_order_relaxed);
    evicted_bytes_.fetch_add(victim->bytes, std::memory_order_relaxed);
    RemoveLocked(victim);
    return true;
  }
  return false;
}

bool HostCache::EvictFromSmallLocked() {
  // Entries hit while in the small queue, and pinned ones, move to the main one; the first
  // entry never hit is evicted and remembered in the ghost queue.
  while (!small_.empty()) {
    Node* tail = &small_.back();
    bool pinned = tail->value.value.block() && tail->value.value.block()->pinned();
    if (pinned || tail->frequency.load(std::memory_order_relaxed) >= kPromoteFrequency) {
      tail->frequency.store(0, std::memory_order_relaxed);
      tail->queue = Queue::kMain;
      small_bytes_ -= tail->bytes;
      main_bytes_ += tail->bytes;
      main_.splice(main_.begin(), small_, tail->self);
      continue;
    }
    RememberGhostLocked(tail->key, tail->bytes);
    evictions_.fetch_add(1, std::memory_order_relaxed);
    evicted_bytes_.fetch_add(tail->bytes, std::memory_order_relaxed);
    RemoveLocked(tail);
    return true;
  }
  return false;
}

bool HostCache::EvictFromMainLocked() {
  // Reinsertion: an entry hit since it was last looked at goes back to the head with one
  // hit fewer; the first one with none is evicted. Pinned entries go back to the head; a whole
  // round of them means nothing here can be evicted.
  size_t pinned_seen = 0;
  while (!main_.empty() && pinned_seen < main_.size()) {
    Node* tail = &main_.back();
    if (tail->value.value.block() && tail->value.value.block()->pinned()) {
      ++pinned_seen;
      main_.splice(main_.begin(), main_, tail->self);
      continue;
    }
    uint8_t f = tail->frequency.load(std::memory_order_relaxed);
    if (f > 0) {
      tail->frequency.store(f - 1, std::memory_order_relaxed);
      main_.splice(main_.begin(), main_, tail->self);
      continue;
    }
    evictions_.fetch_add(1, std::memory_order_relaxed);
    evicted_bytes_.fetch_add(tail->bytes, std::memory_order_relaxed);
    RemoveLocked(tail);
    return true;
  }
  return false;
}

void HostCache::RememberGhostLocked(absl::string_view key, uint64_t bytes) {
  uint64_t hash = GhostHash(key);
  if (auto it = ghost_index_.find(hash); it != ghost_index_.end()) {
    ghost_bytes_ -= it->second->second;
    ghost_.erase(it->second);
    ghost_index_.erase(it);
  }
  ghost_.emplace_front(hash, bytes);
  ghost_index_[hash] = ghost_.begin();
  ghost_bytes_ += bytes;
  uint64_t limit = capacity_ - static_cast<uint64_t>(capacity_ * kSmallFraction);
  while (ghost_bytes_ > limit && !ghost_.empty()) {
    ghost_bytes_ -= ghost_.back().second;
    ghost_index_.erase(ghost_.back().first);
    ghost_.pop_back();
  }
}

bool HostCache::TakeGhostLocked(absl::string_view key) {
  auto it = ghost_index_.find(GhostHash(key));
  if (it == ghost_index_.end()) return false;
  ghost_bytes_ -= it->second->second;
  ghost_.erase(it->second);
  ghost_index_.erase(it);
  return true;
}

HostCacheStats HostCache::stats() const {
  HostCacheStats s;
  s.capacity_bytes = capacity_;
  s.used_bytes = used_bytes_.load(std::memory_order_relaxed);
  s.entries = entries_.load(std::memory_order_relaxed);
  s.hits = hits_.load(std::memory_order_relaxed);
  s.misses = misses_.load(std::memory_order_relaxed);
  s.inserts = inserts_.load(std::memory_order_relaxed);
  s.evictions = evictions_.load(std::memory_order_relaxed);
  s.evicted_bytes = evicted_bytes_.load(std::memory_order_relaxed);
  s.not_admitted = not_admitted_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&policy_mu_);
  s.detached_pinned_bytes = detached_bytes_;
  return s;
}

}  // namespace chunkd::server

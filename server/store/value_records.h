// What the engine knows of values it holds by the block: size, version and when the store last
// confirmed them. A block is served only at its value's recorded generation, so dropping a
// record (a write, a change found by validation) retires every block of the old version at
// once; those blocks are then never hit again and leave the cache by eviction.
//
// Bounded by count: past the limit an arbitrary record of the shard goes (its blocks will be
// read again if asked for). Thread-safe.
#ifndef CHUNKD_SERVER_STORE_VALUE_RECORDS_H_
#define CHUNKD_SERVER_STORE_VALUE_RECORDS_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/backend/backend.h"

namespace chunkd::server {

struct ValueRecord {
  ValueInfo info;  // size, generation and validator of the whole value
  absl::Time validated = absl::InfinitePast();
  // Where the last block read of the value ended: a read starting there is sequential.
  uint64_t next_offset = 0;
};

class ValueRecords {
 public:
  explicit ValueRecords(size_t max_records) : per_shard_(max_records / kShards + 1) {}

  std::optional<ValueRecord> Find(absl::string_view key) const {
    const Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.records.find(key);
    if (it == shard.records.end()) return std::nullopt;
    return it->second;
  }

  // Records what the store answered at `when`: a new record, or a newer confirmation of the
  // recorded version; another version replaces the record (its blocks retire).
  void Confirm(absl::string_view key, const ValueInfo& info, absl::Time when) {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.records.find(key);
    if (it != shard.records.end() && it->second.info.generation == info.generation) {
      it->second.validated = std::max(it->second.validated, when);
      return;
    }
    if (it == shard.records.end() && shard.records.size() >= per_shard_) {
      shard.records.erase(shard.records.begin());
    }
    shard.records[key] = ValueRecord{info, when, 0};
  }

  // Notes where a read ended; returns where the previous one did.
  uint64_t ExchangeNextOffset(absl::string_view key, uint64_t next) {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.records.find(key);
    if (it == shard.records.end()) return ~uint64_t{0};
    return std::exchange(it->second.next_offset, next);
  }

  void Erase(absl::string_view key) {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    shard.records.erase(key);
  }
  void EraseIfGeneration(absl::string_view key, Generation generation) {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.records.find(key);
    if (it != shard.records.end() && it->second.info.generation == generation) {
      shard.records.erase(it);
    }
  }

 private:
  static constexpr size_t kShards = 32;
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, ValueRecord> records ABSL_GUARDED_BY(mu);
  };
  Shard& ShardFor(absl::string_view key) { return shards_[absl::HashOf(key) % kShards]; }
  const Shard& ShardFor(absl::string_view key) const {
    return shards_[absl::HashOf(key) % kShards];
  }

  const size_t per_shard_;
  std::array<Shard, kShards> shards_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_VALUE_RECORDS_H_

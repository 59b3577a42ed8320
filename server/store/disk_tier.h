// The disk tier: cache entries (whole values and blocks of values of a remote store) kept in a
// local directory below the host cache, bounded in bytes, surviving restarts and kill -9.
//
// The interface is what ChunkStore needs; the layout and I/O choices are the implementation's
// (see the comment in disk_tier.cc and docs/disk-tier.md for why, with the measurements).
//
// Guarantees:
// - An entry is served only if its bytes match the crc32c written with them (a torn or
//   corrupted entry is counted, dropped, and read again from the store by the caller).
// - The files under the directory never hold more than `capacity_bytes` of entries; when the
//   filesystem fills for other reasons (ENOSPC) the tier evicts, shrinks its capacity to what
//   it holds and says so (log and counter). Writes are best effort: the tier never fails a read.
// - An entry dropped (its value changed or was deleted) does not come back after a restart.
// - Open returns at once: the index of an existing directory loads in the background, and
//   lookups miss until it has.
#ifndef CHUNKD_SERVER_STORE_DISK_TIER_H_
#define CHUNKD_SERVER_STORE_DISK_TIER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "buffer/memory.h"
#include "server/backend/backend.h"
#include "server/store/host_cache.h"

namespace chunkd::server {

struct DiskTierOptions {
  // Created if missing. One chunkd at a time: Open fails if another process holds it.
  std::string dir;
  uint64_t capacity_bytes = 0;
  // Threads writing entries behind reads, and the most bytes of entries queued for them; an
  // entry offered past that is not written (counted), so a slow disk never holds memory or
  // slows a read.
  size_t write_threads = 2;
  uint64_t max_queued_write_bytes = 64ull << 20;
};

// Which part of a value an entry holds: the whole value, or one block of block_bytes.
inline constexpr uint64_t kWholeValue = ~uint64_t{0};

struct DiskTierStats {
  uint64_t capacity_bytes = 0;  // current capacity (lower than configured after ENOSPC)
  uint64_t used_bytes = 0;
  uint64_t entries = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t writes = 0;  // entries written
  uint64_t write_bytes = 0;
  uint64_t writes_dropped = 0;  // entries not written: queue full, or a write that failed
  uint64_t evictions = 0;
  uint64_t evicted_bytes = 0;
  uint64_t checksum_failures = 0;
  uint64_t enospc_events = 0;
  bool index_loaded = false;
  uint64_t index_load_micros = 0;  // how long the index took to load at start-up
  uint64_t index_bytes = 0;        // memory the in-memory index takes
};

class DiskTier {
 public:
  // Opens (creating) the tier in options.dir and starts loading what it already holds.
  // `allocator`: where entries read from disk are placed (the shared-memory arena when
  // shared-memory delivery is on, so a promoted entry can be handed out as a handle).
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options,
                                                        buffer::HostAllocator* allocator);
  virtual ~DiskTier() = default;

  // The entry `part` (kWholeValue or a block index) of the value under `key`, if the tier holds
  // it at generation `generation` (0: whichever it holds). Blocking (a read from disk): call it
  // on an I/O thread, never on a gRPC thread. The CachedValue has the generation, etag,
  // validation time, offset and total_size it was written with.
  virtual std::optional<CachedValue> Read(absl::string_view key, uint64_t part,
                                          Generation generation) = 0;
  // What the tier knows of the value under `key` (size, generation, etag, when the store last
  // confirmed it): seeds a restarted server's record of a value read by the block, so that it
  // is revalidated (a conditional request), not read again. A memory lookup.
  virtual std::optional<std::pair<ValueInfo, absl::Time>> Record(absl::string_view key) = 0;
  // Offers `entry` (part `part` of the value under `key`) to be written behind; never blocks.
  // An entry of another generation than the ones the tier holds of `key` replaces them.
  virtual void Write(absl::string_view key, uint64_t part, const CachedValue& entry) = 0;
  // Drops every entry of `key` (the value changed or was deleted), durably.
  virtual void Drop(absl::string_view key) = 0;
  // Waits until the writes queued so far are on disk (tests, shutdown).
  virtual void Flush() = 0;
  virtual DiskTierStats stats() const = 0;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_DISK_TIER_H_

// The store the service talks to: a backend, the host cache in front of it, single-flight
// reads and an I/O pool.
//
// Reads: a hit is answered from the cache on the caller's thread. Concurrent misses on one key
// cause exactly one backend read (single flight); every waiter gets its result. Writes and
// deletes go through to the backend before they are acknowledged, then update the cache; a
// read that was in flight when a write landed does not put its (older) value in the cache.
#ifndef CHUNKD_SERVER_STORE_CHUNK_STORE_H_
#define CHUNKD_SERVER_STORE_CHUNK_STORE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/backend/backend.h"
#include "server/store/host_cache.h"
#include "server/common/executor.h"

namespace chunkd::server {

struct ChunkStoreOptions {
  HostCacheOptions cache;
  size_t io_threads = 8;
  // Backend operations waiting for an I/O thread; past this, new ones fail with UNAVAILABLE.
  size_t max_queued_io = 4096;
};

struct ChunkStoreCounters {
  uint64_t backend_reads = 0;
  uint64_t backend_read_errors = 0;  // failed reads, missing keys not included
  uint64_t backend_not_found = 0;    // reads of keys the store does not hold
  uint64_t backend_read_bytes = 0;
  uint64_t backend_read_micros = 0;  // total time spent in backend reads
  uint64_t single_flight_joins = 0;  // misses that waited on a read already in flight
  uint64_t writes = 0;
  uint64_t deletes = 0;
  uint64_t overloaded = 0;  // operations refused because the I/O queue was full
};

class ChunkStore {
 public:
  using ReadCallback = absl::AnyInvocable<void(absl::StatusOr<CachedValue>) &&>;

  ChunkStore(std::unique_ptr<Backend> backend, const ChunkStoreOptions& options);
  ~ChunkStore();

  // Reads the whole value under `key` and calls `done` exactly once: on this thread for a
  // cache hit, else on an I/O thread. REQUIRES: ValidateKey(key).ok().
  void Read(absl::string_view key, ReadCallback done);
  // Read, waiting for the result. Must not be called on an I/O thread.
  absl::StatusOr<CachedValue> ReadAndWait(absl::string_view key);

  // Runs `task` on an I/O thread; UNAVAILABLE when the queue is full.
  absl::Status Submit(absl::AnyInvocable<void() &&> task);

  // Size and generation of a cached value: a memory lookup, fine on any thread.
  std::optional<ValueInfo> CachedInfo(absl::string_view key);

  // Blocking operations; call them on an I/O thread (through Submit).
  absl::StatusOr<ValueInfo> Stat(absl::string_view key);
  absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                  const Conditions& conditions);
  absl::Status Delete(absl::string_view key, const Conditions& conditions);
  // Drops the cached copy of `key` (a read in flight does not put its value in the cache
  // either): the next read goes to the backend. The backend is not touched. Any thread.
  void Invalidate(absl::string_view key);
  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix, bool directory);

  Backend& backend() { return *backend_; }
  // Null when the backend holds its values in memory itself (memory://): no second copy.
  HostCache* cache() { return cache_.get(); }
  ChunkStoreCounters counters() const;

 private:
  struct Flight {
    std::vector<ReadCallback> waiters;
    bool stale = false;  // a write or delete landed meanwhile: do not cache the result
  };
  struct FlightShard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, std::shared_ptr<Flight>> flights ABSL_GUARDED_BY(mu);
  };

  FlightShard& FlightShardFor(absl::string_view key);
  absl::Mutex& WriteLockFor(absl::string_view key);
  void RunFlight(std::string key, std::shared_ptr<Flight> flight);
  // Removes `flight` from the table if it is still the one registered for `key`.
  void EraseFlightLocked(FlightShard& shard, absl::string_view key,
                         const std::shared_ptr<Flight>& flight)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu);
  // Marks any read in flight for `key` stale, then applies `update` to the cache.
  void InvalidateFlight(absl::string_view key);

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<HostCache> cache_;
  std::array<FlightShard, 32> flight_shards_;
  // Writers and deleters of one key are serialized, so that the backend and the cache see
  // their updates in the same order. Readers never take these.
  std::array<absl::Mutex, 64> write_locks_;

  std::atomic<uint64_t> backend_reads_{0}, backend_read_errors_{0}, backend_not_found_{0},
      backend_read_bytes_{0},
      backend_read_micros_{0}, single_flight_joins_{0}, writes_{0}, deletes_{0}, overloaded_{0};

  // Last member: destroyed first, so queued work finishes while the rest still exists.
  std::unique_ptr<Executor> io_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_CHUNK_STORE_H_

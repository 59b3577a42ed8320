// Derived entries: values computed from a stored value by clients (for Zarr, a chunk decoded by
// its codec chain), held in host memory for every process of the node and never written to the
// store (chunkd.v1's DerivedRead and DerivedPut, proto/chunkd/v1/chunkd.proto).
//
// An entry is identified by (source key, derivation) and holds the generation of the source it
// was derived from. It is served only while that generation is the source's current one: each
// read first reads the source through the ChunkStore with an empty range (a cheap hit when the
// source is cached and fresh under the freshness rules, else a stat, HEAD or record flight as
// for any read), and an entry of another generation is dropped on sight. The ChunkStore also
// tells this cache when a source changes (writes, deletes, invalidations, values found changed
// behind chunkd's back: ChunkStore::SetChangeListener), and the source's entries go at once.
// Entries live in a HostCache of their own budget, their memory allocated by the Put that
// published them (the shared-memory arena when shared-memory delivery is on), so they are
// delivered and leased like any cached value.
//
// Productions: a miss is derived once on the node. The first reader that misses with `produce`
// is told to produce the entry (a production id); readers that miss meanwhile wait for it,
// without holding a thread (their callbacks are kept, at most `max_waiters` of them), until the
// producer publishes (they get the entry), gives up, dies (the process the kernel named for its
// UNIX-socket connection, server/store/process_watch.h) or misses `produce_timeout`: then the
// first waiter that may produce is handed the production (a handoff) and the others keep
// waiting. A waiter past its own deadline ends with DEADLINE_EXCEEDED. One thread watches the
// deadlines and the producers' lives.
//
// Thread-safe.
#ifndef CHUNKD_SERVER_STORE_DERIVED_CACHE_H_
#define CHUNKD_SERVER_STORE_DERIVED_CACHE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/store/chunk_store.h"
#include "server/store/host_cache.h"
#include "server/store/lease_table.h"

namespace chunkd::server {

// The longest derivation a client may name (bytes).
inline constexpr size_t kMaxDerivationBytes = 4096;

struct DerivedCacheOptions {
  // The entries' budget and eviction (capacity_bytes > 0).
  HostCacheOptions cache;
  // How long a producer has to publish before a waiter takes the production over.
  absl::Duration produce_timeout = absl::Seconds(30);
  // How long a reader waits for another's production when it names no wait of its own.
  absl::Duration default_wait = absl::Seconds(10);
  // Readers waiting at once, all entries together; past it a miss that would wait is answered
  // at once with RESOURCE_EXHAUSTED.
  size_t max_waiters = 4096;
};

struct DerivedCacheStats {
  HostCacheStats cache;  // entries, bytes held, capacity, evictions
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t productions = 0;  // productions started (a reader told to produce)
  uint64_t published = 0;    // entries published ("decodes done")
  uint64_t handoffs = 0;     // productions handed to a waiter (producer gone, gave up, late)
  uint64_t abandons = 0;     // productions given up by their producer
  uint64_t wait_timeouts = 0;
  uint64_t waiters_refused = 0;  // misses answered at once because max_waiters wait already
  uint64_t stale_drops = 0;      // entries dropped because their source changed
  uint64_t stale_publishes = 0;  // publications refused: the source had changed
  uint64_t waiting = 0;          // readers waiting now
};

// What a derived read is answered with.
struct DerivedAnswer {
  // A hit: the entry (generation: the source's).
  std::optional<CachedValue> value;
  // A miss this reader is to produce (nonzero), from generation `generation` of the source.
  uint64_t production_id = 0;
  Generation generation = 0;
};

struct DerivedRequest {
  std::string key;
  std::string derivation;
  bool produce = false;
  // 0: DerivedCacheOptions::default_wait.
  absl::Duration wait = absl::ZeroDuration();
  // How the source is read (its freshness bound).
  ReadOptions source;
  // The reader's process when the server knows it (UNIX socket): a production it is handed
  // follows its life.
  std::shared_ptr<const ProcessLife> process;
};

class DerivedCache {
 public:
  using Callback = absl::AnyInvocable<void(absl::StatusOr<DerivedAnswer>) &&>;
  using StatusCallback = absl::AnyInvocable<void(absl::Status) &&>;

  // `store` outlives this cache. Registers itself as the store's change listener.
  DerivedCache(ChunkStore* store, const DerivedCacheOptions& options);
  // Ends every wait (UNAVAILABLE) and stops the watching thread.
  ~DerivedCache();
  DerivedCache(const DerivedCache&) = delete;
  DerivedCache& operator=(const DerivedCache&) = delete;

  // Answers `request` through `done`, exactly once: on this thread, an I/O thread (after a
  // read of the source), the thread of a publication, or the watching thread. NOT_FOUND when
  // the source does not exist, or on a miss without `produce` that nobody is producing.
  // REQUIRES: ValidateKey(key).ok(), 1 <= derivation.size() <= kMaxDerivationBytes.
  void Read(DerivedRequest request, Callback done);

  // Publishes `value` as the entry of (key, derivation) derived from `source_generation`:
  // FAILED_PRECONDITION (nothing stored) when the source is no longer at that generation.
  // Readers waiting for the entry get it. `done` runs on an I/O thread (the source is read).
  void Publish(std::string key, std::string derivation, Generation source_generation,
               uint64_t production_id, buffer::cpu::Buffer value, StatusCallback done);
  // The producer of `production_id` gives it up: a waiter takes it over. Nothing to do (OK)
  // when that production is over already.
  absl::Status Abandon(absl::string_view key, absl::string_view derivation, uint64_t production_id);

  // Fails every wait with UNAVAILABLE (the server is shutting down) and refuses new ones.
  void Shutdown();

  DerivedCacheStats stats() const;

 private:
  struct Waiter {
    DerivedRequest request;
    Callback done;
    absl::Time deadline;
  };
  struct Production {
    uint64_t id = 0;
    Generation generation = 0;
    absl::Time deadline;
    std::shared_ptr<const ProcessLife> producer;
    std::vector<Waiter> waiters;
  };
  // What to run once mu_ is released: answers, and reads to start again.
  struct Deferred {
    std::vector<std::pair<Callback, absl::StatusOr<DerivedAnswer>>> answers;
    std::vector<Waiter> restarts;
    void Run(DerivedCache* cache);
  };

  // (key, derivation) as one string: keys hold no NUL.
  static std::string EntryKey(absl::string_view key, absl::string_view derivation);
  // The read once the source's current generation is known.
  void Resolve(DerivedRequest request, Generation generation, Callback done);
  // The entries of `key` go (its value changed).
  void SourceChanged(absl::string_view key);
  // Hands production `it` to its first waiter that may produce, or ends it (the others told
  // NOT_FOUND) when none may.
  void HandOffLocked(absl::flat_hash_map<std::string, Production>::iterator it, Deferred* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Remembers that `entry` (of `key`) is cached, for SourceChanged.
  void IndexLocked(absl::string_view key, const std::string& entry)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Watch();

  ChunkStore* const store_;
  const DerivedCacheOptions options_;
  HostCache cache_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Production> productions_ ABSL_GUARDED_BY(mu_);
  // The entries of each source key (some may have been evicted since).
  absl::flat_hash_map<std::string, absl::flat_hash_set<std::string>> by_source_
      ABSL_GUARDED_BY(mu_);
  size_t indexed_ ABSL_GUARDED_BY(mu_) = 0;
  size_t waiting_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::CondVar wake_;

  std::atomic<uint64_t> hits_{0}, misses_{0}, productions_started_{0}, published_{0}, handoffs_{0},
      abandons_{0}, wait_timeouts_{0}, waiters_refused_{0}, stale_drops_{0}, stale_publishes_{0};

  std::thread watcher_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_DERIVED_CACHE_H_

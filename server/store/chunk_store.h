// The store the service talks to: a backend, the host cache in front of it, single-flight
// reads and an I/O pool.
//
// Reads: a hit is answered from the cache on the caller's thread. Concurrent misses on one key
// cause exactly one backend read (single flight); every waiter gets its result. Writes and
// deletes go through to the backend before they are acknowledged, then update the cache; a
// read that was in flight when a write landed does not put its (older) value in the cache. A
// write or delete that fails drops the cached copy too: its outcome may be unknown (a timeout
// after the store acted), so the next read asks the store.
//
// Blocks: a value read whole that is at most whole_read_bytes() is one cache entry, as read.
// Ranges of other values, and values larger than that, are read and cached as aligned blocks of
// `block_bytes` of one version: a miss reads from the store only the blocks the range covers
// (runs of adjacent missing blocks in one ranged request for remote stores), each block read
// once however many readers miss it (single flight per block). A value's blocks are served
// only at the version its ValueRecord names; the blocks of one read are all of one version
// (ranged reads after the first are conditional on it): a change between two block reads
// retries the read once at the new version, else fails with ABORTED. A read walking a value
// sequentially has the next `read_ahead_blocks` blocks fetched ahead of it. A read answers at
// most ReadOptions::max_extent_bytes at once; a range over several blocks is copied into one
// buffer counted against the read budget (server/store/read_budget.h).
//
// Freshness: the store may change behind chunkd's back (other writers). Each cached value
// remembers when the store last confirmed it (CachedValue::validated). A hit older than the
// read's bound is validated first: on the caller's thread with a stat for the file store
// (Validation::kLocal), else by one conditional request per key at a time on an I/O thread
// (a revalidation flight, which readers of the key join as they join a miss). The bound is the
// request's own when it gives one, else the policy (FreshnessOptions): Zarr metadata every
// read, immutable prefixes never, other keys after `revalidate_after`. A revalidation the store
// cannot answer (unreachable) serves the cached copy with its old validation time, so an outage
// of the store does not fail reads the cache can answer.
//
// The disk tier (optional, remote stores only: server/store/disk_tier.h): below the host cache.
// Policy: every value and block read from the store is offered to it as it is inserted in the
// host cache (written behind, on the tier's own threads; never on the read's path). Writing on
// eviction from memory instead would write less, but what is only in memory is lost when the
// server is killed (kill -9, OOM): written behind, a pass over a dataset is on disk as soon as
// it has been read, and a restarted server serves it without reading the store again. A host
// miss asks the tier before the store, on an I/O thread: a whole value (at any generation;
// held to the read's freshness bound like any cached copy: one conditional request when it is
// older, and a 304 moves no bytes), a block (at its value's recorded generation). A value
// without a record takes the tier's (DiskTier::Record), so a restarted server validates it
// (one HEAD) instead of reading it again. A hit is promoted: inserted in the host cache and then
// served as any hit. Whatever finds a value changed or gone (writes, deletes, validations,
// Invalidate) drops it from the tier too.
#ifndef CHUNKD_SERVER_STORE_CHUNK_STORE_H_
#define CHUNKD_SERVER_STORE_CHUNK_STORE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/backend/backend.h"
#include "server/common/byte_range.h"
#include "server/common/executor.h"
#include "server/store/disk_tier.h"
#include "server/store/host_cache.h"
#include "server/store/read_budget.h"
#include "server/store/value_records.h"

namespace chunkd::server {

// Zarr v2 and v3 metadata: where a store changes shape; small, so validating them is cheap.
inline constexpr const char* kZarrMetadataNames[] = {"zarr.json", ".zarray", ".zattrs", ".zgroup",
                                                     ".zmetadata"};

struct FreshnessOptions {
  // How long a cached value is served without validating it against the store. nullopt: the
  // backend's default (Backend::default_revalidate_after: file 0, i.e. every read; s3 and
  // http 60 s). absl::InfiniteDuration(): never (served until evicted).
  std::optional<absl::Duration> revalidate_after;
  // Keys whose last segment is one of these are validated on every read.
  std::vector<std::string> always_revalidate_names{std::begin(kZarrMetadataNames),
                                                   std::end(kZarrMetadataNames)};
  // Keys starting with one of these are never validated, whatever a request asks: the
  // operator declares that values there are never replaced (snapshot stores, content-addressed
  // chunks).
  std::vector<std::string> immutable_prefixes;
};

// What one read accepts from the cache.
struct ReadOptions {
  // Serve a cached value only if the store confirmed it at or after this time. nullopt: the
  // policy of FreshnessOptions for the key. absl::InfinitePast(): any cached value.
  std::optional<absl::Time> validated_since;
  // Only this version of the value (0: any); another is ABORTED. A caller reading a value in
  // several pieces passes the first piece's generation, so that versions never mix.
  Generation if_generation = 0;
  // The most bytes the caller takes in one answer: a longer range is answered with its first
  // part (ending on a block boundary) and the caller reads on from where it ends.
  uint64_t max_extent_bytes = ~uint64_t{0};
  // Where the caller's whole read ends, when it reads a range in several pieces: blocks past
  // it are not fetched ahead.
  uint64_t read_ahead_end = ~uint64_t{0};
};

struct ChunkStoreOptions {
  HostCacheOptions cache;
  FreshnessOptions freshness;
  // 0: 8 for a local store, 64 for a remote one (Validation::kRemote), whose threads mostly
  // wait for a round trip.
  size_t io_threads = 0;
  // Backend operations waiting for an I/O thread; past this, new ones fail with UNAVAILABLE.
  size_t max_queued_io = 4096;
  // The unit of caching for ranges and large values (see above).
  uint64_t block_bytes = 256 << 10;
  // Blocks fetched ahead of a sequential reader; read_ahead_blocks x block_bytes is also the
  // largest value read whole in one request (whole_read_bytes).
  size_t read_ahead_blocks = 128;
  // Bytes reads may hold outside the cache (ranges assembled from blocks); past it a read
  // fails with RESOURCE_EXHAUSTED.
  uint64_t read_budget_bytes = 256ull << 20;
  // Where block copies and assembled ranges are allocated (the shared-memory arena when
  // shared-memory delivery is on, so that they can be handed out as handles).
  buffer::HostAllocator* allocator = &buffer::HeapAllocator();
  // The disk tier below the host cache (see above), or null. Not owned: it must outlive the
  // store. Only for remote stores (Validation::kRemote).
  DiskTier* disk = nullptr;
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
  // Freshness: validations of cached values (stats for the file store, conditional requests
  // for remote ones), those that found the value unchanged (HTTP 304), and cached values found
  // changed or removed behind chunkd's back (dropped or replaced).
  uint64_t revalidations = 0;
  uint64_t revalidations_not_modified = 0;
  uint64_t stale_invalidations = 0;
  // Revalidations the store could not answer (unreachable, 5xx after retries): the cached
  // copy was served as it was.
  uint64_t revalidation_errors = 0;
  // Writes and deletes that failed and so dropped the cached copy (outcome possibly unknown).
  uint64_t failed_write_invalidations = 0;
  // Blocks: ranged reads of the store (a run of adjacent blocks each), the blocks they
  // brought, those fetched ahead of a sequential reader, and reads that found the value
  // changed between two of its blocks (retried at the new version, or failed).
  uint64_t block_reads = 0;
  uint64_t blocks_read = 0;
  uint64_t read_ahead_blocks = 0;
  uint64_t changed_during_read = 0;
  // The disk tier: entries read from it into the host cache, and their bytes.
  uint64_t disk_promotions = 0;
  uint64_t disk_promoted_bytes = 0;
};

class ChunkStore {
 public:
  using ReadCallback = absl::AnyInvocable<void(absl::StatusOr<CachedValue>) &&>;

  ChunkStore(std::unique_ptr<Backend> backend, const ChunkStoreOptions& options);
  ~ChunkStore();

  // Reads `range` of the value under `key` and calls `done` exactly once: on this thread for
  // a cache hit (validated here when that is a stat), else on an I/O thread. The answer holds
  // at least the bytes the range selects (clipped to the value, and to max_extent_bytes): the
  // whole value when it is cached whole, else exactly those bytes (CachedValue::offset,
  // total_size). REQUIRES: ValidateKey(key).ok(), range.Validate().ok().
  void Read(absl::string_view key, const ByteRange& range, const ReadOptions& options,
            ReadCallback done);
  void Read(absl::string_view key, const ReadOptions& options, ReadCallback done) {
    Read(key, ByteRange::All(), options, std::move(done));
  }
  void Read(absl::string_view key, ReadCallback done) { Read(key, ReadOptions(), std::move(done)); }
  // Read, waiting for the result. Must not be called on an I/O thread.
  absl::StatusOr<CachedValue> ReadAndWait(absl::string_view key,
                                          const ReadOptions& options = ReadOptions(),
                                          const ByteRange& range = ByteRange::All());

  uint64_t block_bytes() const { return block_bytes_; }
  // The largest value read whole in one request and cached as one entry.
  uint64_t whole_read_bytes() const { return whole_read_bytes_; }
  ReadBudgetStats read_budget() const { return budget_.stats(); }

  // The time a cached value of `key` must have been validated at or after, under the policy
  // (InfinitePast: any copy will do).
  absl::Time PolicyValidatedSince(absl::string_view key, absl::Time now) const;
  // The effective revalidation interval of keys without a rule of their own.
  absl::Duration revalidate_after() const { return revalidate_after_; }

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
  // either), and from the disk tier: the next read goes to the backend. The backend is not
  // touched. Any thread, but with a disk tier the drop is a durable disk write: prefer an I/O
  // thread.
  void Invalidate(absl::string_view key);
  // `listener` is called with a key whose value changed or may have: a write or delete (failed
  // ones too), an Invalidate, a cached copy or record found changed or removed behind chunkd's
  // back. Derived entries of the key go then (server/store/derived_cache.h). Called on the
  // thread that noticed, with no lock of the store held. Set before serving; null: none.
  void SetChangeListener(absl::AnyInvocable<void(absl::string_view) const> listener);
  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix, bool directory);

  Backend& backend() { return *backend_; }
  // Null when the backend holds its values in memory itself (memory://): no second copy.
  HostCache* cache() { return cache_.get(); }
  // Null without a disk tier.
  const DiskTier* disk() const { return disk_; }
  ChunkStoreCounters counters() const;

 private:
  struct Flight {
    std::vector<ReadCallback> waiters;
    bool stale = false;  // a write or delete landed meanwhile: do not cache the result
    // A revalidation: the cached copy to check (a miss when unset).
    std::optional<CachedValue> cached;
    // A whole value's flight: when it was started (its answer is current as of no earlier
    // than this; readers with a later bound do not join it), or, once it answers with a copy
    // from the disk tier, when that copy was validated. Guarded by its shard's mutex. Record
    // and block flights are joined by every reader: their answers are checked against the
    // value's record.
    absl::Time started;
    // A whole value's flight: the latest bound of the readers it answers (those that joined
    // without a bound of their own past `started`): what a copy from the disk tier must meet
    // to be served without a revalidation.
    absl::Time need = absl::InfinitePast();
    // A record flight: the suffix to read with the record (0: a Stat).
    uint64_t suffix_bytes = 0;
  };
  // The reads of one key in flight: of the whole value, of its record, of its blocks.
  struct KeyFlights {
    std::shared_ptr<Flight> whole;
    std::shared_ptr<Flight> record;
    absl::flat_hash_map<uint64_t, std::shared_ptr<Flight>> blocks;
    bool empty() const { return !whole && !record && blocks.empty(); }
  };
  struct FlightShard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, KeyFlights> flights ABSL_GUARDED_BY(mu);
  };
  struct BlockRead;

  FlightShard& FlightShardFor(absl::string_view key);
  absl::Mutex& WriteLockFor(absl::string_view key);
  void RunFlight(std::string key, std::shared_ptr<Flight> flight);
  // Runs `flight` (registered in `slot` of the key's flights) on an I/O thread; when the queue
  // is full, takes it out again and fails its waiters.
  void LaunchFlight(absl::string_view key, std::shared_ptr<Flight> KeyFlights::*slot,
                    std::shared_ptr<Flight> flight,
                    void (ChunkStore::*run)(std::string, std::shared_ptr<Flight>));
  // Starts or joins the flight of `key`: a miss when `cached` is unset, else a revalidation.
  void StartOrJoinFlight(absl::string_view key, std::optional<CachedValue> cached, absl::Time need,
                         ReadCallback done);
  // Whether a cached copy of `key` was validated recently enough for `need`; validates it on
  // this thread when the backend can do so with a stat. False: it must be revalidated or read.
  bool FreshEnough(absl::string_view key, CachedValue& hit, absl::Time need);
  // Drops the cached copy after a write or delete failed.
  void InvalidateAfterFailure(absl::string_view key);
  // Removes `flight` from `slot` if it is still the one there, and the key's entry once empty.
  void EraseFlightLocked(FlightShard& shard, absl::string_view key,
                         std::shared_ptr<Flight> KeyFlights::*slot,
                         const std::shared_ptr<Flight>& flight)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu);
  // Marks any read in flight for `key` stale and drops the cached copy and record.
  void InvalidateFlight(absl::string_view key);
  // Its part in memory (flights, cache, record), under the shard's lock.
  void InvalidateMemory(absl::string_view key);
  // The value of `key` changed or may have: tells the change listener. NoteStale: found
  // changed behind chunkd's back (counted, and dropped from the disk tier).
  void NoteChanged(absl::string_view key);
  void NoteStale(absl::string_view key);

  // The block path (values not cached whole). `record`: what is known of the value, if
  // anything yet; `attempt`: 1 once the read was retried after the value changed under it.
  void ReadBlocks(std::string key, ByteRange range, absl::Time need, ReadOptions options,
                  int attempt, std::optional<ValueRecord> record, ReadCallback done);
  // Validates `record` against the store (a stat, or a HEAD for a remote store): confirmed, it
  // counts as validated now; changed or removed, it is dropped (its blocks retire) and reset. A
  // remote store that cannot answer leaves it as it was (served, as whole values are).
  void ValidateRecord(absl::string_view key, std::optional<ValueRecord>& record);
  // No record: learns the value's size and version (reading what it can on the way).
  void FirstTouch(std::string key, ByteRange range, absl::Time need, ReadOptions options,
                  int attempt, ReadCallback done);
  void StartOrJoinRecordFlight(absl::string_view key, uint64_t suffix_bytes, ReadCallback done);
  void RunRecordFlight(std::string key, std::shared_ptr<Flight> flight);
  // Reads blocks [start, end) cover, from the cache or the store, and answers with the range.
  void StartBlockRead(std::string key, uint64_t start, uint64_t end, ByteRange range,
                      absl::Time need, ReadOptions options, int attempt,
                      std::optional<ValueRecord> record, ReadCallback done);
  void FinishBlockRead(std::shared_ptr<BlockRead> read);
  // Starts or joins the reads of `indices` (ascending); `waiter(i)` (may be null: read-ahead)
  // gets block indices[i].
  void FetchBlocks(absl::string_view key, const std::vector<uint64_t>& indices,
                   const std::optional<ValueInfo>& expected,
                   const std::function<ReadCallback(size_t)>& waiter);
  void RunBlocks(std::string key, uint64_t first, std::vector<std::shared_ptr<Flight>> flights,
                 std::optional<ValueInfo> expected);
  // Cuts `bytes` (the value's bytes from block `first` on) into cache entries of one block.
  std::vector<absl::StatusOr<CachedValue>> CutBlocks(const buffer::cpu::Buffer& bytes,
                                                     uint64_t first, size_t count,
                                                     const ValueInfo& info, absl::Time when);
  void CountBackendRead(const absl::Status& status, uint64_t bytes, absl::Time start);
  // The disk tier's part (no-ops without one): an entry read from the store, written behind;
  // a value found changed or gone, dropped.
  void WriteBehind(absl::string_view key, uint64_t part, const CachedValue& entry);
  void DropFromDisk(absl::string_view key);
  void CountPromotion(const CachedValue& entry);

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<HostCache> cache_;
  DiskTier* const disk_;
  buffer::HostAllocator* const allocator_;
  const uint64_t block_bytes_;
  const size_t read_ahead_blocks_;
  const uint64_t whole_read_bytes_;
  // Adjacent missing blocks read in one request: remote stores pay a round trip per request;
  // the file store reads each block into its own buffer (no copy).
  const size_t max_run_blocks_;
  ValueRecords records_;
  ReadBudget budget_;
  std::array<FlightShard, 32> flight_shards_;
  // Writers and deleters of one key are serialized, so that the backend and the cache see
  // their updates in the same order. Readers never take these.
  std::array<absl::Mutex, 64> write_locks_;

  absl::Mutex listener_mu_;
  absl::AnyInvocable<void(absl::string_view) const> change_listener_ ABSL_GUARDED_BY(listener_mu_);

  const FreshnessOptions freshness_;
  const Validation validation_;
  const absl::Duration revalidate_after_;

  std::atomic<uint64_t> backend_reads_{0}, backend_read_errors_{0}, backend_not_found_{0},
      backend_read_bytes_{0}, backend_read_micros_{0}, single_flight_joins_{0}, writes_{0},
      deletes_{0}, overloaded_{0};
  std::atomic<uint64_t> revalidations_{0}, revalidations_not_modified_{0}, stale_invalidations_{0},
      revalidation_errors_{0}, failed_write_invalidations_{0};
  std::atomic<uint64_t> block_reads_{0}, blocks_read_{0}, read_ahead_blocks_read_{0},
      changed_during_read_{0};
  std::atomic<uint64_t> disk_promotions_{0}, disk_promoted_bytes_{0};

  // Last member: destroyed first, so queued work finishes while the rest still exists.
  std::unique_ptr<Executor> io_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_CHUNK_STORE_H_

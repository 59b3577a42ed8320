#include "server/store/chunk_store.h"

#include <algorithm>
#include <cstring>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace chunkd::server {

namespace {

uint64_t WholeReadBytes(const ChunkStoreOptions& options) {
  uint64_t window = options.block_bytes * std::max<size_t>(options.read_ahead_blocks, 1);
  uint64_t max_entry =
      static_cast<uint64_t>(options.cache.capacity_bytes * options.cache.max_entry_fraction);
  return std::max(options.block_bytes, std::min(window, max_entry));
}

// The cache key of block `index` of `key`: keys hold no NUL (ValidateKey), so no block key
// is ever a value's key.
std::string BlockKey(absl::string_view key, uint64_t index) {
  std::string out(key);
  out.push_back('\0');
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>(index >> shift));
  return out;
}

ValueRecord RecordOf(const CachedValue& value) {
  return ValueRecord{ValueInfo{value.size(), value.generation, value.etag}, value.validated, 0};
}

absl::Status ChangedError(absl::string_view key) {
  return absl::AbortedError(
      absl::StrCat("key '", key, "' changed in the store while it was being read; read it again"));
}

}  // namespace

ChunkStore::ChunkStore(std::unique_ptr<Backend> backend, const ChunkStoreOptions& options)
    : backend_(std::move(backend)),
      // A store that holds its values in memory has no cache, so nothing to keep on disk.
      disk_(backend_->holds_values_in_memory() ? nullptr : options.disk),
      allocator_(options.allocator),
      block_bytes_(std::max<uint64_t>(options.block_bytes, 4096)),
      read_ahead_blocks_(options.read_ahead_blocks),
      whole_read_bytes_(WholeReadBytes(options)),
      max_run_blocks_(backend_->validation() == Validation::kRemote ? 16 : 1),
      records_(std::max<uint64_t>(4096, options.cache.capacity_bytes / block_bytes_)),
      budget_(options.read_budget_bytes),
      freshness_(options.freshness),
      validation_(backend_->validation()),
      revalidate_after_(
          options.freshness.revalidate_after.value_or(backend_->default_revalidate_after())) {
  if (!backend_->holds_values_in_memory()) cache_ = std::make_unique<HostCache>(options.cache);
  size_t threads = options.io_threads;
  if (threads == 0) threads = validation_ == Validation::kRemote ? 64 : 8;
  io_ = std::make_unique<Executor>(threads, options.max_queued_io);
}

ChunkStore::~ChunkStore() { io_.reset(); }

ChunkStore::FlightShard& ChunkStore::FlightShardFor(absl::string_view key) {
  return flight_shards_[absl::HashOf(key) % flight_shards_.size()];
}

absl::Mutex& ChunkStore::WriteLockFor(absl::string_view key) {
  return write_locks_[absl::HashOf(key, 1) % write_locks_.size()];
}

absl::Status ChunkStore::Submit(absl::AnyInvocable<void() &&> task) {
  if (io_->TrySchedule(std::move(task))) return absl::OkStatus();
  overloaded_.fetch_add(1, std::memory_order_relaxed);
  return absl::UnavailableError("server overloaded: too many backend operations queued");
}

namespace {

absl::string_view LastSegment(absl::string_view key) {
  size_t slash = key.rfind('/');
  return slash == absl::string_view::npos ? key : key.substr(slash + 1);
}

ValueInfo InfoOf(const CachedValue& value) {
  return ValueInfo{value.size(), value.generation, value.etag};
}

}  // namespace

absl::Time ChunkStore::PolicyValidatedSince(absl::string_view key, absl::Time now) const {
  for (const std::string& prefix : freshness_.immutable_prefixes) {
    if (absl::StartsWith(key, prefix)) return absl::InfinitePast();
  }
  absl::string_view leaf = LastSegment(key);
  for (const std::string& name : freshness_.always_revalidate_names) {
    if (leaf == name) return now;
  }
  if (revalidate_after_ == absl::InfiniteDuration()) return absl::InfinitePast();
  return now - revalidate_after_;
}

// The time a copy served to this read must have been validated at or after.
static absl::Time NeedFor(const ChunkStore& store, const FreshnessOptions& freshness,
                          absl::string_view key, const ReadOptions& options) {
  absl::Time now = absl::Now();
  if (options.validated_since) {
    // Immutable prefixes win over the request: their values never change.
    for (const std::string& prefix : freshness.immutable_prefixes) {
      if (absl::StartsWith(key, prefix)) return absl::InfinitePast();
    }
    // A bound in the future cannot be waited for: validate now.
    return std::min(*options.validated_since, now);
  }
  return store.PolicyValidatedSince(key, now);
}

bool ChunkStore::FreshEnough(absl::string_view key, CachedValue& hit, absl::Time need) {
  if (hit.validated >= need || validation_ == Validation::kNone) return true;
  if (validation_ != Validation::kLocal) return false;
  // A stat on this thread (about a microsecond), cheaper than a hop to an I/O thread.
  absl::Time start = absl::Now();
  revalidations_.fetch_add(1, std::memory_order_relaxed);
  absl::StatusOr<bool> current = backend_->IsCurrent(key, InfoOf(hit));
  if (current.ok() && *current) {
    revalidations_not_modified_.fetch_add(1, std::memory_order_relaxed);
    cache_->MarkValidated(key, hit.generation, start);
    hit.validated = start;
    return true;
  }
  // Changed or removed (or the stat failed: the read that follows says why).
  if (current.ok()) NoteStale(key);
  cache_->EraseIfGeneration(key, hit.generation);
  return false;
}

void ChunkStore::Read(absl::string_view key, const ByteRange& range, const ReadOptions& options,
                      ReadCallback done) {
  if (!cache_) {
    // The backend holds values in memory: reading it is a lookup, no I/O, and always current.
    absl::Time now = absl::Now();
    ValueInfo info;
    auto value = backend_->Read(key, &info);
    if (!value.ok()) return std::move(done)(value.status());
    if (options.if_generation != 0 && options.if_generation != info.generation) {
      return std::move(done)(ChangedError(key));
    }
    return std::move(done)(CachedValue{*std::move(value), info.generation, now});
  }
  absl::Time need = NeedFor(*this, freshness_, key, options);
  if (options.validated_since && validation_ == Validation::kRemote) {
    // A request's own bound (max_staleness, TensorStore's staleness_bound) is a promise to its
    // caller: a copy the store could not confirm since then (its revalidation failed) is
    // refused, never served older than asked. Reads under the policy alone get the copy.
    done = [need, owned_key = std::string(key),
            done = std::move(done)](absl::StatusOr<CachedValue> result) mutable {
      if (result.ok() && result->validated < need) {
        return std::move(done)(absl::UnavailableError(
            absl::StrCat("key '", owned_key,
                         "': the store could not confirm the cached copy within the "
                         "requested staleness bound (last confirmed ",
                         absl::FormatDuration(absl::Now() - result->validated), " ago)")));
      }
      std::move(done)(std::move(result));
    };
  }
  if (options.if_generation != 0) {
    done = [generation = options.if_generation, owned_key = std::string(key),
            done = std::move(done)](absl::StatusOr<CachedValue> result) mutable {
      if (result.ok() && result->generation != generation) result = ChangedError(owned_key);
      std::move(done)(std::move(result));
    };
  }
  std::optional<CachedValue> hit = cache_->Lookup(key);
  if (hit) {
    if (FreshEnough(key, *hit, need)) return std::move(done)(*std::move(hit));
    if (validation_ == Validation::kRemote) {
      return StartOrJoinFlight(key, std::move(hit), need, std::move(done));
    }
    // Local validation found it changed: read it again, as a miss.
  }
  ReadBlocks(std::string(key), range, need, options, 0, std::nullopt, std::move(done));
}

void ChunkStore::StartOrJoinFlight(absl::string_view key, std::optional<CachedValue> cached,
                                   absl::Time need, ReadCallback done) {
  FlightShard& shard = FlightShardFor(key);
  std::shared_ptr<Flight> flight;
  {
    absl::ReleasableMutexLock lock(&shard.mu);
    auto it = shard.flights.find(key);
    if (it != shard.flights.end() && it->second.whole) {
      Flight& running = *it->second.whole;
      if (need > running.started) {
        // The flight asked the store before this read's bound: its answer may predate a change
        // this read must see. Take it only if it is recent enough, else read again (then a
        // cheap hit or a new flight that starts after the bound).
        done = [this, owned_key = std::string(key), need,
                done = std::move(done)](absl::StatusOr<CachedValue> result) mutable {
          if ((result.ok() && result->validated < need) || absl::IsNotFound(result.status())) {
            Read(owned_key, ReadOptions{need}, std::move(done));
            return;
          }
          std::move(done)(std::move(result));
        };
      }
      running.need = std::max(running.need, std::min(need, running.started));
      running.waiters.push_back(std::move(done));
      single_flight_joins_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    // A flight that finished between the lookup above and this lock put its value in the
    // cache before leaving the table: look again, so one burst of misses reads once.
    if (auto again = cache_->Peek(key)) {
      if (again->validated >= need) {
        lock.Release();
        return std::move(done)(*std::move(again));
      }
      if (validation_ == Validation::kLocal) {
        // Older than this read's bound (the file store's is the read's own start): a stat
        // confirms it, as for any hit, rather than a second read of the value. Found changed,
        // it is dropped, and the next look starts a flight.
        lock.Release();
        if (FreshEnough(key, *again, need)) return std::move(done)(*std::move(again));
        return StartOrJoinFlight(key, std::move(cached), need, std::move(done));
      }
    }
    flight = std::make_shared<Flight>();
    flight->started = absl::Now();
    flight->need = need;
    flight->cached = std::move(cached);
    flight->waiters.push_back(std::move(done));
    shard.flights[key].whole = flight;
  }
  LaunchFlight(key, &KeyFlights::whole, std::move(flight), &ChunkStore::RunFlight);
}

void ChunkStore::LaunchFlight(absl::string_view key, std::shared_ptr<Flight> KeyFlights::*slot,
                              std::shared_ptr<Flight> flight,
                              void (ChunkStore::*run)(std::string, std::shared_ptr<Flight>)) {
  std::string owned_key(key);
  absl::Status queued = Submit([this, owned_key, flight, run]() mutable {
    (this->*run)(std::move(owned_key), std::move(flight));
  });
  if (queued.ok()) return;
  std::vector<ReadCallback> waiters;
  {
    FlightShard& shard = FlightShardFor(key);
    absl::MutexLock lock(&shard.mu);
    EraseFlightLocked(shard, key, slot, flight);
    waiters = std::move(flight->waiters);
  }
  for (ReadCallback& waiter : waiters) std::move(waiter)(queued);
}

void ChunkStore::EraseFlightLocked(FlightShard& shard, absl::string_view key,
                                   std::shared_ptr<Flight> KeyFlights::*slot,
                                   const std::shared_ptr<Flight>& flight) {
  // A write may have replaced this flight in the table by a newer one: leave that one be.
  auto it = shard.flights.find(key);
  if (it == shard.flights.end()) return;
  if (it->second.*slot == flight) (it->second.*slot).reset();
  if (it->second.empty()) shard.flights.erase(it);
}

void ChunkStore::WriteBehind(absl::string_view key, uint64_t part, const CachedValue& entry) {
  if (disk_ && !entry.value.empty()) disk_->Write(key, part, entry);
}

void ChunkStore::DropFromDisk(absl::string_view key) {
  if (disk_) disk_->Drop(key);
}

void ChunkStore::CountPromotion(const CachedValue& entry) {
  disk_promotions_.fetch_add(1, std::memory_order_relaxed);
  disk_promoted_bytes_.fetch_add(entry.value.size(), std::memory_order_relaxed);
}

void ChunkStore::CountBackendRead(const absl::Status& status, uint64_t bytes, absl::Time start) {
  backend_reads_.fetch_add(1, std::memory_order_relaxed);
  backend_read_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  backend_read_micros_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start),
                                 std::memory_order_relaxed);
  if (status.ok()) return;
  if (absl::IsAborted(status)) {
    changed_during_read_.fetch_add(1, std::memory_order_relaxed);
  } else {
    // A missing key is an answer, not a failure of the store.
    (absl::IsNotFound(status) ? backend_not_found_ : backend_read_errors_)
        .fetch_add(1, std::memory_order_relaxed);
  }
}

std::vector<absl::StatusOr<CachedValue>> ChunkStore::CutBlocks(const buffer::cpu::Buffer& bytes,
                                                               uint64_t first, size_t count,
                                                               const ValueInfo& info,
                                                               absl::Time when) {
  std::vector<absl::StatusOr<CachedValue>> blocks;
  blocks.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    uint64_t at = i * block_bytes_;
    uint64_t length = at < bytes.size() ? std::min(block_bytes_, bytes.size() - at) : 0;
    buffer::cpu::Buffer block;
    if (count == 1 && at == 0 && length == bytes.size()) {
      block = bytes;  // the read is the block: no copy
    } else if (length > 0) {
      // Each block in memory of its own, so that evicting one frees it (a slice would keep
      // the whole read alive).
      auto copy = buffer::cpu::MutableBuffer::Allocate(length, *allocator_);
      if (!copy.ok()) {
        blocks.push_back(copy.status());
        continue;
      }
      std::memcpy(copy->data(), bytes.data() + at, length);
      block = std::move(*copy).Freeze();
    }
    CachedValue value(std::move(block), info.generation, when, info.etag);
    value.offset = (first + i) * block_bytes_;
    value.total_size = info.size;
    blocks.push_back(std::move(value));
  }
  return blocks;
}

void ChunkStore::RunFlight(std::string key, std::shared_ptr<Flight> flight) {
  absl::Time start = absl::Now();
  ValueInfo info;
  absl::StatusOr<CachedValue> result;
  // What to do to the cache once the answer is in (unless a write landed meanwhile).
  enum class Update { kNone, kInsert, kMarkValidated, kErase, kBlocks } update = Update::kNone;
  std::vector<absl::StatusOr<CachedValue>> blocks;
  FlightShard& shard = FlightShardFor(key);
  // The copy to check against the store: the host cache's (a revalidation), or the disk tier's.
  std::optional<CachedValue> cached = flight->cached;
  // Whether `result` is a copy from the disk tier (promoted to the host cache, not written
  // back), rather than bytes from the store (written behind).
  bool from_disk = false;
  bool answered = false;
  if (!cached && disk_) {
    // A miss of the host cache: the disk tier may hold the value, at whatever generation; it
    // is held to the readers' bound as a cached copy is.
    if (std::optional<CachedValue> entry = disk_->Read(key, kWholeValue, 0)) {
      from_disk = true;
      absl::MutexLock lock(&shard.mu);
      if (entry->validated >= flight->need) {
        // Fresh enough for every reader so far; a reader joining from now on with a later
        // bound reads again (StartOrJoinFlight).
        flight->started = std::min(flight->started, entry->validated);
        result = *std::move(entry);
        update = Update::kInsert;
        answered = true;
      } else {
        cached = std::move(entry);
      }
    }
  }
  if (answered) {
  } else if (cached) {
    // A revalidation: one conditional request; a 304 moves no bytes.
    auto changed = backend_->ReadIfChanged(key, InfoOf(*cached), &info);
    revalidations_.fetch_add(1, std::memory_order_relaxed);
    if (changed.ok() && !changed->has_value()) {
      revalidations_not_modified_.fetch_add(1, std::memory_order_relaxed);
      result = *cached;
      result->validated = start;
      // A copy from disk is not in the host cache yet.
      update = from_disk ? Update::kInsert : Update::kMarkValidated;
    } else if (changed.ok()) {
      NoteStale(key);
      backend_reads_.fetch_add(1, std::memory_order_relaxed);
      backend_read_bytes_.fetch_add((*changed)->size(), std::memory_order_relaxed);
      from_disk = false;
      result = CachedValue{**std::move(changed), info.generation, start, std::move(info.etag)};
      update = Update::kInsert;
    } else if (absl::IsNotFound(changed.status())) {
      NoteStale(key);
      result = changed.status();
      update = Update::kErase;
    } else {
      // The store cannot say (unreachable, refusing): the cached copy is served as it is,
      // its validation time unchanged (TensorStore's timestamp shows its age), so that an
      // outage of the store does not fail reads under the policy that the cache can answer;
      // a read with a bound of its own refuses it (Read). The next read past the bound asks
      // again.
      revalidation_errors_.fetch_add(1, std::memory_order_relaxed);
      result = *cached;
      if (from_disk) update = Update::kInsert;
    }
    backend_read_micros_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start),
                                   std::memory_order_relaxed);
  } else {
    // A miss of the whole value: one request for up to whole_read_bytes. A larger value comes
    // back as its first part, which is cut into blocks; the reader goes on by the block.
    absl::StatusOr<buffer::cpu::Buffer> value =
        backend_->ReadRange(key, 0, whole_read_bytes_, &info);
    CountBackendRead(value.status(), value.ok() ? value->size() : 0, start);
    if (!value.ok()) {
      result = value.status();
    } else if (value->size() >= info.size) {
      result = CachedValue{*std::move(value), info.generation, start, std::move(info.etag)};
      update = Update::kInsert;
    } else {
      size_t count = (value->size() + block_bytes_ - 1) / block_bytes_;
      blocks = CutBlocks(*value, 0, count, info, start);
      block_reads_.fetch_add(1, std::memory_order_relaxed);
      blocks_read_.fetch_add(count, std::memory_order_relaxed);
      CachedValue first(*std::move(value), info.generation, start, info.etag);
      first.total_size = info.size;
      result = std::move(first);
      update = Update::kBlocks;
    }
  }
  std::vector<ReadCallback> waiters;
  {
    absl::MutexLock lock(&shard.mu);
    // Under the lock, so that a write's invalidation (which marks the flight stale, then drops
    // the key from the tier) is ordered after this offer.
    if (!flight->stale) {
      switch (update) {
        case Update::kInsert:
          cache_->Insert(key, *result);
          if (from_disk) {
            CountPromotion(*result);
          } else {
            WriteBehind(key, kWholeValue, *result);
          }
          break;
        case Update::kMarkValidated:
          cache_->MarkValidated(key, result->generation, start);
          break;
        case Update::kErase:
          cache_->EraseIfGeneration(key, cached->generation);
          break;
        case Update::kBlocks:
          records_.Confirm(key, InfoOf(*result), start);
          for (size_t i = 0; i < blocks.size(); ++i) {
            if (!blocks[i].ok()) continue;
            cache_->Insert(BlockKey(key, i), *blocks[i]);
            WriteBehind(key, i, *blocks[i]);
          }
          break;
        case Update::kNone:
          break;
      }
    }
    EraseFlightLocked(shard, key, &KeyFlights::whole, flight);
    waiters = std::move(flight->waiters);
  }
  for (ReadCallback& waiter : waiters) std::move(waiter)(result);
}

// ---------------------------------------------------------------------------------------
// The block path.

// One read of a range by the block: the blocks it covers, gathered from the cache and from
// block flights, then answered as one range.
struct ChunkStore::BlockRead {
  std::string key;
  ByteRange range;  // as asked, for a retry
  uint64_t start = 0, end = 0;
  uint64_t first_block = 0;
  absl::Time need;
  ReadOptions options;
  int attempt = 0;
  std::optional<ValueRecord> record;
  ReadCallback done;

  absl::Mutex mu;
  std::vector<std::optional<CachedValue>> blocks ABSL_GUARDED_BY(mu);
  size_t remaining ABSL_GUARDED_BY(mu) = 0;
  absl::Status error ABSL_GUARDED_BY(mu);
};

void ChunkStore::ReadBlocks(std::string key, ByteRange range, absl::Time need, ReadOptions options,
                            int attempt, std::optional<ValueRecord> record, ReadCallback done) {
  if (!record) record = records_.Find(key);
  if (record && record->validated < need && validation_ != Validation::kNone) {
    if (validation_ == Validation::kLocal) {
      ValidateRecord(key, record);  // a stat, on this thread
    } else {
      // One metadata request (HEAD) on an I/O thread: a changed value retires its blocks, an
      // unchanged one is served without moving its bytes again. The callback is shared with
      // this frame: a task that cannot be queued is destroyed unrun, and the refusal must still
      // be answered.
      auto owned_done = std::make_shared<ReadCallback>(std::move(done));
      absl::Status queued =
          Submit([this, key, range, options, attempt, record, owned_done]() mutable {
            ValidateRecord(key, record);
            ReadBlocks(std::move(key), range, absl::InfinitePast(), options, attempt,
                       std::move(record), std::move(*owned_done));
          });
      if (!queued.ok()) std::move (*owned_done)(queued);
      return;
    }
  }
  if (!record) return FirstTouch(std::move(key), range, need, options, attempt, std::move(done));
  if (options.if_generation != 0 && options.if_generation != record->info.generation) {
    return std::move(done)(ChangedError(key));
  }
  ResolvedRange r = Resolve(range, record->info.size);
  uint64_t start = r.start, end = r.start + r.length;
  if (r.length > options.max_extent_bytes) {
    // The first part, ending on a block boundary when one lies within it.
    end = start + options.max_extent_bytes;
    uint64_t aligned = end / block_bytes_ * block_bytes_;
    if (aligned > start) end = aligned;
  }
  if (end == start) {
    CachedValue empty(buffer::cpu::Buffer(), record->info.generation, record->validated,
                      record->info.etag);
    empty.offset = start;
    empty.total_size = record->info.size;
    return std::move(done)(std::move(empty));
  }
  StartBlockRead(std::move(key), start, end, range, need, options, attempt, std::move(record),
                 std::move(done));
}

void ChunkStore::ValidateRecord(absl::string_view key, std::optional<ValueRecord>& record) {
  absl::Time start = absl::Now();
  revalidations_.fetch_add(1, std::memory_order_relaxed);
  absl::StatusOr<bool> current = backend_->IsCurrent(key, record->info);
  if (current.ok() && *current) {
    revalidations_not_modified_.fetch_add(1, std::memory_order_relaxed);
    records_.Confirm(key, record->info, start);
    record->validated = start;
    return;
  }
  if (!current.ok() && validation_ == Validation::kRemote) {
    // Unreachable: serve what is cached, as for whole values (RunFlight).
    revalidation_errors_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // Changed or removed (or a local stat that failed: the read that follows says why).
  if (current.ok()) NoteStale(key);
  records_.EraseIfGeneration(key, record->info.generation);
  record.reset();
}

void ChunkStore::FirstTouch(std::string key, ByteRange range, absl::Time need, ReadOptions options,
                            int attempt, ReadCallback done) {
  if (disk_) {
    // The disk tier knows the value (a restarted server, or one whose record was dropped to
    // bound memory): its record is taken, so that the value is validated (one HEAD when older
    // than the bound), not read again, and its blocks come from disk. A small value read
    // whole stays on the whole path, where the tier holds it as one entry (RunFlight).
    if (std::optional<std::pair<ValueInfo, absl::Time>> known = disk_->Record(key);
        known && (range.kind != ByteRange::Kind::kAll || known->first.size > whole_read_bytes_)) {
      records_.Confirm(key, known->first, known->second);
      return ReadBlocks(std::move(key), range, need, options, attempt,
                        ValueRecord{known->first, known->second, 0}, std::move(done));
    }
  }
  if (range.kind == ByteRange::Kind::kBounded && range.end > range.start) {
    // The blocks the range covers, without knowing the size yet (the value may be shorter).
    uint64_t start = range.start;
    uint64_t end = range.end - start > options.max_extent_bytes ? start + options.max_extent_bytes
                                                                : static_cast<uint64_t>(range.end);
    return StartBlockRead(std::move(key), start, end, range, need, options, attempt, std::nullopt,
                          std::move(done));
  }
  // The other reads learn the size first, and read on with what they learnt.
  auto read_on = [this, key, range, options, attempt,
                  done = std::move(done)](absl::StatusOr<CachedValue> result) mutable {
    if (!result.ok()) return std::move(done)(result.status());
    // A value read whole is answered whole (the caller slices it). Otherwise the record is
    // known now and the blocks read on the way are cached: the read goes on by the block, so
    // that every answer over several blocks is joined under the read budget.
    if (result->whole()) return std::move(done)(*std::move(result));
    ReadBlocks(std::move(key), range, absl::InfinitePast(), options, attempt, RecordOf(*result),
               std::move(done));
  };
  switch (range.kind) {
    case ByteRange::Kind::kAll:
      // Read whole, as one request: most values are small enough (see RunFlight).
      return StartOrJoinFlight(key, std::nullopt, need, std::move(read_on));
    case ByteRange::Kind::kBounded:  // an empty range: only the size is needed
      break;
    case ByteRange::Kind::kSuffix:
      if (validation_ == Validation::kRemote) {
        // Zarr's shard index from a remote store: one request for the suffix, rounded so that
        // it covers whole blocks (the last block is at most one block long), rather than a
        // round trip for the size first. A local store's size costs a stat: then only the
        // blocks the suffix covers are read (the last one may be a few bytes).
        uint64_t blocks = (static_cast<uint64_t>(range.suffix) + block_bytes_ - 1) / block_bytes_;
        return StartOrJoinRecordFlight(key, (blocks + 1) * block_bytes_, std::move(read_on));
      }
      break;
    case ByteRange::Kind::kOffset:
      break;
  }
  StartOrJoinRecordFlight(key, 0, std::move(read_on));
}

void ChunkStore::StartOrJoinRecordFlight(absl::string_view key, uint64_t suffix_bytes,
                                         ReadCallback done) {
  FlightShard& shard = FlightShardFor(key);
  std::shared_ptr<Flight> flight;
  {
    absl::MutexLock lock(&shard.mu);
    KeyFlights& flights = shard.flights[key];
    if (flights.record) {
      // Its answer brings the record; blocks it did not bring, the reader reads on by the
      // block (FirstTouch's read_on). One record flight per key, so that a write marks it stale.
      flights.record->waiters.push_back(std::move(done));
      single_flight_joins_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    flight = std::make_shared<Flight>();
    flight->suffix_bytes = suffix_bytes;
    flight->waiters.push_back(std::move(done));
    flights.record = flight;
  }
  LaunchFlight(key, &KeyFlights::record, std::move(flight), &ChunkStore::RunRecordFlight);
}

void ChunkStore::RunRecordFlight(std::string key, std::shared_ptr<Flight> flight) {
  absl::Time start = absl::Now();
  ValueInfo info;
  absl::StatusOr<CachedValue> result;
  std::vector<absl::StatusOr<CachedValue>> blocks;
  uint64_t first = 0;
  if (flight->suffix_bytes > 0) {
    absl::StatusOr<buffer::cpu::Buffer> tail =
        backend_->ReadSuffix(key, flight->suffix_bytes, &info);
    CountBackendRead(tail.status(), tail.ok() ? tail->size() : 0, start);
    if (!tail.ok()) {
      result = tail.status();
    } else {
      // The whole blocks within the suffix, up to the end of the value.
      uint64_t tail_start = info.size - tail->size();
      first = (tail_start + block_bytes_ - 1) / block_bytes_;
      uint64_t from = first * block_bytes_;
      if (from < info.size) {
        size_t count = (info.size - from + block_bytes_ - 1) / block_bytes_;
        blocks =
            CutBlocks(tail->Slice(from - tail_start, info.size - from), first, count, info, start);
        block_reads_.fetch_add(1, std::memory_order_relaxed);
        blocks_read_.fetch_add(count, std::memory_order_relaxed);
      }
      CachedValue suffix(*std::move(tail), info.generation, start, info.etag);
      suffix.offset = tail_start;
      suffix.total_size = info.size;
      result = std::move(suffix);
    }
  } else {
    absl::StatusOr<ValueInfo> stat = backend_->Stat(key);
    backend_read_micros_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start),
                                   std::memory_order_relaxed);
    if (!stat.ok()) {
      result = stat.status();
    } else {
      info = *stat;
      CachedValue none(buffer::cpu::Buffer(), info.generation, start, info.etag);
      none.offset = info.size;
      none.total_size = info.size;
      result = std::move(none);
    }
  }
  std::vector<ReadCallback> waiters;
  {
    FlightShard& shard = FlightShardFor(key);
    absl::MutexLock lock(&shard.mu);
    if (!flight->stale && result.ok()) {
      records_.Confirm(key, info, start);
      for (size_t i = 0; i < blocks.size(); ++i) {
        if (!blocks[i].ok()) continue;
        cache_->Insert(BlockKey(key, first + i), *blocks[i]);
        WriteBehind(key, first + i, *blocks[i]);
      }
    }
    EraseFlightLocked(shard, key, &KeyFlights::record, flight);
    waiters = std::move(flight->waiters);
  }
  for (ReadCallback& waiter : waiters) std::move(waiter)(result);
}

void ChunkStore::StartBlockRead(std::string key, uint64_t start, uint64_t end, ByteRange range,
                                absl::Time need, ReadOptions options, int attempt,
                                std::optional<ValueRecord> record, ReadCallback done) {
  auto read = std::make_shared<BlockRead>();
  read->key = key;
  read->range = range;
  read->start = start;
  read->end = end;
  read->first_block = start / block_bytes_;
  read->need = need;
  read->options = options;
  read->attempt = attempt;
  read->record = record;
  read->done = std::move(done);
  uint64_t last_block = (end - 1) / block_bytes_;
  std::vector<uint64_t> missing;
  {
    absl::MutexLock lock(&read->mu);
    read->blocks.resize(last_block - read->first_block + 1);
    for (uint64_t i = read->first_block; i <= last_block; ++i) {
      // Without a record no cached block can be trusted: it may be of a version retired by a
      // write (the record is what a write drops).
      std::optional<CachedValue> hit;
      if (record) hit = cache_->Lookup(BlockKey(key, i));
      if (hit && hit->generation == record->info.generation) {
        read->blocks[i - read->first_block] = std::move(hit);
      } else {
        missing.push_back(i);
      }
    }
    read->remaining = missing.size();
  }
  std::optional<ValueInfo> expected;
  if (record) expected = record->info;
  if (record) {
    // Read-ahead: a read that starts where the last one of this value ended walks it.
    uint64_t previous_end = records_.ExchangeNextOffset(key, end);
    uint64_t blocks_in_value = (record->info.size + block_bytes_ - 1) / block_bytes_;
    if (read_ahead_blocks_ > 0 && previous_end == start && start > 0 &&
        last_block + 1 < blocks_in_value) {
      std::vector<uint64_t> ahead;
      uint64_t stop = std::min<uint64_t>(
          {blocks_in_value, last_block + 1 + read_ahead_blocks_,
           options.read_ahead_end / block_bytes_ + (options.read_ahead_end % block_bytes_ != 0)});
      for (uint64_t i = last_block + 1; i < stop; ++i) {
        std::optional<CachedValue> cached = cache_->Peek(BlockKey(key, i));
        if (!cached || cached->generation != record->info.generation) ahead.push_back(i);
      }
      if (!ahead.empty()) FetchBlocks(key, ahead, expected, nullptr);
    }
  }
  if (missing.empty()) return FinishBlockRead(std::move(read));
  FetchBlocks(read->key, missing, expected, [this, read, &missing](size_t i) -> ReadCallback {
    size_t slot = missing[i] - read->first_block;
    return [this, read, slot](absl::StatusOr<CachedValue> block) {
      bool last;
      {
        absl::MutexLock lock(&read->mu);
        if (block.ok()) {
          read->blocks[slot] = *std::move(block);
        } else if (read->error.ok()) {
          read->error = block.status();
        }
        last = --read->remaining == 0;
      }
      if (last) FinishBlockRead(read);
    };
  });
}

void ChunkStore::FetchBlocks(absl::string_view key, const std::vector<uint64_t>& indices,
                             const std::optional<ValueInfo>& expected,
                             const std::function<ReadCallback(size_t)>& waiter) {
  struct Run {
    uint64_t first;
    std::vector<std::shared_ptr<Flight>> flights;
  };
  std::vector<Run> runs;
  std::vector<std::pair<ReadCallback, CachedValue>> arrived;
  FlightShard& shard = FlightShardFor(key);
  {
    absl::MutexLock lock(&shard.mu);
    KeyFlights& flights = shard.flights[key];
    for (size_t i = 0; i < indices.size(); ++i) {
      uint64_t index = indices[i];
      // A flight that finished since the caller looked put its block in the cache before
      // leaving the table: take it, so that one burst of misses reads once.
      // (Without a version to hold to, no cached block can be trusted: see StartBlockRead.)
      if (std::optional<CachedValue> cached =
              expected ? cache_->Peek(BlockKey(key, index)) : std::nullopt;
          cached && cached->generation == expected->generation) {
        if (waiter) arrived.emplace_back(waiter(i), *std::move(cached));
        continue;
      }
      if (auto it = flights.blocks.find(index); it != flights.blocks.end()) {
        if (waiter) {
          it->second->waiters.push_back(waiter(i));
          single_flight_joins_.fetch_add(1, std::memory_order_relaxed);
        }
        continue;
      }
      auto flight = std::make_shared<Flight>();
      if (waiter) flight->waiters.push_back(waiter(i));
      flights.blocks.emplace(index, flight);
      if (runs.empty() || runs.back().first + runs.back().flights.size() != index ||
          runs.back().flights.size() >= max_run_blocks_) {
        runs.push_back(Run{index, {}});
      }
      runs.back().flights.push_back(std::move(flight));
    }
    if (flights.empty()) shard.flights.erase(std::string(key));
  }
  for (auto& [done, block] : arrived) std::move(done)(std::move(block));
  if (!waiter) {
    for (const Run& run : runs) {
      read_ahead_blocks_read_.fetch_add(run.flights.size(), std::memory_order_relaxed);
    }
  }
  for (Run& run : runs) {
    absl::Status queued = Submit([this, owned_key = std::string(key), first = run.first,
                                  flights = run.flights, expected]() mutable {
      RunBlocks(std::move(owned_key), first, std::move(flights), std::move(expected));
    });
    if (queued.ok()) continue;
    std::vector<ReadCallback> waiters;
    {
      absl::MutexLock lock(&shard.mu);
      for (size_t i = 0; i < run.flights.size(); ++i) {
        auto it = shard.flights.find(key);
        if (it == shard.flights.end()) break;
        auto block = it->second.blocks.find(run.first + i);
        if (block != it->second.blocks.end() && block->second == run.flights[i]) {
          it->second.blocks.erase(block);
        }
        if (it->second.empty()) shard.flights.erase(it);
        for (ReadCallback& w : run.flights[i]->waiters) waiters.push_back(std::move(w));
      }
    }
    for (ReadCallback& w : waiters) std::move(w)(queued);
  }
}

void ChunkStore::RunBlocks(std::string key, uint64_t first,
                           std::vector<std::shared_ptr<Flight>> flights,
                           std::optional<ValueInfo> expected) {
  absl::Time start = absl::Now();
  const size_t count = flights.size();
  std::vector<absl::StatusOr<CachedValue>> blocks(count, absl::UnknownError("not read"));
  std::vector<bool> from_disk(count, false);
  if (disk_ && expected) {
    // The disk tier first, at the value's recorded version; a block of another size or place
    // (a --block_bytes changed across a restart) is not one of this value's blocks.
    for (size_t i = 0; i < count; ++i) {
      uint64_t at = (first + i) * block_bytes_;
      if (at >= expected->size) break;
      std::optional<CachedValue> entry = disk_->Read(key, first + i, expected->generation);
      if (entry && entry->offset == at && entry->size() == expected->size &&
          entry->value.size() == std::min(block_bytes_, expected->size - at)) {
        blocks[i] = *std::move(entry);
        from_disk[i] = true;
      }
    }
  }
  // The rest from the store, a run of adjacent blocks per request.
  ValueInfo info;
  bool read_ok = false;
  for (size_t i = 0; i < count;) {
    if (from_disk[i]) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < count && !from_disk[end]) ++end;
    absl::Time run_start = absl::Now();
    uint64_t offset = (first + i) * block_bytes_;
    uint64_t length = (end - i) * block_bytes_;
    // Blocks after the first of a value are read only at the version the first had.
    absl::StatusOr<buffer::cpu::Buffer> bytes =
        expected ? backend_->ReadRangeIfMatch(key, offset, length, *expected, &info)
                 : backend_->ReadRange(key, offset, length, &info);
    CountBackendRead(bytes.status(), bytes.ok() ? bytes->size() : 0, run_start);
    block_reads_.fetch_add(1, std::memory_order_relaxed);
    if (bytes.ok()) {
      read_ok = true;
      blocks_read_.fetch_add(end - i, std::memory_order_relaxed);
      std::vector<absl::StatusOr<CachedValue>> run =
          CutBlocks(*bytes, first + i, end - i, info, run_start);
      std::move(run.begin(), run.end(), blocks.begin() + i);
    } else {
      std::fill(blocks.begin() + i, blocks.begin() + end, bytes.status());
    }
    i = end;
  }
  std::vector<std::pair<ReadCallback, size_t>> waiters;
  {
    FlightShard& shard = FlightShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.flights.find(key);
    bool stale = false;
    for (size_t i = 0; i < count; ++i) {
      stale |= flights[i]->stale;
      if (!flights[i]->stale && blocks[i].ok() && !blocks[i]->value.empty()) {
        cache_->Insert(BlockKey(key, first + i), *blocks[i]);
        if (from_disk[i]) {
          CountPromotion(*blocks[i]);
        } else {
          WriteBehind(key, first + i, *blocks[i]);
        }
      }
      if (it != shard.flights.end()) {
        auto block = it->second.blocks.find(first + i);
        if (block != it->second.blocks.end() && block->second == flights[i]) {
          it->second.blocks.erase(block);
        }
      }
      for (ReadCallback& w : flights[i]->waiters) waiters.emplace_back(std::move(w), i);
    }
    if (it != shard.flights.end() && it->second.empty()) shard.flights.erase(it);
    if (!stale && read_ok) records_.Confirm(key, info, start);
  }
  for (auto& [waiter, i] : waiters) std::move(waiter)(blocks[i]);
}

void ChunkStore::FinishBlockRead(std::shared_ptr<BlockRead> read) {
  absl::Status error;
  std::vector<std::optional<CachedValue>> blocks;
  {
    absl::MutexLock lock(&read->mu);
    error = read->error;
    blocks = std::move(read->blocks);
  }
  // One version for every block: the record's, else the first block's (a first touch).
  Generation generation = 0;
  if (read->record) generation = read->record->info.generation;
  if (error.ok()) {
    for (const auto& block : blocks) {
      if (generation == 0) generation = block->generation;
      if (block->generation != generation) {
        error = ChangedError(read->key);
        changed_during_read_.fetch_add(1, std::memory_order_relaxed);
        break;
      }
    }
  }
  if (!error.ok()) {
    if (absl::IsAborted(error) || absl::IsNotFound(error)) {
      // The value changed (or went) under the read: its record is stale.
      if (read->record) records_.EraseIfGeneration(read->key, read->record->info.generation);
      DropFromDisk(read->key);
      if (absl::IsAborted(error) && read->attempt == 0) {
        return ReadBlocks(std::move(read->key), read->range, read->need, read->options, 1,
                          std::nullopt, std::move(read->done));
      }
    }
    return std::move(read->done)(error);
  }
  const CachedValue& any = *blocks.front();
  uint64_t size = any.size();
  absl::Time validated = absl::InfiniteFuture();
  if (read->record) {
    validated = read->record->validated;
  } else {
    for (const auto& block : blocks) validated = std::min(validated, block->validated);
  }
  uint64_t start = std::min(read->start, size);
  uint64_t end = std::min(read->end, size);
  // A first read of the value: where it ended tells whether the next one walks on.
  if (!read->record) records_.ExchangeNextOffset(read->key, end);
  CachedValue out;
  out.generation = generation;
  out.validated = validated;
  out.etag = any.etag;
  out.offset = start;
  out.total_size = size;
  if (end > start) {
    size_t first = (start - read->first_block * block_bytes_) / block_bytes_;
    size_t last = (end - 1 - read->first_block * block_bytes_) / block_bytes_;
    if (first == last) {
      // Within one block: a view of it, no copy.
      const CachedValue& block = *blocks[first];
      out.value = block.value.Slice(start - block.offset, end - start);
    } else {
      // Across blocks: one buffer for the range, held under the read budget.
      auto joined = budget_.Allocate(end - start, *allocator_);
      if (!joined.ok()) return std::move(read->done)(joined.status());
      std::byte* to = joined->data();
      for (size_t i = first; i <= last; ++i) {
        const CachedValue& block = *blocks[i];
        uint64_t from = std::max(start, block.offset);
        uint64_t until = std::min(end, block.offset + block.value.size());
        std::memcpy(to, block.value.data() + (from - block.offset), until - from);
        to += until - from;
      }
      out.value = std::move(*joined).Freeze();
    }
  }
  std::move(read->done)(std::move(out));
}

absl::StatusOr<CachedValue> ChunkStore::ReadAndWait(absl::string_view key,
                                                    const ReadOptions& options,
                                                    const ByteRange& range) {
  absl::Notification done;
  absl::StatusOr<CachedValue> out;
  Read(key, range, options, [&](absl::StatusOr<CachedValue> result) {
    out = std::move(result);
    done.Notify();
  });
  done.WaitForNotification();
  return out;
}

std::optional<ValueInfo> ChunkStore::CachedInfo(absl::string_view key) {
  if (!cache_) return std::nullopt;
  auto hit = cache_->Peek(key);
  // A copy the policy would validate before serving is not an answer either.
  if (!hit || (validation_ != Validation::kNone &&
               hit->validated < PolicyValidatedSince(key, absl::Now()))) {
    return std::nullopt;
  }
  return InfoOf(*hit);
}

absl::StatusOr<ValueInfo> ChunkStore::Stat(absl::string_view key) {
  if (std::optional<ValueInfo> cached = CachedInfo(key)) return *cached;
  return backend_->Stat(key);
}

void ChunkStore::SetChangeListener(absl::AnyInvocable<void(absl::string_view) const> listener) {
  absl::MutexLock lock(&listener_mu_);
  change_listener_ = std::move(listener);
}

void ChunkStore::NoteChanged(absl::string_view key) {
  absl::ReaderMutexLock lock(&listener_mu_);
  if (change_listener_) change_listener_(key);
}

void ChunkStore::NoteStale(absl::string_view key) {
  stale_invalidations_.fetch_add(1, std::memory_order_relaxed);
  NoteChanged(key);
  // Found changed in the store: the tier's copy goes (on an I/O thread: a durable disk write).
  DropFromDisk(key);
}

void ChunkStore::InvalidateFlight(absl::string_view key) {
  // Derived entries go whether or not this store caches the value itself (memory://).
  NoteChanged(key);
  if (!cache_) return;
  InvalidateMemory(key);
  // After the flights are marked stale (none offers the tier its value from now on), and
  // outside the lock: a durable drop is a disk write. Callers hold the key's write lock.
  DropFromDisk(key);
}

void ChunkStore::InvalidateMemory(absl::string_view key) {
  FlightShard& shard = FlightShardFor(key);
  absl::MutexLock lock(&shard.mu);
  if (auto it = shard.flights.find(key); it != shard.flights.end()) {
    // The flights still answer the readers that joined them, but no reader that starts from
    // now on (after the write is acknowledged) may join them: they would get the older value.
    KeyFlights& flights = it->second;
    if (flights.whole) flights.whole->stale = true;
    if (flights.record) flights.record->stale = true;
    for (auto& [index, block] : flights.blocks) block->stale = true;
    shard.flights.erase(it);
  }
  cache_->Erase(key);
  // Its blocks retire with the record: none is served again (ValueRecords).
  records_.Erase(key);
}

void ChunkStore::InvalidateAfterFailure(absl::string_view key) {
  if (!cache_) return;
  failed_write_invalidations_.fetch_add(1, std::memory_order_relaxed);
  InvalidateFlight(key);
}

absl::StatusOr<ValueInfo> ChunkStore::Write(absl::string_view key, buffer::cpu::Buffer value,
                                            const Conditions& conditions) {
  absl::MutexLock lock(&WriteLockFor(key));
  buffer::cpu::Buffer kept = value;
  absl::Time start = absl::Now();
  auto info = backend_->Write(key, std::move(value), conditions);
  if (!info.ok()) {
    // The write may have landed anyway (a timeout after the store acted, a retried multipart
    // completion answered 404, a directory sync that failed after the rename): the cached
    // copy may be the old value, so it goes; the next read asks the store.
    InvalidateAfterFailure(key);
    return info.status();
  }
  writes_.fetch_add(1, std::memory_order_relaxed);
  InvalidateFlight(key);
  // Written values are likely read soon (a writer's readers, a re-read after write).
  if (cache_) {
    cache_->Insert(key, CachedValue{std::move(kept), info->generation, start, info->etag});
  }
  return info;
}

absl::Status ChunkStore::Delete(absl::string_view key, const Conditions& conditions) {
  absl::MutexLock lock(&WriteLockFor(key));
  absl::Status status = backend_->Delete(key, conditions);
  if (status.ok() || absl::IsNotFound(status)) {
    // Drop the cached copy even when the backend says NOT_FOUND: someone else removed it.
    InvalidateFlight(key);
  } else {
    // Maybe removed anyway (a timeout after the store acted).
    InvalidateAfterFailure(key);
  }
  if (status.ok()) deletes_.fetch_add(1, std::memory_order_relaxed);
  return status;
}

void ChunkStore::Invalidate(absl::string_view key) {
  // Ordered with writes of the key, as a write's own invalidation is.
  absl::MutexLock lock(&WriteLockFor(key));
  InvalidateFlight(key);
}

absl::StatusOr<std::unique_ptr<ListCursor>> ChunkStore::List(absl::string_view prefix,
                                                             bool directory) {
  return backend_->List(prefix, directory);
}

ChunkStoreCounters ChunkStore::counters() const {
  ChunkStoreCounters c;
  c.backend_reads = backend_reads_.load(std::memory_order_relaxed);
  c.backend_read_errors = backend_read_errors_.load(std::memory_order_relaxed);
  c.backend_not_found = backend_not_found_.load(std::memory_order_relaxed);
  c.backend_read_bytes = backend_read_bytes_.load(std::memory_order_relaxed);
  c.backend_read_micros = backend_read_micros_.load(std::memory_order_relaxed);
  c.single_flight_joins = single_flight_joins_.load(std::memory_order_relaxed);
  c.writes = writes_.load(std::memory_order_relaxed);
  c.deletes = deletes_.load(std::memory_order_relaxed);
  c.overloaded = overloaded_.load(std::memory_order_relaxed);
  c.revalidations = revalidations_.load(std::memory_order_relaxed);
  c.revalidations_not_modified = revalidations_not_modified_.load(std::memory_order_relaxed);
  c.stale_invalidations = stale_invalidations_.load(std::memory_order_relaxed);
  c.revalidation_errors = revalidation_errors_.load(std::memory_order_relaxed);
  c.failed_write_invalidations = failed_write_invalidations_.load(std::memory_order_relaxed);
  c.block_reads = block_reads_.load(std::memory_order_relaxed);
  c.blocks_read = blocks_read_.load(std::memory_order_relaxed);
  c.read_ahead_blocks = read_ahead_blocks_read_.load(std::memory_order_relaxed);
  c.changed_during_read = changed_during_read_.load(std::memory_order_relaxed);
  c.disk_promotions = disk_promotions_.load(std::memory_order_relaxed);
  c.disk_promoted_bytes = disk_promoted_bytes_.load(std::memory_order_relaxed);
  return c;
}

}  // namespace chunkd::server

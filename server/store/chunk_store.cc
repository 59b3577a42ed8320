#include "server/store/chunk_store.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace chunkd::server {

ChunkStore::ChunkStore(std::unique_ptr<Backend> backend, const ChunkStoreOptions& options)
    : backend_(std::move(backend)),
      freshness_(options.freshness),
      validation_(backend_->validation()),
      revalidate_after_(
          options.freshness.revalidate_after.value_or(backend_->default_revalidate_after())) {
  if (!backend_->holds_values_in_memory()) cache_ = std::make_unique<HostCache>(options.cache);
  io_ = std::make_unique<Executor>(options.io_threads, options.max_queued_io);
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
  return ValueInfo{value.value.size(), value.generation, value.etag};
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
  if (current.ok()) stale_invalidations_.fetch_add(1, std::memory_order_relaxed);
  cache_->EraseIfGeneration(key, hit.generation);
  return false;
}

void ChunkStore::Read(absl::string_view key, const ReadOptions& options, ReadCallback done) {
  if (!cache_) {
    // The backend holds values in memory: reading it is a lookup, no I/O, and always current.
    absl::Time now = absl::Now();
    ValueInfo info;
    auto value = backend_->Read(key, &info);
    if (!value.ok()) return std::move(done)(value.status());
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
        return std::move(done)(absl::UnavailableError(absl::StrCat(
            "key '", owned_key, "': the store could not confirm the cached copy within the "
            "requested staleness bound (last confirmed ",
            absl::FormatDuration(absl::Now() - result->validated), " ago)")));
      }
      std::move(done)(std::move(result));
    };
  }
  std::optional<CachedValue> hit = cache_->Lookup(key);
  if (hit) {
    if (FreshEnough(key, *hit, need)) return std::move(done)(*std::move(hit));
    // Local validation found it changed: read it again, as a miss.
    if (validation_ != Validation::kRemote) hit.reset();
  }
  StartOrJoinFlight(key, std::move(hit), need, std::move(done));
}

void ChunkStore::StartOrJoinFlight(absl::string_view key, std::optional<CachedValue> cached,
                                   absl::Time need, ReadCallback done) {
  FlightShard& shard = FlightShardFor(key);
  std::shared_ptr<Flight> flight;
  {
    absl::ReleasableMutexLock lock(&shard.mu);
    auto it = shard.flights.find(key);
    if (it != shard.flights.end()) {
      if (need > it->second->started) {
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
      it->second->waiters.push_back(std::move(done));
      single_flight_joins_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    // A flight that finished between the lookup above and this lock put its value in the
    // cache before leaving the table: look again, so one burst of misses reads once.
    if (auto again = cache_->Peek(key); again && again->validated >= need) {
      lock.Release();
      return std::move(done)(*std::move(again));
    }
    flight = std::make_shared<Flight>();
    flight->started = absl::Now();
    flight->cached = std::move(cached);
    flight->waiters.push_back(std::move(done));
    shard.flights.emplace(std::string(key), flight);
  }
  std::string owned_key(key);
  absl::Status queued = Submit([this, owned_key, flight]() mutable {
    RunFlight(std::move(owned_key), std::move(flight));
  });
  if (!queued.ok()) {
    std::vector<ReadCallback> waiters;
    {
      absl::MutexLock lock(&shard.mu);
      EraseFlightLocked(shard, owned_key, flight);
      waiters = std::move(flight->waiters);
    }
    for (ReadCallback& waiter : waiters) std::move(waiter)(queued);
  }
}

void ChunkStore::EraseFlightLocked(FlightShard& shard, absl::string_view key,
                                   const std::shared_ptr<Flight>& flight) {
  // A write may have replaced this flight in the table by a newer one: leave that one be.
  if (auto it = shard.flights.find(key); it != shard.flights.end() && it->second == flight) {
    shard.flights.erase(it);
  }
}

void ChunkStore::RunFlight(std::string key, std::shared_ptr<Flight> flight) {
  absl::Time start = absl::Now();
  ValueInfo info;
  absl::StatusOr<CachedValue> result;
  // What to do to the cache once the answer is in (unless a write landed meanwhile).
  enum class Update { kNone, kInsert, kMarkValidated, kErase } update = Update::kNone;
  if (flight->cached) {
    // A revalidation: one conditional request; a 304 moves no bytes.
    const CachedValue& cached = *flight->cached;
    auto changed = backend_->ReadIfChanged(key, InfoOf(cached), &info);
    revalidations_.fetch_add(1, std::memory_order_relaxed);
    if (changed.ok() && !changed->has_value()) {
      revalidations_not_modified_.fetch_add(1, std::memory_order_relaxed);
      result = cached;
      result->validated = start;
      update = Update::kMarkValidated;
    } else if (changed.ok()) {
      stale_invalidations_.fetch_add(1, std::memory_order_relaxed);
      backend_reads_.fetch_add(1, std::memory_order_relaxed);
      backend_read_bytes_.fetch_add((*changed)->size(), std::memory_order_relaxed);
      result = CachedValue{**std::move(changed), info.generation, start, std::move(info.etag)};
      update = Update::kInsert;
    } else if (absl::IsNotFound(changed.status())) {
      stale_invalidations_.fetch_add(1, std::memory_order_relaxed);
      result = changed.status();
      update = Update::kErase;
    } else {
      // The store cannot say (unreachable, refusing): the cached copy is served as it is,
      // its validation time unchanged (TensorStore's timestamp shows its age), so that an
      // outage of the store does not fail reads under the policy that the cache can answer;
      // a read with a bound of its own refuses it (Read). The next read past the bound asks
      // again.
      revalidation_errors_.fetch_add(1, std::memory_order_relaxed);
      result = cached;
    }
  } else {
    absl::StatusOr<buffer::cpu::Buffer> value = backend_->Read(key, &info);
    backend_reads_.fetch_add(1, std::memory_order_relaxed);
    if (value.ok()) {
      backend_read_bytes_.fetch_add(value->size(), std::memory_order_relaxed);
      result = CachedValue{*std::move(value), info.generation, start, std::move(info.etag)};
      update = Update::kInsert;
    } else {
      // A missing key is an answer, not a failure of the store.
      (absl::IsNotFound(value.status()) ? backend_not_found_ : backend_read_errors_)
          .fetch_add(1, std::memory_order_relaxed);
      result = value.status();
    }
  }
  backend_read_micros_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start),
                                 std::memory_order_relaxed);
  std::vector<ReadCallback> waiters;
  {
    FlightShard& shard = FlightShardFor(key);
    absl::MutexLock lock(&shard.mu);
    if (!flight->stale) {
      switch (update) {
        case Update::kInsert:
          cache_->Insert(key, *result);
          break;
        case Update::kMarkValidated:
          cache_->MarkValidated(key, result->generation, start);
          break;
        case Update::kErase:
          cache_->EraseIfGeneration(key, flight->cached->generation);
          break;
        case Update::kNone:
          break;
      }
    }
    EraseFlightLocked(shard, key, flight);
    waiters = std::move(flight->waiters);
  }
  for (ReadCallback& waiter : waiters) std::move(waiter)(result);
}

absl::StatusOr<CachedValue> ChunkStore::ReadAndWait(absl::string_view key,
                                                    const ReadOptions& options) {
  absl::Notification done;
  absl::StatusOr<CachedValue> out;
  Read(key, options, [&](absl::StatusOr<CachedValue> result) {
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

void ChunkStore::InvalidateFlight(absl::string_view key) {
  if (!cache_) return;
  FlightShard& shard = FlightShardFor(key);
  absl::MutexLock lock(&shard.mu);
  if (auto it = shard.flights.find(key); it != shard.flights.end()) {
    // The flight still answers the readers that joined it, but no reader that starts from
    // now on (after the write is acknowledged) may join it: it would get the older value.
    it->second->stale = true;
    shard.flights.erase(it);
  }
  cache_->Erase(key);
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
  return c;
}

}  // namespace chunkd::server

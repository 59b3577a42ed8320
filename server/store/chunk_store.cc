#include "server/store/chunk_store.h"

#include "absl/hash/hash.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace chunkd::server {

ChunkStore::ChunkStore(std::unique_ptr<Backend> backend, const ChunkStoreOptions& options)
    : backend_(std::move(backend)) {
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

void ChunkStore::Read(absl::string_view key, ReadCallback done) {
  if (!cache_) {
    // The backend holds values in memory: reading it is a lookup, no I/O.
    ValueInfo info;
    auto value = backend_->Read(key, &info);
    if (!value.ok()) return std::move(done)(value.status());
    return std::move(done)(CachedValue{*std::move(value), info.generation});
  }
  if (auto hit = cache_->Lookup(key)) return std::move(done)(*std::move(hit));

  FlightShard& shard = FlightShardFor(key);
  std::shared_ptr<Flight> flight;
  {
    absl::ReleasableMutexLock lock(&shard.mu);
    auto it = shard.flights.find(key);
    if (it != shard.flights.end()) {
      it->second->waiters.push_back(std::move(done));
      single_flight_joins_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    // A flight that finished between the lookup above and this lock put its value in the
    // cache before leaving the table: look again, so one burst of misses reads once.
    if (auto hit = cache_->Peek(key)) {
      lock.Release();
      return std::move(done)(*std::move(hit));
    }
    flight = std::make_shared<Flight>();
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
  absl::StatusOr<buffer::cpu::Buffer> value = backend_->Read(key, &info);
  backend_reads_.fetch_add(1, std::memory_order_relaxed);
  backend_read_micros_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start),
                                 std::memory_order_relaxed);
  absl::StatusOr<CachedValue> result;
  if (value.ok()) {
    backend_read_bytes_.fetch_add(value->size(), std::memory_order_relaxed);
    result = CachedValue{*std::move(value), info.generation};
  } else {
    // A missing key is an answer, not a failure of the store.
    (absl::IsNotFound(value.status()) ? backend_not_found_ : backend_read_errors_)
        .fetch_add(1, std::memory_order_relaxed);
    result = value.status();
  }
  std::vector<ReadCallback> waiters;
  {
    FlightShard& shard = FlightShardFor(key);
    absl::MutexLock lock(&shard.mu);
    if (result.ok() && !flight->stale) cache_->Insert(key, *result);
    EraseFlightLocked(shard, key, flight);
    waiters = std::move(flight->waiters);
  }
  for (ReadCallback& waiter : waiters) std::move(waiter)(result);
}

absl::StatusOr<CachedValue> ChunkStore::ReadAndWait(absl::string_view key) {
  absl::Notification done;
  absl::StatusOr<CachedValue> out;
  Read(key, [&](absl::StatusOr<CachedValue> result) {
    out = std::move(result);
    done.Notify();
  });
  done.WaitForNotification();
  return out;
}

std::optional<ValueInfo> ChunkStore::CachedInfo(absl::string_view key) {
  if (!cache_) return std::nullopt;
  auto hit = cache_->Peek(key);
  if (!hit) return std::nullopt;
  return ValueInfo{hit->value.size(), hit->generation};
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

absl::StatusOr<ValueInfo> ChunkStore::Write(absl::string_view key, buffer::cpu::Buffer value,
                                            const Conditions& conditions) {
  absl::MutexLock lock(&WriteLockFor(key));
  buffer::cpu::Buffer kept = value;
  auto info = backend_->Write(key, std::move(value), conditions);
  if (!info.ok()) return info.status();
  writes_.fetch_add(1, std::memory_order_relaxed);
  InvalidateFlight(key);
  // Written values are likely read soon (a writer's readers, a re-read after write).
  if (cache_) cache_->Insert(key, CachedValue{std::move(kept), info->generation});
  return info;
}

absl::Status ChunkStore::Delete(absl::string_view key, const Conditions& conditions) {
  absl::MutexLock lock(&WriteLockFor(key));
  absl::Status status = backend_->Delete(key, conditions);
  // Drop the cached copy even when the backend says NOT_FOUND: someone else removed it.
  if (status.ok() || absl::IsNotFound(status)) InvalidateFlight(key);
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
  return c;
}

}  // namespace chunkd::server

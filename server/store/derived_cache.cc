#include "server/store/derived_cache.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/common/key.h"

namespace chunkd::server {
namespace {

// How often the watcher looks at the lives of producers the kernel named: a dead producer's
// waiters get the production within about this long.
constexpr absl::Duration kLifePoll = absl::Milliseconds(50);

absl::Status Stopping() { return absl::UnavailableError("the server is shutting down"); }

}  // namespace

std::string DerivedCache::EntryKey(absl::string_view key, absl::string_view derivation) {
  return absl::StrCat(key, absl::string_view("\0", 1), derivation);
}

DerivedCache::DerivedCache(ChunkStore* store, const DerivedCacheOptions& options)
    : store_(store), options_(options), cache_(options.cache) {
  store_->SetChangeListener([this](absl::string_view key) { SourceChanged(key); });
  watcher_ = std::thread([this] { Watch(); });
}

DerivedCache::~DerivedCache() {
  store_->SetChangeListener(nullptr);
  Shutdown();
  watcher_.join();
}

void DerivedCache::Shutdown() {
  Deferred out;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [entry, production] : productions_) {
      for (Waiter& waiter : production.waiters) {
        out.answers.emplace_back(std::move(waiter.done), Stopping());
      }
    }
    productions_.clear();
    waiting_ = 0;
    wake_.SignalAll();
  }
  out.Run(this);
}

void DerivedCache::Deferred::Run(DerivedCache* cache) {
  for (auto& [done, answer] : answers) std::move(done)(std::move(answer));
  answers.clear();
  for (Waiter& waiter : restarts) {
    // The production it waited for is over without an entry of the source's current
    // generation: it reads again, within what is left of its wait.
    absl::Duration left = waiter.deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      cache->wait_timeouts_.fetch_add(1, std::memory_order_relaxed);
      std::move(waiter.done)(absl::DeadlineExceededError(
          absl::StrCat("key ", QuoteKey(waiter.request.key),
                       ": no derived entry was published within the wait; derive it without "
                       "publishing")));
      continue;
    }
    waiter.request.wait = left;
    cache->Read(std::move(waiter.request), std::move(waiter.done));
  }
  restarts.clear();
}

void DerivedCache::Read(DerivedRequest request, Callback done) {
  if (request.wait <= absl::ZeroDuration()) request.wait = options_.default_wait;
  std::string key = request.key;
  // The source's current generation under the freshness rules: a hit on a cached, fresh source
  // answers here; otherwise a stat, HEAD or record flight, as for any read of it.
  store_->Read(key, ByteRange::Bounded(0, 0), request.source,
               [this, request = std::move(request),
                done = std::move(done)](absl::StatusOr<CachedValue> source) mutable {
                 if (!source.ok()) return std::move(done)(source.status());
                 Resolve(std::move(request), source->generation, std::move(done));
               });
}

void DerivedCache::Resolve(DerivedRequest request, Generation generation, Callback done) {
  std::string entry = EntryKey(request.key, request.derivation);
  Deferred out;
  absl::StatusOr<DerivedAnswer> answer;
  bool waits = false;
  {
    absl::MutexLock lock(&mu_);
    std::optional<CachedValue> hit = cache_.Lookup(entry);
    if (hit && hit->generation == generation) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      DerivedAnswer a;
      a.value = std::move(hit);
      a.generation = generation;
      answer = std::move(a);
    } else {
      if (hit) {
        // Derived from another generation of the source: never served, and gone.
        cache_.EraseIfGeneration(entry, hit->generation);
        stale_drops_.fetch_add(1, std::memory_order_relaxed);
      }
      misses_.fetch_add(1, std::memory_order_relaxed);
      auto it = productions_.find(entry);
      if (it != productions_.end() && it->second.generation != generation) {
        // A production from another generation: superseded. Its waiters read again (its
        // producer's Put is refused: the source is no longer at that generation).
        for (Waiter& waiter : it->second.waiters) out.restarts.push_back(std::move(waiter));
        waiting_ -= it->second.waiters.size();
        productions_.erase(it);
        it = productions_.end();
      }
      if (stopping_) {
        answer = Stopping();
      } else if (it != productions_.end()) {
        if (waiting_ >= options_.max_waiters) {
          waiters_refused_.fetch_add(1, std::memory_order_relaxed);
          answer = absl::ResourceExhaustedError(absl::StrCat(
              "key ", QuoteKey(request.key), ": ", waiting_,
              " reads wait for derived entries already (--derived_max_waiters); derive it "
              "without publishing"));
        } else {
          absl::Time deadline = absl::Now() + request.wait;
          it->second.waiters.push_back(Waiter{std::move(request), std::move(done), deadline});
          ++waiting_;
          waits = true;
          wake_.Signal();
        }
      } else if (request.produce) {
        Production& production = productions_[entry];
        production.id = next_id_++;
        production.generation = generation;
        production.deadline = absl::Now() + options_.produce_timeout;
        production.producer = request.process;
        productions_started_.fetch_add(1, std::memory_order_relaxed);
        wake_.Signal();
        DerivedAnswer a;
        a.production_id = production.id;
        a.generation = generation;
        answer = std::move(a);
      } else {
        answer = absl::NotFoundError(absl::StrCat(
            "key ", QuoteKey(request.key),
            ": no derived entry for this derivation at source generation ", generation));
      }
    }
  }
  out.Run(this);
  if (!waits) std::move(done)(std::move(answer));
}

void DerivedCache::Publish(std::string key, std::string derivation, Generation source_generation,
                           uint64_t production_id, buffer::cpu::Buffer value, StatusCallback done) {
  // Stored only if the source is still at the generation the value was derived from, under the
  // freshness rules of a read without a bound of its own.
  std::string owned_key = key;
  store_->Read(
      owned_key, ByteRange::Bounded(0, 0), ReadOptions(),
      [this, key = std::move(key), derivation = std::move(derivation), source_generation,
       production_id, value = std::move(value),
       done = std::move(done)](absl::StatusOr<CachedValue> source) mutable {
        std::string entry = EntryKey(key, derivation);
        Deferred out;
        absl::Status status;
        {
          absl::MutexLock lock(&mu_);
          auto it = productions_.find(entry);
          if (!source.ok() || source->generation != source_generation) {
            stale_publishes_.fetch_add(1, std::memory_order_relaxed);
            if (source.ok() || absl::IsNotFound(source.status())) {
              status = absl::FailedPreconditionError(absl::StrCat(
                  "key ", QuoteKey(key), " is no longer at generation ", source_generation,
                  source.ok() ? absl::StrCat(" (now ", source->generation, ")") : " (removed)",
                  ": the derived entry is not stored"));
            } else {
              status = source.status();
            }
            if (it != productions_.end() && production_id != 0 && it->second.id == production_id) {
              // This production is over: its waiters read again and find the new generation.
              for (Waiter& waiter : it->second.waiters) out.restarts.push_back(std::move(waiter));
              waiting_ -= it->second.waiters.size();
              productions_.erase(it);
            }
          } else {
            CachedValue stored(std::move(value), source_generation, absl::Now());
            // Not admitted (too large, or pinned entries leave no room): the waiters get it all
            // the same.
            if (cache_.Insert(entry, stored)) IndexLocked(key, entry);
            published_.fetch_add(1, std::memory_order_relaxed);
            if (it != productions_.end()) {
              for (Waiter& waiter : it->second.waiters) {
                if (it->second.generation == source_generation) {
                  DerivedAnswer a;
                  a.value = stored;
                  a.generation = source_generation;
                  out.answers.emplace_back(std::move(waiter.done), std::move(a));
                } else {
                  out.restarts.push_back(std::move(waiter));
                }
              }
              waiting_ -= it->second.waiters.size();
              productions_.erase(it);
            }
          }
        }
        out.Run(this);
        std::move(done)(status);
      });
}

absl::Status DerivedCache::Abandon(absl::string_view key, absl::string_view derivation,
                                   uint64_t production_id) {
  Deferred out;
  {
    absl::MutexLock lock(&mu_);
    auto it = productions_.find(EntryKey(key, derivation));
    if (it != productions_.end() && it->second.id == production_id) {
      abandons_.fetch_add(1, std::memory_order_relaxed);
      HandOffLocked(it, &out);
    }
  }
  out.Run(this);
  return absl::OkStatus();
}

void DerivedCache::HandOffLocked(absl::flat_hash_map<std::string, Production>::iterator it,
                                 Deferred* out) {
  Production& production = it->second;
  auto next = std::find_if(production.waiters.begin(), production.waiters.end(),
                           [](const Waiter& waiter) { return waiter.request.produce; });
  if (next == production.waiters.end()) {
    // Nobody waiting may produce it: the production ends, and so do the waits.
    for (Waiter& waiter : production.waiters) {
      out->answers.emplace_back(
          std::move(waiter.done),
          absl::NotFoundError(absl::StrCat("key ", QuoteKey(waiter.request.key),
                                           ": the reader producing this derived entry gave up, "
                                           "died or ran out of time")));
    }
    waiting_ -= production.waiters.size();
    productions_.erase(it);
    return;
  }
  handoffs_.fetch_add(1, std::memory_order_relaxed);
  production.id = next_id_++;
  production.deadline = absl::Now() + options_.produce_timeout;
  production.producer = next->request.process;
  DerivedAnswer a;
  a.production_id = production.id;
  a.generation = production.generation;
  out->answers.emplace_back(std::move(next->done), std::move(a));
  production.waiters.erase(next);
  --waiting_;
}

void DerivedCache::IndexLocked(absl::string_view key, const std::string& entry) {
  if (by_source_[key].insert(entry).second) ++indexed_;
  // Evicted entries stay in the index until their source changes: prune it when it has grown
  // well past what the cache holds.
  uint64_t held = cache_.stats().entries;
  if (indexed_ <= 2 * held + 1024) return;
  indexed_ = 0;
  for (auto source = by_source_.begin(); source != by_source_.end();) {
    absl::flat_hash_set<std::string>& entries = source->second;
    for (auto e = entries.begin(); e != entries.end();) {
      if (cache_.Peek(*e)) {
        ++e;
      } else {
        entries.erase(e++);
      }
    }
    indexed_ += entries.size();
    if (entries.empty()) {
      by_source_.erase(source++);
    } else {
      ++source;
    }
  }
}

void DerivedCache::SourceChanged(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = by_source_.find(key);
  if (it == by_source_.end()) return;
  for (const std::string& entry : it->second) {
    if (cache_.Peek(entry)) stale_drops_.fetch_add(1, std::memory_order_relaxed);
    cache_.Erase(entry);
  }
  indexed_ -= it->second.size();
  by_source_.erase(it);
}

void DerivedCache::Watch() {
  mu_.Lock();
  while (!stopping_) {
    absl::Time now = absl::Now();
    Deferred out;
    std::vector<std::string> over;  // productions whose producer is gone or late
    for (auto& [entry, production] : productions_) {
      auto& waiters = production.waiters;
      for (auto w = waiters.begin(); w != waiters.end();) {
        if (w->deadline > now) {
          ++w;
          continue;
        }
        wait_timeouts_.fetch_add(1, std::memory_order_relaxed);
        out.answers.emplace_back(
            std::move(w->done),
            absl::DeadlineExceededError(
                absl::StrCat("key ", QuoteKey(w->request.key), ": waited ",
                             absl::FormatDuration(w->request.wait),
                             " for another reader to produce the derived entry; derive it without "
                             "publishing")));
        w = waiters.erase(w);
        --waiting_;
      }
      bool dead = production.producer != nullptr && !production.producer->alive();
      if (dead || production.deadline <= now) over.push_back(entry);
    }
    for (const std::string& entry : over) {
      auto it = productions_.find(entry);
      if (it != productions_.end()) HandOffLocked(it, &out);
    }
    if (!out.answers.empty() || !out.restarts.empty()) {
      mu_.Unlock();
      out.Run(this);
      mu_.Lock();
      continue;
    }
    // Sleep until the next deadline, or the next look at the producers' lives.
    absl::Time next = absl::InfiniteFuture();
    for (const auto& [entry, production] : productions_) {
      next = std::min(next, production.deadline);
      if (production.producer != nullptr) next = std::min(next, now + kLifePoll);
      for (const Waiter& waiter : production.waiters) next = std::min(next, waiter.deadline);
    }
    wake_.WaitWithDeadline(&mu_, next);
  }
  mu_.Unlock();
}

DerivedCacheStats DerivedCache::stats() const {
  DerivedCacheStats s;
  s.cache = cache_.stats();
  s.hits = hits_.load(std::memory_order_relaxed);
  s.misses = misses_.load(std::memory_order_relaxed);
  s.productions = productions_started_.load(std::memory_order_relaxed);
  s.published = published_.load(std::memory_order_relaxed);
  s.handoffs = handoffs_.load(std::memory_order_relaxed);
  s.abandons = abandons_.load(std::memory_order_relaxed);
  s.wait_timeouts = wait_timeouts_.load(std::memory_order_relaxed);
  s.waiters_refused = waiters_refused_.load(std::memory_order_relaxed);
  s.stale_drops = stale_drops_.load(std::memory_order_relaxed);
  s.stale_publishes = stale_publishes_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  s.waiting = waiting_;
  return s;
}

}  // namespace chunkd::server

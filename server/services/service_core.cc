#include "server/services/service_core.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "server/common/key.h"

namespace chunkd::server {

absl::StatusOr<ReadSlice> SliceForRead(const CachedValue& value, absl::string_view key,
                                       const ByteRange& range, const Conditions& conditions,
                                       RangeRule rule) {
  if (absl::Status s = conditions.Check(key, value.generation); !s.ok()) return s;
  ResolvedRange r;
  if (rule == RangeRule::kClip) {
    r = Resolve(range, value.size());
  } else {
    absl::StatusOr<ResolvedRange> within = ResolveWithin(range, value.size());
    if (!within.ok()) {
      return absl::Status(within.status().code(),
                          absl::StrCat("key ", QuoteKey(key), ": ", within.status().message()));
    }
    r = *within;
  }
  ReadSlice slice;
  slice.total_size = value.size();
  slice.generation = value.generation;
  slice.start = r.start;
  slice.length = r.length;
  // The store answers with the bytes from the range's start on (ChunkStore::Read).
  uint64_t held_until = value.offset + value.value.size();
  if (r.length > 0 && (r.start < value.offset || r.start >= held_until)) {
    return absl::InternalError(absl::StrCat("key ", QuoteKey(key), ": the store answered bytes [",
                                            value.offset, ", ", held_until, ") for a read at ",
                                            r.start));
  }
  if (r.length > 0) {
    slice.bytes =
        value.value.Slice(r.start - value.offset, std::min(r.length, held_until - r.start));
  }
  return slice;
}

ServiceCore::ServiceCore(ChunkStore* store, const ServiceOptions& options)
    : store_(store), options_(options) {}

void ServiceCore::AddCounters(std::string prefix, const CallCounters* counters) {
  counters_.emplace_back(std::move(prefix), counters);
}

void ServiceCore::ExportCounters(
    const std::function<void(const std::string&, uint64_t)>& out) const {
  for (const auto& [prefix, c] : counters_) {
    for (const CallCounterSpec& spec : CallCounterSpecs()) out(prefix + spec.name, spec.value(*c));
  }
}

absl::Status ServiceCore::CheckWritable(absl::string_view what) const {
  if (!options_.read_only) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("the server is read-only (--read_only); ", what, " are refused"));
}

absl::Status ServiceCore::CheckValueSize(absl::string_view key, uint64_t size) const {
  if (size <= options_.max_value_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "value for key ", QuoteKey(key), " is ", size, " bytes, more than the server's maximum of ",
      options_.max_value_bytes, " (--max_value_bytes)"));
}

bool ServiceCore::ReservePutBytes(uint64_t bytes, uint64_t held) {
  uint64_t used = inflight_put_bytes_.load();
  do {
    if (used + bytes > options_.max_inflight_put_bytes && used > held) return false;
  } while (!inflight_put_bytes_.compare_exchange_weak(used, used + bytes));
  return true;
}

void ServiceCore::ReleasePutBytes(uint64_t bytes) { inflight_put_bytes_.fetch_sub(bytes); }

absl::Status ServiceCore::PutBudgetExhausted() {
  return absl::ResourceExhaustedError(
      "too many bytes of writes in flight on the server; try again later");
}

void ServiceCore::SubmitWrite(std::string key, buffer::cpu::Buffer value, Conditions conditions,
                              CallCounters* counters,
                              absl::AnyInvocable<void(absl::StatusOr<ValueInfo>) &&> done) {
  // `done` moves into the task only if it is queued; a refused task is destroyed unrun.
  auto shared =
      std::make_shared<absl::AnyInvocable<void(absl::StatusOr<ValueInfo>) &&>>(std::move(done));
  absl::Status queued = store_->Submit([this, key = std::move(key), value = std::move(value),
                                        conditions, counters, shared]() mutable {
    absl::StatusOr<ValueInfo> info = store_->Write(key, std::move(value), conditions);
    if (info.ok()) {
      counters->puts.fetch_add(1, std::memory_order_relaxed);
      counters->bytes_written.fetch_add(info->size, std::memory_order_relaxed);
    }
    std::move (*shared)(std::move(info));
  });
  if (!queued.ok()) std::move (*shared)(queued);
}

void ServiceCore::SubmitDelete(std::string key, Conditions conditions, CallCounters* counters,
                               absl::AnyInvocable<void(absl::Status) &&> done) {
  auto shared = std::make_shared<absl::AnyInvocable<void(absl::Status) &&>>(std::move(done));
  absl::Status queued =
      store_->Submit([this, key = std::move(key), conditions, counters, shared]() mutable {
        absl::Status s = store_->Delete(key, conditions);
        if (s.ok()) counters->deletes.fetch_add(1, std::memory_order_relaxed);
        std::move (*shared)(std::move(s));
      });
  if (!queued.ok()) std::move (*shared)(queued);
}

}  // namespace chunkd::server

#include "server/services/server_counters.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace chunkd::server {
namespace {

constexpr MetricKind kCounter = MetricKind::kCounter;
constexpr MetricKind kGauge = MetricKind::kGauge;

uint64_t Load(uint64_t value) { return value; }
uint64_t Load(const std::atomic<uint64_t>& value) { return value.load(); }

// The value of `Field` of the part `Part` of the sources; none when that part is off.
template <auto Part, auto Field>
std::optional<uint64_t> From(const CounterSources& sources) {
  const auto* part = sources.*Part;
  if (part == nullptr) return std::nullopt;
  return Load(part->*Field);
}

constexpr auto kLeases = &CounterSources::leases;
constexpr auto kCache = &CounterSources::cache;
constexpr auto kStore = &CounterSources::store;
constexpr auto kBudget = &CounterSources::budget;
constexpr auto kService = &CounterSources::service;
constexpr auto kDevice = &CounterSources::device;
constexpr auto kDisk = &CounterSources::disk;

// The disk tier's store-side counters: only with a disk tier.
template <auto Field>
std::optional<uint64_t> FromStoreWithDisk(const CounterSources& sources) {
  if (sources.disk == nullptr || sources.store == nullptr) return std::nullopt;
  return sources.store->*Field;
}

constexpr auto kDerived = &CounterSources::derived;

// A field of the derived entries' cache (DerivedCacheStats::cache).
template <auto Field>
std::optional<uint64_t> FromDerivedCache(const CounterSources& sources) {
  if (sources.derived == nullptr) return std::nullopt;
  return sources.derived->cache.*Field;
}

std::optional<uint64_t> BlockBytes(const CounterSources& sources) { return sources.block_bytes; }

// Names are part of the interface (ServerInfo's map, /metrics, tests, the Python package and
// the benchmarks read them): never rename one.
constexpr CounterSpec kServerCounters[] = {
    // Leases on handles (shared memory, CUDA IPC): with leases on.
    {"leases_granted", kCounter, "Leases granted on handle deliveries.",
     From<kLeases, &LeaseStats::granted>},
    {"leases_released", kCounter, "Leases released by their clients.",
     From<kLeases, &LeaseStats::released>},
    {"leases_expired", kCounter, "Leases that ended at their TTL, unrenewed.",
     From<kLeases, &LeaseStats::expired>},
    {"leases_unknown", kCounter, "Releases or renewals of ids that named no lease.",
     From<kLeases, &LeaseStats::unknown>},
    {"leases_process_bound", kCounter,
     "Live leases that follow a watched client process (UNIX socket).",
     From<kLeases, &LeaseStats::process_bound>},
    {"lease_count_refusals", kCounter,
     "Grants refused at the count caps (--max_client_leases and the table's total).",
     From<kLeases, &LeaseStats::refused_count>},
    // The host cache: with a cache.
    {"hits", kCounter, "Reads answered from the host cache.", From<kCache, &HostCacheStats::hits>},
    {"misses", kCounter, "Reads the host cache did not hold.",
     From<kCache, &HostCacheStats::misses>},
    {"evictions", kCounter, "Entries evicted from the host cache.",
     From<kCache, &HostCacheStats::evictions>},
    {"evicted_bytes", kCounter, "Bytes evicted from the host cache.",
     From<kCache, &HostCacheStats::evicted_bytes>},
    {"not_admitted", kCounter, "Values too large for the host cache.",
     From<kCache, &HostCacheStats::not_admitted>},
    {"detached_pinned_bytes", kGauge,
     "Leased values no longer in the cache (replaced, deleted), still held until their leases end.",
     From<kCache, &HostCacheStats::detached_pinned_bytes>},
    // The chunk store over its backend.
    {"backend_reads", kCounter, "Reads of the backend store.",
     From<kStore, &ChunkStoreCounters::backend_reads>},
    {"backend_read_errors", kCounter, "Failed backend reads (missing keys not included).",
     From<kStore, &ChunkStoreCounters::backend_read_errors>},
    {"backend_not_found", kCounter, "Backend reads of keys the store does not hold.",
     From<kStore, &ChunkStoreCounters::backend_not_found>},
    {"backend_read_bytes", kCounter, "Bytes read from the backend store.",
     From<kStore, &ChunkStoreCounters::backend_read_bytes>},
    {"backend_read_micros", kCounter,
     "Time spent in backend reads, in microseconds (divided by backend_reads: mean latency).",
     From<kStore, &ChunkStoreCounters::backend_read_micros>},
    {"single_flight_joins", kCounter, "Misses that waited on a read already in flight.",
     From<kStore, &ChunkStoreCounters::single_flight_joins>},
    {"overloaded", kCounter, "Operations refused because the I/O queue was full.",
     From<kStore, &ChunkStoreCounters::overloaded>},
    {"revalidations", kCounter,
     "Validations of cached values (stats for the file store, conditional requests otherwise).",
     From<kStore, &ChunkStoreCounters::revalidations>},
    {"revalidations_not_modified", kCounter,
     "Validations that found the value unchanged (a 304 for s3/http).",
     From<kStore, &ChunkStoreCounters::revalidations_not_modified>},
    {"stale_invalidations", kCounter,
     "Cached values found changed or removed behind chunkd's back.",
     From<kStore, &ChunkStoreCounters::stale_invalidations>},
    {"revalidation_errors", kCounter,
     "Validations the store could not answer (the cached copy was served).",
     From<kStore, &ChunkStoreCounters::revalidation_errors>},
    {"failed_write_invalidations", kCounter,
     "Cached copies dropped because a write or delete failed.",
     From<kStore, &ChunkStoreCounters::failed_write_invalidations>},
    {"block_reads", kCounter, "Ranged reads of the store (a run of adjacent blocks each).",
     From<kStore, &ChunkStoreCounters::block_reads>},
    {"blocks_read", kCounter, "Blocks read from the store.",
     From<kStore, &ChunkStoreCounters::blocks_read>},
    {"read_ahead_blocks", kCounter, "Blocks fetched ahead of a sequential reader.",
     From<kStore, &ChunkStoreCounters::read_ahead_blocks>},
    {"changed_during_read", kCounter, "Reads that found the value changed between two blocks.",
     From<kStore, &ChunkStoreCounters::changed_during_read>},
    // The read budget (--read_budget_bytes) and the block size.
    {"read_budget_bytes", kGauge, "Bytes reads may hold outside the cache (--read_budget_bytes).",
     From<kBudget, &ReadBudgetStats::capacity_bytes>},
    {"read_held_bytes", kGauge, "Bytes reads hold outside the cache now.",
     From<kBudget, &ReadBudgetStats::held_bytes>},
    {"read_held_peak_bytes", kGauge, "The most bytes reads held outside the cache since start.",
     From<kBudget, &ReadBudgetStats::peak_held_bytes>},
    {"read_budget_refusals", kCounter, "Reads refused because the read budget was in use.",
     From<kBudget, &ReadBudgetStats::refusals>},
    {"block_bytes", kGauge, "Size of the blocks values are read by (--block_bytes).", BlockBytes},
    // chunkd.v1's deliveries.
    {"get_many_calls", kCounter, "GetMany calls (their items count in gets).",
     From<kService, &ServiceCounters::get_many_calls>},
    {"bytes_served_shm", kCounter, "Bytes delivered as shared-memory handles.",
     From<kService, &ServiceCounters::bytes_served_shm>},
    {"gets_shm", kCounter, "Reads delivered as shared-memory handles.",
     From<kService, &ServiceCounters::gets_shm>},
    {"shm_fallbacks", kCounter, "Reads that asked for shared memory and were served inline.",
     From<kService, &ServiceCounters::shm_fallbacks>},
    {"stats", kCounter, "Stat calls.", From<kService, &ServiceCounters::stats>},
    {"invalidations", kCounter, "Stat calls that invalidated the cached copy (pool clients).",
     From<kService, &ServiceCounters::invalidations>},
    {"gets_cuda", kCounter, "Reads delivered as CUDA IPC handles.",
     From<kService, &ServiceCounters::gets_cuda>},
    {"bytes_served_cuda", kCounter, "Bytes delivered as CUDA IPC handles.",
     From<kService, &ServiceCounters::bytes_served_cuda>},
    {"cuda_fallbacks", kCounter, "Reads that asked for CUDA IPC and were served otherwise.",
     From<kService, &ServiceCounters::cuda_fallbacks>},
    {"cuda_unknown_gpu", kCounter, "CUDA IPC requests naming a GPU the server does not have.",
     From<kService, &ServiceCounters::cuda_unknown_gpu>},
    // The device tier: with CUDA IPC on.
    {"device_hits", kCounter, "CUDA IPC reads found in the device tier.",
     From<kDevice, &DeviceTierStats::hits>},
    {"device_promotions", kCounter, "Values copied to a GPU for CUDA IPC.",
     From<kDevice, &DeviceTierStats::promotions>},
    {"device_promoted_bytes", kCounter, "Bytes copied to a GPU for CUDA IPC.",
     From<kDevice, &DeviceTierStats::promoted_bytes>},
    {"device_promotion_failures", kCounter, "Copies to a GPU that failed.",
     From<kDevice, &DeviceTierStats::promotion_failures>},
    {"device_evictions", kCounter, "Entries evicted from the device tier.",
     From<kDevice, &DeviceTierStats::evictions>},
    {"device_evicted_bytes", kCounter, "Bytes evicted from the device tier.",
     From<kDevice, &DeviceTierStats::evicted_bytes>},
    {"device_not_admitted", kCounter, "Values larger than the device tier's budget.",
     From<kDevice, &DeviceTierStats::not_admitted>},
    // Derived entries (decoded chunks): with --derived_cache_fraction > 0.
    {"derived_hits", kCounter, "Derived reads answered with an entry of the source's generation.",
     From<kDerived, &DerivedCacheStats::hits>},
    {"derived_misses", kCounter, "Derived reads that found no entry of the source's generation.",
     From<kDerived, &DerivedCacheStats::misses>},
    {"derived_productions", kCounter, "Derived reads told to produce the entry.",
     From<kDerived, &DerivedCacheStats::productions>},
    {"derived_published", kCounter, "Derived entries published (decodes done).",
     From<kDerived, &DerivedCacheStats::published>},
    {"derived_handoffs", kCounter,
     "Productions handed to a waiting reader (the producer gave up, died or ran late).",
     From<kDerived, &DerivedCacheStats::handoffs>},
    {"derived_abandons", kCounter, "Productions given up by their producer.",
     From<kDerived, &DerivedCacheStats::abandons>},
    {"derived_wait_timeouts", kCounter,
     "Derived reads that waited for a production past their wait (DEADLINE_EXCEEDED).",
     From<kDerived, &DerivedCacheStats::wait_timeouts>},
    {"derived_waiters_refused", kCounter,
     "Derived reads refused a wait because --derived_max_waiters waited already.",
     From<kDerived, &DerivedCacheStats::waiters_refused>},
    {"derived_stale_drops", kCounter, "Derived entries dropped because their source changed.",
     From<kDerived, &DerivedCacheStats::stale_drops>},
    {"derived_stale_publishes", kCounter,
     "Derived entries refused at publication: the source had changed.",
     From<kDerived, &DerivedCacheStats::stale_publishes>},
    {"derived_waiting", kGauge, "Derived reads waiting for a production now.",
     From<kDerived, &DerivedCacheStats::waiting>},
    {"derived_entries", kGauge, "Derived entries held.",
     FromDerivedCache<&HostCacheStats::entries>},
    {"derived_bytes", kGauge, "Bytes of derived entries held.",
     FromDerivedCache<&HostCacheStats::used_bytes>},
    {"derived_capacity_bytes", kGauge,
     "Budget of derived entries (--derived_cache_fraction of --host_cache_bytes).",
     FromDerivedCache<&HostCacheStats::capacity_bytes>},
    {"derived_evictions", kCounter, "Derived entries evicted for room.",
     FromDerivedCache<&HostCacheStats::evictions>},
    // Levels, exported as totals since they first appeared (the names are kept).
    {"device_segments", kCounter, "Device memory segments allocated.",
     From<kDevice, &DeviceTierStats::segments>},
    {"device_segment_bytes", kCounter, "Device memory allocated for segments.",
     From<kDevice, &DeviceTierStats::segment_bytes>},
    {"device_ipc_exports", kCounter, "Device segments exported for CUDA IPC (once each).",
     From<kDevice, &DeviceTierStats::ipc_exports>},
    // The disk tier (--disk_cache_dir): with it on.
    {"disk_capacity_bytes", kGauge,
     "Budget of the disk tier (--disk_cache_bytes; lower after the disk filled: ENOSPC).",
     From<kDisk, &DiskTierStats::capacity_bytes>},
    {"disk_used_bytes", kGauge, "Bytes of entries the disk tier holds.",
     From<kDisk, &DiskTierStats::used_bytes>},
    {"disk_entries", kGauge, "Entries (whole values and blocks) the disk tier holds.",
     From<kDisk, &DiskTierStats::entries>},
    {"disk_hits", kCounter, "Host-cache misses found in the disk tier.",
     From<kDisk, &DiskTierStats::hits>},
    {"disk_misses", kCounter, "Host-cache misses the disk tier did not hold either.",
     From<kDisk, &DiskTierStats::misses>},
    {"disk_promotions", kCounter, "Entries read from the disk tier into the host cache.",
     FromStoreWithDisk<&ChunkStoreCounters::disk_promotions>},
    {"disk_promoted_bytes", kCounter, "Bytes read from the disk tier into the host cache.",
     FromStoreWithDisk<&ChunkStoreCounters::disk_promoted_bytes>},
    {"disk_writes", kCounter, "Entries written to the disk tier (behind store reads).",
     From<kDisk, &DiskTierStats::writes>},
    {"disk_write_bytes", kCounter, "Bytes written to the disk tier.",
     From<kDisk, &DiskTierStats::write_bytes>},
    {"disk_writes_dropped", kCounter,
     "Entries not written to the disk tier: its write queue was full, or the write failed.",
     From<kDisk, &DiskTierStats::writes_dropped>},
    {"disk_evictions", kCounter, "Entries evicted from the disk tier.",
     From<kDisk, &DiskTierStats::evictions>},
    {"disk_evicted_bytes", kCounter, "Bytes evicted from the disk tier.",
     From<kDisk, &DiskTierStats::evicted_bytes>},
    {"disk_checksum_failures", kCounter,
     "Entries read from disk whose crc32c did not match (dropped, read again from the store).",
     From<kDisk, &DiskTierStats::checksum_failures>},
    {"disk_enospc_events", kCounter,
     "Times the disk tier's filesystem was full (ENOSPC): the tier shrank to what it held.",
     From<kDisk, &DiskTierStats::enospc_events>},
    {"disk_index_loaded", kGauge,
     "1 once the disk tier's index of what it held at start-up is loaded (it misses until).",
     [](const CounterSources& s) -> std::optional<uint64_t> {
       if (s.disk == nullptr) return std::nullopt;
       return s.disk->index_loaded ? 1 : 0;
     }},
    {"disk_index_load_micros", kGauge,
     "How long the disk tier's index took to load at start-up, in microseconds.",
     From<kDisk, &DiskTierStats::index_load_micros>},
    {"disk_index_bytes", kGauge, "Memory the disk tier's index takes.",
     From<kDisk, &DiskTierStats::index_bytes>},
};

template <auto Field>
uint64_t Call(const CallCounters& counters) {
  return (counters.*Field).load();
}

constexpr CallCounterSpec kCallCounters[] = {
    {"gets", "Reads (a GetMany item or a TensorStore Read counts as one).",
     Call<&CallCounters::gets>},
    {"get_errors", "Reads that failed.", Call<&CallCounters::get_errors>},
    {"bytes_served_inline", "Bytes sent inline in replies.",
     Call<&CallCounters::bytes_served_inline>},
    {"puts", "Writes.", Call<&CallCounters::puts>},
    {"bytes_written", "Bytes written.", Call<&CallCounters::bytes_written>},
    {"deletes", "Deletes.", Call<&CallCounters::deletes>},
    {"lists", "Listings.", Call<&CallCounters::lists>},
};

}  // namespace

absl::Span<const CounterSpec> ServerCounterSpecs() { return kServerCounters; }
absl::Span<const CallCounterSpec> CallCounterSpecs() { return kCallCounters; }

void ExportServerCounters(const CounterSources& sources,
                          const std::function<void(const std::string&, uint64_t)>& out) {
  for (const CounterSpec& spec : kServerCounters) {
    if (std::optional<uint64_t> value = spec.value(sources)) out(spec.name, *value);
  }
}

CounterDescription DescribeCounter(absl::string_view name) {
  for (const CounterSpec& spec : kServerCounters) {
    if (name == spec.name) return {spec.kind, spec.help};
  }
  // A call counter: its name, under the prefix of its service ("" for chunkd.v1).
  for (const CallCounterSpec& spec : kCallCounters) {
    absl::string_view call = spec.name;
    if (name == call) return {MetricKind::kCounter, absl::StrCat(spec.help, " (chunkd.v1)")};
    if (name.size() > call.size() + 1 && absl::EndsWith(name, call) &&
        name[name.size() - call.size() - 1] == '_') {
      absl::string_view service = name.substr(0, name.size() - call.size() - 1);
      return {MetricKind::kCounter, absl::StrCat(spec.help, " (", service, " service)")};
    }
  }
  return {MetricKind::kCounter, absl::StrCat("chunkd counter ", name, ".")};
}

}  // namespace chunkd::server

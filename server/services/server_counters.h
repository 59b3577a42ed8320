// Every counter the server exports, declared once: its name, whether it is a running total or a
// level, what it counts, and where its value comes from (TensorStore's
// internal_metrics::Counter::New(name, help) is the model). ServerInfo's counters map is filled
// from these tables, /metrics takes each metric's kind and help from them, and `chunkctl info`
// prints the map: a counter added here shows everywhere.
#ifndef CHUNKD_SERVER_SERVICES_SERVER_COUNTERS_H_
#define CHUNKD_SERVER_SERVICES_SERVER_COUNTERS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "server/store/chunk_store.h"
#include "server/store/derived_cache.h"
#include "server/store/device_tier.h"
#include "server/store/disk_tier.h"
#include "server/store/host_cache.h"
#include "server/store/lease_table.h"
#include "server/store/read_budget.h"

namespace chunkd::server {

// A running total (Prometheus counter, `chunkd_<name>_total`) or a level (gauge, `chunkd_<name>`).
enum class MetricKind { kCounter, kGauge };

// The calls of one service, counted the same way for every service and exported under the
// service's prefix (ServerInfo counters, /metrics): a read counts as a get, a write as a put.
struct CallCounters {
  std::atomic<uint64_t> gets{0}, get_errors{0}, bytes_served_inline{0}, puts{0}, bytes_written{0},
      deletes{0}, lists{0};
};

// chunkd.v1's own counters, beside the calls counted as for every service (CallCounters).
struct ServiceCounters : CallCounters {
  std::atomic<uint64_t> get_many_calls{0}, bytes_served_shm{0}, gets_shm{0}, shm_fallbacks{0},
      stats{0}, invalidations{0};
  std::atomic<uint64_t> gets_cuda{0}, bytes_served_cuda{0}, cuda_fallbacks{0}, cuda_unknown_gpu{0};
};

// What one ServerInfo reads its counters from; null where that part of the server is off (no
// leases, no host cache, no device tier): its counters are then left out.
struct CounterSources {
  const LeaseStats* leases = nullptr;
  const HostCacheStats* cache = nullptr;
  const ChunkStoreCounters* store = nullptr;
  const ReadBudgetStats* budget = nullptr;
  uint64_t block_bytes = 0;
  const ServiceCounters* service = nullptr;  // chunkd.v1's own
  const DeviceTierStats* device = nullptr;
  const DiskTierStats* disk = nullptr;
  const DerivedCacheStats* derived = nullptr;  // with derived entries on
};

// One counter of the server (not of a service's calls).
struct CounterSpec {
  const char* name;
  MetricKind kind;
  const char* help;
  std::optional<uint64_t> (*value)(const CounterSources&);
};

// One call counter, exported once per service under its prefix ("gets", "tensorstore_gets").
struct CallCounterSpec {
  const char* name;
  const char* help;
  uint64_t (*value)(const CallCounters&);
};

absl::Span<const CounterSpec> ServerCounterSpecs();
absl::Span<const CallCounterSpec> CallCounterSpecs();

// Every server counter `sources` has a value for, by name.
void ExportServerCounters(const CounterSources& sources,
                          const std::function<void(const std::string&, uint64_t)>& out);

// What /metrics says of a ServerInfo counter: its kind and help. A call counter is found under
// any service prefix ("tensorstore_gets"); a name of no table (a newer server's) is a counter.
struct CounterDescription {
  MetricKind kind = MetricKind::kCounter;
  std::string help;
};
CounterDescription DescribeCounter(absl::string_view name);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_SERVER_COUNTERS_H_

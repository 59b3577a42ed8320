#include "server/services/requests.h"

namespace chunkd::server {

ReadOptions ReadOptionsFor(bool has_max_staleness, uint64_t max_staleness_ms) {
  ReadOptions options;
  if (has_max_staleness) {
    // Bounds beyond ~292 years saturate: any cached copy will do.
    options.validated_since =
        max_staleness_ms > (uint64_t{1} << 62) / 1000000
            ? absl::InfinitePast()
            : absl::Now() - absl::Milliseconds(static_cast<int64_t>(max_staleness_ms));
  }
  return options;
}

}  // namespace chunkd::server

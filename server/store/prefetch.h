// Warming the cache: reads keys (a list, and/or every key under a prefix) through the store
// so that later Gets hit, without sending any data to the caller.
#ifndef CHUNKD_SERVER_STORE_PREFETCH_H_
#define CHUNKD_SERVER_STORE_PREFETCH_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/store/chunk_store.h"

namespace chunkd::server {

struct PrefetchProgress {
  uint64_t keys_done = 0;
  uint64_t bytes_loaded = 0;
  uint64_t keys_failed = 0;
  std::vector<std::string> errors;  // the first few failures, "key: reason"
};

// Reads every key of `keys`, then every key under `prefix` (when set), through `store`.
// Calls `report` after every `report_every` keys and once at the end; a `report` that returns
// false stops the warm-up (the call was cancelled). Blocking: run it on a thread of its own,
// never on an I/O thread of the store. Errors of single keys are counted, not returned; the
// status is for the listing of `prefix` failing or a stop.
absl::Status Prefetch(ChunkStore& store, const std::vector<std::string>& keys,
                      const std::optional<std::string>& prefix, size_t report_every,
                      const std::function<bool(const PrefetchProgress&)>& report);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_PREFETCH_H_

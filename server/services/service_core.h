// What the gRPC services of one server share (chunkd.v1.Chunkd and TensorStore's
// tensorstore_grpc.kvstore.KvStoreService): the store, the limits and the write budget, the
// per-service counters, and the one implementation of the rules every service applies to a
// read (conditions, then the byte range) and to a write (read-only server, size limit, budget).
// The protocol of each service (its messages, how it names generations and reports a failed
// condition) stays in the service.
#ifndef CHUNKD_SERVER_SERVICES_SERVICE_CORE_H_
#define CHUNKD_SERVER_SERVICES_SERVICE_CORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "buffer/host_identity.h"
#include "buffer/memory.h"
#include "server/common/byte_range.h"
#include "server/services/server_counters.h"
#include "server/store/chunk_store.h"
#include "server/store/derived_cache.h"
#include "server/store/device_tier.h"
#include "server/store/lease_table.h"
#include "server/store/process_watch.h"

namespace chunkd::server {

struct ServiceOptions {
  // Values larger than this are refused with RESOURCE_EXHAUSTED (before any byte is buffered
  // when the size is announced, as chunkd.v1's Put does).
  uint64_t max_value_bytes = 256ull << 20;
  bool read_only = false;
  // Size of the value parts of a read's reply messages (at most 1 MiB).
  size_t part_bytes = 1u << 20;
  // Bytes of written values being received at once, all calls of all services together; past
  // it new writes fail with RESOURCE_EXHAUSTED instead of growing memory without bound.
  uint64_t max_inflight_put_bytes = 1ull << 30;
  // Where value memory comes from.
  buffer::HostAllocator* allocator = &buffer::HeapAllocator();
  // Shared-memory delivery (chunkd.v1): on when `leases` is set. Handles are offered to clients
  // whose identity shows they can map this server's segments (see buffer/host_identity.h).
  LeaseTable* leases = nullptr;
  buffer::HostIdentity host;
  // Whose memory a lease pins (the per-client cap, server/store/lease_table.h): by bearer
  // token when the server has tokens, else by connection (rpc/auth.h CallerOf).
  bool clients_by_token = false;
  // The processes behind UNIX-socket connections (server/store/process_watch.h): their leases
  // follow their lives, and their per-client caps count the process the kernel names.
  const ProcessWatch* processes = nullptr;
  // CUDA IPC delivery (chunkd.v1): on when `device_tier` (and `leases`) is set. Offered to
  // clients with the same boot id as `host` that name one of the tier's GPUs by UUID
  // (server/store/device_tier.h).
  DeviceTier* device_tier = nullptr;
  // Derived entries (chunkd.v1's DerivedRead and DerivedPut, server/store/derived_cache.h): on
  // when set (--derived_cache_fraction > 0).
  DerivedCache* derived = nullptr;
};

// Which bytes a read answers with: the rule of the service for ranges past the end.
enum class RangeRule {
  // Zarr's stores (chunkd.v1): a range past the end returns what exists.
  kClip,
  // TensorStore's kvstore: a range that does not lie within the value is OUT_OF_RANGE.
  kWithin,
};

// The part of a stored value one read returns, and what the reply says about the value.
struct ReadSlice {
  uint64_t total_size = 0;
  Generation generation = 0;
  uint64_t start = 0;   // offset of `bytes` in the value
  uint64_t length = 0;  // of the range the read selects
  // A slice of what the store answered (no copy): the whole range, or its first part when the
  // read asked for at most ReadOptions::max_extent_bytes (then the caller reads on).
  buffer::cpu::Buffer bytes;
  bool complete() const { return bytes.size() == length; }
};

// The one check every service makes on a value read for a client: `conditions` first
// (FAILED_PRECONDITION naming the key and both generations), then the range under `rule`
// (OUT_OF_RANGE for kWithin). REQUIRES: range.Validate().ok().
absl::StatusOr<ReadSlice> SliceForRead(const CachedValue& value, absl::string_view key,
                                       const ByteRange& range, const Conditions& conditions,
                                       RangeRule rule);

class ServiceCore {
 public:
  ServiceCore(ChunkStore* store, const ServiceOptions& options);
  ServiceCore(const ServiceCore&) = delete;
  ServiceCore& operator=(const ServiceCore&) = delete;

  ChunkStore& store() { return *store_; }
  const ServiceOptions& options() const { return options_; }

  // Before serving: `counters` (owned by a service that outlives this core's use) are exported
  // by ExportCounters with every name prefixed by `prefix` ("" for chunkd.v1).
  void AddCounters(std::string prefix, const CallCounters* counters);
  // Every service's counters, by name ("gets", "tensorstore_gets", ...).
  void ExportCounters(const std::function<void(const std::string&, uint64_t)>& out) const;

  // PERMISSION_DENIED on a read-only server; `what` names the refused operation ("writes",
  // "deletes").
  absl::Status CheckWritable(absl::string_view what) const;
  // RESOURCE_EXHAUSTED for a value over --max_value_bytes.
  absl::Status CheckValueSize(absl::string_view key, uint64_t size) const;
  // The budget of bytes being received: reserve before buffering, release when the call ends.
  // False (nothing reserved) when it would pass --max_inflight_put_bytes while other calls hold
  // some of it; `held` is what the caller already holds (a write that reserves part by part),
  // so that a write alone on the server is always admitted, whatever its size.
  bool ReservePutBytes(uint64_t bytes, uint64_t held = 0);
  void ReleasePutBytes(uint64_t bytes);
  // RESOURCE_EXHAUSTED, for a refused reservation.
  static absl::Status PutBudgetExhausted();

  // Writes `value` under `key` on an I/O thread and calls `done` there with the result,
  // counting the put in `counters` when it succeeds; `done` gets UNAVAILABLE (on this thread)
  // when the I/O queue is full.
  void SubmitWrite(std::string key, buffer::cpu::Buffer value, Conditions conditions,
                   CallCounters* counters,
                   absl::AnyInvocable<void(absl::StatusOr<ValueInfo>) &&> done);
  // Deletes `key` the same way, counting the delete when it succeeds.
  void SubmitDelete(std::string key, Conditions conditions, CallCounters* counters,
                    absl::AnyInvocable<void(absl::Status) &&> done);

 private:
  ChunkStore* const store_;
  const ServiceOptions options_;
  std::vector<std::pair<std::string, const CallCounters*>> counters_;
  std::atomic<uint64_t> inflight_put_bytes_{0};
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_SERVICE_CORE_H_

// Leases on chunk buffers handed to colocated readers as handles (shared memory, CUDA IPC).
//
// A lease keeps its buffer alive and pinned: the cache neither evicts nor reuses pinned memory,
// and an update of the key writes new memory, so the holder keeps reading the bytes it was
// given. A lease ends when released or when its TTL passes without renewal, so a client that
// dies holding leases pins memory for one TTL at most. Lease ids are random 64-bit numbers:
// a forged or stale id names no lease and frees nothing.
#ifndef CHUNKD_SERVER_STORE_LEASE_TABLE_H_
#define CHUNKD_SERVER_STORE_LEASE_TABLE_H_

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"

namespace chunkd::server {

struct LeaseTableOptions {
  absl::Duration ttl = absl::Seconds(30);
  // Live leases at most; past it, handle deliveries fall back to inline.
  size_t max_leases = 1 << 20;
};

struct LeaseStats {
  uint64_t active = 0;
  uint64_t bytes = 0;
  uint64_t granted = 0;
  uint64_t released = 0;
  uint64_t expired = 0;
  uint64_t unknown = 0;  // release or renew of ids that named no lease
};

class LeaseTable {
 public:
  explicit LeaseTable(const LeaseTableOptions& options);
  // Stops the expiry thread and drops every lease.
  ~LeaseTable();

  // A new lease on `buffer`. RESOURCE_EXHAUSTED when max_leases are live.
  absl::StatusOr<uint64_t> Grant(buffer::cpu::Buffer buffer);
  // A new lease on `bytes` bytes of `block` (host or device memory): the block stays alive and
  // pinned until the lease ends.
  absl::StatusOr<uint64_t> Grant(std::shared_ptr<const buffer::Block> block, uint64_t bytes);
  // Ends the named leases; returns the ids that named none (unknown, expired, released).
  std::vector<uint64_t> Release(const std::vector<uint64_t>& ids);
  // Extends the named leases by one TTL from now; returns the ids that named none.
  std::vector<uint64_t> Renew(const std::vector<uint64_t>& ids);
  // Ends leases whose time is up. The expiry thread calls this; tests may too.
  void ExpireNow();

  absl::Duration ttl() const { return options_.ttl; }
  LeaseStats stats() const;

 private:
  struct Entry {
    std::shared_ptr<const buffer::Block> block;
    uint64_t bytes = 0;
    absl::Time expires;
  };
  using Dropped = std::vector<std::shared_ptr<const buffer::Block>>;
  void DropLocked(absl::flat_hash_map<uint64_t, Entry>::iterator it, Dropped* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const LeaseTableOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Entry> leases_ ABSL_GUARDED_BY(mu_);
  LeaseStats stats_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread expiry_thread_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_LEASE_TABLE_H_

// Leases on chunk buffers handed to colocated readers as handles (shared memory, CUDA IPC).
//
// A lease keeps its buffer alive and pinned: the cache neither evicts nor reuses pinned memory,
// and an update of the key writes new memory, so the holder keeps reading the bytes it was
// given. A lease ends when released or when its TTL passes without renewal, so a client that
// dies holding leases pins memory for one TTL at most. Lease ids are random 64-bit numbers:
// a forged or stale id names no lease and frees nothing.
//
// Pinned memory is capped, so that what clients hold cannot push the server past the budget
// its operator gave it: host memory (shared-memory handles) and each GPU's memory (CUDA IPC
// handles) have a cap for all holders together and one for each holder (a bearer token, or a
// connection's peer; see Grant). A block is counted once however many leases pin it, and in
// full whatever range of it a lease covers: that is the memory it keeps alive. A grant that
// would pass a cap is refused with RESOURCE_EXHAUSTED naming the cap; the services then serve
// the value inline instead (or fail a call that accepts only handles). This is the one place
// that decides: every service that hands out handles asks here.
#ifndef CHUNKD_SERVER_STORE_LEASE_TABLE_H_
#define CHUNKD_SERVER_STORE_LEASE_TABLE_H_

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"

namespace chunkd::server {

// Caps on the memory leases pin in one pool (host memory, or one GPU's).
struct PinLimits {
  uint64_t max_bytes = std::numeric_limits<uint64_t>::max();         // all holders together
  uint64_t max_holder_bytes = std::numeric_limits<uint64_t>::max();  // one holder
  // Where the caps come from, for the refusal's message ("--max_pinned_fraction=0.5 of
  // --host_cache_bytes").
  std::string origin;
  std::string holder_origin;
};

// A client process the server watches (by pidfd): its leases live as long as it does.
// Thread-safe; MarkExited is called once, by the watcher, when the process has gone.
class ProcessLife {
 public:
  explicit ProcessLife(int64_t pid) : pid_(pid) {}
  // In the server's PID namespace.
  int64_t pid() const { return pid_; }
  bool alive() const { return alive_.load(std::memory_order_acquire); }
  void MarkExited() { alive_.store(false, std::memory_order_release); }

 private:
  const int64_t pid_;
  std::atomic<bool> alive_{true};
};

// Who takes a lease: `name` for the per-holder caps (a token's digest, a connection's peer, or
// a process the kernel named); `process`, when set, the process whose life the lease follows.
struct LeaseHolder {
  std::string name;
  std::shared_ptr<const ProcessLife> process;
};

struct LeaseTableOptions {
  absl::Duration ttl = absl::Seconds(30);
  // Live leases at most, all holders together and per holder; past either, handle deliveries
  // fall back to inline.
  size_t max_leases = 1 << 20;
  size_t max_holder_leases = 1 << 16;
  // Host memory: shared-memory handles.
  PinLimits host;
  // The memory of each GPU: CUDA IPC handles (blocks of kind kDevice).
  PinLimits device;
};

// Pinned memory of one tier (host, or every GPU together).
struct PinStats {
  uint64_t pinned_bytes = 0;  // of distinct blocks that leases hold
  uint64_t holders = 0;       // holders with pinned memory now
  uint64_t max_bytes = 0;     // the caps (device: of each GPU)
  uint64_t max_holder_bytes = 0;
  uint64_t refused_total = 0;   // grants refused at the cap for all holders
  uint64_t refused_holder = 0;  // grants refused at the cap for one holder
};

struct LeaseStats {
  uint64_t active = 0;
  uint64_t bytes = 0;  // lengths of the leased ranges, summed over leases
  uint64_t granted = 0;
  uint64_t released = 0;
  uint64_t expired = 0;
  uint64_t unknown = 0;        // release or renew of ids that named no lease
  uint64_t process_bound = 0;  // live leases that follow a watched process's life
  uint64_t refused_count = 0;  // grants refused at max_leases or max_holder_leases
  PinStats host;
  PinStats device;
};

class LeaseTable {
 public:
  explicit LeaseTable(const LeaseTableOptions& options);
  // Stops the expiry thread and drops every lease.
  ~LeaseTable();

  // A new lease for `holder` on `buffer` (host memory). RESOURCE_EXHAUSTED when max_leases are
  // live, or when the lease would take pinned memory past a cap (the message names it).
  // `holder` says whose memory it is, for the per-holder cap: the services pass the call's
  // bearer token (digested) when tokens are on, else the connection's peer.
  // `until_renewed`: the lease's TTL starts at its first Renew, not now: a call that grants
  // leases as it reads (GetMany) renews them when its reply is out, so that a long reply does
  // not let its first leases expire before the client has even seen them.
  absl::StatusOr<uint64_t> Grant(const LeaseHolder& holder, buffer::cpu::Buffer buffer,
                                 bool until_renewed = false);
  // A new lease on `bytes` bytes of `block` (host or device memory): the block stays alive and
  // pinned until the lease ends. Device blocks count against their GPU's caps.
  absl::StatusOr<uint64_t> Grant(const LeaseHolder& holder,
                                 std::shared_ptr<const buffer::Block> block, uint64_t bytes,
                                 bool until_renewed = false);
  // The same for a holder known by name only (its leases expire by TTL).
  absl::StatusOr<uint64_t> Grant(absl::string_view holder, buffer::cpu::Buffer buffer) {
    return Grant(LeaseHolder{std::string(holder), nullptr}, std::move(buffer));
  }
  absl::StatusOr<uint64_t> Grant(absl::string_view holder,
                                 std::shared_ptr<const buffer::Block> block, uint64_t bytes) {
    return Grant(LeaseHolder{std::string(holder), nullptr}, std::move(block), bytes);
  }
  // Ends the named leases; returns the ids that named none (unknown, expired, released).
  std::vector<uint64_t> Release(const std::vector<uint64_t>& ids);
  // Extends the named leases by one TTL from now; returns the ids that named none.
  std::vector<uint64_t> Renew(const std::vector<uint64_t>& ids);
  // Ends leases whose time is up; leases of a process that still lives are extended instead.
  // The expiry thread calls this; tests may too.
  void ExpireNow();

  absl::Duration ttl() const { return options_.ttl; }
  const LeaseTableOptions& options() const { return options_; }
  LeaseStats stats() const;

 private:
  // The memory a pool's leases pin: per block (counted once) and per holder.
  struct Holder {
    uint64_t bytes = 0;
    absl::flat_hash_map<const buffer::Block*, uint32_t> blocks;  // -> leases on it
  };
  struct Pool {
    const PinLimits* limits = nullptr;
    bool device = false;
    uint64_t bytes = 0;
    absl::flat_hash_map<const buffer::Block*, uint32_t> blocks;  // -> leases on it
    absl::flat_hash_map<std::string, Holder> holders;
    uint64_t refused_total = 0;
    uint64_t refused_holder = 0;
  };
  struct Entry {
    std::shared_ptr<const buffer::Block> block;
    uint64_t bytes = 0;
    absl::Time expires;
    Pool* pool = nullptr;
    std::string holder;
    std::shared_ptr<const ProcessLife> process;
    // Grants this one lease stands for (one process asking for one block again: see Grant);
    // each Release takes one back.
    uint32_t refs = 1;
  };
  using Dropped = std::vector<std::shared_ptr<const buffer::Block>>;
  // The pool of `block`: host memory, or its GPU's.
  Pool& PoolFor(const buffer::Block& block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropLocked(absl::flat_hash_map<uint64_t, Entry>::iterator it, Dropped* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const LeaseTableOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Entry> leases_ ABSL_GUARDED_BY(mu_);
  // The lease of each (process, block) that process-bound leases hold, for sharing.
  absl::flat_hash_map<std::pair<const ProcessLife*, const buffer::Block*>, uint64_t> shared_
      ABSL_GUARDED_BY(mu_);
  // Live leases per holder name (max_holder_leases).
  absl::flat_hash_map<std::string, size_t> holder_leases_ ABSL_GUARDED_BY(mu_);
  // Host memory, and each GPU's by ordinal. Entries point into these (node-stable maps).
  Pool host_pool_ ABSL_GUARDED_BY(mu_);
  absl::node_hash_map<int, Pool> device_pools_ ABSL_GUARDED_BY(mu_);
  LeaseStats stats_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread expiry_thread_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_LEASE_TABLE_H_

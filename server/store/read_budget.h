// The memory budget of reads in flight: bytes a read holds outside the cache's own budget
// (a range assembled from several blocks, waiting for its client to drain it). A read that
// would go past the budget fails fast with RESOURCE_EXHAUSTED instead of growing memory; the
// bytes are given back when the last view of them is dropped (the reply sent, the lease
// ended), however long a slow client takes.
#ifndef CHUNKD_SERVER_STORE_READ_BUDGET_H_
#define CHUNKD_SERVER_STORE_READ_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "buffer/cpu/buffer.h"
#include "buffer/memory.h"

namespace chunkd::server {

struct ReadBudgetStats {
  uint64_t capacity_bytes = 0;
  uint64_t held_bytes = 0;       // now
  uint64_t peak_held_bytes = 0;  // since start
  uint64_t refusals = 0;         // reads refused because the budget was in use
};

class ReadBudget {
 public:
  explicit ReadBudget(uint64_t capacity_bytes) : state_(std::make_shared<State>(capacity_bytes)) {}
  ReadBudget(const ReadBudget&) = delete;
  ReadBudget& operator=(const ReadBudget&) = delete;

  // A writable buffer of `size` bytes from `allocator`, counted against the budget until its
  // memory is freed. RESOURCE_EXHAUSTED (naming the flag) when the budget has no room.
  absl::StatusOr<buffer::cpu::MutableBuffer> Allocate(size_t size,
                                                      buffer::HostAllocator& allocator);

  ReadBudgetStats stats() const;

 private:
  // Shared with the blocks handed out, which may outlive the budget (a lease ended after the
  // store shut down).
  struct State {
    explicit State(uint64_t capacity) : capacity(capacity) {}
    bool TryReserve(uint64_t bytes);
    void Release(uint64_t bytes) { held.fetch_sub(bytes, std::memory_order_relaxed); }

    const uint64_t capacity;
    std::atomic<uint64_t> held{0}, peak{0}, refusals{0};
  };
  friend class BudgetedBlock;

  std::shared_ptr<State> state_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_READ_BUDGET_H_

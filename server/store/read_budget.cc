#include "server/store/read_budget.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/byte_size.h"

namespace chunkd::server {

// A block whose bytes count against a ReadBudget until it is destroyed. It wraps the
// allocator's block (so shared-memory blocks keep their location) rather than copying it.
class BudgetedBlock final : public buffer::Block {
 public:
  BudgetedBlock(std::shared_ptr<buffer::Block> inner, std::shared_ptr<ReadBudget::State> budget)
      : Block(inner->data(), inner->size(), inner->kind()),
        inner_(std::move(inner)),
        budget_(std::move(budget)) {}
  ~BudgetedBlock() override { budget_->Release(size()); }
  std::optional<buffer::ShmLocation> shm_location() const override {
    return inner_->shm_location();
  }

 private:
  std::shared_ptr<buffer::Block> inner_;
  std::shared_ptr<ReadBudget::State> budget_;
};

bool ReadBudget::State::TryReserve(uint64_t bytes) {
  uint64_t now = held.load(std::memory_order_relaxed);
  do {
    if (now + bytes > capacity) {
      refusals.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  } while (!held.compare_exchange_weak(now, now + bytes, std::memory_order_relaxed));
  now += bytes;
  uint64_t high = peak.load(std::memory_order_relaxed);
  while (now > high && !peak.compare_exchange_weak(high, now, std::memory_order_relaxed)) {
  }
  return true;
}

absl::StatusOr<buffer::cpu::MutableBuffer> ReadBudget::Allocate(size_t size,
                                                                buffer::HostAllocator& allocator) {
  if (!state_->TryReserve(size)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the read memory budget (--read_budget_bytes=", FormatBytes(state_->capacity),
                     ") is in use by reads in flight; retry, or read a smaller range"));
  }
  absl::StatusOr<std::shared_ptr<buffer::Block>> block = allocator.Allocate(size);
  if (!block.ok()) {
    state_->Release(size);
    return block.status();
  }
  return buffer::cpu::MutableBuffer(std::make_shared<BudgetedBlock>(*std::move(block), state_));
}

ReadBudgetStats ReadBudget::stats() const {
  return ReadBudgetStats{state_->capacity, state_->held.load(std::memory_order_relaxed),
                         state_->peak.load(std::memory_order_relaxed),
                         state_->refusals.load(std::memory_order_relaxed)};
}

}  // namespace chunkd::server

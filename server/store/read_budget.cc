#include "server/store/read_budget.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/byte_size.h"

namespace chunkd::server {

// A block whose bytes count against a ReadBudget until it is destroyed. It wraps the
// allocator's block (so shared-memory blocks keep their location) rather than copying it.
class BudgetedBlock final : public buffer::Block {
 public:
  BudgetedBlock(std::shared_ptr<buffer::Block> inner, ReadBudget* budget)
      : Block(inner->data(), inner->size(), inner->kind()),
        inner_(std::move(inner)),
        budget_(budget) {}
  ~BudgetedBlock() override { budget_->Release(size()); }
  std::optional<buffer::ShmLocation> shm_location() const override {
    return inner_->shm_location();
  }

 private:
  std::shared_ptr<buffer::Block> inner_;
  ReadBudget* budget_;
};

bool ReadBudget::TryReserve(uint64_t bytes) {
  uint64_t held = held_.load(std::memory_order_relaxed);
  do {
    if (held + bytes > capacity_) {
      refusals_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  } while (!held_.compare_exchange_weak(held, held + bytes, std::memory_order_relaxed));
  uint64_t now = held + bytes;
  uint64_t peak = peak_.load(std::memory_order_relaxed);
  while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  return true;
}

void ReadBudget::Release(uint64_t bytes) { held_.fetch_sub(bytes, std::memory_order_relaxed); }

absl::StatusOr<buffer::cpu::MutableBuffer> ReadBudget::Allocate(
    size_t size, buffer::HostAllocator& allocator) {
  if (!TryReserve(size)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the read memory budget (--read_budget_bytes=", FormatBytes(capacity_),
        ") is in use by reads in flight; retry, or read a smaller range"));
  }
  absl::StatusOr<std::shared_ptr<buffer::Block>> block = allocator.Allocate(size);
  if (!block.ok()) {
    Release(size);
    return block.status();
  }
  return buffer::cpu::MutableBuffer(std::make_shared<BudgetedBlock>(*std::move(block), this));
}

ReadBudgetStats ReadBudget::stats() const {
  return ReadBudgetStats{capacity_, held_.load(std::memory_order_relaxed),
                         peak_.load(std::memory_order_relaxed),
                         refusals_.load(std::memory_order_relaxed)};
}

}  // namespace chunkd::server

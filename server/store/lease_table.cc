#include "server/store/lease_table.h"

#include <sys/random.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace chunkd::server {
namespace {

uint64_t RandomId() {
  uint64_t id = 0;
  while (id == 0) {
    if (::getrandom(&id, sizeof(id), 0) != sizeof(id)) id = 0;
  }
  return id;
}

}  // namespace

LeaseTable::LeaseTable(const LeaseTableOptions& options) : options_(options) {
  // Expired leases are swept a few times per TTL, so memory comes back within ~1.25 TTL.
  absl::Duration period = std::clamp(options_.ttl / 4, absl::Milliseconds(10), absl::Seconds(5));
  expiry_thread_ = std::thread([this, period] {
    absl::MutexLock lock(&mu_);
    while (!stopping_) {
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), period);
      if (stopping_) break;
      mu_.Unlock();
      ExpireNow();
      mu_.Lock();
    }
  });
}

LeaseTable::~LeaseTable() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  expiry_thread_.join();
  absl::MutexLock lock(&mu_);
  for (auto& [id, entry] : leases_) entry.block->Unpin();
  leases_.clear();
}

absl::StatusOr<uint64_t> LeaseTable::Grant(buffer::cpu::Buffer buffer) {
  // The lease holds the whole block the buffer views: the same memory stays alive and pinned.
  return Grant(buffer.block(), buffer.size());
}

absl::StatusOr<uint64_t> LeaseTable::Grant(std::shared_ptr<const buffer::Block> block,
                                           uint64_t bytes) {
  if (!block) return absl::InvalidArgumentError("cannot lease an empty buffer");
  absl::MutexLock lock(&mu_);
  if (leases_.size() >= options_.max_leases) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many leases outstanding (", leases_.size(), ")"));
  }
  uint64_t id = RandomId();
  while (leases_.contains(id)) id = RandomId();
  block->Pin();
  stats_.bytes += bytes;
  ++stats_.granted;
  leases_.emplace(id, Entry{std::move(block), bytes, absl::Now() + options_.ttl});
  return id;
}

void LeaseTable::DropLocked(absl::flat_hash_map<uint64_t, Entry>::iterator it,
                            Dropped* dropped) {
  it->second.block->Unpin();
  stats_.bytes -= it->second.bytes;
  // The block itself is released outside the lock: freeing arena memory takes its own lock.
  dropped->push_back(std::move(it->second.block));
  leases_.erase(it);
}

std::vector<uint64_t> LeaseTable::Release(const std::vector<uint64_t>& ids) {
  std::vector<uint64_t> unknown;
  Dropped dropped;
  absl::MutexLock lock(&mu_);
  for (uint64_t id : ids) {
    auto it = leases_.find(id);
    if (it == leases_.end()) {
      unknown.push_back(id);
      ++stats_.unknown;
      continue;
    }
    DropLocked(it, &dropped);
    ++stats_.released;
  }
  return unknown;
}

std::vector<uint64_t> LeaseTable::Renew(const std::vector<uint64_t>& ids) {
  std::vector<uint64_t> unknown;
  absl::Time expires = absl::Now() + options_.ttl;
  absl::MutexLock lock(&mu_);
  for (uint64_t id : ids) {
    auto it = leases_.find(id);
    if (it == leases_.end()) {
      unknown.push_back(id);
      ++stats_.unknown;
    } else {
      it->second.expires = expires;
    }
  }
  return unknown;
}

void LeaseTable::ExpireNow() {
  Dropped dropped;
  absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  for (auto it = leases_.begin(); it != leases_.end();) {
    auto current = it++;
    if (current->second.expires <= now) {
      DropLocked(current, &dropped);
      ++stats_.expired;
    }
  }
}

LeaseStats LeaseTable::stats() const {
  absl::MutexLock lock(&mu_);
  LeaseStats s = stats_;
  s.active = leases_.size();
  return s;
}

}  // namespace chunkd::server

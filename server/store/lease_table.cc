#include "server/store/lease_table.h"

#include <sys/random.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "buffer/gpu/buffer.h"
#include "server/common/byte_size.h"

namespace chunkd::server {
namespace {

uint64_t RandomId() {
  uint64_t id = 0;
  while (id == 0) {
    if (::getrandom(&id, sizeof(id), 0) != sizeof(id)) id = 0;
  }
  return id;
}

// Adds one lease on `block` to a count of leases per block; true when it is the block's first.
template <class Map>
bool CountIn(Map& blocks, const buffer::Block* block) {
  return ++blocks[block] == 1;
}

// Removes one lease on `block`; true when it was the block's last.
template <class Map>
bool UncountIn(Map& blocks, const buffer::Block* block) {
  auto it = blocks.find(block);
  if (--it->second > 0) return false;
  blocks.erase(it);
  return true;
}

}  // namespace

LeaseTable::LeaseTable(const LeaseTableOptions& options) : options_(options) {
  host_pool_.limits = &options_.host;
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

absl::StatusOr<uint64_t> LeaseTable::Grant(const LeaseHolder& holder, buffer::cpu::Buffer buffer,
                                           bool until_renewed) {
  // The lease holds the whole block the buffer views: the same memory stays alive and pinned.
  return Grant(holder, buffer.block(), buffer.size(), until_renewed);
}

LeaseTable::Pool& LeaseTable::PoolFor(const buffer::Block& block) {
  if (block.kind() != buffer::MemoryKind::kDevice) return host_pool_;
  int device = static_cast<const buffer::gpu::DeviceBlock&>(block).device();
  Pool& pool = device_pools_[device];
  pool.limits = &options_.device;
  pool.device = true;
  return pool;
}

absl::StatusOr<uint64_t> LeaseTable::Grant(const LeaseHolder& lease_holder,
                                           std::shared_ptr<const buffer::Block> block,
                                           uint64_t bytes, bool until_renewed) {
  if (!block) return absl::InvalidArgumentError("cannot lease an empty buffer");
  const std::string& holder = lease_holder.name;
  absl::MutexLock lock(&mu_);
  if (lease_holder.process) {
    auto shared = shared_.find({lease_holder.process.get(), block.get()});
    if (shared != shared_.end()) {
      // This process holds this block already: the same lease, once more.
      Entry& entry = leases_.at(shared->second);
      ++entry.refs;
      ++stats_.granted;
      return shared->second;
    }
  }
  if (leases_.size() >= options_.max_leases) {
    ++stats_.refused_count;
    return absl::ResourceExhaustedError(
        absl::StrCat("too many leases outstanding (", leases_.size(), ")"));
  }
  // Per holder too: one client holding many leases (the same small value asked for thousands
  // of times) must not leave none for the others.
  auto count_it = holder_leases_.find(holder);
  if (count_it != holder_leases_.end() && count_it->second >= options_.max_holder_leases) {
    ++stats_.refused_count;
    return absl::ResourceExhaustedError(
        absl::StrCat("this client holds ", count_it->second,
                     " leases, the most one client may hold; "
                     "release some (drop the buffers) and read again"));
  }
  Pool& pool = PoolFor(*block);
  const PinLimits& limits = *pool.limits;
  // Only memory not pinned yet counts: a lease on a block that is pinned already (another
  // reader of the same chunk) keeps nothing more alive.
  auto holder_it = pool.holders.find(holder);
  uint64_t added = pool.blocks.contains(block.get()) ? 0 : block->size();
  uint64_t holder_bytes = holder_it == pool.holders.end() ? 0 : holder_it->second.bytes;
  uint64_t holder_added =
      holder_it != pool.holders.end() && holder_it->second.blocks.contains(block.get())
          ? 0
          : block->size();
  const char* what =
      pool.device ? "GPU memory (CUDA IPC handles)" : "host memory (shared-memory handles)";
  if (added > 0 && pool.bytes + added > limits.max_bytes) {
    ++pool.refused_total;
    return absl::ResourceExhaustedError(absl::StrCat(
        "leases of all clients pin ", FormatBytes(pool.bytes), " of ", what, "; ",
        FormatBytes(added), " more would pass the cap of ", FormatBytes(limits.max_bytes),
        limits.origin.empty() ? "" : absl::StrCat(" (", limits.origin, ")")));
  }
  if (holder_added > 0 && holder_bytes + holder_added > limits.max_holder_bytes) {
    ++pool.refused_holder;
    return absl::ResourceExhaustedError(absl::StrCat(
        "this client's leases pin ", FormatBytes(holder_bytes), " of ", what, "; ",
        FormatBytes(holder_added), " more would pass the cap of ",
        FormatBytes(limits.max_holder_bytes), " per client",
        limits.holder_origin.empty() ? "" : absl::StrCat(" (", limits.holder_origin, ")"),
        "; release some (drop the buffers) and read again"));
  }
  uint64_t id = RandomId();
  while (leases_.contains(id)) id = RandomId();
  if (CountIn(pool.blocks, block.get())) pool.bytes += block->size();
  Holder& h = pool.holders[holder];
  if (CountIn(h.blocks, block.get())) h.bytes += block->size();
  block->Pin();
  stats_.bytes += bytes;
  ++stats_.granted;
  ++holder_leases_[holder];
  if (lease_holder.process) ++stats_.process_bound;
  absl::Time expires = until_renewed ? absl::InfiniteFuture() : absl::Now() + options_.ttl;
  if (lease_holder.process) shared_[{lease_holder.process.get(), block.get()}] = id;
  leases_.emplace(id, Entry{std::move(block), bytes, expires, &pool, holder, lease_holder.process});
  return id;
}

void LeaseTable::DropLocked(absl::flat_hash_map<uint64_t, Entry>::iterator it, Dropped* dropped) {
  Entry& entry = it->second;
  Pool& pool = *entry.pool;
  const buffer::Block* block = entry.block.get();
  if (UncountIn(pool.blocks, block)) pool.bytes -= block->size();
  auto holder = pool.holders.find(entry.holder);
  if (UncountIn(holder->second.blocks, block)) holder->second.bytes -= block->size();
  if (holder->second.blocks.empty()) pool.holders.erase(holder);
  entry.block->Unpin();
  stats_.bytes -= entry.bytes;
  if (auto count = holder_leases_.find(entry.holder); --count->second == 0) {
    holder_leases_.erase(count);
  }
  if (entry.process) {
    --stats_.process_bound;
    shared_.erase({entry.process.get(), block});
  }
  // The block itself is released outside the lock: freeing arena memory takes its own lock.
  dropped->push_back(std::move(entry.block));
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
    ++stats_.released;
    if (it->second.refs > 1) {
      --it->second.refs;  // another grant of the same lease still holds it
      continue;
    }
    DropLocked(it, &dropped);
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
    if (current->second.process && current->second.process->alive()) {
      // The holder lives: its lease does too, and expires one TTL after it has gone.
      current->second.expires = now + options_.ttl;
      continue;
    }
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
  auto add = [](PinStats& out, const Pool& pool) {
    out.pinned_bytes += pool.bytes;
    out.holders += pool.holders.size();
    out.refused_total += pool.refused_total;
    out.refused_holder += pool.refused_holder;
  };
  add(s.host, host_pool_);
  for (const auto& [device, pool] : device_pools_) add(s.device, pool);
  s.host.max_bytes = options_.host.max_bytes;
  s.host.max_holder_bytes = options_.host.max_holder_bytes;
  s.device.max_bytes = options_.device.max_bytes;
  s.device.max_holder_bytes = options_.device.max_holder_bytes;
  return s;
}

}  // namespace chunkd::server

#include "server/store/device_tier.h"

#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "buffer/extent_allocator.h"
#include "server/common/byte_size.h"
#include "server/common/log.h"

namespace chunkd::server {
namespace {

using buffer::gpu::DeviceApi;
using buffer::gpu::DeviceInfo;
using buffer::gpu::IpcHandle;

uint64_t RoundUp(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

// Segment names must not repeat within a host while a client may still hold an old mapping,
// so they carry the pid and a random tag (a restarted server in a container has pid 1 again).
std::string InstanceTag() {
  uint32_t tag = 0;
  if (::getrandom(&tag, sizeof(tag), 0) != sizeof(tag)) tag = static_cast<uint32_t>(::getpid());
  return absl::StrFormat("%d-%08x", ::getpid(), tag);
}

// One device allocation, exported once; chunk blocks are extents of it.
struct Segment {
  Segment(DeviceApi* api, int ordinal, std::string name, std::byte* base, uint64_t size,
          const IpcHandle& handle, bool dedicated)
      : api(api),
        ordinal(ordinal),
        name(std::move(name)),
        base(base),
        size(size),
        handle(handle),
        dedicated(dedicated),
        extents(size) {}
  ~Segment() { (void)api->Free(ordinal, base); }

  DeviceApi* const api;
  const int ordinal;
  const std::string name;
  std::byte* const base;
  const uint64_t size;
  const IpcHandle handle;
  // A segment made for one value larger than segment_bytes; released when its block goes.
  const bool dedicated;
  buffer::ExtentAllocator extents;  // guarded by DeviceState::alloc_mu
};

}  // namespace

struct DeviceTier::DeviceState : std::enable_shared_from_this<DeviceTier::DeviceState> {
  class TierBlock;
  struct Entry {
    std::string key;
    uint64_t generation = 0;
    std::shared_ptr<TierBlock> block;
  };

  DeviceState(DeviceApi* api, const DeviceInfo& info, const DeviceTierOptions& options,
              std::string tag)
      : api(api), info(info), options(options), tag(std::move(tag)) {}

  DeviceApi* const api;
  const DeviceInfo info;
  const DeviceTierOptions options;
  const std::string tag;

  // Lock order: index_mu, then alloc_mu. A block's destructor takes alloc_mu only, so blocks
  // may be dropped while index_mu is held.
  absl::Mutex index_mu;
  std::list<Entry> lru ABSL_GUARDED_BY(index_mu);  // front: most recently used
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index ABSL_GUARDED_BY(index_mu);

  absl::Mutex alloc_mu;
  std::vector<std::shared_ptr<Segment>> segments ABSL_GUARDED_BY(alloc_mu);
  uint64_t segment_bytes ABSL_GUARDED_BY(alloc_mu) = 0;
  uint64_t used ABSL_GUARDED_BY(alloc_mu) = 0;
  uint64_t next_segment ABSL_GUARDED_BY(alloc_mu) = 0;

  std::atomic<uint64_t> hits{0}, promotions{0}, promoted_bytes{0}, promotion_failures{0},
      evictions{0}, evicted_bytes{0}, not_admitted{0}, ipc_exports{0};

  DeviceChunk ChunkOf(const std::shared_ptr<TierBlock>& block) const;
  absl::StatusOr<std::shared_ptr<TierBlock>> AllocateLocked(size_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(index_mu);
  // A block of `length` bytes from the segments, making a segment if the budget allows.
  // nullptr: no room (evict and retry); an error: the device failed.
  absl::StatusOr<std::shared_ptr<TierBlock>> TryCarve(uint64_t length, size_t size);
  absl::StatusOr<std::shared_ptr<Segment>> NewSegmentLocked(uint64_t size, bool dedicated)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(alloc_mu);
  bool EvictOneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(index_mu);
  void FreeExtent(const std::shared_ptr<Segment>& segment, uint64_t offset, uint64_t length);
  void TouchLocked(std::list<Entry>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(index_mu) {
    lru.splice(lru.begin(), lru, it);
  }
};

// A value's block: an extent of a segment, returned to it when the last reference goes (the
// cache entry, a lease, a reply being built).
class DeviceTier::DeviceState::TierBlock final : public buffer::gpu::DeviceBlock {
 public:
  TierBlock(std::shared_ptr<DeviceState> state, std::shared_ptr<Segment> segment, uint64_t offset,
            uint64_t length, size_t size)
      : DeviceBlock(segment->base + offset, size, state->info.ordinal, state->api),
        state_(std::move(state)),
        segment_(std::move(segment)),
        offset_(offset),
        length_(length) {}
  ~TierBlock() override { state_->FreeExtent(segment_, offset_, length_); }

  const Segment& segment() const { return *segment_; }
  uint64_t offset() const { return offset_; }

 private:
  std::shared_ptr<DeviceState> state_;
  std::shared_ptr<Segment> segment_;
  const uint64_t offset_;
  const uint64_t length_;
};

DeviceChunk DeviceTier::DeviceState::ChunkOf(const std::shared_ptr<TierBlock>& block) const {
  DeviceChunk chunk;
  chunk.buffer = buffer::gpu::Buffer(std::shared_ptr<const buffer::gpu::DeviceBlock>(block));
  chunk.segment = block->segment().name;
  chunk.ipc_handle = block->segment().handle;
  chunk.offset = block->offset();
  chunk.device_uuid = info.uuid;
  return chunk;
}

absl::StatusOr<std::shared_ptr<Segment>> DeviceTier::DeviceState::NewSegmentLocked(uint64_t size,
                                                                                   bool dedicated) {
  absl::StatusOr<void*> base = api->Malloc(info.ordinal, size);
  if (!base.ok()) return base.status();
  // Exported once, here: every block of the segment travels with this one handle.
  absl::StatusOr<IpcHandle> handle = api->IpcGetMemHandle(info.ordinal, *base);
  if (!handle.ok()) {
    (void)api->Free(info.ordinal, *base);
    return handle.status();
  }
  ipc_exports.fetch_add(1, std::memory_order_relaxed);
  auto segment = std::make_shared<Segment>(
      api, info.ordinal, absl::StrCat("chunkd-gpu", info.ordinal, "-", tag, "-", next_segment++),
      static_cast<std::byte*>(*base), size, *handle, dedicated);
  segments.push_back(segment);
  segment_bytes += size;
  return segment;
}

absl::StatusOr<std::shared_ptr<DeviceTier::DeviceState::TierBlock>>
DeviceTier::DeviceState::TryCarve(uint64_t length, size_t size) {
  std::shared_ptr<Segment> chosen;
  uint64_t offset = 0;
  {
    absl::MutexLock lock(&alloc_mu);
    uint64_t best = 0;
    for (const auto& segment : segments) {
      if (segment->dedicated) continue;
      std::optional<uint64_t> fit = segment->extents.BestFit(length);
      if (fit && (chosen == nullptr || *fit < best)) {
        chosen = segment;
        best = *fit;
      }
    }
    if (chosen == nullptr) {
      // A new segment, within the budget: segment_bytes (less if the budget has less left), or
      // a segment of the value's own size for a value larger than that.
      bool dedicated = length > options.segment_bytes;
      auto size_left = [&] {
        uint64_t left = options.capacity_bytes - segment_bytes;
        return dedicated ? length
                         : std::min(options.segment_bytes,
                                    left / options.block_alignment * options.block_alignment);
      };
      uint64_t new_size = size_left();
      if (new_size < length || new_size > options.capacity_bytes - segment_bytes) {
        // Empty segments may hold the budget this one needs.
        for (auto it = segments.begin(); it != segments.end();) {
          if ((*it)->extents.empty()) {
            segment_bytes -= (*it)->size;
            it = segments.erase(it);
          } else {
            ++it;
          }
        }
        new_size = size_left();
        if (new_size < length || new_size > options.capacity_bytes - segment_bytes) {
          return std::shared_ptr<TierBlock>();
        }
      }
      absl::StatusOr<std::shared_ptr<Segment>> segment = NewSegmentLocked(new_size, dedicated);
      if (!segment.ok()) return segment.status();
      chosen = *segment;
    }
    offset = *chosen->extents.Allocate(length);
    used += length;
  }
  return std::make_shared<TierBlock>(shared_from_this(), std::move(chosen), offset, length, size);
}

absl::StatusOr<std::shared_ptr<DeviceTier::DeviceState::TierBlock>>
DeviceTier::DeviceState::AllocateLocked(size_t size) {
  uint64_t length = RoundUp(std::max<uint64_t>(size, 1), options.block_alignment);
  if (length > options.capacity_bytes) {
    not_admitted.fetch_add(1, std::memory_order_relaxed);
    return absl::ResourceExhaustedError(
        absl::StrCat("a value of ", size, " bytes does not fit the device tier's budget of ",
                     FormatBytes(options.capacity_bytes), " (--device_cache_bytes)"));
  }
  for (;;) {
    absl::StatusOr<std::shared_ptr<TierBlock>> block = TryCarve(length, size);
    if (!block.ok() || *block != nullptr) return block;
    if (!EvictOneLocked()) break;
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("no room for ", size, " bytes in the device tier of ",
                   buffer::gpu::UuidToString(info.uuid), ": its budget is held by leased chunks"));
}

bool DeviceTier::DeviceState::EvictOneLocked() {
  for (auto it = lru.rbegin(); it != lru.rend(); ++it) {
    if (it->block->pinned()) continue;
    evictions.fetch_add(1, std::memory_order_relaxed);
    evicted_bytes.fetch_add(it->block->size(), std::memory_order_relaxed);
    auto victim = std::next(it).base();
    index.erase(victim->key);
    // Dropping the block returns its extent at once unless a reply still holds it.
    lru.erase(victim);
    return true;
  }
  return false;
}

void DeviceTier::DeviceState::FreeExtent(const std::shared_ptr<Segment>& segment, uint64_t offset,
                                         uint64_t length) {
  absl::MutexLock lock(&alloc_mu);
  segment->extents.Free(offset, length);
  used -= length;
  if (segment->dedicated && segment->extents.empty()) {
    // The block that frees the extent still holds the segment: the device memory goes with it.
    auto it = std::find(segments.begin(), segments.end(), segment);
    if (it != segments.end()) {
      segment_bytes -= segment->size;
      segments.erase(it);
    }
  }
}

struct DeviceTier::Staging {
  void* data = nullptr;
  bool pinned = false;
};

absl::StatusOr<std::unique_ptr<DeviceTier>> DeviceTier::Create(DeviceApi* api,
                                                               const DeviceTierOptions& options) {
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("the device tier needs a budget (--device_cache_bytes)");
  }
  if (options.block_alignment == 0 || options.segment_bytes < options.block_alignment ||
      options.staging_bytes == 0 || options.max_staging_buffers == 0) {
    return absl::InvalidArgumentError("device tier: bad segment, alignment or staging sizes");
  }
  absl::StatusOr<std::vector<DeviceInfo>> all = api->Devices();
  if (!all.ok()) return all.status();
  if (all->empty()) return absl::FailedPreconditionError("no CUDA device: none visible");
  std::unique_ptr<DeviceTier> tier(new DeviceTier(api, options));
  if (options.devices.empty()) {
    tier->devices_ = *all;
  } else {
    for (int ordinal : options.devices) {
      if (ordinal < 0 || static_cast<size_t>(ordinal) >= all->size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--cuda_device=", ordinal, ": this process sees ", all->size(), " CUDA device(s)"));
      }
      tier->devices_.push_back((*all)[ordinal]);
    }
  }
  std::string tag = InstanceTag();
  for (const DeviceInfo& info : tier->devices_) {
    tier->states_.push_back(std::make_shared<DeviceState>(api, info, options, tag));
  }
  return tier;
}

DeviceTier::DeviceTier(DeviceApi* api, const DeviceTierOptions& options)
    : api_(api), options_(options) {}

DeviceTier::~DeviceTier() {
  // Entries hold blocks that hold their device's state: break the cycle. Blocks still leased
  // keep their segment (and its device memory) until the lease ends.
  for (auto& state : states_) {
    std::list<DeviceState::Entry> entries;
    {
      absl::MutexLock lock(&state->index_mu);
      state->index.clear();
      entries.swap(state->lru);
    }
  }
  absl::MutexLock lock(&staging_mu_);
  for (auto& s : staging_) {
    if (s->pinned) {
      (void)api_->HostFreePinned(s->data);
    } else {
      std::free(s->data);
    }
  }
}

std::optional<size_t> DeviceTier::FindDevice(const buffer::gpu::DeviceUuid& uuid) const {
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (devices_[i].uuid == uuid) return i;
  }
  return std::nullopt;
}

std::optional<DeviceChunk> DeviceTier::Lookup(size_t device, absl::string_view key,
                                              uint64_t generation) {
  DeviceState& state = *states_.at(device);
  absl::MutexLock lock(&state.index_mu);
  auto it = state.index.find(key);
  if (it == state.index.end() || it->second->generation != generation) return std::nullopt;
  state.TouchLocked(it->second);
  state.hits.fetch_add(1, std::memory_order_relaxed);
  return state.ChunkOf(it->second->block);
}

absl::StatusOr<DeviceChunk> DeviceTier::Promote(size_t device, absl::string_view key,
                                                uint64_t generation,
                                                const buffer::cpu::Buffer& host) {
  if (std::optional<DeviceChunk> hit = Lookup(device, key, generation)) return *std::move(hit);
  DeviceState& state = *states_.at(device);
  std::shared_ptr<DeviceState::TierBlock> block;
  {
    absl::MutexLock lock(&state.index_mu);
    auto allocated = state.AllocateLocked(host.size());
    if (!allocated.ok()) {
      state.promotion_failures.fetch_add(1, std::memory_order_relaxed);
      return allocated.status();
    }
    block = *std::move(allocated);
  }
  // The copy runs without locks: hits and other promotions go on meanwhile.
  if (absl::Status s = CopyIn(state, block->data(), host); !s.ok()) {
    state.promotion_failures.fetch_add(1, std::memory_order_relaxed);
    return s;
  }
  absl::MutexLock lock(&state.index_mu);
  auto it = state.index.find(key);
  if (it != state.index.end()) {
    if (it->second->generation == generation) {
      // Another promotion of the same value won the race: use its block, drop ours.
      state.TouchLocked(it->second);
      return state.ChunkOf(it->second->block);
    }
    // An older generation: replaced (its block lives on while leased).
    state.lru.erase(it->second);
    state.index.erase(it);
  }
  state.lru.push_front(DeviceState::Entry{std::string(key), generation, block});
  state.index.emplace(std::string(key), state.lru.begin());
  state.promotions.fetch_add(1, std::memory_order_relaxed);
  state.promoted_bytes.fetch_add(host.size(), std::memory_order_relaxed);
  return state.ChunkOf(block);
}

absl::StatusOr<DeviceTier::Staging*> DeviceTier::TakeStaging() {
  absl::MutexLock lock(&staging_mu_);
  if (free_staging_.empty() && staging_.size() < options_.max_staging_buffers) {
    auto staging = std::make_unique<Staging>();
    if (!staging_unpinned_) {
      absl::StatusOr<void*> pinned = api_->HostAllocPinned(options_.staging_bytes);
      if (pinned.ok()) {
        staging->data = *pinned;
        staging->pinned = true;
      } else {
        staging_unpinned_ = true;
        Log("device tier: no pinned staging memory (%s); copying from pageable memory",
            std::string(pinned.status().message()));
      }
    }
    if (staging->data == nullptr) {
      staging->data = std::aligned_alloc(4096, RoundUp(options_.staging_bytes, 4096));
      if (staging->data == nullptr) return absl::ResourceExhaustedError("staging memory");
    }
    free_staging_.push_back(staging.get());
    staging_.push_back(std::move(staging));
  }
  staging_mu_.Await(absl::Condition(
      +[](std::vector<Staging*>* free) { return !free->empty(); }, &free_staging_));
  Staging* staging = free_staging_.back();
  free_staging_.pop_back();
  return staging;
}

void DeviceTier::ReturnStaging(Staging* staging) {
  absl::MutexLock lock(&staging_mu_);
  free_staging_.push_back(staging);
}

absl::Status DeviceTier::CopyIn(DeviceState& state, std::byte* dst,
                                const buffer::cpu::Buffer& host) {
  if (host.empty()) return absl::OkStatus();
  absl::StatusOr<Staging*> staging = TakeStaging();
  if (!staging.ok()) return staging.status();
  absl::Status status;
  for (size_t offset = 0; offset < host.size() && status.ok();) {
    size_t n = std::min<size_t>(options_.staging_bytes, host.size() - offset);
    std::memcpy((*staging)->data, host.data() + offset, n);
    status = api_->CopyToDevice(state.info.ordinal, dst + offset, (*staging)->data, n);
    offset += n;
  }
  ReturnStaging(*staging);
  return status;
}

DeviceTierStats DeviceTier::stats() const {
  DeviceTierStats s;
  s.devices = states_.size();
  for (const auto& state : states_) {
    s.capacity_bytes += options_.capacity_bytes;
    {
      absl::MutexLock lock(&state->index_mu);
      s.entries += state->index.size();
    }
    {
      absl::MutexLock lock(&state->alloc_mu);
      s.used_bytes += state->used;
      s.segment_bytes += state->segment_bytes;
      s.segments += state->segments.size();
    }
    s.hits += state->hits.load();
    s.promotions += state->promotions.load();
    s.promoted_bytes += state->promoted_bytes.load();
    s.promotion_failures += state->promotion_failures.load();
    s.evictions += state->evictions.load();
    s.evicted_bytes += state->evicted_bytes.load();
    s.not_admitted += state->not_admitted.load();
    s.ipc_exports += state->ipc_exports.load();
  }
  return s;
}

CudaChoice ChooseCudaDelivery(const DeviceTier* tier, const std::string& server_boot_id,
                              const CudaRequest& request) {
  CudaChoice choice;
  const auto no = [&](absl::Status why) {
    choice.decision = request.only ? CudaChoice::kRefuse : CudaChoice::kFallback;
    choice.why = std::move(why);
    return choice;
  };
  if (tier == nullptr) {
    return no(absl::FailedPreconditionError(
        "CUDA IPC delivery is off on this server (no device tier: --device_cache_bytes is 0 "
        "or the server found no CUDA device)"));
  }
  if (server_boot_id.empty() || request.client_boot_id != server_boot_id) {
    return no(absl::FailedPreconditionError(
        "CUDA IPC delivery needs a client on the server's host (the boot ids differ)"));
  }
  absl::StatusOr<buffer::gpu::DeviceUuid> uuid = buffer::gpu::UuidFromBytes(request.gpu_uuid);
  if (!uuid.ok()) {
    return no(absl::InvalidArgumentError(
        absl::StrCat("CUDA IPC delivery needs gpu_uuid: ", uuid.status().message())));
  }
  std::optional<size_t> device = tier->FindDevice(*uuid);
  if (!device) {
    choice.unknown_gpu = true;
    return no(absl::FailedPreconditionError(
        absl::StrCat("GPU ", buffer::gpu::UuidToString(*uuid), " is not visible to this server")));
  }
  choice.decision = CudaChoice::kOffer;
  choice.device = *device;
  return choice;
}

absl::StatusOr<std::vector<int>> ParseCudaDevices(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  if (text.empty() || text == "all") return std::vector<int>();
  std::vector<int> ordinals;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int ordinal;
    if (!absl::SimpleAtoi(part, &ordinal) || ordinal < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--cuda_device=", text, " is not \"all\" or comma-separated device ordinals"));
    }
    if (std::find(ordinals.begin(), ordinals.end(), ordinal) == ordinals.end()) {
      ordinals.push_back(ordinal);
    }
  }
  return ordinals;
}

}  // namespace chunkd::server

// The device tier: a byte-budgeted cache of chunk values in GPU memory, for CUDA IPC delivery.
//
// Memory comes from large device segments (DeviceTierOptions::segment_bytes, 256 MiB by
// default) allocated through DeviceApi::Malloc and exported ONCE each with cudaIpcGetMemHandle;
// chunk blocks are carved out of them with an ExtentAllocator (buffer/extent_allocator.h), so a
// client opens one IPC handle per segment, not one per chunk. A value larger than a segment gets
// a segment of its own, released when its block goes.
//
// Promote(key, generation, host value) copies a value from host memory into the tier (through
// pinned staging buffers: cudaMemcpyAsync on a stream, then a synchronize) or finds it there.
// Entries are keyed by key; a newer generation replaces an older one. When the budget is
// reached, least recently used entries are evicted, skipping pinned (leased) blocks. Eviction
// drops the device copy only: the host cache or the store still holds the value ("evicted to
// host, never lost"), and the next Promote copies it again.
//
// The budget is per device and bounds the device memory the tier allocates (segments), so it is
// never exceeded, whatever the leases.
//
// Thread-safe.
#ifndef CHUNKD_SERVER_STORE_DEVICE_TIER_H_
#define CHUNKD_SERVER_STORE_DEVICE_TIER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "buffer/cpu/buffer.h"
#include "buffer/gpu/buffer.h"
#include "buffer/gpu/device_api.h"

namespace chunkd::server {

struct DeviceTierOptions {
  // Budget of device memory per device; 0 turns the tier off.
  uint64_t capacity_bytes = 0;
  // Ordinals of the devices to use (as this process numbers them); empty: all of them.
  std::vector<int> devices;
  // Size of each device segment (one IPC handle each); capped by the budget.
  uint64_t segment_bytes = 256ull << 20;
  // Size of each pinned host staging buffer, and how many exist at most (one per concurrent
  // promotion; more promotions wait).
  uint64_t staging_bytes = 8ull << 20;
  size_t max_staging_buffers = 4;
  // Blocks start at multiples of this within a segment.
  uint64_t block_alignment = 512;
};

struct DeviceTierStats {
  uint64_t devices = 0;
  uint64_t capacity_bytes = 0;  // all devices together
  uint64_t used_bytes = 0;      // in blocks (cached, or evicted but still leased)
  uint64_t segment_bytes = 0;   // device memory allocated for segments
  uint64_t segments = 0;
  uint64_t entries = 0;
  uint64_t hits = 0;
  uint64_t promotions = 0;
  uint64_t promoted_bytes = 0;
  uint64_t promotion_failures = 0;
  uint64_t evictions = 0;
  uint64_t evicted_bytes = 0;
  uint64_t not_admitted = 0;  // values larger than the budget
  uint64_t ipc_exports = 0;   // segments exported (once each)
};

// A value in the tier, as a CUDA IPC delivery describes it.
struct DeviceChunk {
  buffer::gpu::Buffer buffer;           // the whole value, on the tier's device
  std::string segment;                  // name of the segment: unique for the life of the process
  buffer::gpu::IpcHandle ipc_handle{};  // of the segment
  uint64_t offset = 0;                  // of the value within the segment
  buffer::gpu::DeviceUuid device_uuid{};
};

class DeviceTier {
 public:
  // A tier on `api`'s devices (options.devices, or all). REQUIRES: `api` outlives the tier and
  // every block it handed out. FAILED_PRECONDITION when there is no device, INVALID_ARGUMENT for
  // an ordinal the process does not have or a zero budget.
  static absl::StatusOr<std::unique_ptr<DeviceTier>> Create(buffer::gpu::DeviceApi* api,
                                                            const DeviceTierOptions& options);
  ~DeviceTier();
  DeviceTier(const DeviceTier&) = delete;
  DeviceTier& operator=(const DeviceTier&) = delete;

  // The tier's devices; a device is named by its index in this list below.
  const std::vector<buffer::gpu::DeviceInfo>& devices() const { return devices_; }
  // The index of the device with this UUID, or nullopt when the tier has none.
  std::optional<size_t> FindDevice(const buffer::gpu::DeviceUuid& uuid) const;

  // The value (key, generation) on device `device`, copied from `host` unless already there.
  // RESOURCE_EXHAUSTED when the value is larger than the budget, or when leased blocks leave no
  // room; errors of the device otherwise. `host` is the whole value.
  absl::StatusOr<DeviceChunk> Promote(size_t device, absl::string_view key, uint64_t generation,
                                      const buffer::cpu::Buffer& host);
  // The value if it is in the tier (counts a hit), without copying.
  std::optional<DeviceChunk> Lookup(size_t device, absl::string_view key, uint64_t generation);

  DeviceTierStats stats() const;
  const DeviceTierOptions& options() const { return options_; }
  buffer::gpu::DeviceApi* api() const { return api_; }

 private:
  struct DeviceState;
  struct Staging;

  DeviceTier(buffer::gpu::DeviceApi* api, const DeviceTierOptions& options);
  absl::StatusOr<Staging*> TakeStaging();
  void ReturnStaging(Staging* staging);
  absl::Status CopyIn(DeviceState& state, std::byte* dst, const buffer::cpu::Buffer& host);

  buffer::gpu::DeviceApi* const api_;
  const DeviceTierOptions options_;
  std::vector<buffer::gpu::DeviceInfo> devices_;
  std::vector<std::shared_ptr<DeviceState>> states_;

  absl::Mutex staging_mu_;
  std::vector<std::unique_ptr<Staging>> staging_ ABSL_GUARDED_BY(staging_mu_);
  std::vector<Staging*> free_staging_ ABSL_GUARDED_BY(staging_mu_);
  bool staging_unpinned_ ABSL_GUARDED_BY(staging_mu_) = false;
};

// What a Get asks for about CUDA IPC delivery (from GetRequest).
struct CudaRequest {
  bool wanted = false;   // accept lists DELIVERY_CUDA_IPC
  bool only = false;     // ... and no other delivery: no fallback to inline
  std::string gpu_uuid;  // GetRequest.gpu_uuid: 16 raw bytes
  std::string client_boot_id;
};

// What the server does about it.
struct CudaChoice {
  enum Decision {
    kOffer,     // promote to `device` of the tier and reply with a handle
    kFallback,  // use another delivery the client accepts (counted)
    kRefuse,    // fail the Get with `why`: the client accepts nothing else
  };
  Decision decision = kFallback;
  size_t device = 0;
  bool unknown_gpu = false;  // the client named a GPU the tier does not have
  absl::Status why;          // for kFallback and kRefuse: the reason
};

// CUDA IPC needs a device tier, a client on this host (the same boot id: IPC handles are
// resolved by the driver of this kernel; /dev/shm does not matter), and a gpu_uuid that names
// one of the tier's devices. `tier` may be null (no tier).
CudaChoice ChooseCudaDelivery(const DeviceTier* tier, const std::string& server_boot_id,
                              const CudaRequest& request);

// Parses --cuda_device: "all" (or empty) for every device, else comma-separated ordinals.
absl::StatusOr<std::vector<int>> ParseCudaDevices(absl::string_view text);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_DEVICE_TIER_H_

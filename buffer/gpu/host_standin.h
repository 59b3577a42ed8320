// A stand-in for the CUDA runtime in host memory, for tests of the logic above DeviceApi (the
// device tier, IPC import, gpu::Buffer) on machines without a GPU. Test-only: it lives in its
// own library (chunkd_gpu_standin) that neither the server nor the client links, so no flag or
// option can pick it as a delivery.
//
// "Device memory" is host memory, so its bytes can be checked directly. IPC handles name
// entries of one table per process shared by every stand-in: an allocation exported through
// one instance can be opened through another, which plays the part of a second process. Each
// instance enforces CUDA's rule that a process opens a handle at most once at a time, refuses
// to free memory whose handle another instance still has open (undefined in CUDA), and counts
// what it was asked to do.
#ifndef CHUNKD_BUFFER_GPU_HOST_STANDIN_H_
#define CHUNKD_BUFFER_GPU_HOST_STANDIN_H_

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "buffer/gpu/device_api.h"

namespace chunkd::buffer::gpu {

struct HostStandInCounters {
  uint64_t mallocs = 0;
  uint64_t frees = 0;
  uint64_t ipc_exports = 0;  // IpcGetMemHandle calls
  uint64_t ipc_opens = 0;
  uint64_t ipc_closes = 0;
  uint64_t synchronizes = 0;
  // Frees refused because another "process" (stand-in) still had the allocation's IPC handle
  // open: CUDA leaves that undefined, so the stand-in refuses it and keeps the memory.
  uint64_t frees_with_open_imports = 0;
  uint64_t copies_to_device = 0;
  uint64_t copies_to_host = 0;
  uint64_t bytes_to_device = 0;
  uint64_t pinned_allocs = 0;
  uint64_t device_bytes = 0;       // allocated now, all devices
  uint64_t peak_device_bytes = 0;  // the most ever allocated at once
};

class HostStandInDeviceApi final : public DeviceApi {
 public:
  // Devices with these UUIDs (ordinals in this order), each with `memory_per_device` bytes.
  HostStandInDeviceApi(std::vector<DeviceUuid> uuids, uint64_t memory_per_device);
  ~HostStandInDeviceApi() override;

  // The UUID the stand-in gives device `ordinal`: the same in every instance, so that two
  // instances (two "processes") see the same GPUs.
  static DeviceUuid StandInUuid(int ordinal);

  std::string name() const override { return "host-stand-in"; }
  absl::StatusOr<std::vector<DeviceInfo>> Devices() override;
  absl::StatusOr<void*> Malloc(int device, size_t bytes) override;
  absl::Status Free(int device, void* ptr) override;
  absl::StatusOr<IpcHandle> IpcGetMemHandle(int device, void* ptr) override;
  absl::StatusOr<void*> IpcOpenMemHandle(int device, const IpcHandle& handle) override;
  absl::Status IpcCloseMemHandle(int device, void* ptr) override;
  absl::Status Synchronize(int device) override;
  absl::Status CopyToDevice(int device, void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(int device, void* dst, const void* src, size_t bytes) override;
  absl::StatusOr<void*> HostAllocPinned(size_t bytes) override;
  absl::Status HostFreePinned(void* ptr) override;
  absl::Status HostRegister(void* ptr, size_t bytes) override;
  absl::Status HostUnregister(void* ptr) override;

  HostStandInCounters counters() const;
  // Bytes allocated on `device` now.
  uint64_t device_bytes(int device) const;
  // Handles this instance has open now.
  size_t open_handles() const;

 private:
  struct Allocation {
    size_t size = 0;
    int device = 0;
    uint64_t exported_id = 0;  // entry in the process-wide handle table, 0 if never exported
  };
  absl::Status CheckDeviceRange(int device, const void* ptr, size_t bytes) const;
  absl::Status CheckDevice(int device) const;

  const std::vector<DeviceUuid> uuids_;
  const uint64_t memory_per_device_;
  mutable absl::Mutex mu_;
  std::map<uintptr_t, Allocation> allocations_ ABSL_GUARDED_BY(mu_);
  // Mapped (opened) ranges: base -> (size, handle id).
  std::map<uintptr_t, std::pair<size_t, uint64_t>> opened_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> used_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<void*> pinned_ ABSL_GUARDED_BY(mu_);
  HostStandInCounters counters_ ABSL_GUARDED_BY(mu_);
};

// `n_devices` devices with the UUIDs StandInUuid(0..n-1).
std::unique_ptr<HostStandInDeviceApi> NewHostStandInDeviceApi(int n_devices,
                                                              uint64_t memory_per_device = 1ull
                                                                                           << 30);

}  // namespace chunkd::buffer::gpu

#endif  // CHUNKD_BUFFER_GPU_HOST_STANDIN_H_

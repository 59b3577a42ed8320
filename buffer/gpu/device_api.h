// Every CUDA call chunkd makes, behind one narrow interface.
//
// Two implementations:
// - CudaDeviceApi(): the CUDA runtime (compiled when the toolkit is found at build time). At run
//   time it fails with FAILED_PRECONDITION "no CUDA device: ..." (the CUDA error string) when
//   there is no driver or no device, and callers run host-only.
// - NewHostStandInDeviceApi() (buffer/gpu/host_standin.h, a test-only library): "device
//   memory" is host memory and IPC handles name entries of a process-local table. It exists to
//   test the logic above this interface (the device tier, handle import) on machines without a
//   GPU; nothing in the server or the client can select it.
//
// Devices are named by ordinal within one process (what cudaSetDevice takes) and matched across
// processes by their 16-byte UUID (cudaDeviceProp::uuid), never by ordinal: two processes may
// see different devices, or the same devices in a different order (CUDA_VISIBLE_DEVICES).
//
// Thread-safe: every method may be called from any thread.
#ifndef CHUNKD_BUFFER_GPU_DEVICE_API_H_
#define CHUNKD_BUFFER_GPU_DEVICE_API_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace chunkd::buffer::gpu {

inline constexpr size_t kUuidBytes = 16;
inline constexpr size_t kIpcHandleBytes = 64;  // CUDA_IPC_HANDLE_SIZE

using DeviceUuid = std::array<uint8_t, kUuidBytes>;
using IpcHandle = std::array<uint8_t, kIpcHandleBytes>;

// "GPU-8hex-4hex-4hex-4hex-12hex", as nvidia-smi -L prints it.
std::string UuidToString(const DeviceUuid& uuid);
// A UUID from its 16 raw bytes (as they travel in GetRequest.gpu_uuid); INVALID_ARGUMENT for
// any other length.
absl::StatusOr<DeviceUuid> UuidFromBytes(absl::string_view bytes);
// The raw 16 bytes, for the wire.
inline std::string UuidBytes(const DeviceUuid& uuid) {
  return std::string(reinterpret_cast<const char*>(uuid.data()), uuid.size());
}
absl::StatusOr<IpcHandle> IpcHandleFromBytes(absl::string_view bytes);
inline std::string IpcHandleBytes(const IpcHandle& handle) {
  return std::string(reinterpret_cast<const char*>(handle.data()), handle.size());
}

struct DeviceInfo {
  int ordinal = 0;
  DeviceUuid uuid{};
  std::string name;
  uint64_t total_memory = 0;
};

class DeviceApi {
 public:
  virtual ~DeviceApi() = default;

  // "cuda" or "host-stand-in".
  virtual std::string name() const = 0;

  // The devices this process can use, by ordinal.
  virtual absl::StatusOr<std::vector<DeviceInfo>> Devices() = 0;

  // Device memory (cudaMalloc on `device`); RESOURCE_EXHAUSTED when it has no room.
  virtual absl::StatusOr<void*> Malloc(int device, size_t bytes) = 0;
  virtual absl::Status Free(int device, void* ptr) = 0;

  // The IPC handle of the allocation that starts at `ptr` (cudaIpcGetMemHandle). REQUIRES:
  // `ptr` came from Malloc (an IPC handle names a whole allocation, not a pointer into one).
  virtual absl::StatusOr<IpcHandle> IpcGetMemHandle(int device, void* ptr) = 0;
  // Maps another process's allocation into this one on `device` (cudaIpcOpenMemHandle). CUDA
  // allows one open of a handle per process: callers keep one mapping per handle.
  virtual absl::StatusOr<void*> IpcOpenMemHandle(int device, const IpcHandle& handle) = 0;
  virtual absl::Status IpcCloseMemHandle(int device, void* ptr) = 0;
  // Waits for all the work this process has queued on `device`, on every stream
  // (cudaDeviceSynchronize): what a consumer's kernels read of imported memory is read once it
  // returns, so the memory may go back to its owner.
  virtual absl::Status Synchronize(int device) = 0;

  // Copies `bytes` bytes and waits for them (cudaMemcpyAsync on a stream of `device`, then
  // cudaStreamSynchronize). Host memory is best pinned (HostAllocPinned, HostRegister); pageable
  // memory works, more slowly.
  virtual absl::Status CopyToDevice(int device, void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(int device, void* dst, const void* src, size_t bytes) = 0;

  // Page-locked host memory (cudaHostAlloc / cudaFreeHost).
  virtual absl::StatusOr<void*> HostAllocPinned(size_t bytes) = 0;
  virtual absl::Status HostFreePinned(void* ptr) = 0;
  // Page-locks existing host memory (cudaHostRegister / cudaHostUnregister).
  virtual absl::Status HostRegister(void* ptr, size_t bytes) = 0;
  virtual absl::Status HostUnregister(void* ptr) = 0;
};

// The CUDA runtime, shared by the whole process (never destroyed). FAILED_PRECONDITION
// "no CUDA device: <CUDA's error string>" when the driver is missing or finds no device, or
// when this build has no CUDA support. The first call probes the driver; later calls return
// the same answer.
absl::StatusOr<DeviceApi*> CudaDeviceApi();

// Whether this build was compiled with the CUDA toolkit.
bool BuiltWithCuda();

}  // namespace chunkd::buffer::gpu

#endif  // CHUNKD_BUFFER_GPU_DEVICE_API_H_

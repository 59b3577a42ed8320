// CudaDeviceApi(): the CUDA runtime API (host code only; no kernels).
#include <cuda_runtime_api.h>

#include <cstring>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "buffer/gpu/device_api.h"

namespace chunkd::buffer::gpu {
namespace {

static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes);
static_assert(sizeof(cudaUUID_t) == kUuidBytes);

absl::Status CudaError(cudaError_t err, absl::string_view what) {
  // Clears the thread's last error, so that a recoverable failure (out of memory, say) does not
  // show up again in an unrelated call.
  (void)cudaGetLastError();
  std::string message =
      absl::StrCat(what, ": ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidResourceHandle:
      return absl::InvalidArgumentError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorMapBufferObjectFailed:
    case cudaErrorNotSupported:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

// Makes `device` current for the scope and restores the caller's device afterwards: the
// client library runs on its caller's threads and must not change their current device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceScope() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) {
      cudaSetDevice(previous_);
    }
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

class CudaApi final : public DeviceApi {
 public:
  ~CudaApi() override = default;

  std::string name() const override { return "cuda"; }

  absl::StatusOr<std::vector<DeviceInfo>> Devices() override {
    int count = 0;
    if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
      return CudaError(err, "cudaGetDeviceCount");
    }
    std::vector<DeviceInfo> devices;
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop;
      if (cudaError_t err = cudaGetDeviceProperties(&prop, i); err != cudaSuccess) {
        return CudaError(err, absl::StrCat("cudaGetDeviceProperties(", i, ")"));
      }
      DeviceInfo info;
      info.ordinal = i;
      std::memcpy(info.uuid.data(), prop.uuid.bytes, kUuidBytes);
      info.name = prop.name;
      info.total_memory = prop.totalGlobalMem;
      devices.push_back(std::move(info));
    }
    return devices;
  }

  absl::StatusOr<void*> Malloc(int device, size_t bytes) override {
    DeviceScope scope(device);
    if (scope.status() != cudaSuccess) return CudaError(scope.status(), "cudaSetDevice");
    void* ptr = nullptr;
    if (cudaError_t err = cudaMalloc(&ptr, bytes); err != cudaSuccess) {
      return CudaError(err, absl::StrCat("cudaMalloc(", bytes, ") on device ", device));
    }
    return ptr;
  }

  absl::Status Free(int device, void* ptr) override {
    DeviceScope scope(device);
    if (cudaError_t err = cudaFree(ptr); err != cudaSuccess) return CudaError(err, "cudaFree");
    return absl::OkStatus();
  }

  absl::StatusOr<IpcHandle> IpcGetMemHandle(int device, void* ptr) override {
    DeviceScope scope(device);
    cudaIpcMemHandle_t handle;
    if (cudaError_t err = cudaIpcGetMemHandle(&handle, ptr); err != cudaSuccess) {
      return CudaError(err, "cudaIpcGetMemHandle");
    }
    IpcHandle out;
    std::memcpy(out.data(), handle.reserved, kIpcHandleBytes);
    return out;
  }

  absl::StatusOr<void*> IpcOpenMemHandle(int device, const IpcHandle& handle) override {
    DeviceScope scope(device);
    if (scope.status() != cudaSuccess) return CudaError(scope.status(), "cudaSetDevice");
    cudaIpcMemHandle_t h;
    std::memcpy(h.reserved, handle.data(), kIpcHandleBytes);
    void* ptr = nullptr;
    if (cudaError_t err = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
        err != cudaSuccess) {
      return CudaError(err, absl::StrCat("cudaIpcOpenMemHandle on device ", device));
    }
    return ptr;
  }

  absl::Status IpcCloseMemHandle(int device, void* ptr) override {
    DeviceScope scope(device);
    if (cudaError_t err = cudaIpcCloseMemHandle(ptr); err != cudaSuccess) {
      return CudaError(err, "cudaIpcCloseMemHandle");
    }
    return absl::OkStatus();
  }

  absl::Status Synchronize(int device) override {
    DeviceScope scope(device);
    if (cudaError_t err = cudaDeviceSynchronize(); err != cudaSuccess) {
      return CudaError(err, "cudaDeviceSynchronize");
    }
    return absl::OkStatus();
  }

  absl::Status CopyToDevice(int device, void* dst, const void* src, size_t bytes) override {
    return Copy(device, dst, src, bytes, cudaMemcpyHostToDevice);
  }
  absl::Status CopyToHost(int device, void* dst, const void* src, size_t bytes) override {
    return Copy(device, dst, src, bytes, cudaMemcpyDeviceToHost);
  }

  absl::StatusOr<void*> HostAllocPinned(size_t bytes) override {
    void* ptr = nullptr;
    if (cudaError_t err = cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable); err != cudaSuccess) {
      return CudaError(err, absl::StrCat("cudaHostAlloc(", bytes, ")"));
    }
    return ptr;
  }
  absl::Status HostFreePinned(void* ptr) override {
    if (cudaError_t err = cudaFreeHost(ptr); err != cudaSuccess) {
      return CudaError(err, "cudaFreeHost");
    }
    return absl::OkStatus();
  }
  absl::Status HostRegister(void* ptr, size_t bytes) override {
    if (cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable);
        err != cudaSuccess) {
      return CudaError(err, "cudaHostRegister");
    }
    return absl::OkStatus();
  }
  absl::Status HostUnregister(void* ptr) override {
    if (cudaError_t err = cudaHostUnregister(ptr); err != cudaSuccess) {
      return CudaError(err, "cudaHostUnregister");
    }
    return absl::OkStatus();
  }

 private:
  // Streams are reused: one per concurrent copy on each device, created on first need.
  absl::StatusOr<cudaStream_t> TakeStream(int device) {
    {
      absl::MutexLock lock(&mu_);
      auto& free = streams_[device];
      if (!free.empty()) {
        cudaStream_t s = free.back();
        free.pop_back();
        return s;
      }
    }
    cudaStream_t s;
    if (cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        err != cudaSuccess) {
      return CudaError(err, "cudaStreamCreate");
    }
    return s;
  }
  void ReturnStream(int device, cudaStream_t s) {
    absl::MutexLock lock(&mu_);
    streams_[device].push_back(s);
  }

  absl::Status Copy(int device, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return absl::OkStatus();
    DeviceScope scope(device);
    if (scope.status() != cudaSuccess) return CudaError(scope.status(), "cudaSetDevice");
    absl::StatusOr<cudaStream_t> stream = TakeStream(device);
    if (!stream.ok()) return stream.status();
    cudaError_t err = cudaMemcpyAsync(dst, src, bytes, kind, *stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(*stream);
    if (err != cudaSuccess) {
      // A failed stream may be unusable: do not return it to the pool.
      cudaStreamDestroy(*stream);
      return CudaError(err, kind == cudaMemcpyHostToDevice ? "copy to device" : "copy to host");
    }
    ReturnStream(device, *stream);
    return absl::OkStatus();
  }

  absl::Mutex mu_;
  absl::flat_hash_map<int, std::vector<cudaStream_t>> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<DeviceApi*> CudaDeviceApi() {
  static const absl::StatusOr<DeviceApi*>* const probed = [] {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return new absl::StatusOr<DeviceApi*>(absl::FailedPreconditionError(
          absl::StrCat("no CUDA device: ", cudaGetErrorString(err),
                       " (cudaGetDeviceCount: ", cudaGetErrorName(err), ")")));
    }
    if (count == 0) {
      return new absl::StatusOr<DeviceApi*>(
          absl::FailedPreconditionError("no CUDA device: the CUDA driver reports no device"));
    }
    return new absl::StatusOr<DeviceApi*>(static_cast<DeviceApi*>(new CudaApi()));
  }();
  return *probed;
}

bool BuiltWithCuda() { return true; }

}  // namespace chunkd::buffer::gpu

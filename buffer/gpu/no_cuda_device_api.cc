// CudaDeviceApi() in a build without the CUDA toolkit: there is never a device.
#include "buffer/gpu/device_api.h"

namespace chunkd::buffer::gpu {

absl::StatusOr<DeviceApi*> CudaDeviceApi() {
  return absl::FailedPreconditionError(
      "no CUDA device: this build has no CUDA support (built without the CUDA toolkit, or with "
      "-DCHUNKD_WITH_CUDA=OFF)");
}

bool BuiltWithCuda() { return false; }

}  // namespace chunkd::buffer::gpu

#include "buffer/gpu/device_api.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace chunkd::buffer::gpu {

std::string UuidToString(const DeviceUuid& u) {
  std::string out = "GPU-";
  for (size_t i = 0; i < u.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    absl::StrAppendFormat(&out, "%02x", u[i]);
  }
  return out;
}

absl::StatusOr<DeviceUuid> UuidFromBytes(absl::string_view bytes) {
  if (bytes.size() != kUuidBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a GPU UUID has ", kUuidBytes, " bytes, not ", bytes.size()));
  }
  DeviceUuid uuid;
  std::memcpy(uuid.data(), bytes.data(), kUuidBytes);
  return uuid;
}

absl::StatusOr<IpcHandle> IpcHandleFromBytes(absl::string_view bytes) {
  if (bytes.size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a CUDA IPC handle has ", kIpcHandleBytes, " bytes, not ", bytes.size()));
  }
  IpcHandle handle;
  std::memcpy(handle.data(), bytes.data(), kIpcHandleBytes);
  return handle;
}

}  // namespace chunkd::buffer::gpu

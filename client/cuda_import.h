// The client side of CUDA IPC delivery: opens the IPC handles of the server's device segments
// and hands out gpu::Buffers that view chunks inside them.
//
// CUDA allows a process to open an IPC handle once at a time, so the importer keeps one mapping
// per (segment, device), shared by every buffer of that segment and reference-counted: the
// handle is opened by the first buffer of a segment and closed when the last one is gone. One
// importer serves the whole process (ForProcess), whatever the number of Clients.
#ifndef CHUNKD_CLIENT_CUDA_IMPORT_H_
#define CHUNKD_CLIENT_CUDA_IMPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "buffer/gpu/buffer.h"
#include "buffer/gpu/device_api.h"
#include "chunkd/v1/chunkd.pb.h"

namespace chunkd::client {

class CudaImporter {
 public:
  // An importer over `api`'s devices. REQUIRES: `api` outlives the importer, and the importer
  // outlives every buffer it hands out.
  static absl::StatusOr<std::unique_ptr<CudaImporter>> Create(buffer::gpu::DeviceApi* api);
  // The process's importer over the CUDA runtime (never destroyed). FAILED_PRECONDITION
  // "no CUDA device: ..." without a driver or a device.
  static absl::StatusOr<CudaImporter*> ForProcess();
  ~CudaImporter();

  // A device buffer over the chunk `handle` describes, on this process's device with the
  // handle's UUID. `on_release` runs once the buffer and every copy and slice of it are gone
  // (the lease is returned then). FAILED_PRECONDITION when this process does not see that GPU.
  absl::StatusOr<buffer::gpu::Buffer> Import(const v1::CudaIpcHandle& handle,
                                             std::function<void()> on_release);

  // The UUID of this process's device `ordinal`; INVALID_ARGUMENT for one it does not have.
  absl::StatusOr<buffer::gpu::DeviceUuid> UuidOf(int ordinal) const;
  const std::vector<buffer::gpu::DeviceInfo>& devices() const { return devices_; }
  // IPC handles open now.
  size_t open_handles() const;
  buffer::gpu::DeviceApi* api() const { return api_; }

 private:
  struct Mapping {
    std::byte* base = nullptr;
    int device = 0;
    buffer::gpu::IpcHandle handle{};
    size_t refs = 0;
  };
  class ImportedBlock;

  CudaImporter(buffer::gpu::DeviceApi* api, std::vector<buffer::gpu::DeviceInfo> devices)
      : api_(api), devices_(std::move(devices)) {}
  void Unref(const std::string& key);

  buffer::gpu::DeviceApi* const api_;
  const std::vector<buffer::gpu::DeviceInfo> devices_;
  mutable absl::Mutex mu_;
  // Key: segment name and device UUID.
  absl::flat_hash_map<std::string, Mapping> mappings_ ABSL_GUARDED_BY(mu_);
};

// Readies `request` (which accepts DELIVERY_CUDA_IPC) for device `ordinal`: sets gpu_uuid and
// the client's GPU UUIDs. Returns the process's importer, or "no CUDA device: ..." when there
// is none.
absl::StatusOr<CudaImporter*> PrepareCudaRequest(int ordinal, v1::GetRequest* request);

// Whether CUDA IPC delivery can be asked for on device `ordinal` in this process.
absl::Status CheckCudaDelivery(int ordinal);

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_CUDA_IMPORT_H_

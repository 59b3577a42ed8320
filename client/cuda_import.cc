#include "client/cuda_import.h"

#include <unistd.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "buffer/host_identity.h"

namespace chunkd::client {

using buffer::gpu::DeviceApi;
using buffer::gpu::DeviceUuid;

// A chunk inside an opened segment; drops its reference to the mapping when it goes, and only
// then its lease.
class CudaImporter::ImportedBlock final : public buffer::gpu::DeviceBlock {
 public:
  ImportedBlock(CudaImporter* importer, std::string key, std::byte* data, size_t size, int device,
                std::function<void()> on_release)
      : DeviceBlock(data, size, device, importer->api_),
        importer_(importer),
        key_(std::move(key)),
        on_release_(std::move(on_release)) {}
  ~ImportedBlock() override {
    // The lease goes back last. First, the work this process queued on the device, on any
    // stream, is done (a kernel may still read the chunk when its buffer's last reference goes;
    // the server copies another chunk into this memory once the lease is back); then the
    // mapping is closed if this was its last buffer (CUDA: the exporter must not free memory
    // that is still mapped).
    if (on_release_) {
      if (absl::Status s = importer_->api_->Synchronize(device()); !s.ok()) {
        std::fprintf(stderr, "chunkd client: %s before returning a device chunk\n",
                     s.ToString().c_str());
      }
    }
    importer_->Unref(key_);
    if (on_release_) on_release_();
  }

 private:
  CudaImporter* const importer_;
  const std::string key_;
  std::function<void()> on_release_;
};

absl::StatusOr<std::unique_ptr<CudaImporter>> CudaImporter::Create(DeviceApi* api) {
  auto devices = api->Devices();
  if (!devices.ok()) return devices.status();
  return std::unique_ptr<CudaImporter>(new CudaImporter(api, *std::move(devices)));
}

absl::StatusOr<CudaImporter*> CudaImporter::ForProcess() {
  static const absl::StatusOr<CudaImporter*>* const importer = [] {
    absl::StatusOr<DeviceApi*> api = buffer::gpu::CudaDeviceApi();
    if (!api.ok()) return new absl::StatusOr<CudaImporter*>(api.status());
    auto created = Create(*api);
    if (!created.ok()) {
      return new absl::StatusOr<CudaImporter*>(absl::FailedPreconditionError(
          absl::StrCat("no CUDA device: ", created.status().message())));
    }
    return new absl::StatusOr<CudaImporter*>(created->release());
  }();
  return *importer;
}

CudaImporter::~CudaImporter() {
  absl::MutexLock lock(&mu_);
  for (auto& [key, mapping] : mappings_)
    (void)api_->IpcCloseMemHandle(mapping.device, mapping.base);
}

absl::StatusOr<DeviceUuid> CudaImporter::UuidOf(int ordinal) const {
  if (ordinal < 0 || static_cast<size_t>(ordinal) >= devices_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("no CUDA device with ordinal ", ordinal,
                                                   " (this process sees ", devices_.size(), ")"));
  }
  return devices_[ordinal].uuid;
}

absl::StatusOr<buffer::gpu::Buffer> CudaImporter::Import(const v1::CudaIpcHandle& handle,
                                                         std::function<void()> on_release) {
  absl::StatusOr<DeviceUuid> uuid = buffer::gpu::UuidFromBytes(handle.device_uuid());
  absl::StatusOr<buffer::gpu::IpcHandle> ipc = buffer::gpu::IpcHandleFromBytes(handle.ipc_handle());
  if (!uuid.ok() || !ipc.ok() || handle.segment().empty()) {
    return absl::DataLossError("malformed CUDA IPC handle in the Get reply");
  }
  int device = -1;
  for (const auto& d : devices_) {
    if (d.uuid == *uuid) device = d.ordinal;
  }
  if (device < 0) {
    return absl::FailedPreconditionError(absl::StrCat("the server put the chunk on GPU ",
                                                      buffer::gpu::UuidToString(*uuid),
                                                      ", which this process does not see"));
  }
  std::string key = absl::StrCat(handle.segment(), "/", buffer::gpu::UuidBytes(*uuid));
  std::byte* base = nullptr;
  {
    absl::MutexLock lock(&mu_);
    auto it = mappings_.find(key);
    if (it != mappings_.end()) {
      if (it->second.handle != *ipc) {
        return absl::DataLossError(absl::StrCat("segment ", handle.segment(),
                                                " came with another IPC handle than before"));
      }
    } else {
      // Opened under the lock: a concurrent Import of the same segment waits for this open
      // instead of opening the handle a second time, which CUDA refuses.
      absl::StatusOr<void*> opened = api_->IpcOpenMemHandle(device, *ipc);
      if (!opened.ok()) {
        return absl::Status(opened.status().code(),
                            absl::StrCat("cannot open the CUDA IPC handle of segment ",
                                         handle.segment(), ": ", opened.status().message()));
      }
      it = mappings_.emplace(key, Mapping{static_cast<std::byte*>(*opened), device, *ipc, 0}).first;
    }
    ++it->second.refs;
    base = it->second.base;
  }
  return buffer::gpu::Buffer(
      std::make_shared<ImportedBlock>(this, std::move(key), base + handle.offset(), handle.length(),
                                      device, std::move(on_release)));
}

void CudaImporter::Unref(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = mappings_.find(key);
  if (it == mappings_.end() || --it->second.refs > 0) return;
  // Closed under the lock, for the same reason the open is.
  (void)api_->IpcCloseMemHandle(it->second.device, it->second.base);
  mappings_.erase(it);
}

size_t CudaImporter::open_handles() const {
  absl::MutexLock lock(&mu_);
  return mappings_.size();
}

absl::StatusOr<CudaImporter*> PrepareCudaRequest(int ordinal, v1::GetRequest* request) {
  absl::StatusOr<CudaImporter*> importer = CudaImporter::ForProcess();
  if (!importer.ok()) return importer.status();
  absl::StatusOr<DeviceUuid> uuid = (*importer)->UuidOf(ordinal);
  if (!uuid.ok()) return uuid.status();
  request->set_gpu_uuid(buffer::gpu::UuidBytes(*uuid));
  v1::ClientIdentity* client = request->mutable_client();
  client->clear_gpu_uuids();
  for (const auto& d : (*importer)->devices())
    client->add_gpu_uuids(buffer::gpu::UuidBytes(d.uuid));
  if (client->boot_id().empty()) {
    // The server matches CUDA IPC clients by boot id.
    client->set_boot_id(buffer::CurrentHostIdentity().boot_id);
  }
  // Tells this process apart from others on the same UNIX socket (the per-client cap).
  if (client->process_id() == 0) client->set_process_id(static_cast<uint64_t>(::getpid()));
  return importer;
}

absl::Status CheckCudaDelivery(int ordinal) {
  absl::StatusOr<CudaImporter*> importer = CudaImporter::ForProcess();
  if (!importer.ok()) return importer.status();
  return (*importer)->UuidOf(ordinal).status();
}

}  // namespace chunkd::client

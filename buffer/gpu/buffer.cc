#include "buffer/gpu/buffer.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace chunkd::buffer::gpu {
namespace {

class OwnedDeviceBlock final : public DeviceBlock {
 public:
  OwnedDeviceBlock(std::byte* data, size_t size, int device, DeviceApi* api)
      : DeviceBlock(data, size, device, api) {}
  ~OwnedDeviceBlock() override {
    if (data() != nullptr) (void)api()->Free(device(), data());
  }
};

}  // namespace

absl::StatusOr<std::shared_ptr<DeviceBlock>> AllocateDeviceBlock(DeviceApi& api, int device,
                                                                 size_t size) {
  std::byte* data = nullptr;
  if (size > 0) {
    absl::StatusOr<void*> p = api.Malloc(device, size);
    if (!p.ok()) return p.status();
    data = static_cast<std::byte*>(*p);
  }
  return std::make_shared<OwnedDeviceBlock>(data, size, device, &api);
}

Buffer::Buffer(std::shared_ptr<const DeviceBlock> block)
    : data_(block ? block->data() : nullptr), size_(block ? block->size() : 0) {
  block_ = std::move(block);
}

absl::StatusOr<Buffer> Buffer::FromCpu(const cpu::Buffer& host, int device, DeviceApi* api) {
  if (api == nullptr) {
    absl::StatusOr<DeviceApi*> cuda = CudaDeviceApi();
    if (!cuda.ok()) return cuda.status();
    api = *cuda;
  }
  absl::StatusOr<std::vector<DeviceInfo>> devices = api->Devices();
  if (!devices.ok()) return devices.status();
  if (device < 0 || static_cast<size_t>(device) >= devices->size()) {
    return absl::InvalidArgumentError(absl::StrCat("no CUDA device with ordinal ", device,
                                                   " (this process sees ", devices->size(), ")"));
  }
  absl::StatusOr<std::shared_ptr<DeviceBlock>> block =
      AllocateDeviceBlock(*api, device, host.size());
  if (!block.ok()) return block.status();
  if (absl::Status s = api->CopyToDevice(device, (*block)->data(), host.data(), host.size());
      !s.ok()) {
    return s;
  }
  return Buffer(std::shared_ptr<const DeviceBlock>(*std::move(block)));
}

absl::StatusOr<cpu::Buffer> Buffer::to_cpu() const {
  auto host = cpu::MutableBuffer::Allocate(size_);
  if (!host.ok()) return host.status();
  if (size_ > 0) {
    if (absl::Status s = block_->api()->CopyToHost(block_->device(), host->data(), data_, size_);
        !s.ok()) {
      return s;
    }
  }
  return std::move(*host).Freeze();
}

Buffer Buffer::Slice(size_t offset, size_t length) const {
  if (offset > size_ || length > size_ - offset) {
    std::fprintf(stderr, "chunkd::buffer::gpu: requirement failed: Slice within the buffer\n");
    std::abort();
  }
  return Buffer(block_, data_ + offset, length);
}

}  // namespace chunkd::buffer::gpu

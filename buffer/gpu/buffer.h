// Device chunk buffers: chunkd::buffer::gpu, in the spirit of zarr.buffer.gpu.
//
// A gpu::Buffer is an immutable view of bytes in GPU memory that shares ownership of the block
// it lives in (a device allocation of its own, a range of the device tier's segment, or a range
// of another process's segment opened through CUDA IPC). Copying or slicing it copies no bytes.
// Its data() is a device pointer: hand it to CUDA (a kernel, cupy, a copy), never dereference
// it on the host; to_cpu() copies the bytes back.
#ifndef CHUNKD_BUFFER_GPU_BUFFER_H_
#define CHUNKD_BUFFER_GPU_BUFFER_H_

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "buffer/cpu/buffer.h"
#include "buffer/gpu/device_api.h"
#include "buffer/memory.h"

namespace chunkd::buffer::gpu {

// A block of device memory (MemoryKind::kDevice). data() is a device pointer.
class DeviceBlock : public Block {
 public:
  int device() const { return device_; }
  // The API that made the block; copies of its bytes go through it.
  DeviceApi* api() const { return api_; }

 protected:
  DeviceBlock(std::byte* data, size_t size, int device, DeviceApi* api)
      : Block(data, size, MemoryKind::kDevice), device_(device), api_(api) {}

 private:
  const int device_;
  DeviceApi* const api_;
};

// A device allocation of its own (api.Malloc), freed when the last reference goes.
// REQUIRES: `api` outlives the block.
absl::StatusOr<std::shared_ptr<DeviceBlock>> AllocateDeviceBlock(DeviceApi& api, int device,
                                                                 size_t size);

class Buffer {
 public:
  // An empty buffer (size 0, no device).
  Buffer() = default;
  // Views all of `block`.
  explicit Buffer(std::shared_ptr<const DeviceBlock> block);

  // A copy of `host` in a new allocation on `device` (through `api`; null: the CUDA runtime).
  // FAILED_PRECONDITION "no CUDA device: ..." without a driver or device, INVALID_ARGUMENT for
  // a device ordinal this process does not have, RESOURCE_EXHAUSTED when the device is full.
  static absl::StatusOr<Buffer> FromCpu(const cpu::Buffer& host, int device = 0,
                                        DeviceApi* api = nullptr);

  // A copy of the bytes in host memory. Errors are the device's (a failed copy).
  absl::StatusOr<cpu::Buffer> to_cpu() const;

  // Device pointer to the first byte (null for an empty default buffer).
  const std::byte* data() const { return data_; }
  void* device_ptr() const { return const_cast<std::byte*>(data_); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // Ordinal (in this process) of the device the bytes are on; -1 for an empty default buffer.
  int device() const { return block_ ? block_->device() : -1; }
  MemoryKind kind() const { return MemoryKind::kDevice; }

  // A view of [offset, offset + length), sharing the block. REQUIRES: offset + length <= size().
  Buffer Slice(size_t offset, size_t length) const;

  const std::shared_ptr<const DeviceBlock>& block() const { return block_; }
  size_t offset_in_block() const {
    return block_ ? static_cast<size_t>(data_ - block_->data()) : 0;
  }

 private:
  Buffer(std::shared_ptr<const DeviceBlock> block, const std::byte* data, size_t size)
      : block_(std::move(block)), data_(data), size_(size) {}

  std::shared_ptr<const DeviceBlock> block_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// zarr's Buffer.to_gpu / from cpu: Buffer::FromCpu under the name the conversion has in zarr.
inline absl::StatusOr<Buffer> ToGpu(const cpu::Buffer& host, int device = 0,
                                    DeviceApi* api = nullptr) {
  return Buffer::FromCpu(host, device, api);
}

}  // namespace chunkd::buffer::gpu

#endif  // CHUNKD_BUFFER_GPU_BUFFER_H_

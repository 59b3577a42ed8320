// The CUDA runtime behind DeviceApi, and the device tier and gpu::Buffer on a real GPU. Every
// test skips with "no CUDA device: ..." where CudaDeviceApi() fails (no driver, no device, or a
// build without the toolkit); tests/unit/device_tier_test.cc covers the same logic everywhere,
// on the host stand-in.
#include <cstring>
#include <set>
#include <string>

#include "buffer/gpu/buffer.h"
#include "buffer/gpu/device_api.h"
#include "gtest/gtest.h"
#include "server/store/device_tier.h"
#include "server/store/lease_table.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using buffer::gpu::DeviceApi;

// The CUDA runtime, or a skip.
#define CUDA_OR_SKIP(api)                                         \
  DeviceApi* api = nullptr;                                       \
  if (auto probed = buffer::gpu::CudaDeviceApi(); !probed.ok()) { \
    GTEST_SKIP() << probed.status().message();                    \
  } else {                                                        \
    api = *probed;                                                \
  }

TEST(GpuDeviceApiTest, DevicesHaveDistinctUuids) {
  CUDA_OR_SKIP(api);
  auto devices = api->Devices();
  ASSERT_TRUE(devices.ok()) << devices.status();
  ASSERT_FALSE(devices->empty());
  std::set<buffer::gpu::DeviceUuid> uuids;
  for (const auto& d : *devices) {
    EXPECT_NE(d.uuid, buffer::gpu::DeviceUuid{}) << d.name;
    EXPECT_GT(d.total_memory, 0u);
    uuids.insert(d.uuid);
  }
  EXPECT_EQ(uuids.size(), devices->size());
}

TEST(GpuDeviceApiTest, MallocExportAndCopiesThroughPinnedMemory) {
  CUDA_OR_SKIP(api);
  constexpr size_t kSize = 8 << 20;
  auto device = api->Malloc(0, kSize);
  ASSERT_TRUE(device.ok()) << device.status();
  auto handle = api->IpcGetMemHandle(0, *device);
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_NE(*handle, buffer::gpu::IpcHandle{});
  auto pinned = api->HostAllocPinned(kSize);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  std::string value = testing::RandomBytes(kSize, 1);
  std::memcpy(*pinned, value.data(), kSize);
  ASSERT_TRUE(api->CopyToDevice(0, *device, *pinned, kSize).ok());
  std::string back(kSize, '\0');
  ASSERT_TRUE(api->CopyToHost(0, back.data(), *device, kSize).ok());  // pageable works too
  EXPECT_TRUE(back == value);
  std::string registered(4096, 'r');
  EXPECT_TRUE(api->HostRegister(registered.data(), registered.size()).ok());
  EXPECT_TRUE(api->HostUnregister(registered.data()).ok());
  EXPECT_TRUE(api->HostFreePinned(*pinned).ok());
  EXPECT_TRUE(api->Free(0, *device).ok());
  EXPECT_EQ(api->Malloc(0, size_t{1} << 62).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(GpuBufferOnCudaTest, ToGpuAndBack) {
  CUDA_OR_SKIP(api);
  std::string value = testing::RandomBytes(3 << 20, 2);
  auto device = buffer::gpu::ToGpu(buffer::cpu::Buffer::CopyOf(value), 0);
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_EQ(device->device(), 0);
  auto host = device->to_cpu();
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_TRUE(host->view() == value);
  auto devices = api->Devices();
  EXPECT_EQ(buffer::gpu::ToGpu(buffer::cpu::Buffer::CopyOf("x"), devices->size()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GpuDeviceTierTest, PromotionsShareOneExportedSegment) {
  CUDA_OR_SKIP(api);
  auto tier = server::DeviceTier::Create(
      api, {.capacity_bytes = 64 << 20, .devices = {0}, .segment_bytes = 32 << 20});
  ASSERT_TRUE(tier.ok()) << tier.status();
  std::vector<server::DeviceChunk> chunks;
  for (int i = 0; i < 16; ++i) {
    std::string value = testing::RandomBytes((1 << 20) + i * 4096, 10 + i);
    auto chunk =
        (*tier)->Promote(0, "k" + std::to_string(i), 1, buffer::cpu::Buffer::CopyOf(value));
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    auto back = chunk->buffer.to_cpu();
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(back->view() == value) << i;
    chunks.push_back(*chunk);
  }
  EXPECT_EQ((*tier)->stats().ipc_exports, 1u);
  for (const auto& c : chunks) EXPECT_EQ(c.ipc_handle, chunks[0].ipc_handle);
  // Eviction keeps the budget and skips leased blocks.
  server::LeaseTable leases({});
  ASSERT_TRUE(leases.Grant("test", chunks[0].buffer.block(), chunks[0].buffer.size()).ok());
  chunks.clear();
  for (int i = 0; i < 64; ++i) {
    ASSERT_TRUE((*tier)
                    ->Promote(0, "m" + std::to_string(i), 1,
                              buffer::cpu::Buffer::CopyOf(std::string(1 << 20, 'm')))
                    .ok());
    ASSERT_LE((*tier)->stats().segment_bytes, 64u << 20);
  }
  EXPECT_TRUE((*tier)->Lookup(0, "k0", 1).has_value());
  EXPECT_GT((*tier)->stats().evictions, 0u);
}

}  // namespace
}  // namespace chunkd

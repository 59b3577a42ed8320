// The device tier, CUDA IPC delivery and import, against the host-memory stand-in of the CUDA
// runtime (buffer/gpu/host_standin.h): the logic above DeviceApi, run on machines without a GPU.
// The same paths on a real GPU: tests/unit/gpu_*_test.cc and tests/integration/cuda_test.cc.
#include "server/store/device_tier.h"

#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "buffer/extent_allocator.h"
#include "buffer/gpu/buffer.h"
#include "buffer/gpu/host_standin.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/cuda_import.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "server/backend/memory/memory_backend.h"
#include "server/services/chunkd_service.h"
#include "server/store/lease_table.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using buffer::ExtentAllocator;
using buffer::cpu::Buffer;
using buffer::gpu::HostStandInDeviceApi;
using buffer::gpu::NewHostStandInDeviceApi;
using server::CudaChoice;
using server::CudaRequest;
using server::DeviceChunk;
using server::DeviceTier;
using server::DeviceTierOptions;
using server::LeaseTable;
using server::LeaseTableOptions;

constexpr uint64_t kKiB = 1024;

Buffer Bytes(const std::string& s) { return Buffer::CopyOf(s); }

// The bytes of a chunk as the device holds them (stand-in device memory is host memory).
std::string DeviceBytes(const DeviceChunk& chunk) {
  auto host = chunk.buffer.to_cpu();
  EXPECT_TRUE(host.ok()) << host.status();
  return host.ok() ? std::string(host->view()) : "";
}

// ---------------------------------------------------------------------------------------------
// ExtentAllocator (shared with the shared-memory arena)

TEST(ExtentAllocatorTest, BestFitAndCoalescing) {
  ExtentAllocator a(100);
  auto x = a.Allocate(10), y = a.Allocate(20), z = a.Allocate(30);
  ASSERT_TRUE(x && y && z);
  EXPECT_EQ(*x, 0u);
  EXPECT_EQ(*y, 10u);
  EXPECT_EQ(*z, 30u);
  EXPECT_EQ(a.used(), 60u);
  a.Free(*y, 20);  // a hole of 20 between x and z; 40 free at the end
  EXPECT_EQ(a.BestFit(15), 20u);
  EXPECT_EQ(a.Allocate(15), 10u);  // the smallest extent that fits, not the first
  EXPECT_EQ(a.BestFit(41), std::nullopt);
  EXPECT_EQ(a.Allocate(41), std::nullopt);
  a.Free(10, 15);
  a.Free(*x, 10);
  a.Free(*z, 30);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(a.free_extents(), 1u);  // every neighbour coalesced
  EXPECT_EQ(a.largest_free(), 100u);
}

// ---------------------------------------------------------------------------------------------
// gpu::Buffer

TEST(GpuBufferTest, RoundTripThroughTheDevice) {
  auto api = NewHostStandInDeviceApi(2);
  std::string value = testing::RandomBytes(100 * kKiB + 3, 1);
  auto device = buffer::gpu::Buffer::FromCpu(Bytes(value), 1, api.get());
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_EQ(device->device(), 1);
  EXPECT_EQ(device->size(), value.size());
  EXPECT_EQ(device->kind(), buffer::MemoryKind::kDevice);
  auto host = device->to_cpu();
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_TRUE(host->view() == value);
  auto slice = device->Slice(10, 100).to_cpu();
  ASSERT_TRUE(slice.ok());
  EXPECT_EQ(slice->view(), value.substr(10, 100));
  EXPECT_EQ(api->counters().device_bytes, value.size());
  device = absl::InternalError("dropped");
  EXPECT_EQ(api->counters().device_bytes, 0u);  // freed with the last reference
}

TEST(GpuBufferTest, ExplicitErrors) {
  auto api = NewHostStandInDeviceApi(1, 1024);
  EXPECT_EQ(buffer::gpu::ToGpu(Bytes("x"), 3, api.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(buffer::gpu::ToGpu(Bytes(std::string(2048, 'x')), 0, api.get()).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Through the CUDA runtime: on a machine without a driver or device, a clear error.
  auto cuda = buffer::gpu::ToGpu(Bytes("x"));
  if (!buffer::gpu::CudaDeviceApi().ok()) {
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(absl::StartsWith(cuda.status().message(), "no CUDA device: ")) << cuda.status();
  }
  EXPECT_TRUE(buffer::gpu::Buffer().to_cpu().ok());  // empty: nothing to copy
}

TEST(GpuBufferTest, UuidStrings) {
  buffer::gpu::DeviceUuid u{};
  for (int i = 0; i < 16; ++i) u[i] = static_cast<uint8_t>(0xa0 + i);
  EXPECT_EQ(buffer::gpu::UuidToString(u), "GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf");
  EXPECT_EQ(*buffer::gpu::UuidFromBytes(buffer::gpu::UuidBytes(u)), u);
  EXPECT_FALSE(buffer::gpu::UuidFromBytes("short").ok());
}

// ---------------------------------------------------------------------------------------------
// DeviceTier

class DeviceTierTest : public ::testing::Test {
 protected:
  void Make(uint64_t capacity, uint64_t segment, int devices = 1) {
    api_ = NewHostStandInDeviceApi(devices);
    DeviceTierOptions options;
    options.capacity_bytes = capacity;
    options.segment_bytes = segment;
    options.staging_bytes = 16 * kKiB;  // several staging rounds per value
    auto tier = DeviceTier::Create(api_.get(), options);
    ASSERT_TRUE(tier.ok()) << tier.status();
    tier_ = *std::move(tier);
  }
  absl::StatusOr<DeviceChunk> Promote(const std::string& key, const std::string& value,
                                      uint64_t generation = 1, size_t device = 0) {
    return tier_->Promote(device, key, generation, Bytes(value));
  }

  // Declared first: outlives the tier and every block.
  std::unique_ptr<HostStandInDeviceApi> api_;
  std::unique_ptr<DeviceTier> tier_;
};

TEST_F(DeviceTierTest, PromotionCopiesEqualBytesThroughPinnedStaging) {
  Make(4 << 20, 1 << 20);
  std::string value = testing::RandomBytes(100 * kKiB + 7, 2);
  auto chunk = Promote("a/c/0", value);
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  EXPECT_EQ(chunk->buffer.size(), value.size());
  EXPECT_TRUE(DeviceBytes(*chunk) == value);
  EXPECT_EQ(chunk->device_uuid, HostStandInDeviceApi::StandInUuid(0));
  EXPECT_GT(api_->counters().pinned_allocs, 0u);
  EXPECT_EQ(api_->counters().copies_to_device, 7u);  // 16 KiB of staging at a time
  // A second Promote of the same generation is a hit: no copy.
  auto again = Promote("a/c/0", value);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->buffer.data(), chunk->buffer.data());
  EXPECT_EQ(api_->counters().copies_to_device, 7u);
  auto s = tier_->stats();
  EXPECT_EQ(s.promotions, 1u);
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.promoted_bytes, value.size());
}

TEST_F(DeviceTierTest, SegmentIsExportedOnceAndSharedByEveryBlockInIt) {
  Make(1 << 20, 1 << 20);
  std::vector<DeviceChunk> chunks;
  std::map<uint64_t, uint64_t> extents;
  for (int i = 0; i < 20; ++i) {
    std::string value = testing::RandomBytes(10 * kKiB + i, 100 + i);
    auto chunk = Promote("k" + std::to_string(i), value);
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    EXPECT_TRUE(DeviceBytes(*chunk) == value);
    chunks.push_back(*chunk);
    extents[chunk->offset] = chunk->buffer.size();
  }
  EXPECT_EQ(api_->counters().ipc_exports, 1u);
  EXPECT_EQ(api_->counters().mallocs, 1u);
  EXPECT_EQ(tier_->stats().ipc_exports, 1u);
  for (const DeviceChunk& c : chunks) {
    EXPECT_EQ(c.segment, chunks[0].segment);
    EXPECT_EQ(c.ipc_handle, chunks[0].ipc_handle);
    EXPECT_EQ(c.offset % 512, 0u);
  }
  // Blocks do not overlap.
  uint64_t end = 0;
  for (const auto& [offset, size] : extents) {
    EXPECT_GE(offset, end);
    end = offset + size;
  }
}

TEST_F(DeviceTierTest, BudgetIsNeverExceeded) {
  const uint64_t capacity = 1 << 20;
  Make(capacity, 256 * kKiB);
  LeaseTable leases({.ttl = absl::Seconds(30)});
  std::mt19937_64 rng(7);
  std::vector<uint64_t> held;
  for (int i = 0; i < 300; ++i) {
    // Sizes up to 400 KiB: some values need a segment of their own.
    size_t size = 1 + rng() % (400 * kKiB);
    std::string value(size, static_cast<char>('a' + i % 26));
    auto chunk = Promote("k" + std::to_string(rng() % 40), value, i + 1);
    if (chunk.ok()) {
      EXPECT_EQ(chunk->buffer.size(), size);
      if (rng() % 8 == 0) held.push_back(*leases.Grant("test", chunk->buffer.block(), size));
    } else {
      EXPECT_EQ(chunk.status().code(), absl::StatusCode::kResourceExhausted) << chunk.status();
    }
    if (held.size() > 3) {
      leases.Release({held.front()});
      held.erase(held.begin());
    }
    ASSERT_LE(api_->device_bytes(0), capacity);
    auto s = tier_->stats();
    ASSERT_LE(s.segment_bytes, capacity);
    ASSERT_LE(s.used_bytes, s.segment_bytes);
  }
  EXPECT_LE(api_->counters().peak_device_bytes, capacity);
  EXPECT_GT(tier_->stats().evictions, 0u);
}

TEST_F(DeviceTierTest, EvictionSkipsLeasedBlocksAndKeepsTheirBytes) {
  Make(256 * kKiB, 256 * kKiB);
  LeaseTable leases({.ttl = absl::Seconds(30)});
  std::string a = testing::RandomBytes(64 * kKiB, 3);
  auto leased = Promote("a", a);
  ASSERT_TRUE(leased.ok());
  auto lease = leases.Grant("test", leased->buffer.block(), a.size());
  ASSERT_TRUE(lease.ok());
  DeviceChunk a_chunk = *leased;
  leased = absl::InternalError("dropped");  // only the lease holds it now, and the tier
  for (int i = 0; i < 20; ++i) {
    auto chunk = Promote("b" + std::to_string(i), std::string(64 * kKiB, 'b'));
    ASSERT_TRUE(chunk.ok()) << chunk.status();
  }
  EXPECT_GE(tier_->stats().evictions, 17u);
  // The leased value stayed in the tier and in place; its memory was never reused.
  auto hit = tier_->Lookup(0, "a", 1);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->offset, a_chunk.offset);
  EXPECT_TRUE(DeviceBytes(*hit) == a);
  hit.reset();
  a_chunk = DeviceChunk();
  // Released, it is evicted like the others.
  EXPECT_TRUE(leases.Release({*lease}).empty());
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Promote("c" + std::to_string(i), std::string(64 * kKiB, 'c')).ok());
  }
  EXPECT_FALSE(tier_->Lookup(0, "a", 1).has_value());
}

TEST_F(DeviceTierTest, EveryBlockLeasedMeansResourceExhaustedNotOverBudget) {
  Make(256 * kKiB, 256 * kKiB);
  LeaseTable leases({.ttl = absl::Seconds(30)});
  for (int i = 0; i < 4; ++i) {
    auto chunk = Promote("k" + std::to_string(i), std::string(64 * kKiB, 'x'));
    ASSERT_TRUE(chunk.ok());
    ASSERT_TRUE(leases.Grant("test", chunk->buffer.block(), 64 * kKiB).ok());
  }
  auto more = Promote("one-more", std::string(64 * kKiB, 'y'));
  EXPECT_EQ(more.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(more.status().message(), "leased")) << more.status();
  EXPECT_LE(api_->device_bytes(0), 256 * kKiB);
  EXPECT_EQ(tier_->stats().entries, 4u);
}

TEST_F(DeviceTierTest, ValuesLargerThanTheBudgetAreNotAdmitted) {
  Make(256 * kKiB, 256 * kKiB);
  auto chunk = Promote("huge", std::string(300 * kKiB, 'h'));
  EXPECT_EQ(chunk.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(tier_->stats().not_admitted, 1u);
  EXPECT_EQ(api_->counters().mallocs, 0u);
}

TEST_F(DeviceTierTest, LargeValueGetsItsOwnSegmentReleasedWhenEvicted) {
  Make(1 << 20, 128 * kKiB);
  std::string big = testing::RandomBytes(600 * kKiB, 4);
  auto chunk = Promote("big", big);
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  EXPECT_TRUE(DeviceBytes(*chunk) == big);
  EXPECT_EQ(api_->device_bytes(0), 600 * kKiB);
  chunk = absl::InternalError("dropped");
  // Room for a full budget of small values means the big one goes, with its segment.
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(Promote("s" + std::to_string(i), std::string(64 * kKiB, 's')).ok());
  }
  EXPECT_FALSE(tier_->Lookup(0, "big", 1).has_value());
  EXPECT_LE(api_->device_bytes(0), 1u << 20);
  EXPECT_EQ(tier_->stats().segment_bytes, api_->device_bytes(0));
}

TEST_F(DeviceTierTest, NewGenerationReplacesTheOldOne) {
  Make(1 << 20, 1 << 20);
  ASSERT_TRUE(Promote("k", "old value", 1).ok());
  auto v2 = Promote("k", "new value", 2);
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(DeviceBytes(*v2), "new value");
  EXPECT_FALSE(tier_->Lookup(0, "k", 1).has_value());
  EXPECT_TRUE(tier_->Lookup(0, "k", 2).has_value());
  EXPECT_EQ(tier_->stats().entries, 1u);
}

TEST_F(DeviceTierTest, DevicesAreFoundByUuidAndKeptApart) {
  Make(1 << 20, 1 << 20, 2);
  auto d1 = tier_->FindDevice(HostStandInDeviceApi::StandInUuid(1));
  ASSERT_TRUE(d1.has_value());
  EXPECT_EQ(*d1, 1u);
  EXPECT_FALSE(tier_->FindDevice(HostStandInDeviceApi::StandInUuid(5)).has_value());
  auto chunk = Promote("k", "on gpu 1", 1, *d1);
  ASSERT_TRUE(chunk.ok());
  EXPECT_EQ(chunk->buffer.device(), 1);
  EXPECT_EQ(chunk->device_uuid, HostStandInDeviceApi::StandInUuid(1));
  EXPECT_EQ(api_->device_bytes(0), 0u);
  EXPECT_FALSE(tier_->Lookup(0, "k", 1).has_value());
}

TEST(DeviceTierCreateTest, ExplicitErrors) {
  auto api = NewHostStandInDeviceApi(1);
  EXPECT_EQ(DeviceTier::Create(api.get(), {.capacity_bytes = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      DeviceTier::Create(api.get(), {.capacity_bytes = 1 << 20, .devices = {2}}).status().code(),
      absl::StatusCode::kInvalidArgument);
  auto none = NewHostStandInDeviceApi(0);
  EXPECT_EQ(DeviceTier::Create(none.get(), {.capacity_bytes = 1 << 20}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*server::ParseCudaDevices("all"), std::vector<int>());
  EXPECT_EQ(*server::ParseCudaDevices("1,0,1"), (std::vector<int>{1, 0}));
  EXPECT_FALSE(server::ParseCudaDevices("gpu0").ok());
}

// Which delivery a Get gets.
TEST(ChooseCudaDeliveryTest, NeedsATierTheSameHostAndAKnownGpu) {
  auto api = NewHostStandInDeviceApi(1);
  auto tier = *DeviceTier::Create(api.get(), {.capacity_bytes = 1 << 20});
  CudaRequest request{.wanted = true,
                      .only = false,
                      .gpu_uuid = buffer::gpu::UuidBytes(HostStandInDeviceApi::StandInUuid(0)),
                      .client_boot_id = "boot"};
  CudaChoice offer = server::ChooseCudaDelivery(tier.get(), "boot", request);
  EXPECT_EQ(offer.decision, CudaChoice::kOffer);
  EXPECT_EQ(offer.device, 0u);

  EXPECT_EQ(server::ChooseCudaDelivery(nullptr, "boot", request).decision, CudaChoice::kFallback);
  EXPECT_EQ(server::ChooseCudaDelivery(tier.get(), "other boot", request).decision,
            CudaChoice::kFallback);

  CudaRequest unknown = request;
  unknown.gpu_uuid = buffer::gpu::UuidBytes(HostStandInDeviceApi::StandInUuid(9));
  CudaChoice fallback = server::ChooseCudaDelivery(tier.get(), "boot", unknown);
  EXPECT_EQ(fallback.decision, CudaChoice::kFallback);
  EXPECT_TRUE(fallback.unknown_gpu);
  unknown.only = true;
  CudaChoice refuse = server::ChooseCudaDelivery(tier.get(), "boot", unknown);
  EXPECT_EQ(refuse.decision, CudaChoice::kRefuse);
  EXPECT_EQ(refuse.why.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(refuse.why.message(),
            "GPU " + buffer::gpu::UuidToString(HostStandInDeviceApi::StandInUuid(9)) +
                " is not visible to this server");

  CudaRequest no_uuid = request;
  no_uuid.gpu_uuid.clear();
  no_uuid.only = true;
  EXPECT_EQ(server::ChooseCudaDelivery(tier.get(), "boot", no_uuid).why.code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// CudaImporter: the client side, with a second stand-in instance playing the client process.

class CudaImporterTest : public DeviceTierTest {
 protected:
  void SetUp() override {
    Make(1 << 20, 512 * kKiB);
    client_api_ = NewHostStandInDeviceApi(1);
    importer_ = *client::CudaImporter::Create(client_api_.get());
  }
  static v1::CudaIpcHandle HandleOf(const DeviceChunk& chunk) {
    v1::CudaIpcHandle h;
    h.set_ipc_handle(buffer::gpu::IpcHandleBytes(chunk.ipc_handle));
    h.set_segment(chunk.segment);
    h.set_offset(chunk.offset);
    h.set_length(chunk.buffer.size());
    h.set_device_uuid(buffer::gpu::UuidBytes(chunk.device_uuid));
    return h;
  }

  std::unique_ptr<HostStandInDeviceApi> client_api_;
  std::unique_ptr<client::CudaImporter> importer_;
};

TEST_F(CudaImporterTest, OpensEachSegmentOnceAndClosesItWithTheLastBuffer) {
  std::string a = testing::RandomBytes(40 * kKiB, 5), b = testing::RandomBytes(50 * kKiB, 6);
  auto ca = Promote("a", a), cb = Promote("b", b);
  ASSERT_TRUE(ca.ok() && cb.ok());
  ASSERT_EQ(ca->segment, cb->segment);
  int released = 0;
  auto ia = importer_->Import(HandleOf(*ca), [&] { ++released; });
  auto ib = importer_->Import(HandleOf(*cb), [&] { ++released; });
  ASSERT_TRUE(ia.ok()) << ia.status();
  ASSERT_TRUE(ib.ok()) << ib.status();
  EXPECT_EQ(client_api_->counters().ipc_opens, 1u);
  EXPECT_EQ(importer_->open_handles(), 1u);
  EXPECT_TRUE(ia->to_cpu()->view() == a);
  EXPECT_TRUE(ib->to_cpu()->view() == b);
  auto copy = ia->Slice(5, 10);  // a slice keeps the mapping too
  ia = absl::InternalError("dropped");
  EXPECT_EQ(released, 0);
  copy = buffer::gpu::Buffer();
  EXPECT_EQ(released, 1);
  EXPECT_EQ(importer_->open_handles(), 1u);
  ib = absl::InternalError("dropped");
  EXPECT_EQ(released, 2);
  EXPECT_EQ(importer_->open_handles(), 0u);
  EXPECT_EQ(client_api_->counters().ipc_closes, 1u);
  // Opened again for the next buffer.
  auto again = importer_->Import(HandleOf(*ca), nullptr);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(client_api_->counters().ipc_opens, 2u);
}

// A device buffer's lease goes back only once the work this process queued on the GPU is done
// (a kernel may still read the chunk when the buffer's last reference goes) and the segment's
// mapping is closed when it was its last buffer: the server may write or free that memory as
// soon as the lease is back.
TEST_F(CudaImporterTest, TheLeaseGoesBackAfterTheDeviceIsSynchronizedAndTheMappingClosed) {
  auto chunk = Promote("a", std::string(40 * kKiB, 'a'));
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  uint64_t syncs_at_release = 0;
  size_t open_at_release = 99;
  auto imported = importer_->Import(HandleOf(*chunk), [&] {
    syncs_at_release = client_api_->counters().synchronizes;
    open_at_release = client_api_->open_handles();
  });
  ASSERT_TRUE(imported.ok()) << imported.status();
  imported = absl::InternalError("dropped");
  EXPECT_EQ(syncs_at_release, 1u);
  EXPECT_EQ(open_at_release, 0u);
}

// The stand-in refuses what CUDA leaves undefined: freeing memory whose IPC handle another
// process still has open.
TEST_F(CudaImporterTest, TheStandInRefusesToFreeMemoryAnotherProcessHasOpen) {
  void* memory = *api_->Malloc(0, 4096);
  auto handle = api_->IpcGetMemHandle(0, memory);
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto opened = client_api_->IpcOpenMemHandle(0, *handle);
  ASSERT_TRUE(opened.ok()) << opened.status();
  absl::Status freed = api_->Free(0, memory);
  EXPECT_EQ(freed.code(), absl::StatusCode::kFailedPrecondition) << freed;
  EXPECT_EQ(api_->counters().frees_with_open_imports, 1u);
  ASSERT_TRUE(client_api_->IpcCloseMemHandle(0, *opened).ok());
  EXPECT_TRUE(api_->Free(0, memory).ok());
}

TEST_F(CudaImporterTest, ConcurrentImportsOpenTheHandleOnce) {
  std::vector<DeviceChunk> chunks;
  for (int i = 0; i < 8; ++i) {
    chunks.push_back(*Promote("k" + std::to_string(i), std::string(8 * kKiB, 'a' + i)));
  }
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        auto b = importer_->Import(HandleOf(chunks[(t + i) % 8]), nullptr);
        if (!b.ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);  // a second open of one handle would have failed
  EXPECT_EQ(importer_->open_handles(), 0u);
  EXPECT_EQ(client_api_->counters().ipc_opens, client_api_->counters().ipc_closes);
}

TEST_F(CudaImporterTest, AGpuThisProcessDoesNotSeeIsAnError) {
  auto other = std::make_unique<HostStandInDeviceApi>(
      std::vector<buffer::gpu::DeviceUuid>{HostStandInDeviceApi::StandInUuid(7)}, 1 << 20);
  auto importer = *client::CudaImporter::Create(other.get());
  auto chunk = Promote("k", "v");
  ASSERT_TRUE(chunk.ok());
  auto b = importer->Import(HandleOf(*chunk), nullptr);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(b.status().message(), "does not see")) << b.status();
  v1::CudaIpcHandle bad = HandleOf(*chunk);
  bad.set_ipc_handle("short");
  EXPECT_EQ(importer_->Import(bad, nullptr).status().code(), absl::StatusCode::kDataLoss);
}

// ---------------------------------------------------------------------------------------------
// The service: CUDA IPC delivery over gRPC, with the device tier on the stand-in.

class CudaServiceTest : public ::testing::Test {
 protected:
  void Start(uint64_t device_capacity = 1 << 20, uint64_t segment = 1 << 20) {
    api_ = NewHostStandInDeviceApi(1);
    client_api_ = NewHostStandInDeviceApi(1);
    tier_ = *DeviceTier::Create(api_.get(),
                                {.capacity_bytes = device_capacity, .segment_bytes = segment});
    leases_ = std::make_unique<LeaseTable>(LeaseTableOptions{.ttl = absl::Seconds(30)});
    store_ = std::make_unique<server::ChunkStore>(
        server::NewMemoryBackend(server::BackendOptions{}), server::ChunkStoreOptions{});
    server::ServiceOptions options;
    options.leases = leases_.get();
    options.device_tier = tier_.get();
    options.host = buffer::CurrentHostIdentity();
    core_ = std::make_unique<server::ServiceCore>(store_.get(), options);
    service_ = std::make_unique<server::ChunkdService>(core_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    engine_ = std::make_unique<server::rpc::Engine>(builder, 1);
    service_->Serve(engine_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    engine_->Start();
    stub_ = v1::Chunkd::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                    grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
    if (engine_) engine_->Shutdown();
  }

  void Put(const std::string& key, const std::string& value) {
    ASSERT_TRUE(store_->Write(key, Bytes(value), {}).ok());
  }

  struct Reply {
    grpc::Status status;
    v1::GetHeader header;
    std::string data;
  };
  Reply Get(const std::string& key, std::vector<v1::Delivery> accept,
            const buffer::gpu::DeviceUuid& uuid, std::string boot_id = "",
            std::optional<std::pair<int64_t, int64_t>> range = std::nullopt) {
    v1::GetRequest request;
    request.set_key(key);
    for (auto d : accept) request.add_accept(d);
    request.set_gpu_uuid(buffer::gpu::UuidBytes(uuid));
    request.mutable_client()->set_boot_id(boot_id.empty() ? buffer::CurrentHostIdentity().boot_id
                                                          : boot_id);
    request.mutable_client()->add_gpu_uuids(buffer::gpu::UuidBytes(uuid));
    if (range) {
      request.mutable_range()->mutable_bounded()->set_start(range->first);
      request.mutable_range()->mutable_bounded()->set_end(range->second);
    }
    grpc::ClientContext context;
    auto reader = stub_->Get(&context, request);
    Reply reply;
    v1::GetResponse response;
    while (reader->Read(&response)) {
      if (response.has_header()) reply.header = response.header();
      reply.data += response.data();
    }
    reply.status = reader->Finish();
    return reply;
  }
  // What a client process reads through the handle: opens it, copies, closes.
  std::string ReadThroughHandle(const v1::CudaIpcHandle& h) {
    auto handle = buffer::gpu::IpcHandleFromBytes(h.ipc_handle());
    EXPECT_TRUE(handle.ok());
    auto base = client_api_->IpcOpenMemHandle(0, *handle);
    EXPECT_TRUE(base.ok()) << base.status();
    std::string out(h.length(), '\0');
    EXPECT_TRUE(
        client_api_
            ->CopyToHost(0, out.data(), static_cast<std::byte*>(*base) + h.offset(), h.length())
            .ok());
    EXPECT_TRUE(client_api_->IpcCloseMemHandle(0, *base).ok());
    return out;
  }
  void Release(uint64_t lease) {
    grpc::ClientContext context;
    v1::ReleaseRequest request;
    v1::ReleaseResponse response;
    request.add_lease_ids(lease);
    ASSERT_TRUE(stub_->Release(&context, request, &response).ok());
    EXPECT_EQ(response.unknown_lease_ids_size(), 0);
  }
  uint64_t InfoCounter(const std::string& name) {
    grpc::ClientContext context;
    v1::ServerInfoResponse info;
    EXPECT_TRUE(stub_->ServerInfo(&context, v1::ServerInfoRequest(), &info).ok());
    auto it = info.counters().find(name);
    return it == info.counters().end() ? 0 : it->second;
  }

  const buffer::gpu::DeviceUuid gpu0_ = HostStandInDeviceApi::StandInUuid(0);
  const buffer::gpu::DeviceUuid unknown_gpu_ = HostStandInDeviceApi::StandInUuid(42);
  std::unique_ptr<HostStandInDeviceApi> api_, client_api_;
  std::unique_ptr<DeviceTier> tier_;
  std::unique_ptr<LeaseTable> leases_;
  std::unique_ptr<server::ChunkStore> store_;
  std::unique_ptr<server::ServiceCore> core_;
  std::unique_ptr<server::ChunkdService> service_;
  std::unique_ptr<server::rpc::Engine> engine_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Chunkd::Stub> stub_;
};

TEST_F(CudaServiceTest, ColocatedGpuClientGetsAHandleAndALease) {
  Start();
  std::string value = testing::RandomBytes(200 * kKiB, 8);
  Put("arr/c/0", value);
  Reply r = Get("arr/c/0", {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, gpu0_);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.header.delivery(), v1::DELIVERY_CUDA_IPC);
  EXPECT_TRUE(r.data.empty());  // no byte over the connection
  EXPECT_EQ(r.header.cuda().ipc_handle().size(), 64u);
  EXPECT_EQ(r.header.cuda().length(), value.size());
  EXPECT_EQ(r.header.cuda().device_uuid(), buffer::gpu::UuidBytes(gpu0_));
  EXPECT_NE(r.header.lease().id(), 0u);
  EXPECT_TRUE(ReadThroughHandle(r.header.cuda()) == value);
  EXPECT_EQ(leases_->stats().active, 1u);

  // A range is a handle into the same block.
  Reply part = Get("arr/c/0", {v1::DELIVERY_CUDA_IPC}, gpu0_, "", std::make_pair(1000, 5000));
  ASSERT_TRUE(part.status.ok()) << part.status.error_message();
  EXPECT_EQ(part.header.cuda().offset(), r.header.cuda().offset() + 1000);
  EXPECT_EQ(part.header.cuda().segment(), r.header.cuda().segment());
  EXPECT_EQ(ReadThroughHandle(part.header.cuda()), value.substr(1000, 4000));
  EXPECT_EQ(InfoCounter("device_promotions"), 1u);
  EXPECT_EQ(InfoCounter("device_hits"), 1u);
  EXPECT_EQ(InfoCounter("gets_cuda"), 2u);
  EXPECT_EQ(InfoCounter("device_ipc_exports"), 1u);
  Release(r.header.lease().id());
  Release(part.header.lease().id());
  EXPECT_EQ(leases_->stats().active, 0u);

  grpc::ClientContext context;
  v1::ServerInfoResponse info;
  ASSERT_TRUE(stub_->ServerInfo(&context, v1::ServerInfoRequest(), &info).ok());
  EXPECT_NE(std::find(info.deliveries().begin(), info.deliveries().end(), v1::DELIVERY_CUDA_IPC),
            info.deliveries().end());
  // The heap allocator: no shared memory here, so no DELIVERY_SHM.
  EXPECT_EQ(std::find(info.deliveries().begin(), info.deliveries().end(), v1::DELIVERY_SHM),
            info.deliveries().end());
  bool device_tier = false;
  for (const auto& t : info.tiers()) {
    if (t.tier() == "device") {
      device_tier = true;
      EXPECT_EQ(t.capacity_bytes(), 1u << 20);
      EXPECT_EQ(t.entries(), 1u);
      EXPECT_GE(t.used_bytes(), value.size());
    }
  }
  EXPECT_TRUE(device_tier);
}

TEST_F(CudaServiceTest, UnknownGpuFallsBackToInlineOrFailsWhenOnlyCudaIsAccepted) {
  Start();
  Put("k", "value bytes");
  Reply fallback = Get("k", {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, unknown_gpu_);
  ASSERT_TRUE(fallback.status.ok()) << fallback.status.error_message();
  EXPECT_EQ(fallback.header.delivery(), v1::DELIVERY_INLINE);
  EXPECT_EQ(fallback.data, "value bytes");
  EXPECT_EQ(InfoCounter("cuda_fallbacks"), 1u);
  EXPECT_EQ(InfoCounter("cuda_unknown_gpu"), 1u);

  Reply refused = Get("k", {v1::DELIVERY_CUDA_IPC}, unknown_gpu_);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(refused.status.error_message(),
            "GPU " + buffer::gpu::UuidToString(unknown_gpu_) + " is not visible to this server");
  EXPECT_EQ(InfoCounter("cuda_unknown_gpu"), 2u);
  EXPECT_EQ(leases_->stats().granted, 0u);
  EXPECT_EQ(tier_->stats().promotions, 0u);
}

TEST_F(CudaServiceTest, ClientOnAnotherHostGetsInline) {
  Start();
  Put("k", "remote");
  Reply r = Get("k", {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, gpu0_, "another-boot-id");
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.header.delivery(), v1::DELIVERY_INLINE);
  EXPECT_EQ(r.data, "remote");
  EXPECT_EQ(InfoCounter("cuda_fallbacks"), 1u);
  Reply only = Get("k", {v1::DELIVERY_CUDA_IPC}, gpu0_, "another-boot-id");
  EXPECT_EQ(only.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(CudaServiceTest, EvictionDropsTheDeviceCopyOnlyAndLeasedChunksStayPut) {
  Start(256 * kKiB, 256 * kKiB);
  std::vector<std::string> values;
  for (int i = 0; i < 12; ++i) {
    values.push_back(testing::RandomBytes(60 * kKiB, 50 + i));
    Put("k" + std::to_string(i), values.back());
  }
  // k0 is held by a lease through the whole run; the others come and go.
  Reply held = Get("k0", {v1::DELIVERY_CUDA_IPC}, gpu0_);
  ASSERT_EQ(held.header.delivery(), v1::DELIVERY_CUDA_IPC);
  for (int round = 0; round < 3; ++round) {
    for (int i = 1; i < 12; ++i) {
      Reply r = Get("k" + std::to_string(i), {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, gpu0_);
      ASSERT_TRUE(r.status.ok()) << r.status.error_message();
      ASSERT_EQ(r.header.delivery(), v1::DELIVERY_CUDA_IPC);
      ASSERT_TRUE(ReadThroughHandle(r.header.cuda()) == values[i]) << "k" << i;
      Release(r.header.lease().id());
      ASSERT_LE(api_->device_bytes(0), 256 * kKiB);
    }
  }
  EXPECT_GT(tier_->stats().evictions, 20u);
  // The leased chunk's bytes were never overwritten.
  EXPECT_TRUE(ReadThroughHandle(held.header.cuda()) == values[0]);
  Release(held.header.lease().id());
  // Evicted values are not lost: the store still has them, and they come back to the device.
  for (int i = 0; i < 12; ++i) {
    Reply r = Get("k" + std::to_string(i), {v1::DELIVERY_CUDA_IPC}, gpu0_);
    ASSERT_TRUE(r.status.ok());
    EXPECT_TRUE(ReadThroughHandle(r.header.cuda()) == values[i]);
    Release(r.header.lease().id());
    Reply inline_reply = Get("k" + std::to_string(i), {v1::DELIVERY_INLINE}, gpu0_);
    EXPECT_TRUE(inline_reply.data == values[i]);
  }
}

TEST_F(CudaServiceTest, AllDeviceMemoryLeasedFallsBackToInline) {
  Start(128 * kKiB, 128 * kKiB);
  Put("a", std::string(100 * kKiB, 'a'));
  Put("b", std::string(100 * kKiB, 'b'));
  Reply a = Get("a", {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, gpu0_);
  ASSERT_EQ(a.header.delivery(), v1::DELIVERY_CUDA_IPC);
  Reply b = Get("b", {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE}, gpu0_);
  ASSERT_TRUE(b.status.ok());
  EXPECT_EQ(b.header.delivery(), v1::DELIVERY_INLINE);
  EXPECT_EQ(b.data, std::string(100 * kKiB, 'b'));
  Reply b_only = Get("b", {v1::DELIVERY_CUDA_IPC}, gpu0_);
  EXPECT_EQ(b_only.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  Release(a.header.lease().id());
}

}  // namespace
}  // namespace chunkd

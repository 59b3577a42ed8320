// CUDA IPC delivery with the real chunkd: the server (another process) promotes chunks into its
// device tier and exports them; this process imports them through the client library.
//
// Tests that need a GPU skip with "no CUDA device: ..." where CudaDeviceApi() fails; the
// host-only behaviour (the server says once that it runs without CUDA, chunkctl refuses
// --delivery=cuda) is checked on machines without one.
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "buffer/gpu/device_api.h"
#include "client/client.h"
#include "client/cuda_import.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using testing::ServerProcess;
using testing::TempDir;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

size_t Count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

class CudaTest : public ::testing::Test {
 protected:
  void StartServer(std::vector<std::string> extra = {}) {
    std::filesystem::create_directories(dir_.Join("store"));
    std::vector<std::string> flags = {"--listen=127.0.0.1:0", "--store=" + dir_.Join("store"),
                                      "--fsync=false", "--shm_dir=" + shm_.path()};
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  std::unique_ptr<Client> Connect(bool cuda) {
    ClientOptions options;
    options.address = server_->address();
    if (cuda) options.accept = {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE};
    auto c = Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
  uint64_t Counter(Client& c, const std::string& name) {
    auto info = c.ServerInfo();
    EXPECT_TRUE(info.ok());
    auto it = info->counters().find(name);
    return it == info->counters().end() ? 0 : it->second;
  }
  bool HasGpu() const { return buffer::gpu::CudaDeviceApi().ok(); }

  TempDir dir_;
  TempDir shm_{"/dev/shm"};
  std::unique_ptr<ServerProcess> server_;
};

#define GPU_OR_SKIP()                                             \
  if (auto probed = buffer::gpu::CudaDeviceApi(); !probed.ok()) { \
    GTEST_SKIP() << probed.status().message();                    \
  }

// Runs everywhere: without a GPU the server serves host-only and says so once.
TEST_F(CudaTest, WithoutAGpuTheServerRunsHostOnlyAndSaysSoOnce) {
  StartServer({"--device_cache_bytes=64MiB"});
  auto c = Connect(false);
  ASSERT_TRUE(c->Put("k", Bytes("bytes")).ok());
  auto info = c->ServerInfo();
  ASSERT_TRUE(info.ok());
  bool cuda = std::find(info->deliveries().begin(), info->deliveries().end(),
                        v1::DELIVERY_CUDA_IPC) != info->deliveries().end();
  bool device_tier = false;
  for (const auto& t : info->tiers()) device_tier |= t.tier() == "device";
  if (HasGpu()) {
    EXPECT_TRUE(cuda);
    EXPECT_TRUE(device_tier);
    EXPECT_EQ(Count(server_->log(), "CUDA IPC delivery: device tier"), 1u) << server_->log();
    return;
  }
  EXPECT_FALSE(cuda);
  EXPECT_FALSE(device_tier);
  EXPECT_EQ(Count(server_->log(), "CUDA IPC delivery is off, serving host-only: no CUDA device"),
            1u)
      << server_->log();
  // A client without a GPU cannot ask for CUDA IPC: a clear error, before any call.
  ClientOptions options;
  options.address = server_->address();
  options.accept = {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE};
  auto refused = Client::Connect(options);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StartsWith(refused.status().message(), "no CUDA device: ")) << refused.status();
  auto ctl = testing::RunCommand(
      {testing::kChunkctlBinary, "--server=" + server_->address(), "--delivery=cuda", "get", "k"});
  EXPECT_EQ(ctl.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(ctl.err, "chunkctl: no CUDA device: ")) << ctl.err;
  // Inline is unaffected.
  auto got = c->Get("k");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data.view(), "bytes");
}

TEST_F(CudaTest, GpuClientReadsChunksFromTheServersDeviceTier) {
  GPU_OR_SKIP();
  StartServer({"--device_cache_bytes=256MiB", "--device_segment_bytes=64MiB", "--cuda_device=0"});
  auto writer = Connect(false);
  std::vector<std::string> values;
  for (int i = 0; i < 8; ++i) {
    values.push_back(testing::RandomBytes((4 << 20) + i * 1000, 20 + i));
    ASSERT_TRUE(writer->Put("arr/c/" + std::to_string(i), Bytes(values.back())).ok());
  }
  auto reader = Connect(true);
  std::vector<buffer::gpu::Buffer> held;
  for (int i = 0; i < 8; ++i) {
    auto got = reader->Get("arr/c/" + std::to_string(i));
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->delivery, v1::DELIVERY_CUDA_IPC) << server_->log();
    ASSERT_TRUE(got->device_data.has_value());
    EXPECT_TRUE(got->data.empty());
    EXPECT_NE(got->lease_id, 0u);
    EXPECT_EQ(got->device_data->size(), values[i].size());
    auto host = got->device_data->to_cpu();
    ASSERT_TRUE(host.ok()) << host.status();
    EXPECT_TRUE(host->view() == values[i]) << i;
    held.push_back(*got->device_data);
  }
  // Eight chunks, one segment: exported once by the server, opened once by this process.
  EXPECT_EQ(Counter(*reader, "device_ipc_exports"), 1u);
  EXPECT_EQ(Counter(*reader, "device_promotions"), 8u);
  EXPECT_EQ(Counter(*reader, "bytes_served_inline"), 0u);
  auto importer = client::CudaImporter::ForProcess();
  ASSERT_TRUE(importer.ok());
  EXPECT_EQ((*importer)->open_handles(), 1u);
  // A second reading of the same chunk is a device-tier hit and a second view of one mapping.
  client::GetOptions range;
  range.range = client::ByteRange::Bounded(1000, 50000);
  auto part = reader->Get("arr/c/3", range);
  ASSERT_TRUE(part.ok()) << part.status();
  ASSERT_EQ(part->delivery, v1::DELIVERY_CUDA_IPC);
  EXPECT_EQ(part->device_data->to_cpu()->view(), values[3].substr(1000, 49000));
  EXPECT_GE(Counter(*reader, "device_hits"), 1u);
  EXPECT_EQ((*importer)->open_handles(), 1u);
  // Another process (chunkctl) opens the same segment while this one holds it.
  std::string out = dir_.Join("out.bin");
  auto ctl = testing::RunCommand({testing::kChunkctlBinary, "--server=" + server_->address(),
                                  "--delivery=cuda", "-v", "get", "arr/c/5", "-o", out});
  EXPECT_EQ(ctl.exit_code, 0) << ctl.err;
  EXPECT_TRUE(absl::StrContains(ctl.err, "delivery DELIVERY_CUDA_IPC")) << ctl.err;
  EXPECT_TRUE(testing::ReadFile(out) == values[5]);
  // Dropping the buffers closes the handle and returns the leases.
  held.clear();
  part = absl::CancelledError("dropped");
  EXPECT_EQ((*importer)->open_handles(), 0u);
  reader->FlushReleases();
  auto info = reader->ServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->leases_active(), 0u);
}

TEST_F(CudaTest, EvictedChunksComeBackFromTheHost) {
  GPU_OR_SKIP();
  StartServer({"--device_cache_bytes=64MiB", "--device_segment_bytes=16MiB"});
  auto writer = Connect(false);
  std::vector<std::string> values;
  for (int i = 0; i < 12; ++i) {
    values.push_back(testing::RandomBytes(8 << 20, 40 + i));
    ASSERT_TRUE(writer->Put("k" + std::to_string(i), Bytes(values.back())).ok());
  }
  auto reader = Connect(true);
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 12; ++i) {
      auto got = reader->Get("k" + std::to_string(i));
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(got->delivery, v1::DELIVERY_CUDA_IPC);
      EXPECT_TRUE(got->device_data->to_cpu()->view() == values[i]);
    }
    reader->FlushReleases();
  }
  EXPECT_GT(Counter(*reader, "device_evictions"), 0u);
  auto info = reader->ServerInfo();
  for (const auto& t : info->tiers()) {
    if (t.tier() == "device") {
      EXPECT_LE(t.used_bytes(), t.capacity_bytes());
    }
  }
}

}  // namespace
}  // namespace chunkd

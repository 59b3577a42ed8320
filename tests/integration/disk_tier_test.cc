// The disk tier (--disk_cache_dir) through the real chunkd in front of a real S3 store (moto on
// loopback): a restarted server serves from disk without reading the store, kill -9 while the
// tier writes never serves a torn value, bytes corrupted on disk are caught and read again,
// a filesystem that fills and the tier's own budget keep it bounded with every read correct,
// and a value changed in the store behind chunkd's back is not served from disk past the bound.
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/support/test_support.h"
#include "tests/unit/http_s3_test_servers.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using testing::MotoServer;
using testing::RandomBytes;
using testing::RunCommand;
using testing::ServerProcess;
using testing::TempDir;

constexpr uint64_t kBlock = 256 << 10;

// Small values (one entry each, under 300 KB) and values of 3 MiB and more, above the largest
// read whole (a quarter of the host cache: at most 2 MiB of --host_cache_bytes=8MiB), which are
// read and kept by the block.
std::map<std::string, std::string> Dataset(int small, int large, uint64_t seed) {
  std::map<std::string, std::string> values;
  for (int i = 0; i < small; ++i) {
    values[absl::StrCat("t2m/c/0/", i)] = RandomBytes(40000 + 9000 * i, seed + i);
  }
  for (int i = 0; i < large; ++i) {
    values[absl::StrCat("big/", i)] = RandomBytes((3 << 20) + 4096 * i + 17, seed + 100 + i);
  }
  return values;
}

// Entries the tier holds for `values`: one per small value, one per block of a large one.
uint64_t EntriesOf(const std::map<std::string, std::string>& values) {
  uint64_t entries = 0;
  for (const auto& [key, bytes] : values) {
    entries += bytes.size() >= (3 << 20) ? (bytes.size() + kBlock - 1) / kBlock : 1;
  }
  return entries;
}

uint64_t BytesOf(const std::map<std::string, std::string>& values) {
  uint64_t total = 0;
  for (const auto& [key, bytes] : values) total += bytes.size();
  return total;
}

class DiskTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto moto = MotoServer::Start();
    if (absl::IsNotFound(moto.status())) GTEST_SKIP() << moto.status();
    ASSERT_TRUE(moto.ok()) << moto.status();
    moto_ = *std::move(moto);
    ASSERT_TRUE(moto_->CreateBucket("data").ok());
    testing::SetTestAwsCredentials();  // the server inherits the environment
    std::filesystem::create_directories(tier());
  }

  std::string tier() const { return dir_.Join("tier"); }

  // A chunkd on the S3 store with an 8 MiB host cache and, unless `disk` is false, the tier.
  std::unique_ptr<ServerProcess> Start(std::vector<std::string> extra = {}, bool disk = true) {
    std::vector<std::string> flags = {
        "--listen=127.0.0.1:0",  "--store=s3://data/ds", "--s3_endpoint=" + moto_->endpoint(),
        "--http_max_attempts=2", "--http_timeout=10s",   "--host_cache_bytes=8MiB",
        "--block_bytes=256KiB",  "--shm=false"};
    if (disk) {
      flags.push_back("--disk_cache_dir=" + tier());
      flags.push_back("--disk_cache_bytes=64MiB");
    }
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(flags);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? *std::move(server) : nullptr;
  }

  std::unique_ptr<Client> Connect(const ServerProcess& server) {
    ClientOptions options;
    options.address = server.address();
    options.timeout = absl::Seconds(60);
    auto c = Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return *std::move(c);
  }

  // Writes `values` to the store through a chunkd without the tier (another writer).
  void Store(const std::map<std::string, std::string>& values) {
    auto writer = Start({}, /*disk=*/false);
    ASSERT_NE(writer, nullptr);
    auto c = Connect(*writer);
    for (const auto& [key, bytes] : values) {
      auto put = c->Put(key, buffer::cpu::Buffer::CopyOf(bytes));
      ASSERT_TRUE(put.ok()) << key << ": " << put.status();
    }
    EXPECT_EQ(writer->Stop(SIGTERM), 0) << writer->log();
  }

  // Reads every value whole and checks its bytes.
  void ReadAll(Client& c, const std::map<std::string, std::string>& values) {
    for (const auto& [key, bytes] : values) {
      auto got = c.Get(key);
      ASSERT_TRUE(got.ok()) << key << ": " << got.status();
      ASSERT_EQ(got->data.size(), bytes.size()) << key;
      ASSERT_TRUE(got->data.view() == bytes) << key << " differs from the store's value";
    }
  }

  static uint64_t Counter(Client& c, const std::string& name) {
    auto info = c.ServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    if (!info.ok()) return 0;
    auto it = info->counters().find(name);
    EXPECT_NE(it, info->counters().end()) << name;
    return it == info->counters().end() ? 0 : it->second;
  }

  // Waits (generously: a loaded machine) until counter `name` reaches `at_least`.
  static bool WaitFor(Client& c, const std::string& name, uint64_t at_least) {
    absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (absl::Now() < deadline) {
      if (Counter(c, name) >= at_least) return true;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return Counter(c, name) >= at_least;
  }

  // Reads `values` through a tier server and waits until the tier holds them all.
  std::unique_ptr<ServerProcess> Fill(const std::map<std::string, std::string>& values,
                                      std::vector<std::string> extra = {}) {
    auto server = Start(extra);
    if (!server) return nullptr;
    auto c = Connect(*server);
    ReadAll(*c, values);
    EXPECT_TRUE(WaitFor(*c, "disk_writes", EntriesOf(values)))
        << Counter(*c, "disk_writes") << " of " << EntriesOf(values) << " entries written; "
        << Counter(*c, "disk_writes_dropped") << " dropped";
    return server;
  }

  // The bytes the files under the tier's directory take.
  uint64_t BytesOnDisk() {
    uint64_t total = 0;
    for (const auto& entry : std::filesystem::recursive_directory_iterator(tier())) {
      struct stat st;
      if (entry.is_regular_file() && ::stat(entry.path().c_str(), &st) == 0) {
        total += static_cast<uint64_t>(st.st_blocks) * 512;
      }
    }
    return total;
  }

  TempDir dir_;
  std::unique_ptr<MotoServer> moto_;
};

TEST(DiskTierFlags, RefusedForStoresOnALocalDiskOrInMemoryAndWithoutABudget) {
  TempDir dir;
  std::string tier = dir.Join("tier");
  std::filesystem::create_directories(dir.Join("store"));
  auto run = [&](std::vector<std::string> flags) {
    std::vector<std::string> argv = {testing::kChunkdBinary, "--listen=127.0.0.1:0", "--shm=false"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    return RunCommand(argv);
  };
  testing::CommandResult file =
      run({"--store=" + dir.Join("store"), "--disk_cache_dir=" + tier, "--disk_cache_bytes=1GiB"});
  EXPECT_NE(file.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(file.err, "remote stores")) << file.err;
  EXPECT_TRUE(absl::StrContains(file.err, "page cache")) << file.err;
  testing::CommandResult memory =
      run({"--store=memory://", "--disk_cache_dir=" + tier, "--disk_cache_bytes=1GiB"});
  EXPECT_NE(memory.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(memory.err, "in memory")) << memory.err;
  testing::CommandResult no_budget = run({"--store=s3://data/ds", "--disk_cache_dir=" + tier});
  EXPECT_NE(no_budget.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(no_budget.err, "--disk_cache_bytes")) << no_budget.err;
  testing::CommandResult no_dir = run({"--store=s3://data/ds", "--disk_cache_bytes=1GiB"});
  EXPECT_NE(no_dir.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(no_dir.err, "--disk_cache_dir")) << no_dir.err;
}

TEST_F(DiskTierTest, RestartedServerServesFromDiskWithoutReadingTheStore) {
  auto values = Dataset(12, 2, 1);
  Store(values);
  auto first = Fill(values, {"--metrics_listen=127.0.0.1:0"});
  ASSERT_NE(first, nullptr);
  {
    auto c = Connect(*first);
    EXPECT_EQ(Counter(*c, "backend_read_bytes"), BytesOf(values));
    // Metrics and chunkctl info show the tier.
    httplib::Client http("127.0.0.1", first->metrics_port());
    auto res = http.Get("/metrics");
    ASSERT_TRUE(res);
    EXPECT_TRUE(absl::StrContains(res->body, "chunkd_disk_writes_total ")) << res->body;
    EXPECT_TRUE(absl::StrContains(res->body, "# TYPE chunkd_disk_used_bytes gauge")) << res->body;
    testing::CommandResult info = RunCommand(
        {testing::kChunkctlBinary, "--server=" + first->address(), "--timeout=30s", "info"});
    EXPECT_EQ(info.exit_code, 0) << info.err;
    EXPECT_TRUE(absl::StrContains(info.out, "tier disk: ")) << info.out;
    EXPECT_TRUE(absl::StrContains(info.out, "disk_checksum_failures")) << info.out;
  }
  EXPECT_EQ(first->Stop(SIGKILL), 128 + SIGKILL);

  // With shared-memory delivery this time: what the tier reads back is in the arena, so it
  // can be handed out as a handle as any hit.
  TempDir shm("/dev/shm");
  auto second = Start({"--shm=true", "--shm_dir=" + shm.path()});
  ASSERT_NE(second, nullptr);
  auto c = Connect(*second);
  ASSERT_TRUE(WaitFor(*c, "disk_index_loaded", 1));
  auto info = c->ServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  bool listed = false;
  for (const auto& t : info->tiers()) {
    if (t.tier() != "disk") continue;
    listed = true;
    EXPECT_EQ(t.entries(), EntriesOf(values));
    EXPECT_EQ(t.capacity_bytes(), 64u << 20);
    EXPECT_GE(t.used_bytes(), BytesOf(values));
  }
  EXPECT_TRUE(listed);
  // The first reads after the restart come from disk into the arena: handed out as handles.
  ClientOptions options;
  options.address = second->address();
  options.timeout = absl::Seconds(60);
  options.shm_dir = shm.path();
  options.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
  auto handles = Client::Connect(options);
  ASSERT_TRUE(handles.ok()) << handles.status();
  auto small = (*handles)->Get("t2m/c/0/0");
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(small->data.view() == values["t2m/c/0/0"]);
  // Within one block of a value kept by the block (a whole 3 MiB value would pass the
  // per-client cap on pinned memory and go inline).
  client::GetOptions inside;
  inside.range = client::ByteRange::Bounded(kBlock + 10, 2 * kBlock - 10);
  auto block = (*handles)->Get("big/1", inside);
  ASSERT_TRUE(block.ok()) << block.status();
  EXPECT_EQ(block->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(block->data.view() ==
              std::string_view(values["big/1"]).substr(kBlock + 10, kBlock - 20));
  ReadAll(*c, values);
  // Within the revalidation interval (60 s): nothing asked of the store at all.
  EXPECT_EQ(Counter(*c, "backend_read_bytes"), 0u);
  EXPECT_EQ(Counter(*c, "backend_reads"), 0u);
  EXPECT_GE(Counter(*c, "disk_hits"), EntriesOf(values));
  EXPECT_GE(Counter(*c, "disk_promotions"), EntriesOf(values));
  EXPECT_GE(Counter(*c, "disk_promoted_bytes"), BytesOf(values));
  EXPECT_EQ(Counter(*c, "disk_checksum_failures"), 0u);
}

TEST_F(DiskTierTest, KillDuringWritesThenRestartServesOnlyTheStoresValues) {
  auto values = Dataset(24, 3, 2);
  Store(values);
  for (int round = 0; round < 3; ++round) {
    auto server = Start();
    ASSERT_NE(server, nullptr);
    {
      auto c = Connect(*server);
      ReadAll(*c, values);
    }
    // At once: the tier is still writing behind the reads.
    EXPECT_EQ(server->Stop(SIGKILL), 128 + SIGKILL);
  }
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto c = Connect(*server);
  ASSERT_TRUE(WaitFor(*c, "disk_index_loaded", 1));
  ReadAll(*c, values);
  ReadAll(*c, values);
}

TEST_F(DiskTierTest, BytesCorruptedOnDiskAreDetectedCountedAndReadAgain) {
  auto values = Dataset(12, 2, 3);
  Store(values);
  auto first = Fill(values);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->Stop(SIGTERM), 0) << first->log();
  // Flip bytes through every file of the tier that holds entries' bytes.
  int flipped = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(tier())) {
    if (!entry.is_regular_file() || entry.file_size() < (32 << 10)) continue;
    std::fstream file(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    for (uint64_t at = 16 << 10; at < entry.file_size(); at += 24 << 10) {
      char byte;
      file.seekg(static_cast<std::streamoff>(at));
      file.read(&byte, 1);
      byte = static_cast<char>(byte ^ 0x5a);
      file.seekp(static_cast<std::streamoff>(at));
      file.write(&byte, 1);
      ++flipped;
    }
  }
  ASSERT_GT(flipped, 0) << "no file under the tier's directory holds entries";
  auto second = Start();
  ASSERT_NE(second, nullptr);
  auto c = Connect(*second);
  ASSERT_TRUE(WaitFor(*c, "disk_index_loaded", 1));
  ReadAll(*c, values);
  EXPECT_GT(Counter(*c, "disk_checksum_failures"), 0u);
  EXPECT_GT(Counter(*c, "backend_read_bytes"), 0u);
  // Dropped and read again: the tier holds the good bytes now, and serves them.
  ASSERT_TRUE(WaitFor(*c, "disk_writes", Counter(*c, "disk_checksum_failures")));
  EXPECT_EQ(second->Stop(SIGTERM), 0) << second->log();
  auto third = Start();
  ASSERT_NE(third, nullptr);
  auto c3 = Connect(*third);
  ASSERT_TRUE(WaitFor(*c3, "disk_index_loaded", 1));
  ReadAll(*c3, values);
  EXPECT_EQ(Counter(*c3, "disk_checksum_failures"), 0u);
}

TEST_F(DiskTierTest, EvictionKeepsTheTierWithinItsBytes) {
  auto values = Dataset(20, 3, 4);  // about 14 MiB
  Store(values);
  auto server = Start({"--disk_cache_bytes=4MiB"});
  ASSERT_NE(server, nullptr);
  auto c = Connect(*server);
  ReadAll(*c, values);
  ReadAll(*c, values);
  uint64_t offered = 2 * EntriesOf(values);
  absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline && Counter(*c, "disk_writes") + Counter(*c, "disk_writes_dropped") +
                                           Counter(*c, "disk_hits") <
                                       offered / 2) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_GT(Counter(*c, "disk_evictions"), 0u);
  EXPECT_LE(Counter(*c, "disk_used_bytes"), 4u << 20);
  // What the files take: the entries, plus at most 1 MiB of the tier's own bookkeeping.
  EXPECT_LE(BytesOnDisk(), (4u << 20) + (1u << 20));
  ReadAll(*c, values);
}

TEST_F(DiskTierTest, AFilesystemThatFillsShrinksTheTierAndEveryReadStaysCorrect) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a tmpfs needs root";
  if (::mount("tmpfs", tier().c_str(), "tmpfs", 0, "size=4m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here: " << std::strerror(errno);
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{tier()};
  auto values = Dataset(20, 3, 5);  // about 14 MiB, into 4 MiB of filesystem
  Store(values);
  auto server = Start({"--disk_cache_bytes=64MiB"});
  ASSERT_NE(server, nullptr);
  auto c = Connect(*server);
  ReadAll(*c, values);
  ASSERT_TRUE(WaitFor(*c, "disk_enospc_events", 1));
  EXPECT_LT(Counter(*c, "disk_capacity_bytes"), 4u << 20);
  EXPECT_LE(Counter(*c, "disk_used_bytes"), 4u << 20);
  ReadAll(*c, values);
  ReadAll(*c, values);
  EXPECT_EQ(Counter(*c, "get_errors"), 0u);
}

TEST_F(DiskTierTest, AValueChangedBehindChunkdsBackIsNotServedFromDiskPastTheBound) {
  auto values = Dataset(6, 2, 6);
  Store(values);
  auto first = Fill(values, {"--revalidate_after=1s"});
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->Stop(SIGKILL), 128 + SIGKILL);
  // Another writer replaces one small and one large value.
  std::map<std::string, std::string> changed = {{"t2m/c/0/2", RandomBytes(50000, 77)},
                                                {"big/1", RandomBytes((3 << 20) + 999, 78)}};
  Store(changed);
  for (const auto& [key, bytes] : changed) values[key] = bytes;
  absl::SleepFor(absl::Milliseconds(1100));  // past the bound of every copy on disk

  auto second = Start({"--revalidate_after=1s"});
  ASSERT_NE(second, nullptr);
  auto c = Connect(*second);
  ASSERT_TRUE(WaitFor(*c, "disk_index_loaded", 1));
  ReadAll(*c, values);
  // The unchanged ones were confirmed with conditional requests, not read again.
  EXPECT_GE(Counter(*c, "stale_invalidations"), 2u);
  EXPECT_GE(Counter(*c, "revalidations_not_modified"), values.size() - changed.size());
  EXPECT_LE(Counter(*c, "backend_read_bytes"), BytesOf(changed));
  EXPECT_GT(Counter(*c, "disk_hits"), 0u);
  // And the tier now holds the new versions: a restart serves them.
  ASSERT_TRUE(WaitFor(*c, "disk_writes", 1 + (BytesOf(changed) - 50000 + kBlock - 1) / kBlock));
  EXPECT_EQ(second->Stop(SIGTERM), 0) << second->log();
  auto third = Start({"--revalidate_after=1h"});
  ASSERT_NE(third, nullptr);
  auto c3 = Connect(*third);
  ASSERT_TRUE(WaitFor(*c3, "disk_index_loaded", 1));
  ReadAll(*c3, values);
  EXPECT_EQ(Counter(*c3, "backend_read_bytes"), 0u);
}

TEST_F(DiskTierTest, WritesAndDeletesThroughChunkdDropTheTiersCopy) {
  auto values = Dataset(4, 1, 7);
  Store(values);
  // Copies on disk that, after a restart, would be served for an hour without asking the store.
  auto server = Fill(values, {"--revalidate_after=1h"});
  ASSERT_NE(server, nullptr);
  {
    auto c = Connect(*server);
    std::string replaced = RandomBytes(70000, 99);
    ASSERT_TRUE(c->Put("t2m/c/0/1", buffer::cpu::Buffer::CopyOf(replaced)).ok());
    values["t2m/c/0/1"] = replaced;
    std::string big = RandomBytes((3 << 20) + 5, 98);
    ASSERT_TRUE(c->Put("big/0", buffer::cpu::Buffer::CopyOf(big)).ok());
    values["big/0"] = big;
    ASSERT_TRUE(c->Delete("t2m/c/0/3").ok());
    values.erase("t2m/c/0/3");
  }
  EXPECT_EQ(server->Stop(SIGKILL), 128 + SIGKILL);
  auto again = Start({"--revalidate_after=1h"});
  ASSERT_NE(again, nullptr);
  auto c = Connect(*again);
  ASSERT_TRUE(WaitFor(*c, "disk_index_loaded", 1));
  ReadAll(*c, values);
  EXPECT_EQ(c->Get("t2m/c/0/3").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace chunkd

// ShardedClient over three real chunkd servers on loopback that share one file store directory
// (as a pool of caches shares one S3 bucket): keys spread evenly, routing agrees with the Python
// client (a golden list), a server killed mid-run fails over to each key's next server with
// every value read correct, and failovers leave no stale copy in any server's cache.
// (tests/integration/partition_test.cc: a server cut off by the network.)
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/sharded_client.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using client::RendezvousOrder;
using client::ShardedClient;
using client::ShardedClientOptions;
using testing::RandomBytes;
using testing::ServerProcess;
using testing::TempDir;

// The same servers, keys and answers as python/tests/test_sharded.py.
const std::vector<std::string> kGoldenServers = {"chunkd-0.chunkd:7878", "chunkd-1.chunkd:7878",
                                                 "chunkd-2.chunkd:7878"};
const std::vector<std::string> kGoldenKeys = {
    "arr/zarr.json",   "arr/c/0/0", "arr/c/0/1", "arr/c/1/0", "arr/c/1/1", "temperature/c/3/1",
    "température/c/0", "x y/z",     ".zgroup",   "a",         "b/c/d/e",   "zarr.json"};
const std::vector<int> kGoldenHome = {0, 1, 2, 0, 2, 1, 2, 2, 1, 2, 1, 1};
const std::vector<int> kGoldenLast = {1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0};

TEST(RendezvousTest, GoldenListAgreesWithPython) {
  EXPECT_EQ(client::ShardHash64(""), 0xF52A15E9A9B5E89Bull);
  EXPECT_EQ(client::ShardHash64("a"), 0x02C0BDBF481420F8ull);
  EXPECT_EQ(client::ShardHash64("arr/c/0/0"), 0x83269BC04CDE9140ull);
  EXPECT_EQ(client::ShardHash64("température"), 0x124C1C6D4A23102Cull);
  for (size_t i = 0; i < kGoldenKeys.size(); ++i) {
    std::vector<std::string> order = RendezvousOrder(kGoldenServers, kGoldenKeys[i]);
    EXPECT_EQ(order.front(), kGoldenServers[kGoldenHome[i]]) << kGoldenKeys[i];
    EXPECT_EQ(order.back(), kGoldenServers[kGoldenLast[i]]) << kGoldenKeys[i];
  }
}

std::string KeyOf(int i) { return absl::StrCat("arr/c/", i / 60, "/", i % 60); }

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

TEST(RendezvousTest, AddingAServerMovesOnlyItsShare) {
  std::vector<std::string> three = {"a:1", "b:1", "c:1"}, four = {"a:1", "b:1", "c:1", "d:1"};
  int moved_to_new = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string before = RendezvousOrder(three, KeyOf(i))[0];
    std::string after = RendezvousOrder(four, KeyOf(i))[0];
    if (after != before) {
      EXPECT_EQ(after, "d:1") << KeyOf(i);
      ++moved_to_new;
    }
  }
  EXPECT_NEAR(moved_to_new, 750, 100);
}

std::unique_ptr<Client> Plain(const std::string& address) {
  ClientOptions options;
  options.address = address;
  options.timeout = absl::Seconds(30);
  auto c = Client::Connect(options);
  EXPECT_TRUE(c.ok()) << c.status();
  return *std::move(c);
}

uint64_t Counter(Client& c, const std::string& name) {
  auto info = c.ServerInfo();
  EXPECT_TRUE(info.ok()) << info.status();
  if (!info.ok()) return 0;
  auto it = info->counters().find(name);
  return it == info->counters().end() ? 0 : it->second;
}

class PoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directories(root_.Join("store"));
    for (int i = 0; i < 3; ++i) {
      auto s = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + root_.Join("store"),
                                     "--fsync=false", "--host_cache_bytes=256MiB", "--shm=false"});
      ASSERT_TRUE(s.ok()) << s.status();
      addresses_.push_back((*s)->address());
      servers_.push_back(*std::move(s));
    }
  }
  std::unique_ptr<ShardedClient> Pool() {
    ShardedClientOptions options;
    options.servers = addresses_;
    options.client.timeout = absl::Seconds(20);
    options.client.max_attempts = 1;
    options.failures_to_mark_down = 2;
    options.down_backoff = absl::Seconds(60);
    auto pool = ShardedClient::Connect(options);
    EXPECT_TRUE(pool.ok()) << pool.status();
    return *std::move(pool);
  }
  TempDir root_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<ServerProcess>> servers_;
};

TEST_F(PoolTest, SpreadsKeysAndFailsOverWhenAServerDies) {
  constexpr int kKeys = 3000;
  auto pool = Pool();
  ASSERT_NE(pool, nullptr);
  std::map<std::string, int> homes;
  for (int i = 0; i < kKeys; ++i) {
    auto put = pool->Put(KeyOf(i), buffer::cpu::Buffer::CopyOf(RandomBytes(64 + i % 100, i)));
    ASSERT_TRUE(put.ok()) << KeyOf(i) << ": " << put.status();
    ++homes[pool->RankedServers(KeyOf(i))[0]];
  }
  // Every server took its share of the writes, within 10% of even.
  for (const std::string& a : addresses_) {
    uint64_t puts = Counter(*Plain(a), "puts");
    EXPECT_EQ(puts, static_cast<uint64_t>(homes[a])) << a;
    EXPECT_NEAR(static_cast<double>(puts), kKeys / 3.0, kKeys / 3.0 * 0.1) << a;
  }
  auto listing = pool->List("arr/c/", true);
  ASSERT_TRUE(listing.ok()) << listing.status();
  EXPECT_EQ(listing->prefixes.size(), 50u);

  // Read half, kill a server, read everything: each key of the dead server goes to its next
  // server in rendezvous order, which has it (the shared store).
  for (int i = 0; i < kKeys / 2; ++i) {
    auto got = pool->Get(KeyOf(i));
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got->data.view() == RandomBytes(64 + i % 100, i)) << KeyOf(i);
  }
  std::string victim = addresses_[1];
  std::map<std::string, uint64_t> gets_before;
  for (const std::string& a : addresses_) {
    if (a != victim) gets_before[a] = Counter(*Plain(a), "gets");
  }
  servers_[1]->Stop(SIGKILL);
  std::map<std::string, uint64_t> expected_gets;
  for (int i = 0; i < kKeys; ++i) {
    auto got = pool->Get(KeyOf(i));
    ASSERT_TRUE(got.ok()) << KeyOf(i) << ": " << got.status();
    ASSERT_TRUE(got->data.view() == RandomBytes(64 + i % 100, i)) << KeyOf(i);
    std::vector<std::string> order = pool->RankedServers(KeyOf(i));
    ++expected_gets[order[0] == victim ? order[1] : order[0]];
  }
  EXPECT_TRUE(pool->IsDown(victim));
  for (const auto& [a, before] : gets_before) {
    EXPECT_EQ(Counter(*Plain(a), "gets") - before, expected_gets[a]) << a;
  }
  // Listings leave the dead server out.
  auto after = pool->List("arr/c/0/", false);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->entries.size(), 60u);
}

// A pool that finds a silent server within seconds and probes it again soon.
std::unique_ptr<ShardedClient> QuickPool(const std::vector<std::string>& servers) {
  ShardedClientOptions options;
  options.servers = servers;
  options.client.timeout = absl::Seconds(20);
  options.client.max_attempts = 1;
  // Longer under the sanitizers, whose servers may take that long to answer a ping.
  const absl::Duration quick =
      std::getenv("CHUNKD_SANITIZER") != nullptr ? absl::Seconds(3) : absl::Seconds(1);
  options.client.keepalive_time = absl::Seconds(1);
  options.client.keepalive_timeout = quick;
  options.client.connect_timeout = quick;
  options.failures_to_mark_down = 1;
  options.down_backoff = absl::Milliseconds(500);
  auto pool = ShardedClient::Connect(options);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return *std::move(pool);
}

// Waits until every thread of `pid` is stopped (SIGSTOP takes effect after kill returns).
bool WaitStopped(pid_t pid) {
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline) {
    bool all = true;
    std::error_code ec;
    for (const auto& task :
         std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/task"), ec)) {
      std::string stat = testing::ReadFile(task.path().string() + "/stat");
      size_t paren = stat.rfind(')');  // the state follows the command name
      if (paren == std::string::npos || paren + 2 >= stat.size() ||
          (stat[paren + 2] != 'T' && stat[paren + 2] != 't')) {
        all = false;
      }
    }
    if (all && !ec) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return false;
}

std::string Value(Client& c, const std::string& key) {
  auto got = c.Get(key);
  return got.ok() ? std::string(got->data.view()) : got.status().ToString();
}

// Copies stay consistent across failovers (issue 23, item 6). The store is shared, but each
// server caches what it read or was written:
// - a copy the key's second server holds (a read that failed over to it, by any client) is
//   dropped when the key is written at its home;
// - a write that failed over while the home was unreachable (its process stopped: silent,
//   its cache kept) leaves the home's copy stale: the pool drops it before the home serves the
//   key again, and no read through the pool ever sees the old value.
TEST_F(PoolTest, WritesLeaveNoStaleCopies) {
  auto pool = QuickPool(addresses_);
  const std::string key = "arr/c/7/7";
  std::vector<std::string> order = pool->RankedServers(key);
  const std::string home = order[0], second = order[1];
  ServerProcess* home_process = nullptr;
  for (size_t i = 0; i < addresses_.size(); ++i) {
    if (addresses_[i] == home) home_process = servers_[i].get();
  }
  ASSERT_NE(home_process, nullptr);

  ASSERT_TRUE(pool->Put(key, Bytes("one")).ok());
  EXPECT_EQ(Value(*Plain(second), key), "one");  // the second server caches it
  ASSERT_TRUE(pool->Put(key, Bytes("two")).ok());
  EXPECT_EQ(Value(*pool, key), "two");
  EXPECT_EQ(Value(*Plain(second), key), "two") << "the second server's copy went stale";
  EXPECT_EQ(Counter(*Plain(second), "invalidations"), 2u);  // after each write at home

  // The home goes silent: a call for one of its keys finds it (keepalive) and marks it down.
  ASSERT_EQ(::kill(home_process->pid(), SIGSTOP), 0);
  ASSERT_TRUE(WaitStopped(home_process->pid())) << "chunkd did not stop";
  std::string other;  // another key of the same home
  for (int i = 0; other.empty(); ++i) {
    if (pool->RankedServers(KeyOf(i))[0] == home && KeyOf(i) != key) other = KeyOf(i);
  }
  auto probe = pool->Stat(other);
  EXPECT_TRUE(probe.ok()) << probe.status();  // failed over
  EXPECT_TRUE(pool->IsDown(home));
  auto put = pool->Put(key, Bytes("three"));  // to the second server
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(Value(*pool, key), "three");
  ASSERT_EQ(::kill(home_process->pid(), SIGCONT), 0);

  // The home comes back (a probe finds it): every read through the pool is the new value, and
  // the home serves the key again once it has dropped its copy.
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (pool->IsDown(home) && absl::Now() < deadline) {
    ASSERT_EQ(Value(*pool, key), "three");
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_FALSE(pool->IsDown(home)) << "no probe found the home server again";
  uint64_t home_gets = Counter(*Plain(home), "gets");
  EXPECT_EQ(Value(*pool, key), "three");
  EXPECT_EQ(Counter(*Plain(home), "gets"), home_gets + 1) << "the home server was not used again";
  EXPECT_EQ(Counter(*Plain(home), "invalidations"), 1u);
  EXPECT_EQ(Value(*Plain(home), key), "three");
}

TEST_F(PoolTest, ChunkctlTakesAServerList) {
  std::string list = absl::StrCat(addresses_[0], ",", addresses_[1], ",", addresses_[2]);
  auto put = testing::RunCommand(
      {testing::kChunkctlBinary, "--server=" + list, "put", "arr/zarr.json", "-"}, "{}");
  ASSERT_EQ(put.exit_code, 0) << put.err;
  auto get =
      testing::RunCommand({testing::kChunkctlBinary, "--server=" + list, "get", "arr/zarr.json"});
  ASSERT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "{}");
  auto pool = Pool();
  std::string home = pool->RankedServers("arr/zarr.json")[0];
  EXPECT_EQ(Counter(*Plain(home), "puts"), 1u);
}

TEST(ShardedClientTest, HostNameResolvesToThePool) {
  ShardedClientOptions options;
  options.servers = {"localhost:7999"};
  auto pool = ShardedClient::Connect(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  std::vector<std::string> servers = (*pool)->servers();
  ASSERT_EQ(servers.size(), 1u);
  EXPECT_TRUE(servers[0] == "127.0.0.1:7999" || servers[0] == "[::1]:7999") << servers[0];
  options.servers = {"no-such-host.invalid:7878"};
  EXPECT_FALSE(ShardedClient::Connect(options).ok());
  options.servers = {};
  EXPECT_EQ(ShardedClient::Connect(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShardedClientTest, AllServersDownIsUnavailable) {
  ShardedClientOptions options;
  options.servers = {"127.0.0.1:1", "127.0.0.1:2"};
  options.client.timeout = absl::Seconds(5);
  options.client.max_attempts = 1;
  auto pool = ShardedClient::Connect(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ((*pool)->Get("k").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*pool)->List("").status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace chunkd

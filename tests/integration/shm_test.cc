// Shared-memory delivery with the real chunkd: handles, leases, eviction, fallback.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/client.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using testing::ServerProcess;
using testing::TempDir;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

class ShmTest : public ::testing::Test {
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
  std::unique_ptr<Client> Connect(bool shm) {
    ClientOptions options;
    options.address = server_->address();
    options.shm_dir = shm_.path();
    if (shm) options.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
    return *Client::Connect(options);
  }
  uint64_t Counter(Client& c, const std::string& name) {
    auto info = c.ServerInfo();
    EXPECT_TRUE(info.ok());
    auto it = info->counters().find(name);
    return it == info->counters().end() ? 0 : it->second;
  }

  TempDir dir_;
  TempDir shm_{"/dev/shm"};
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(ShmTest, ColocatedClientReads64MiBWithoutTheServerCopyingIt) {
  StartServer();
  auto writer = Connect(false);
  std::string value = testing::RandomBytes(64 << 20, 11);
  ASSERT_TRUE(writer->Put("big/c/0", Bytes(value)).ok());
  auto reader = Connect(true);
  uint64_t inline_before = Counter(*reader, "bytes_served_inline");
  auto got = reader->Get("big/c/0");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->delivery, v1::DELIVERY_SHM);
  EXPECT_EQ(got->data.kind(), buffer::MemoryKind::kHostShared);
  EXPECT_NE(got->lease_id, 0u);
  EXPECT_TRUE(got->data.view() == value);
  // Not one byte went over the connection, and the server granted a lease on its own memory.
  EXPECT_EQ(Counter(*reader, "bytes_served_inline"), inline_before);
  EXPECT_EQ(Counter(*reader, "bytes_served_shm"), 64u << 20);
  auto info = reader->ServerInfo();
  EXPECT_EQ(info->leases_active(), 1u);
  EXPECT_EQ(info->leased_bytes(), 64u << 20);
  // Ranges are handles too.
  client::GetOptions range;
  range.range = client::ByteRange::Bounded(1000, 5000);
  auto part = reader->Get("big/c/0", range);
  ASSERT_TRUE(part.ok());
  EXPECT_EQ(part->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(part->data.view() == std::string_view(value).substr(1000, 4000));
  // Dropping the buffers returns the leases.
  got->data = {};
  part->data = {};
  reader->FlushReleases();
  EXPECT_EQ(reader->leases_held(), 0u);
  EXPECT_EQ(reader->ServerInfo()->leases_active(), 0u);
}

TEST_F(ShmTest, GetManyHandsOutOneHandlePerItem) {
  StartServer();
  auto writer = Connect(false);
  std::vector<std::string> values;
  std::vector<client::GetManyItem> items;
  for (int i = 0; i < 20; ++i) {
    values.push_back(testing::RandomBytes((i + 1) << 16, 30 + i));
    std::string key = absl::StrCat("many/c/", i);
    ASSERT_TRUE(writer->Put(key, Bytes(values.back())).ok());
    items.push_back({key, {}, {}});
  }
  items.push_back({"many/missing", {}, {}});
  auto reader = Connect(true);
  uint64_t inline_before = Counter(*reader, "bytes_served_inline");
  auto got = reader->GetMany(items);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 21u);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE((*got)[i].ok()) << (*got)[i].status();
    EXPECT_EQ((*got)[i]->delivery, v1::DELIVERY_SHM);
    EXPECT_TRUE((*got)[i]->data.view() == values[i]);
  }
  EXPECT_EQ((*got)[20].status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Counter(*reader, "bytes_served_inline"), inline_before);
  EXPECT_EQ(reader->ServerInfo()->leases_active(), 20u);
  got->clear();
  reader->FlushReleases();
  EXPECT_EQ(reader->leases_held(), 0u);
  EXPECT_EQ(reader->ServerInfo()->leases_active(), 0u);
}

TEST_F(ShmTest, UpdatesNeverChangeBytesALeaseHolderReads) {
  StartServer();
  auto c = Connect(true);
  ASSERT_TRUE(c->Put("k", Bytes(std::string(1 << 20, 'a'))).ok());
  auto old = c->Get("k");
  ASSERT_TRUE(old.ok());
  ASSERT_EQ(old->delivery, v1::DELIVERY_SHM);
  for (char v : {'b', 'c', 'd'}) ASSERT_TRUE(c->Put("k", Bytes(std::string(1 << 20, v))).ok());
  ASSERT_TRUE(c->Delete("k").ok());
  EXPECT_TRUE(old->data.view() == std::string(1 << 20, 'a'));
}

TEST_F(ShmTest, ManyReadersInTwoProcessesWhileWritersUpdate) {
  StartServer();
  auto writer = Connect(false);
  std::vector<std::string> keys;
  for (int i = 0; i < 8; ++i) {
    keys.push_back(absl::StrCat("r/c/", i));
    ASSERT_TRUE(writer->Put(keys.back(), Bytes(std::string(256 << 10, 'a' + i))).ok());
  }
  std::vector<std::string> argv = {testing::kShmReaderBinary, server_->address(), shm_.path(),
                                   "read", "40"};
  argv.insert(argv.end(), keys.begin(), keys.end());
  std::string out1 = dir_.Join("reader1"), out2 = dir_.Join("reader2");
  pid_t p1 = testing::StartProcess(argv, out1);
  pid_t p2 = testing::StartProcess(argv, out2);
  std::atomic<bool> stop{false};
  std::thread updates([&] {
    int round = 0;
    while (!stop.load()) {
      for (size_t i = 0; i < keys.size(); ++i) {
        char v = static_cast<char>('a' + (round + i) % 26);
        ASSERT_TRUE(
            writer->Put(keys[i], Bytes(std::string((128 << 10) + round % 7 * 4096, v))).ok());
      }
      ++round;
    }
  });
  int s1, s2;
  ::waitpid(p1, &s1, 0);
  ::waitpid(p2, &s2, 0);
  stop = true;
  updates.join();
  EXPECT_TRUE(WIFEXITED(s1) && WEXITSTATUS(s1) == 0) << testing::ReadFile(out1);
  EXPECT_TRUE(WIFEXITED(s2) && WEXITSTATUS(s2) == 0) << testing::ReadFile(out2);
  EXPECT_NE(testing::ReadFile(out1).find("reads 320 torn 0 shm 320"), std::string::npos)
      << testing::ReadFile(out1);
  EXPECT_NE(testing::ReadFile(out2).find("torn 0"), std::string::npos);
}

TEST_F(ShmTest, LeasesOfAKilledClientExpireAndTheirMemoryComesBack) {
  StartServer({"--lease_ttl=1s", "--host_cache_bytes=64MiB"});
  auto c = Connect(false);
  std::vector<std::string> argv = {testing::kShmReaderBinary, server_->address(), shm_.path(),
                                   "hold"};
  for (int i = 0; i < 4; ++i) {
    std::string key = absl::StrCat("held/c/", i);
    ASSERT_TRUE(c->Put(key, Bytes(std::string(4 << 20, 'h'))).ok());
    argv.push_back(key);
  }
  std::string out = dir_.Join("holder");
  pid_t holder = testing::StartProcess(argv, out);
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (testing::ReadFile(out).find("holding 4") == std::string::npos && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_NE(testing::ReadFile(out).find("holding 4"), std::string::npos);
  // The holder renews its leases, so they outlive the TTL while it lives.
  std::this_thread::sleep_for(std::chrono::milliseconds(1600));
  EXPECT_EQ(c->ServerInfo()->leases_active(), 4u);
  // Delete the keys: the leased bytes stay in memory (the holder may still read them).
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(c->Delete(absl::StrCat("held/c/", i)).ok());
  EXPECT_EQ(Counter(*c, "detached_pinned_bytes"), 16u << 20);
  ::kill(holder, SIGKILL);
  ::waitpid(holder, nullptr, 0);
  deadline = absl::Now() + absl::Seconds(5);
  while (c->ServerInfo()->leases_active() != 0 && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto info = c->ServerInfo();
  EXPECT_EQ(info->leases_active(), 0u);
  EXPECT_EQ(info->leased_bytes(), 0u);
  EXPECT_GE(info->counters().at("leases_expired"), 4u);
  // The cache forgets the detached bytes at its next insert.
  ASSERT_TRUE(c->Put("after", Bytes("x")).ok());
  EXPECT_EQ(Counter(*c, "detached_pinned_bytes"), 0u);
}

// A reader on a UNIX socket that is paused (SIGSTOP) for longer than the lease TTL, while other
// clients churn the cache hard enough that expired leases' memory would be reused, still holds
// its bytes when it goes on: the server knows its process from the kernel and keeps its leases
// while it lives, renewed or not.
TEST_F(ShmTest, PausedReaderOnAUnixSocketKeepsItsBytes) {
  std::filesystem::create_directories(dir_.Join("store"));
  std::string socket = dir_.Join("chunkd.sock");
  auto server = ServerProcess::Start({"--listen=unix:" + socket, "--store=" + dir_.Join("store"),
                                      "--fsync=false", "--shm_dir=" + shm_.path(), "--lease_ttl=1s",
                                      "--host_cache_bytes=8MiB"});
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  ClientOptions options;
  options.address = "unix:" + socket;
  options.shm_dir = shm_.path();
  auto writer = *Client::Connect(options);
  std::vector<std::string> argv = {testing::kShmReaderBinary, options.address, shm_.path(),
                                   "watch"};
  for (int i = 0; i < 6; ++i) {
    std::string key = absl::StrCat("paused/c/", i);
    ASSERT_TRUE(writer->Put(key, Bytes(std::string(256 << 10, 'a' + i))).ok());
    argv.push_back(key);
  }
  std::string out = dir_.Join("watcher");
  pid_t reader = testing::StartProcess(argv, out);
  absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (testing::ReadFile(out).find("holding") == std::string::npos && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_NE(testing::ReadFile(out).find("holding 6 shm 6"), std::string::npos)
      << testing::ReadFile(out);
  ASSERT_EQ(::kill(reader, SIGSTOP), 0);
  // Three TTLs of churn: 8 MiB of cache turned over many times, the shared memory of every
  // evicted value reused by new ones.
  // (At least 160 values of 256 KiB: a sanitizer's slower server churns as much.)
  absl::Time until = absl::Now() + absl::Seconds(3);
  for (int i = 0; absl::Now() < until || i < 160; ++i) {
    ASSERT_TRUE(
        writer->Put(absl::StrCat("churn/", i % 64), Bytes(std::string(256 << 10, 'Z'))).ok());
    if (i >= 64) ASSERT_TRUE(writer->Get(absl::StrCat("churn/", (i * 7) % 64)).ok());
  }
  EXPECT_GT(Counter(*writer, "evictions"), 64u);
  EXPECT_EQ(writer->ServerInfo()->leases_active(), 6u);
  EXPECT_EQ(Counter(*writer, "leases_process_bound"), 6u);
  ASSERT_EQ(::kill(reader, SIGCONT), 0);
  // The reader checks its values every 20 ms; give it time to look.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  int status = 0;
  EXPECT_EQ(::waitpid(reader, &status, WNOHANG), 0) << testing::ReadFile(out);
  EXPECT_EQ(testing::ReadFile(out).find("changed"), std::string::npos) << testing::ReadFile(out);
  ::kill(reader, SIGKILL);
  ::waitpid(reader, nullptr, 0);
  // Its leases follow it: gone within about a TTL of its death.
  deadline = absl::Now() + absl::Seconds(10);
  while (writer->ServerInfo()->leases_active() != 0 && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(writer->ServerInfo()->leases_active(), 0u);
}

// A GetMany whose reply takes longer than the lease TTL (its first item comes from a slow
// store, the others are read, and leased, long before the reply can go), over TCP, where leases
// live by TTL and renewal, while other reads churn the cache: no item is handed out with bytes
// other than its value's. The server starts a lease's TTL when the reply is out; the client
// tracks each lease from its header on and checks it at import.
TEST_F(ShmTest, GetManyReplyLongerThanTheTtlNeverHandsOutOtherBytes) {
  httplib::Server store;
  store.Get(R"(/(.+))", [](const httplib::Request& request, httplib::Response& response) {
    std::string key = request.matches[1];
    if (key == "slow/c/0") std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    if (key.rfind("slow/c/", 0) == 0) {
      int i = std::atoi(key.c_str() + 7);
      response.set_content(std::string(64 << 10, static_cast<char>('a' + i % 26)),
                           "application/octet-stream");
    } else if (key.rfind("churn/", 0) == 0) {
      response.set_content(std::string(256 << 10, 'Z'), "application/octet-stream");
    } else {
      response.status = 404;
    }
  });
  int port = store.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread serving([&] { store.listen_after_bind(); });
  auto server = ServerProcess::Start(
      {"--listen=127.0.0.1:0", absl::StrCat("--store=http://127.0.0.1:", port, "/"),
       "--shm_dir=" + shm_.path(), "--lease_ttl=1s", "--host_cache_bytes=16MiB",
       // cpp-httplib serves with 8 threads, each kept by one keep-alive connection: more I/O
       // threads than that (64 by default for a remote store) would queue new connections
       // behind idle ones for seconds.
       "--io_threads=8"});
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  std::vector<client::GetManyItem> items;
  for (int i = 0; i < 40; ++i) items.push_back({absl::StrCat("slow/c/", i), {}, {}});
  auto reader = Connect(true);
  std::atomic<bool> done{false};
  std::thread churn([&] {
    auto c = Connect(false);
    // Reads of other values while the reply waits: 32 MiB through a 16 MiB cache, over and
    // over, so values whose leases lapsed are evicted and their memory reused.
    for (int i = 0; !done.load(); ++i) (void)c->Get(absl::StrCat("churn/", i % 128));
  });
  auto got = reader->GetMany(items);
  done = true;
  churn.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_GT(Counter(*reader, "evictions"), 0u);
  size_t ok = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!(*got)[i].ok()) {
      EXPECT_EQ((*got)[i].status().code(), absl::StatusCode::kUnavailable)
          << i << ": " << (*got)[i].status();
      continue;
    }
    ++ok;
    EXPECT_EQ((*got)[i]->delivery, v1::DELIVERY_SHM);
    EXPECT_TRUE((*got)[i]->data.view() == std::string(64 << 10, 'a' + i % 26))
        << "item " << i << " holds other bytes";
  }
  EXPECT_EQ(ok, items.size());
  got->clear();
  reader.reset();
  server_.reset();
  store.stop();
  serving.join();
}

// Renewals read the server's answer: a lease the server no longer knows (expired, or, as here,
// released behind the client's back) is known lost after one renewal, and is not renewed again
// and again.
TEST_F(ShmTest, RenewalsReadTheServersAnswer) {
  StartServer({"--lease_ttl=1s"});
  auto c = Connect(true);
  ASSERT_TRUE(c->Put("k", Bytes(std::string(64 << 10, 'k'))).ok());
  auto held = c->Get("k");
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_EQ(held->delivery, v1::DELIVERY_SHM);
  auto stub = v1::Chunkd::NewStub(
      grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::ReleaseRequest request;
  request.add_lease_ids(held->lease_id);
  v1::ReleaseResponse response;
  ASSERT_TRUE(stub->Release(&context, request, &response).ok());
  // The client renews every third of a TTL: within a TTL it has asked, and heard "unknown".
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (Counter(*c, "leases_unknown") == 0 && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  uint64_t unknown = Counter(*c, "leases_unknown");
  ASSERT_GE(unknown, 1u);
  // Three more TTLs: no more renewals of the lost lease.
  std::this_thread::sleep_for(std::chrono::milliseconds(3000));
  EXPECT_EQ(Counter(*c, "leases_unknown"), unknown);
}

TEST_F(ShmTest, EvictionSkipsLeasedChunksAndTheBudgetHolds) {
  StartServer({"--host_cache_bytes=16MiB"});
  auto c = Connect(true);
  ASSERT_TRUE(c->Put("pinned", Bytes(std::string(2 << 20, 'p'))).ok());
  auto held = c->Get("pinned");
  ASSERT_TRUE(held.ok());
  ASSERT_EQ(held->delivery, v1::DELIVERY_SHM);
  // Churn far more than the budget through the cache.
  auto w = Connect(false);
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(w->Put(absl::StrCat("churn/", i), Bytes(std::string(1 << 20, 'c'))).ok());
    auto info = w->ServerInfo();
    ASSERT_LE(info->tiers(0).used_bytes() + info->counters().at("detached_pinned_bytes"),
              16u << 20);
  }
  EXPECT_GT(Counter(*w, "evictions"), 0u);
  // The leased entry is still cached: reading it again is a hit.
  uint64_t misses = Counter(*w, "misses");
  auto again = w->Get("pinned");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(Counter(*w, "misses"), misses);
  EXPECT_TRUE(held->data.view() == std::string(2 << 20, 'p'));
}

TEST_F(ShmTest, FallsBackToInlineWhenTheClientIsElsewhere) {
  StartServer();
  auto w = Connect(false);
  ASSERT_TRUE(w->Put("k", Bytes("value")).ok());
  ClientOptions options;
  options.address = server_->address();
  options.shm_dir = shm_.path();
  options.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
  buffer::HostIdentity elsewhere = buffer::CurrentHostIdentity(shm_.path());
  elsewhere.boot_id = "another-host";
  options.identity = elsewhere;
  auto remote = *Client::Connect(options);
  auto got = remote->Get("k");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->delivery, v1::DELIVERY_INLINE);
  EXPECT_EQ(got->data.view(), "value");
  // A different shared-memory directory is elsewhere too.
  elsewhere = buffer::CurrentHostIdentity("/tmp");
  options.identity = elsewhere;
  got = (*Client::Connect(options))->Get("k");
  EXPECT_EQ(got->delivery, v1::DELIVERY_INLINE);
  EXPECT_GE(Counter(*w, "shm_fallbacks"), 2u);
}

TEST_F(ShmTest, ForgedOrRepeatedLeaseIdsFreeNothing) {
  StartServer();
  auto c = Connect(true);
  ASSERT_TRUE(c->Put("k", Bytes(std::string(1 << 20, 'k'))).ok());
  auto held = c->Get("k");
  ASSERT_TRUE(held.ok());
  ASSERT_EQ(held->delivery, v1::DELIVERY_SHM);
  // Release a forged id and the real one twice through the raw RPC.
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::Chunkd::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::ReleaseRequest request;
    request.add_lease_ids(held->lease_id ^ 0x5555);
    v1::ReleaseResponse response;
    ASSERT_TRUE(stub->Release(&ctx, request, &response).ok());
    ASSERT_EQ(response.unknown_lease_ids_size(), 1);
  }
  EXPECT_EQ(c->ServerInfo()->leases_active(), 1u);
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    v1::ReleaseRequest request;
    request.add_lease_ids(held->lease_id);
    v1::ReleaseResponse response;
    ASSERT_TRUE(stub->Release(&ctx, request, &response).ok());
    EXPECT_EQ(response.unknown_lease_ids_size(), i == 0 ? 0 : 1);
  }
  EXPECT_EQ(c->ServerInfo()->leases_active(), 0u);
  // The cache still holds the value, so the holder's view stays intact.
  EXPECT_TRUE(held->data.view() == std::string(1 << 20, 'k'));
}

TEST_F(ShmTest, ChunkctlShowsTheDeliveryUsed) {
  StartServer();
  std::string in = dir_.Join("in");
  testing::WriteFile(in, testing::RandomBytes(3 << 20, 2));
  std::string server = "--server=" + server_->address();
  ASSERT_EQ(testing::RunCommand({testing::kChunkctlBinary, server, "put", "x", in}).exit_code, 0);
  auto shm =
      testing::RunCommand({testing::kChunkctlBinary, server, "get", "x", "-o", dir_.Join("out"),
                           "--delivery=shm", "--shm_dir=" + shm_.path(), "-v"});
  EXPECT_EQ(shm.exit_code, 0) << shm.err;
  EXPECT_NE(shm.err.find("DELIVERY_SHM"), std::string::npos) << shm.err;
  EXPECT_TRUE(testing::ReadFile(dir_.Join("out")) == testing::ReadFile(in));
  auto inl = testing::RunCommand({testing::kChunkctlBinary, server, "get", "x", "-o",
                                  dir_.Join("out2"), "--delivery=inline", "-v"});
  EXPECT_NE(inl.err.find("DELIVERY_INLINE"), std::string::npos) << inl.err;
  auto bad =
      testing::RunCommand({testing::kChunkctlBinary, server, "get", "x", "--delivery=pigeon"});
  EXPECT_EQ(bad.exit_code, 1);
}

}  // namespace
}  // namespace chunkd

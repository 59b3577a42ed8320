// Caps on the memory leases pin (--max_pinned_fraction, --max_client_pinned_fraction), with
// the real chunkd: a greedy reader that keeps every shared-memory result cannot push the
// server past its budget, others keep working, and a killed reader's memory comes back.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/host_identity.h"
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

constexpr uint64_t kMiB = 1 << 20;

// Resident memory of a process (VmRSS): its heap and the shared-memory pages it has mapped.
uint64_t RssBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

// Memory the files of a directory use (their allocated blocks: segments are sparse).
uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    struct stat st;
    if (::stat(entry.path().c_str(), &st) == 0) total += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return total;
}

const v1::CacheTierInfo& HostTier(const v1::ServerInfoResponse& info) {
  for (const auto& tier : info.tiers()) {
    if (tier.tier() == "host") return tier;
  }
  static const v1::CacheTierInfo* none = new v1::CacheTierInfo();
  return *none;
}

class LeaseCapsTest : public ::testing::Test {
 protected:
  void StartServer(std::vector<std::string> extra) {
    std::filesystem::create_directories(dir_.Join("store"));
    std::vector<std::string> flags = {"--store=" + dir_.Join("store"), "--fsync=false",
                                      "--shm_dir=" + shm_.path()};
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  std::unique_ptr<Client> Connect(std::vector<v1::Delivery> accept,
                                  const std::string& address = "") {
    ClientOptions options;
    options.address = address.empty() ? server_->address() : address;
    options.shm_dir = shm_.path();
    options.accept = std::move(accept);
    return *Client::Connect(options);
  }
  // Puts `n` values of `size` bytes under PREFIX/c/I, value I filled with byte 'a' + I % 26.
  std::vector<std::string> PutValues(Client& c, const std::string& prefix, int n, size_t size) {
    std::vector<std::string> keys;
    for (int i = 0; i < n; ++i) {
      keys.push_back(absl::StrCat(prefix, "/c/", i));
      EXPECT_TRUE(
          c.Put(keys.back(), buffer::cpu::Buffer::CopyOf(std::string(size, 'a' + i % 26))).ok());
    }
    return keys;
  }
  // Starts chunkd_shm_reader greedy on `keys`; waits for its "holding" line and returns it.
  pid_t StartGreedy(const std::string& address, const std::vector<std::string>& keys,
                    const std::string& out, std::string* line) {
    std::vector<std::string> argv = {testing::kShmReaderBinary, address, shm_.path(), "greedy"};
    argv.insert(argv.end(), keys.begin(), keys.end());
    pid_t pid = testing::StartProcess(argv, out);
    absl::Time deadline = absl::Now() + absl::Seconds(120);
    while (testing::ReadFile(out).find("holding") == std::string::npos && absl::Now() < deadline) {
      int status;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;  // it failed: the line never comes
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    *line = testing::ReadFile(out);
    return pid;
  }
  // Seconds until the server pins no memory (leases of a dead client expired), at most `limit`.
  double SecondsUntilUnpinned(Client& c, absl::Duration limit) {
    absl::Time start = absl::Now();
    while (absl::Now() - start < limit) {
      auto info = c.ServerInfo();
      if (info.ok() && info->leases_active() == 0 && HostTier(*info).pinned_bytes() == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return absl::ToDoubleSeconds(absl::Now() - start);
  }

  TempDir dir_;
  // The server's shared-memory directory: a tmpfs of the test's own, so its use is measurable.
  TempDir shm_{"/dev/shm"};
  std::unique_ptr<ServerProcess> server_;
};

// The scenario: 64 MiB of cache, one client reading 200 distinct 1 MiB values through
// shared memory and keeping every result.
TEST_F(LeaseCapsTest, AGreedyReaderCannotPushTheServerPastItsBudget) {
  const absl::Duration ttl = absl::Seconds(2);
  StartServer({"--listen=127.0.0.1:0", "--host_cache_bytes=64MiB",
               absl::StrCat("--lease_ttl=", absl::FormatDuration(ttl))});
  auto writer = Connect({v1::DELIVERY_INLINE});
  std::vector<std::string> keys = PutValues(*writer, "greedy", 200, kMiB);
  const uint64_t limit = 64 * kMiB * 11 / 10 + 64 * kMiB;

  // Measure the server while it serves, and keep other clients reading and writing.
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> max_rss{0}, max_shm{0}, other_ops{0}, other_errors{0};
  std::thread sampler([&] {
    while (!stop.load()) {
      max_rss = std::max<uint64_t>(max_rss.load(), RssBytes(server_->pid()));
      max_shm = std::max<uint64_t>(max_shm.load(), DirBytes(shm_.path()));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  std::thread others([&] {
    auto reader = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE});
    auto w = Connect({v1::DELIVERY_INLINE});
    for (int i = 0; !stop.load(); ++i) {
      std::string key = absl::StrCat("other/c/", i % 16);
      std::string value(64 << 10, 'o' + i % 4);
      bool ok = w->Put(key, buffer::cpu::Buffer::CopyOf(value)).ok();
      auto got = reader->Get(key);
      ok = ok && got.ok() && got->data.view() == value;
      (ok ? other_ops : other_errors).fetch_add(1);
    }
  });

  std::string line;
  pid_t greedy = StartGreedy(server_->address(), keys, dir_.Join("greedy"), &line);
  ASSERT_NE(line.find("holding 200"), std::string::npos) << line;
  auto info = writer->ServerInfo();
  ASSERT_TRUE(info.ok());
  const v1::CacheTierInfo& host = HostTier(*info);
  // The caps' defaults: half the budget for everyone, a quarter for one client.
  EXPECT_EQ(host.max_pinned_bytes(), 32 * kMiB);
  EXPECT_EQ(host.max_client_pinned_bytes(), 16 * kMiB);
  // The greedy client got handles up to its cap, and the rest inline.
  int shm = 0;
  ASSERT_EQ(std::sscanf(line.c_str(), "holding 200 shm %d", &shm), 1) << line;
  EXPECT_GT(shm, 0) << line;
  EXPECT_LE(static_cast<uint64_t>(shm) * kMiB, 16 * kMiB) << line;
  EXPECT_LE(host.pinned_bytes(), 32 * kMiB);
  EXPECT_GE(host.pin_refusals_client_cap(), static_cast<uint64_t>(200 - shm));
  EXPECT_LE(info->leased_bytes(), 32 * kMiB);

  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // others go on a little
  stop = true;
  sampler.join();
  others.join();
  EXPECT_GT(other_ops.load(), 0u);
  EXPECT_EQ(other_errors.load(), 0u);
  // Under a sanitizer the server's own bookkeeping (ASan's quarantine of freed memory and its
  // shadow, TSan's shadow) dwarfs the budget: its RSS is bounded in the plain build only.
  if (std::getenv("CHUNKD_SANITIZER") == nullptr) {
    EXPECT_LE(max_rss.load(), limit) << "server RSS " << max_rss.load() / kMiB << " MiB";
  }
  EXPECT_LE(max_shm.load(), limit) << "shared memory " << max_shm.load() / kMiB << " MiB";
  std::printf(
      "peak server RSS %.1f MiB, shared memory %.1f MiB (limit %.1f MiB), %d of 200 "
      "values by shared memory, %llu reads and writes by others\n",
      max_rss.load() / double(kMiB), max_shm.load() / double(kMiB), limit / double(kMiB), shm,
      static_cast<unsigned long long>(other_ops.load()));

  // Killed, the greedy client stops renewing: its leases end within the TTL (plus the sweep,
  // a quarter of it, and slack for a loaded machine).
  ::kill(greedy, SIGKILL);
  ::waitpid(greedy, nullptr, 0);
  double seconds = SecondsUntilUnpinned(*writer, ttl * 1.25 + absl::Seconds(2));
  info = writer->ServerInfo();
  EXPECT_EQ(info->leases_active(), 0u);
  EXPECT_EQ(HostTier(*info).pinned_bytes(), 0u);
  EXPECT_LE(seconds, absl::ToDoubleSeconds(ttl * 1.25 + absl::Seconds(1)));
  std::printf("leases of the killed client ended %.2f s after its death (TTL %s)\n", seconds,
              absl::FormatDuration(ttl).c_str());
}

// A client that accepts only handles is told which cap stopped it, in Get and in GetMany; one
// that accepts inline bytes just gets them; ServerInfo, /metrics and chunkctl show the caps.
TEST_F(LeaseCapsTest, HandleOnlyClientsGetResourceExhaustedNamingTheCap) {
  StartServer({"--listen=127.0.0.1:0", "--host_cache_bytes=16MiB", "--metrics_listen=127.0.0.1:0"});
  auto writer = Connect({v1::DELIVERY_INLINE});
  std::vector<std::string> keys = PutValues(*writer, "v", 12, kMiB);

  auto only = Connect({v1::DELIVERY_SHM});
  std::vector<client::GetResult> held;
  for (int i = 0; i < 4; ++i) {
    auto got = only->Get(keys[i]);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->delivery, v1::DELIVERY_SHM);
    held.push_back(*std::move(got));
  }
  // 4 MiB is a quarter of the budget: the fifth is refused.
  auto refused = only->Get(keys[4]);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("--max_client_pinned_fraction=0.25"), std::string::npos)
      << refused.status();
  auto many = only->GetMany({{keys[0], {}, {}}, {keys[5], {}, {}}});
  ASSERT_TRUE(many.ok()) << many.status();
  EXPECT_TRUE((*many)[0].ok());  // a block it already pins costs nothing more
  ASSERT_EQ((*many)[1].status().code(), absl::StatusCode::kResourceExhausted);

  // Another client has a quarter of its own, up to half the budget for everyone.
  auto second = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE});
  int second_shm = 0;
  for (int i = 4; i < 8; ++i) {
    auto got = second->Get(keys[i]);
    ASSERT_TRUE(got.ok());
    second_shm += got->delivery == v1::DELIVERY_SHM;
    held.push_back(*std::move(got));
  }
  EXPECT_EQ(second_shm, 4);
  // Everyone together is at 8 MiB, half the budget: a third client gets inline bytes.
  auto third = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE});
  auto inline_value = third->Get(keys[8]);
  ASSERT_TRUE(inline_value.ok());
  EXPECT_EQ(inline_value->delivery, v1::DELIVERY_INLINE);
  EXPECT_EQ(inline_value->data.view(), std::string(kMiB, 'a' + 8));
  auto shm_only = Connect({v1::DELIVERY_SHM})->Get(keys[9]);
  ASSERT_EQ(shm_only.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(shm_only.status().message().find("--max_pinned_fraction=0.5"), std::string::npos)
      << shm_only.status();

  auto info = writer->ServerInfo();
  const v1::CacheTierInfo& host = HostTier(*info);
  EXPECT_EQ(host.pinned_bytes(), 8 * kMiB);
  EXPECT_EQ(host.max_pinned_bytes(), 8 * kMiB);
  EXPECT_EQ(host.max_client_pinned_bytes(), 4 * kMiB);
  EXPECT_EQ(host.pinning_clients(), 2u);
  EXPECT_EQ(host.pin_refusals_client_cap(), 2u);
  EXPECT_EQ(host.pin_refusals_total_cap(), 2u);

  int port = server_->metrics_port();
  ASSERT_GT(port, 0) << server_->log();
  httplib::Client http("127.0.0.1", port);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  const std::string& body = res->body;
  EXPECT_NE(body.find(absl::StrCat("chunkd_pinned_bytes{tier=\"host\"} ", 8 * kMiB, "\n")),
            std::string::npos)
      << body;
  EXPECT_NE(body.find(absl::StrCat("chunkd_max_pinned_bytes{tier=\"host\"} ", 8 * kMiB)),
            std::string::npos);
  EXPECT_NE(body.find(absl::StrCat("chunkd_max_client_pinned_bytes{tier=\"host\"} ", 4 * kMiB)),
            std::string::npos);
  EXPECT_NE(body.find("chunkd_pin_refusals_total{tier=\"host\",cap=\"client\"} 2\n"),
            std::string::npos);
  EXPECT_NE(body.find("chunkd_pin_refusals_total{tier=\"host\",cap=\"total\"} 2\n"),
            std::string::npos);

  auto ctl =
      testing::RunCommand({testing::kChunkctlBinary, "--server=" + server_->address(), "info"});
  EXPECT_EQ(ctl.exit_code, 0) << ctl.err;
  EXPECT_NE(ctl.out.find(absl::StrCat("tier host pinned: ", 8 * kMiB, " bytes by 2 clients, cap ",
                                      8 * kMiB, ", per client ", 4 * kMiB,
                                      ", refused at the cap 2, at the per-client cap 2")),
            std::string::npos)
      << ctl.out;
}

// Clients on one UNIX socket have no peer address: each process still has its own share.
TEST_F(LeaseCapsTest, ProcessesOnAUnixSocketEachHaveTheirOwnShare) {
  std::string socket = dir_.Join("chunkd.sock");
  StartServer({"--listen=unix:" + socket, "--host_cache_bytes=16MiB", "--lease_ttl=1s"});
  std::string address = "unix:" + socket;
  auto writer = Connect({v1::DELIVERY_INLINE}, address);
  std::vector<std::string> keys = PutValues(*writer, "u", 12, kMiB);
  std::vector<std::string> first(keys.begin(), keys.begin() + 6);
  std::vector<std::string> second(keys.begin() + 6, keys.end());
  std::string line1, line2;
  pid_t p1 = StartGreedy(address, first, dir_.Join("p1"), &line1);
  pid_t p2 = StartGreedy(address, second, dir_.Join("p2"), &line2);
  EXPECT_NE(line1.find("holding 6 shm 4 inline 2"), std::string::npos) << line1;
  EXPECT_NE(line2.find("holding 6 shm 4 inline 2"), std::string::npos) << line2;
  auto info = writer->ServerInfo();
  EXPECT_EQ(HostTier(*info).pinned_bytes(), 8 * kMiB);
  EXPECT_EQ(HostTier(*info).pinning_clients(), 2u);
  ::kill(p1, SIGKILL);
  ::kill(p2, SIGKILL);
  ::waitpid(p1, nullptr, 0);
  ::waitpid(p2, nullptr, 0);
  SecondsUntilUnpinned(*writer, absl::Seconds(5));
  EXPECT_EQ(HostTier(*writer->ServerInfo()).pinned_bytes(), 0u);
}

// On a UNIX socket the per-client cap counts the process the kernel names (SO_PEERCRED), not
// the one a client states: a client that states a new process id with every call still gets
// one client's share, not one share per call.
TEST_F(LeaseCapsTest, StatedProcessIdsDoNotMultiplyAClientsShareOnAUnixSocket) {
  std::string socket = dir_.Join("chunkd.sock");
  StartServer({"--listen=unix:" + socket, "--host_cache_bytes=16MiB"});
  std::string address = "unix:" + socket;
  auto writer = Connect({v1::DELIVERY_INLINE}, address);
  std::vector<std::string> keys = PutValues(*writer, "s", 12, kMiB);
  auto stub = v1::Chunkd::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  buffer::HostIdentity id = buffer::CurrentHostIdentity(shm_.path());
  int shm = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    v1::GetRequest request;
    request.set_key(keys[i]);
    request.add_accept(v1::DELIVERY_SHM);
    request.add_accept(v1::DELIVERY_INLINE);
    v1::ClientIdentity* client = request.mutable_client();
    client->set_boot_id(id.boot_id);
    client->set_ipc_namespace(id.ipc_namespace);
    client->set_mount_namespace(id.mount_namespace);
    client->set_shm_dir(id.shm_dir);
    client->set_shm_dir_dev(id.shm_dir_dev);
    client->set_shm_dir_ino(id.shm_dir_ino);
    client->set_process_id(100000 + i);  // a different "process" every call
    grpc::ClientContext context;
    auto reader = stub->Get(&context, request);
    v1::GetResponse response;
    ASSERT_TRUE(reader->Read(&response));
    shm += response.header().delivery() == v1::DELIVERY_SHM;
    while (reader->Read(&response)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  // A quarter of 16 MiB per client: 4 of the 1 MiB values as handles, the rest inline.
  EXPECT_EQ(shm, 4);
  auto info = writer->ServerInfo();
  EXPECT_EQ(HostTier(*info).pinning_clients(), 1u);
  EXPECT_EQ(HostTier(*info).pin_refusals_client_cap(), 8u);
}

// The count of leases is capped per client too: one client asking for the same small value
// hundreds of times gets handles up to --max_client_leases, inline after, and another client
// still gets handles.
TEST_F(LeaseCapsTest, OneClientsRepeatedLeasesLeaveOthersTheirHandles) {
  StartServer({"--listen=127.0.0.1:0", "--host_cache_bytes=16MiB", "--max_client_leases=100"});
  auto writer = Connect({v1::DELIVERY_INLINE});
  ASSERT_TRUE(writer->Put("small", buffer::cpu::Buffer::CopyOf(std::string(4096, 's'))).ok());
  auto greedy = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE});
  std::vector<client::GetManyItem> items(300, client::GetManyItem{"small", {}, {}});
  auto got = greedy->GetMany(items);
  ASSERT_TRUE(got.ok()) << got.status();
  int shm = 0;
  for (const auto& r : *got) {
    ASSERT_TRUE(r.ok()) << r.status() << server_->log();
    EXPECT_EQ(r->data.view(), std::string(4096, 's'));
    shm += r->delivery == v1::DELIVERY_SHM;
  }
  EXPECT_EQ(shm, 100);
  auto other = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE});
  auto mine = other->Get("small");
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(mine->delivery, v1::DELIVERY_SHM);
  EXPECT_EQ(greedy->ServerInfo()->counters().at("lease_count_refusals"), 200u);
}

// On a UNIX socket, a process asking for the same value again gets the lease it holds, counted
// once more: 300 items of one value take one lease, all of them handles, and dropping every
// result gives it back.
TEST_F(LeaseCapsTest, OneProcessAskingForOneValueOnAUnixSocketHoldsOneLease) {
  std::string socket = dir_.Join("chunkd.sock");
  StartServer({"--listen=unix:" + socket, "--host_cache_bytes=16MiB", "--max_client_leases=100"});
  std::string address = "unix:" + socket;
  auto writer = Connect({v1::DELIVERY_INLINE}, address);
  ASSERT_TRUE(writer->Put("small", buffer::cpu::Buffer::CopyOf(std::string(4096, 's'))).ok());
  auto reader = Connect({v1::DELIVERY_SHM, v1::DELIVERY_INLINE}, address);
  std::vector<client::GetManyItem> items(300, client::GetManyItem{"small", {}, {}});
  auto got = reader->GetMany(items);
  ASSERT_TRUE(got.ok()) << got.status();
  for (const auto& r : *got) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->delivery, v1::DELIVERY_SHM);
    EXPECT_EQ(r->data.view(), std::string(4096, 's'));
  }
  EXPECT_EQ(writer->ServerInfo()->leases_active(), 1u);
  EXPECT_EQ(reader->leases_held(), 1u);
  // Half the results go: the lease stays; all of them: it goes.
  got->resize(150);
  ASSERT_TRUE(reader->FlushReleases());
  EXPECT_EQ(writer->ServerInfo()->leases_active(), 1u);
  got->clear();
  ASSERT_TRUE(reader->FlushReleases());
  EXPECT_EQ(reader->leases_held(), 0u);
  EXPECT_EQ(writer->ServerInfo()->leases_active(), 0u);
  EXPECT_EQ(writer->ServerInfo()->counters().at("leases_unknown"), 0u);
}

}  // namespace
}  // namespace chunkd

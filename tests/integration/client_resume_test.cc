// A Get whose reply is cut off mid-value (a server's shutdown closing its connection with the
// last megabytes unsent) is resumed by the client from the bytes it has, at the same
// generation, and ends with the whole value (client/replies.h, InterruptedGet). The cut is made
// by a TCP proxy between the real client and the real server, so it falls at a known place.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/client.h"
#include "client/sharded_client.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using testing::ServerProcess;
using testing::TempDir;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

// A TCP proxy on 127.0.0.1 in front of one server. Its first connection is closed (both ways,
// as a server that goes away closes it) once `cut_after` bytes came from the server; later
// connections pass whole. Counts the bytes the server sent through it.
class CuttingProxy {
 public:
  CuttingProxy(const std::string& server_address, uint64_t cut_after) : cut_after_(cut_after) {
    size_t colon = server_address.rfind(':');
    EXPECT_TRUE(absl::SimpleAtoi(server_address.substr(colon + 1), &server_port_));
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listen_fd_, 16), 0);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
    EXPECT_EQ(::pipe(stop_), 0);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~CuttingProxy() {
    char c = 0;
    EXPECT_EQ(::write(stop_[1], &c, 1), 1);
    accept_thread_.join();
    std::vector<std::thread> pumps;
    {
      absl::MutexLock lock(&mu_);
      pumps.swap(pumps_);
    }
    for (std::thread& t : pumps) t.join();
    ::close(listen_fd_);
    ::close(stop_[0]);
    ::close(stop_[1]);
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  // Bytes the server sent on the connection that was cut, and on the later ones.
  uint64_t cut_from_server() const { return cut_from_server_.load(); }
  uint64_t later_from_server() const { return later_from_server_.load(); }
  int connections() const { return connections_.load(); }

 private:
  void AcceptLoop() {
    while (true) {
      pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) continue;
      if (fds[1].revents != 0) return;
      int client = ::accept(listen_fd_, nullptr, nullptr);
      if (client < 0) continue;
      int server = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(server_port_));
      if (::connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
        ::close(client);
        ::close(server);
        continue;
      }
      bool cut = connections_.fetch_add(1) == 0;
      absl::MutexLock lock(&mu_);
      pumps_.emplace_back([this, client, server, cut] { Pump(client, server, cut); });
    }
  }

  // Forwards both ways until either side closes (or the cut, or the proxy stops).
  void Pump(int client, int server, bool cut) {
    std::vector<char> buffer(256 << 10);
    uint64_t sent = 0;
    bool open = true;
    while (open) {
      pollfd fds[3] = {{client, POLLIN, 0}, {server, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(fds, 3, -1) < 0) continue;
      if (fds[2].revents != 0) break;
      for (int side = 0; side < 2 && open; ++side) {
        if (fds[side].revents == 0) continue;
        int from = side == 0 ? client : server, to = side == 0 ? server : client;
        ssize_t n = ::read(from, buffer.data(), buffer.size());
        if (n <= 0) {
          open = false;
          break;
        }
        if (side == 1 && cut) {
          n = static_cast<ssize_t>(std::min<uint64_t>(n, cut_after_ - sent));
          if (n == 0) {
            // The cut: the connection goes, mid-reply, once the client had time to take in
            // what it was sent (as when a server pauses before closing).
            pollfd stop = {stop_[0], POLLIN, 0};
            ::poll(&stop, 1, 500);
            open = false;
            break;
          }
        }
        for (ssize_t done = 0; done < n;) {
          ssize_t w = ::write(to, buffer.data() + done, n - done);
          if (w <= 0) {
            open = false;
            break;
          }
          done += w;
        }
        if (side == 1) {
          sent += n;
          (cut ? cut_from_server_ : later_from_server_) += n;
        }
      }
    }
    ::close(client);
    ::close(server);
  }

  const uint64_t cut_after_;
  int server_port_ = 0;
  int listen_fd_ = -1;
  int port_ = 0;
  int stop_[2] = {-1, -1};
  std::atomic<uint64_t> cut_from_server_{0};
  std::atomic<uint64_t> later_from_server_{0};
  std::atomic<int> connections_{0};
  std::thread accept_thread_;
  absl::Mutex mu_;
  std::vector<std::thread> pumps_ ABSL_GUARDED_BY(mu_);
};

constexpr size_t kValueBytes = 8 << 20;
constexpr uint64_t kCutAfter = 3 << 20;

class ClientResume : public ::testing::TestWithParam<bool> {};

// The cut-off Get (blocking, then asynchronous) asks only for the rest: after the cut, the
// server sends less than the value (read again whole, it would send all of it).
TEST_P(ClientResume, ACutOffGetIsResumedFromTheBytesItHas) {
  const bool async = GetParam();
  TempDir dir;
  auto server = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path()});
  ASSERT_TRUE(server.ok()) << server.status();
  std::string value = testing::RandomBytes(kValueBytes, 11);
  {
    ClientOptions direct;
    direct.address = (*server)->address();
    ASSERT_TRUE((*Client::Connect(direct))->Put("v", Bytes(value)).ok());
  }
  CuttingProxy proxy((*server)->address(), kCutAfter);
  ClientOptions options;
  options.address = proxy.address();
  options.timeout = absl::Seconds(60);
  options.max_attempts = 10;
  auto client = *Client::Connect(options);
  absl::StatusOr<client::GetResult> got;
  if (async) {
    absl::Notification done;
    client->GetAsync("v", {}, [&](absl::StatusOr<client::GetResult> r) {
      got = std::move(r);
      done.Notify();
    });
    done.WaitForNotification();
  } else {
    got = client->Get("v");
  }
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->data.view() == value);
  EXPECT_EQ(got->range_start, 0u);
  EXPECT_EQ(got->total_size, kValueBytes);
  EXPECT_GE(proxy.connections(), 2);  // the cut happened, and the rest came on a new connection
  EXPECT_EQ(proxy.cut_from_server(), kCutAfter);
  // At least two whole 1 MiB parts had arrived before the cut.
  EXPECT_LT(proxy.later_from_server(), kValueBytes - (1 << 20));
}

INSTANTIATE_TEST_SUITE_P(BlockingAndAsync, ClientResume, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Async" : "Blocking"; });

// A range Get continues within its range; a value replaced between the cut and the next attempt
// is read again whole, never stitched from two generations.
TEST(ClientResumeRange, ARangeContinuesWithinItsRangeAndAReplacedValueIsReadWhole) {
  TempDir dir;
  auto server = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path()});
  ASSERT_TRUE(server.ok()) << server.status();
  std::string value = testing::RandomBytes(kValueBytes, 12);
  ClientOptions direct_options;
  direct_options.address = (*server)->address();
  auto direct = *Client::Connect(direct_options);
  ASSERT_TRUE(direct->Put("v", Bytes(value)).ok());
  {
    CuttingProxy proxy((*server)->address(), kCutAfter);
    ClientOptions options;
    options.address = proxy.address();
    options.max_attempts = 10;
    auto client = *Client::Connect(options);
    client::GetOptions range;
    range.range = client::ByteRange::Bounded(1 << 20, 7 << 20);
    auto got = client->Get("v", range);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(got->data.view() == std::string_view(value).substr(1 << 20, 6 << 20));
    EXPECT_EQ(got->range_start, 1u << 20);
    EXPECT_GE(proxy.connections(), 2);
    // Only the rest of the range came after the cut (two parts, at least, had arrived).
    EXPECT_LT(proxy.later_from_server(), (6u << 20) - (1u << 20));
  }
  {
    // The value is replaced while the first attempt's reply is on its way: the cut comes after
    // the replacement (the proxy holds the connection), and the continuation's generation
    // condition fails, so the next attempt reads the new value whole.
    std::string replacement = testing::RandomBytes(kValueBytes, 13);
    CuttingProxy proxy((*server)->address(), kCutAfter);
    ClientOptions options;
    options.address = proxy.address();
    options.max_attempts = 10;
    auto client = *Client::Connect(options);
    std::thread writer([&] {
      while (proxy.cut_from_server() == 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      EXPECT_TRUE(direct->Put("v", Bytes(replacement)).ok());
    });
    auto got = client->Get("v");
    writer.join();
    ASSERT_TRUE(got.ok()) << got.status();
    // One value or the other, whole: never the first bytes of one and the rest of the other.
    EXPECT_TRUE(got->data.view() == value || got->data.view() == replacement);
  }
}

// In a pool, the key's next server continues what its home server's reply left: the second
// server sends only the rest (both servers over one store, so the generation is the same).
TEST(ClientResumeRange, APoolContinuesACutOffGetOnTheKeysNextServer) {
  TempDir dir;
  auto home = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path()});
  auto next = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path()});
  ASSERT_TRUE(home.ok()) << home.status();
  ASSERT_TRUE(next.ok()) << next.status();
  CuttingProxy cut((*home)->address(), kCutAfter);
  CuttingProxy whole((*next)->address(), ~uint64_t{0});  // counts, cuts nothing
  client::ShardedClientOptions options;
  options.servers = {cut.address(), whole.address()};
  options.client.max_attempts = 1;  // the cut fails the home server's attempt: on to the next
  auto pool = *client::ShardedClient::Connect(options);
  std::string key;
  for (int i = 0; key.empty(); ++i) {
    std::string k = absl::StrCat("v", i);
    if (pool->RankedServers(k).front() == cut.address()) key = k;
  }
  std::string value = testing::RandomBytes(kValueBytes, 14);
  ClientOptions direct;
  direct.address = (*next)->address();
  ASSERT_TRUE((*Client::Connect(direct))->Put(key, Bytes(value)).ok());
  auto got = pool->Get(key);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->data.view() == value);
  EXPECT_EQ(cut.cut_from_server(), kCutAfter);
  uint64_t from_next = whole.cut_from_server() + whole.later_from_server();
  EXPECT_GT(from_next, 0u);
  EXPECT_LT(from_next, kValueBytes - (1 << 20));
}

}  // namespace
}  // namespace chunkd

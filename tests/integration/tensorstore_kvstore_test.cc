// TensorStore's key-value service (tensorstore_grpc.kvstore) of the real chunkd binary, over TCP
// and a UNIX socket, as chunkd.v1 is tested in server_test.cc: values of every size, bad keys,
// conditions, ranges, deletes of ranges, listings, the cache shared with chunkd.v1, limits,
// health, metrics and shutdown. (Tokens and the longest call: security_test.cc; TensorStore's
// own driver: python/tests/test_tensorstore_*.py.)
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "client/health.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/support/tensorstore_client.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using testing::kTsNoValue;
using testing::ServerProcess;
using testing::TempDir;
using testing::TsClient;
using testing::TsRead;
using testing::TsReadOptions;
namespace tskv = ::tensorstore_grpc::kvstore;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

// chunkd's generation G as TensorStore sees it: "\x00" and G in little-endian order.
std::string TsGeneration(uint64_t g) {
  std::string bytes(1, '\0');
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>(g >> (8 * i)));
  return bytes;
}

class TensorStoreServiceTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    root_ = new TempDir();
    std::filesystem::create_directories(root_->Join("store"));
    auto server = ServerProcess::Start({"--listen=127.0.0.1:0,unix:" + root_->Join("sock"),
                                        "--store=" + root_->Join("store"), "--fsync=false",
                                        "--host_cache_bytes=512MiB"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    if (server_) {
      EXPECT_EQ(server_->Stop(SIGTERM), 0) << server_->log();
    }
    delete server_;
    delete root_;
    server_ = nullptr;
    root_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    address_ = GetParam() == "tcp" ? server_->addresses()[0] : server_->addresses()[1];
    ts_ = std::make_unique<TsClient>(address_);
  }
  std::string Key(const std::string& name) { return "ts-" + GetParam() + "/" + name; }
  std::unique_ptr<client::Client> ChunkdClient() {
    client::ClientOptions options;
    options.address = address_;
    return *client::Client::Connect(options);
  }

  static TempDir* root_;
  static ServerProcess* server_;
  std::string address_;
  std::unique_ptr<TsClient> ts_;
};
TempDir* TensorStoreServiceTest::root_ = nullptr;
ServerProcess* TensorStoreServiceTest::server_ = nullptr;

TEST_P(TensorStoreServiceTest, RoundTripsValuesOfEverySize) {
  for (size_t size :
       {size_t{0}, size_t{1}, size_t{4096}, size_t{(1 << 20) + 1}, size_t{64} << 20}) {
    SCOPED_TRACE(size);
    std::string value = testing::RandomBytes(size, size);
    std::string generation;
    grpc::Status w = ts_->Write(Key("v"), value, &generation);
    ASSERT_TRUE(w.ok()) << w.error_message();
    ASSERT_EQ(generation.size(), 9u);
    TsRead r = ts_->Read(Key("v"));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.state, tskv::ReadResponse::VALUE);
    EXPECT_EQ(r.generation, generation);
    EXPECT_TRUE(r.value == value);
    // Parts of at most 1 MiB: the header and the first part share a message.
    EXPECT_EQ(r.messages, std::max<size_t>(1, (size + (1 << 20) - 1) >> 20));
    EXPECT_TRUE(testing::ReadFile(root_->Join("store/" + Key("v"))) == value);
  }
}

TEST_P(TensorStoreServiceTest, SharesValuesAndGenerationsWithChunkdV1) {
  auto chunkd = ChunkdClient();
  auto put = chunkd->Put(Key("shared"), Bytes("from chunkd.v1"));
  ASSERT_TRUE(put.ok()) << put.status();
  TsRead r = ts_->Read(Key("shared"));
  EXPECT_EQ(r.value, "from chunkd.v1");
  EXPECT_EQ(r.generation, TsGeneration(put->generation));
  std::string generation;
  ASSERT_TRUE(ts_->Write(Key("shared"), "from TensorStore", &generation).ok());
  auto got = chunkd->Get(Key("shared"));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::string(got->data.view()), "from TensorStore");
  EXPECT_EQ(TsGeneration(got->generation), generation);
}

TEST_P(TensorStoreServiceTest, RefusesBadKeysAndTouchesNothingOutsideTheRoot) {
  std::string outside = root_->Join("outside");
  std::filesystem::create_directories(outside);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "empty"},
      {"/abs", "starts with '/'"},
      {"a//b", "empty segment"},
      {"a/", "empty segment"},
      {"../../etc/passwd", "'..' segment"},
      {"a/../../b", "'..' segment"},
      {"../outside/x", "'..' segment"},
      {"a/./b", "'.' segment"},
      {std::string("a\0b", 3), "NUL"},
      {"a\x01"
       "b",
       "control character"},
      {"bad\xff"
       "utf8",
       "UTF-8"},
      {std::string(1025, 'k'), "longer than 1024"},
  };
  for (const auto& [key, reason] : bad) {
    SCOPED_TRACE(reason);
    TsRead r = ts_->Read(key);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(r.status.error_message(), reason)) << r.status.error_message();
    grpc::Status w = ts_->Write(key, "x", nullptr);
    EXPECT_EQ(w.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << w.error_message();
    EXPECT_TRUE(absl::StrContains(w.error_message(), reason)) << w.error_message();
    EXPECT_EQ(ts_->Delete(key).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_TRUE(std::filesystem::is_empty(outside));
  EXPECT_FALSE(testing::PathExists(root_->Join("b")));
  std::vector<std::string> keys;
  EXPECT_EQ(ts_->List("/a", "/b", &keys).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ts_->DeleteRange("/a", "/b").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_P(TensorStoreServiceTest, FailedConditionsAreAnswersNotErrors) {
  std::string g1, g2, none;
  ASSERT_TRUE(ts_->Write(Key("c"), "one", &g1).ok());
  // Write: on the right generation, on another one, only if absent.
  ASSERT_TRUE(ts_->Write(Key("c"), "two", &g2, g1).ok());
  EXPECT_NE(g2, g1);
  ASSERT_TRUE(ts_->Write(Key("c"), "three", &none, g1).ok());
  EXPECT_EQ(none, "");
  ASSERT_TRUE(ts_->Write(Key("c"), "three", &none, kTsNoValue).ok());
  EXPECT_EQ(none, "");
  EXPECT_EQ(ts_->Read(Key("c")).value, "two");
  // Read: if_equal and if_not_equal.
  TsRead r = ts_->Read(Key("c"), TsReadOptions::IfEqual(g1));
  EXPECT_TRUE(r.status.ok());
  EXPECT_EQ(r.state, tskv::ReadResponse::UNSPECIFIED);
  EXPECT_EQ(r.generation, g2);
  EXPECT_EQ(r.value, "");
  EXPECT_EQ(ts_->Read(Key("c"), TsReadOptions::IfNotEqual(g2)).state,
            tskv::ReadResponse::UNSPECIFIED);
  EXPECT_EQ(ts_->Read(Key("c"), TsReadOptions::IfEqual(g2)).value, "two");
  // Delete: aborted on another generation, done on the right one.
  std::string deleted;
  ASSERT_TRUE(ts_->Delete(Key("c"), &deleted, g1).ok());
  EXPECT_EQ(deleted, "");
  ASSERT_TRUE(ts_->Delete(Key("c"), &deleted, g2).ok());
  EXPECT_EQ(deleted, kTsNoValue);
  r = ts_->Read(Key("c"));
  EXPECT_EQ(r.state, tskv::ReadResponse::MISSING);
  EXPECT_EQ(r.generation, kTsNoValue);
  // A missing key: "only if absent" holds, a generation does not.
  ASSERT_TRUE(ts_->Delete(Key("c"), &deleted, kTsNoValue).ok());
  EXPECT_EQ(deleted, kTsNoValue);
  ASSERT_TRUE(ts_->Delete(Key("c"), &deleted, g2).ok());
  EXPECT_EQ(deleted, "");
}

TEST_P(TensorStoreServiceTest, RangesMustLieWithinTheValue) {
  ASSERT_TRUE(ts_->Write(Key("r"), "0123456789", nullptr).ok());
  EXPECT_EQ(ts_->Read(Key("r"), TsReadOptions::Range(2, 5)).value, "234");
  EXPECT_EQ(ts_->Read(Key("r"), TsReadOptions::Range(7)).value, "789");
  EXPECT_EQ(ts_->Read(Key("r"), TsReadOptions::Range(-3)).value, "789");
  EXPECT_EQ(ts_->Read(Key("r"), TsReadOptions::Range(10)).value, "");
  for (const TsReadOptions& options :
       {TsReadOptions::Range(11), TsReadOptions::Range(5, 11), TsReadOptions::Range(-11)}) {
    TsRead r = ts_->Read(Key("r"), options);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::OUT_OF_RANGE) << r.status.error_message();
  }
  TsRead r = ts_->Read(Key("r"), TsReadOptions::Range(5, 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_P(TensorStoreServiceTest, ListsAndDeletesRanges) {
  std::string base = Key("lr/");
  for (const char* k : {"a/a", "a/b", "a/c/a", "a/c/b", "b/a", "b/b"}) {
    ASSERT_TRUE(ts_->Write(base + k, "", nullptr).ok());
  }
  std::vector<std::string> keys;
  ASSERT_TRUE(ts_->List(base + "a/b", base + "b/aa", &keys, base.size()).ok());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"a/b", "a/c/a", "a/c/b", "b/a"}));
  ASSERT_TRUE(ts_->DeleteRange(base + "a/b", base + "b/aa").ok());
  keys.clear();
  // Everything under base: [base, base with its last byte incremented).
  ASSERT_TRUE(ts_->List(base, Key("lr0"), &keys, base.size()).ok());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"a/a", "b/b"}));
  EXPECT_FALSE(testing::PathExists(root_->Join("store/" + base + "a/c/a")));
}

TEST_P(TensorStoreServiceTest, ListingsOfManyKeysComeInPages) {
  // More keys than a page (1000): the listing is streamed page by page.
  const int n = 2500;
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      TsClient ts(address_);
      for (int i = t; i < n; i += 4) ts.Write(Key(absl::StrCat("many/", 10000 + i)), "", nullptr);
    });
  }
  for (auto& w : writers) w.join();
  std::vector<std::string> keys;
  ASSERT_TRUE(ts_->List(Key("many/"), Key("many0"), &keys).ok());
  EXPECT_EQ(keys.size(), static_cast<size_t>(n));
  keys.clear();
  ASSERT_TRUE(ts_->List(Key("many/11000"), Key("many/11100"), &keys).ok());
  EXPECT_EQ(keys.size(), 100u);
  ASSERT_TRUE(ts_->DeleteRange(Key("many/"), Key("many0")).ok());
  keys.clear();
  ASSERT_TRUE(ts_->List(Key("many/"), Key("many0"), &keys).ok());
  EXPECT_TRUE(keys.empty());
}

INSTANTIATE_TEST_SUITE_P(Transports, TensorStoreServiceTest, ::testing::Values("tcp", "unix"),
                         [](const auto& info) { return info.param; });

TEST(TensorStoreServiceLimits, ReadOnlyRefusesWritesAndDeletes) {
  TempDir dir;
  testing::WriteFile(dir.Join("k"), "kept");
  auto server =
      ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path(), "--read_only"});
  ASSERT_TRUE(server.ok()) << server.status();
  {
    TsClient ts((*server)->address());
    EXPECT_EQ(ts.Read("k").value, "kept");
    grpc::Status s = ts.Write("k", "new", nullptr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_TRUE(absl::StrContains(s.error_message(), "read-only")) << s.error_message();
    EXPECT_EQ(ts.Delete("k").error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_EQ(ts.DeleteRange("", "").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  EXPECT_EQ(testing::ReadFile(dir.Join("k")), "kept");
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(TensorStoreServiceLimits, RefusesValuesOverTheMaximum) {
  TempDir dir;
  auto server = ServerProcess::Start(
      {"--listen=127.0.0.1:0", "--store=" + dir.path(), "--max_value_bytes=1MiB"});
  ASSERT_TRUE(server.ok()) << server.status();
  {
    // (Closed before the server stops: a synchronous client's idle connection is not polled,
    // and the server's shutdown waits seconds for it to acknowledge the GOAWAY.)
    TsClient ts((*server)->address());
    grpc::Status s = ts.Write("big", std::string((1 << 20) + 1, 'x'), nullptr);
    // Not RESOURCE_EXHAUSTED, which TensorStore's driver retries: this write can never succeed.
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), "--max_value_bytes")) << s.error_message();
    EXPECT_FALSE(testing::PathExists(dir.Join("big")));
    EXPECT_TRUE(ts.Write("fits", std::string(1 << 20, 'x'), nullptr).ok());
  }
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(TensorStoreServiceLimits, AWriteAloneMayExceedTheWriteBudget) {
  // A Write reserves --max_inflight_put_bytes part by part as its parts arrive; alone on the
  // server it is admitted whatever its size, as a Put is.
  TempDir dir;
  auto server = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path(),
                                      "--fsync=false", "--max_inflight_put_bytes=2MiB"});
  ASSERT_TRUE(server.ok()) << server.status();
  {
    TsClient ts((*server)->address());
    std::string value = testing::RandomBytes(5 << 20, 3);
    grpc::Status s = ts.Write("big", value, nullptr);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(ts.Read("big").value == value);
  }
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(TensorStoreServiceLifecycle, SigtermFinishesReadsInFlightAndExitsZero) {
  TempDir dir;
  auto flags = [&](const std::string& listen) {
    return std::vector<std::string>{"--listen=" + listen, "--store=" + dir.path(), "--fsync=false",
                                    "--shutdown_grace=20s"};
  };
  auto server = ServerProcess::Start(flags("127.0.0.1:0"));
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string address = (*server)->address();
  std::string value = testing::RandomBytes(32 << 20, 5);
  TsClient ts(address);
  ASSERT_TRUE(ts.Write("v", value, nullptr).ok());
  client::ClientOptions options;
  options.address = address;
  auto chunkd = *client::Client::Connect(options);
  auto reads_started = [&] {
    auto info = chunkd->ServerInfo();
    return info.ok() ? info->counters().at("tensorstore_gets") : 0;
  };
  // Each reader keeps what arrived; a Read that the shutdown cuts off (gRPC 1.51's server can
  // close a connection with the last megabytes of a reply unsent) is taken up where it stopped,
  // by byte range at the generation it began with, as a TensorStore reader resumes: every
  // Read in flight must end with the whole value.
  struct Reader {
    TsRead first;
    std::string generation;
  };
  std::vector<Reader> results(4);
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&, i] { results[i].first = ts.Read("v"); });
  }
  // SIGTERM once at least one Read has reached the server.
  uint64_t started = 0;
  for (absl::Time end = absl::Now() + absl::Seconds(20); started == 0 && absl::Now() < end;) {
    started = reads_started();
  }
  ASSERT_GT(started, 0u);
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->log();
  for (auto& t : readers) t.join();
  // The same store again at the same address, for the Reads the shutdown cut off or refused.
  auto restarted = ServerProcess::Start(flags(address));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  TsClient again(address);
  int resumed = 0;
  for (Reader& r : results) {
    std::string got = r.first.value;
    if (!r.first.status.ok()) {
      // A Read either has the whole value or fails: never OK with other bytes. It fails
      // UNAVAILABLE when the connection closes before its last bytes arrive, CANCELLED when it
      // came too late.
      EXPECT_TRUE(r.first.status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                  r.first.status.error_code() == grpc::StatusCode::CANCELLED)
          << r.first.status.error_message();
      testing::TsReadOptions rest = testing::TsReadOptions::Range(static_cast<int64_t>(got.size()));
      if (r.first.messages > 0)
        rest.if_equal = r.first.generation;  // the version it began
      else
        got.clear();
      TsRead more = again.Read("v", rest);
      ASSERT_TRUE(more.status.ok()) << more.status.error_message();
      EXPECT_EQ(more.state, tensorstore_grpc::kvstore::ReadResponse::VALUE);
      got += more.value;
      ++resumed;
    }
    EXPECT_EQ(got.size(), value.size());
    EXPECT_TRUE(got == value) << "a Read in flight at SIGTERM did not end with the value";
  }
  if (resumed > 0) std::cerr << resumed << " of 4 reads were resumed after the restart\n";
  EXPECT_EQ((*restarted)->Stop(SIGTERM), 0) << (*restarted)->log();
}

TEST(TensorStoreServiceLifecycle, HealthAndMetricsNameTheService) {
  TempDir dir;
  auto server = ServerProcess::Start(
      {"--listen=127.0.0.1:0", "--store=" + dir.path(), "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  client::ClientOptions options;
  options.address = (*server)->address();
  auto health =
      client::CheckHealth(options, absl::Seconds(10), "tensorstore_grpc.kvstore.KvStoreService");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");

  {
    TsClient ts((*server)->address());
    ASSERT_TRUE(ts.Write("k", "12345", nullptr).ok());
    ASSERT_TRUE(ts.Read("k").status.ok());
    ASSERT_EQ(ts.Read("k", TsReadOptions::Range(11)).status.error_code(),
              grpc::StatusCode::OUT_OF_RANGE);
    std::vector<std::string> keys;
    ASSERT_TRUE(ts.List("", "", &keys).ok());
    ASSERT_TRUE(ts.Delete("k").ok());
  }
  int port = (*server)->metrics_port();
  ASSERT_GT(port, 0) << (*server)->log();
  httplib::Client http("127.0.0.1", port);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  const std::string& body = res->body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_gets_total 2\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_get_errors_total 1\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_bytes_served_inline_total 5\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_puts_total 1\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_bytes_written_total 5\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_lists_total 1\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_tensorstore_deletes_total 1\n")) << body;
  // chunkd.v1's counters are its own.
  EXPECT_TRUE(absl::StrContains(body, "chunkd_gets_total 0\n")) << body;
  EXPECT_TRUE(absl::StrContains(body, "chunkd_puts_total 0\n")) << body;
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace chunkd

// Warming the cache: the Prefetch RPC and the --warm flag, against the real chunkd.
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/client.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using testing::ServerProcess;
using testing::TempDir;

// A store directory holding arr/c/0 .. arr/c/9 (1 KiB each) and other/x, written behind the
// server's back so nothing is cached until warmed.
void FillStore(const TempDir& dir) {
  std::filesystem::create_directories(dir.Join("arr/c"));
  std::filesystem::create_directories(dir.Join("other"));
  for (int i = 0; i < 10; ++i) {
    testing::WriteFile(dir.Join(absl::StrCat("arr/c/", i)), std::string(1024, 'a' + i));
  }
  testing::WriteFile(dir.Join("other/x"), "x");
}

uint64_t Counter(client::Client& c, const std::string& name) {
  auto info = c.ServerInfo();
  auto it = info->counters().find(name);
  return it == info->counters().end() ? 0 : it->second;
}

TEST(Prefetch, WarmsKeysAndPrefixesAndStreamsProgress) {
  TempDir dir;
  FillStore(dir);
  auto server = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path()});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Chunkd::NewStub(
      grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::PrefetchRequest request;
  request.add_keys("other/x");
  request.add_keys("missing/key");
  request.set_prefix("arr/");
  auto reader = stub->Prefetch(&context, request);
  v1::PrefetchResponse progress, last;
  int messages = 0;
  while (reader->Read(&progress)) {
    last = progress;
    ++messages;
  }
  grpc::Status finished = reader->Finish();
  ASSERT_TRUE(finished.ok()) << finished.error_message();
  EXPECT_GE(messages, 1);
  EXPECT_EQ(last.keys_done(), 11u);
  EXPECT_EQ(last.bytes_loaded(), 10u * 1024 + 1);
  EXPECT_EQ(last.keys_failed(), 1u);
  ASSERT_EQ(last.errors_size(), 1);
  EXPECT_NE(last.errors(0).find("missing/key"), std::string::npos);

  // Everything warmed is now a hit.
  client::ClientOptions options;
  options.address = (*server)->address();
  auto c = *client::Client::Connect(options);
  uint64_t misses = Counter(*c, "misses");
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(c->Get(absl::StrCat("arr/c/", i)).ok());
  EXPECT_EQ(Counter(*c, "misses"), misses);

  grpc::ClientContext bad_context;
  v1::PrefetchRequest bad;
  bad.add_keys("../etc/passwd");
  auto bad_reader = stub->Prefetch(&bad_context, bad);
  while (bad_reader->Read(&progress)) {
  }
  EXPECT_EQ(bad_reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(Prefetch, WarmFlagFillsTheCacheAtStart) {
  TempDir dir;
  FillStore(dir);
  auto server =
      ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path(), "--warm=arr/"});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while ((*server)->log().find("warmed prefix") == std::string::npos && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE((*server)->log().find("warmed prefix \"arr/\": 10 keys"), std::string::npos)
      << (*server)->log();
  client::ClientOptions options;
  options.address = (*server)->address();
  auto c = *client::Client::Connect(options);
  auto info = c->ServerInfo();
  EXPECT_EQ(info->tiers(0).entries(), 10u);
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace chunkd

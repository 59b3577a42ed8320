// The real chunkd binary in front of remote stores: --store=s3://... against moto's S3 server and
// --store=http://... against nginx, both on loopback; the store going away mid-run.
#include <signal.h>

#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "tests/unit/http_s3_test_servers.h"

namespace chunkd {
namespace {

using client::ByteRange;
using client::Client;
using client::ClientOptions;
using client::Conditions;
using client::GetOptions;
using testing::MotoServer;
using testing::NginxServer;
using testing::RandomBytes;
using testing::ServerProcess;
using testing::TempDir;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }
std::string Str(const buffer::cpu::Buffer& b) { return std::string(b.view()); }

std::unique_ptr<Client> Connect(const std::string& address, int attempts = 3) {
  ClientOptions options;
  options.address = address;
  options.timeout = absl::Seconds(30);
  options.max_attempts = attempts;
  auto client = Client::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return *std::move(client);
}

// Flags that make a store that went away fail fast.
const std::vector<std::string> kFastRemote = {"--http_max_attempts=2", "--http_timeout=3s",
                                              "--http_connect_timeout=2s", "--fsync=false"};

class S3ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto moto = MotoServer::Start();
    if (absl::IsNotFound(moto.status())) {
      GTEST_SKIP() << moto.status();
    }
    ASSERT_TRUE(moto.ok()) << moto.status();
    moto_ = *std::move(moto);
    ASSERT_TRUE(moto_->CreateBucket("data").ok());
    testing::SetTestAwsCredentials();  // the server inherits the environment
  }
  absl::StatusOr<std::unique_ptr<ServerProcess>> StartChunkd(std::vector<std::string> extra = {}) {
    std::vector<std::string> flags = {"--listen=127.0.0.1:0", "--store=s3://data/era5.zarr",
                                      "--s3_endpoint=" + moto_->endpoint()};
    flags.insert(flags.end(), kFastRemote.begin(), kFastRemote.end());
    flags.insert(flags.end(), extra.begin(), extra.end());
    return ServerProcess::Start(flags);
  }
  std::unique_ptr<MotoServer> moto_;
};

TEST_F(S3ServerTest, ServesAndStoresThroughS3) {
  auto server = StartChunkd({"--s3_multipart_threshold=6MiB", "--s3_multipart_part_size=5MiB"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = Connect((*server)->address());
  auto info = c->ServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "s3");

  std::string big = RandomBytes((13 << 20) + 7, 5);
  auto put = c->Put("t2m/c/0/0", Bytes(big));
  ASSERT_TRUE(put.ok()) << put.status();
  ASSERT_TRUE(c->Put("t2m/zarr.json", Bytes("{\"zarr_format\": 3}")).ok());
  Conditions create_only;
  create_only.if_generation_match = 0;
  EXPECT_EQ(c->Put("t2m/zarr.json", Bytes("{}"), create_only).status().code(),
            absl::StatusCode::kFailedPrecondition);

  auto got = c->Get("t2m/c/0/0");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->data.view() == big);
  EXPECT_EQ(got->generation, put->generation);
  GetOptions range;
  range.range = ByteRange::Bounded(100, 200);
  auto part = c->Get("t2m/c/0/0", range);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(Str(part->data), big.substr(100, 100));
  auto listing = c->List("t2m/", true);
  ASSERT_TRUE(listing.ok()) << listing.status();
  ASSERT_EQ(listing->entries.size(), 1u);
  EXPECT_EQ(listing->entries[0].key, "t2m/zarr.json");
  EXPECT_EQ(listing->prefixes, std::vector<std::string>{"t2m/c/"});

  // S3 is the store of record: a new server sees the same values and generations.
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->log();
  auto again = StartChunkd();
  ASSERT_TRUE(again.ok()) << again.status();
  auto c2 = Connect((*again)->address());
  auto stat = c2->Stat("t2m/c/0/0");
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_TRUE(stat->exists);
  EXPECT_EQ(stat->size, big.size());
  EXPECT_EQ(stat->generation, put->generation);
  ASSERT_TRUE(c2->Delete("t2m/zarr.json").ok());
  EXPECT_EQ(c2->Get("t2m/zarr.json").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(S3ServerTest, S3GoingAwayIsUnavailableAndCachedValuesStillServe) {
  auto server = StartChunkd();
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = Connect((*server)->address(), /*attempts=*/1);
  ASSERT_TRUE(c->Put("warm", Bytes("cached bytes")).ok());
  ASSERT_TRUE(c->Put("cold", Bytes("never read")).ok());
  ASSERT_EQ(Str(c->Get("warm")->data), "cached bytes");
  moto_->Stop();
  // A cached value is still served; a read that needs S3 fails with UNAVAILABLE, promptly.
  auto warm = c->Get("warm");
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_EQ(Str(warm->data), "cached bytes");
  absl::Time start = absl::Now();
  auto missing = c->Get("never-written");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kUnavailable) << missing.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  EXPECT_EQ(c->Put("new", Bytes("x")).status().code(), absl::StatusCode::kUnavailable);
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string root = dir_.path();
    ASSERT_TRUE(testing::WriteFileUnder(root, "arr/zarr.json", "{\"zarr_format\": 3}").ok());
    ASSERT_TRUE(testing::WriteFileUnder(root, "arr/c/0/0", RandomBytes(300000, 1)).ok());
    ASSERT_TRUE(testing::WriteFileUnder(root, "arr/c/0/1", RandomBytes(1000, 2)).ok());
    auto nginx = NginxServer::Start(root);
    if (absl::IsNotFound(nginx.status())) {
      GTEST_SKIP() << nginx.status();
    }
    ASSERT_TRUE(nginx.ok()) << nginx.status();
    nginx_ = *std::move(nginx);
    std::vector<std::string> flags = {"--listen=127.0.0.1:0", "--store=" + nginx_->url() + "/"};
    flags.insert(flags.end(), kFastRemote.begin(), kFastRemote.end());
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  TempDir dir_;
  std::unique_ptr<NginxServer> nginx_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(HttpServerTest, ServesReadOnly) {
  auto c = Connect(server_->address(), 1);
  auto got = c->Get("arr/c/0/0");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->data.view() == RandomBytes(300000, 1));
  GetOptions suffix;
  suffix.range = ByteRange::Suffix(10);
  auto tail = c->Get("arr/c/0/1", suffix);
  ASSERT_TRUE(tail.ok()) << tail.status();
  EXPECT_EQ(Str(tail->data), RandomBytes(1000, 2).substr(990));
  EXPECT_EQ(c->Get("arr/c/9/9").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->Get("arr/c").status().code(), absl::StatusCode::kNotFound);  // a directory
  auto stat = c->Stat("arr/zarr.json");
  ASSERT_TRUE(stat.ok());
  EXPECT_TRUE(stat->exists);
  EXPECT_EQ(stat->size, 18u);
  auto all = c->List("arr/", false);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->entries.size(), 3u);
  EXPECT_EQ(all->entries[0].key, "arr/c/0/0");
  EXPECT_EQ(all->entries[2].key, "arr/zarr.json");
  auto put = c->Put("arr/new", Bytes("x"));
  EXPECT_EQ(put.status().code(), absl::StatusCode::kPermissionDenied) << put.status();
  EXPECT_EQ(c->Delete("arr/zarr.json").code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(HttpServerTest, NginxGoingAwayIsUnavailable) {
  auto c = Connect(server_->address(), 1);
  ASSERT_TRUE(c->Get("arr/c/0/1").ok());
  nginx_->Stop();
  auto warm = c->Get("arr/c/0/1");
  EXPECT_TRUE(warm.ok()) << warm.status();
  auto cold = c->Get("arr/c/0/0");
  EXPECT_EQ(cold.status().code(), absl::StatusCode::kUnavailable) << cold.status();
  // The server itself is fine.
  EXPECT_TRUE(c->ServerInfo().ok());
}

}  // namespace
}  // namespace chunkd

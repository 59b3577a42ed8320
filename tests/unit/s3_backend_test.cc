// The s3:// backend: the whole conformance suite against moto's S3 server on loopback, and
// multipart uploads, objects written by others, credentials, signing and faults.
#include "server/backend/s3/s3_backend.h"

#include <unistd.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "buffer/cpu/buffer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "server/backend/http/http_transport.h"
#include "server/store/chunk_store.h"
#include "tests/support/test_support.h"
#include "tests/unit/backend_conformance.h"
#include "tests/unit/http_s3_test_servers.h"

namespace chunkd::testing {
namespace {

using buffer::cpu::Buffer;
using ::testing::HasSubstr;
using Reply = ScriptedHttpServer::Reply;

constexpr char kBucket[] = "conformance";

void SkipBecause(const std::string& reason) { GTEST_SKIP() << reason; }

// One moto server for the whole test process, with the test bucket.
absl::StatusOr<MotoServer*> SharedMoto() {
  static absl::StatusOr<std::unique_ptr<MotoServer>>* moto = [] {
    auto* m = new absl::StatusOr<std::unique_ptr<MotoServer>>(MotoServer::Start());
    if (m->ok()) {
      absl::Status s = (**m)->CreateBucket(kBucket);
      if (!s.ok()) *m = s;
    }
    return m;
  }();
  // Stopped at exit by the destructor of this holder.
  static struct Stopper {
    ~Stopper() {
      if (moto->ok()) (**moto)->Stop();
    }
  } stopper;
  if (!moto->ok()) return moto->status();
  return moto->value().get();
}

// A fresh prefix of the test bucket for each backend.
std::string FreshUrl() {
  static std::atomic<int> counter{0};
  return absl::StrCat("s3://", kBucket, "/t", ::getpid(), "-", counter.fetch_add(1));
}

server::BackendOptions MotoOptions(MotoServer* moto) {
  server::BackendOptions options;
  options.s3.endpoint = moto->endpoint();
  options.http.initial_backoff = absl::Milliseconds(10);
  return options;
}

MotoServer* MotoOrSkip() {
  auto moto = SharedMoto();
  if (absl::IsNotFound(moto.status())) {
    SkipBecause(std::string(moto.status().message()));
    return nullptr;
  }
  EXPECT_TRUE(moto.ok()) << moto.status();
  SetTestAwsCredentials();
  return moto.ok() ? *moto : nullptr;
}

std::unique_ptr<server::Backend> MakeS3Backend(TempDir&) {
  MotoServer* moto = MotoOrSkip();
  if (moto == nullptr) return nullptr;
  auto backend = server::OpenBackend(FreshUrl(), MotoOptions(moto));
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

INSTANTIATE_TEST_SUITE_P(S3, BackendConformanceTest,
                         ::testing::Values(BackendFactory{"s3_moto", MakeS3Backend}),
                         BackendFactoryName);

class S3BackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    moto_ = MotoOrSkip();
    if (IsSkipped()) return;
    ASSERT_NE(moto_, nullptr);
  }
  std::unique_ptr<server::Backend> Open(const std::string& url, server::BackendOptions options) {
    auto backend = server::OpenBackend(url, options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    return backend.ok() ? *std::move(backend) : nullptr;
  }
  MotoServer* moto_ = nullptr;
};

TEST_F(S3BackendTest, DescribesItsLocation) {
  std::string url = FreshUrl();
  auto backend = Open(url + "/", MotoOptions(moto_));
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->kind(), "s3");
  EXPECT_EQ(backend->location(), url);
}

TEST_F(S3BackendTest, MultipartUploadAboveThreshold) {
  server::BackendOptions options = MotoOptions(moto_);
  options.s3.multipart_threshold_bytes = 6 << 20;
  options.s3.multipart_part_bytes = 5 << 20;
  auto backend = Open(FreshUrl(), options);
  ASSERT_NE(backend, nullptr);
  std::string value = RandomBytes((12 << 20) + 12345, 9);
  auto info = backend->Write("arr/c/big", Buffer::CopyOf(value), {});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, value.size());
  server::ValueInfo read_info;
  auto read = backend->Read("arr/c/big", &read_info);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->view() == value);
  EXPECT_EQ(read_info.generation, info->generation);
  auto stat = backend->Stat("arr/c/big");
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(stat->size, value.size());
  EXPECT_EQ(stat->generation, info->generation);
  // Conditions apply to multipart uploads too.
  server::Conditions create_only;
  create_only.if_generation_match = 0;
  auto again = backend->Write("arr/c/big", Buffer::CopyOf(value), create_only);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
  server::Conditions match;
  match.if_generation_match = info->generation;
  auto replaced = backend->Write("arr/c/big", Buffer::CopyOf(value.substr(1)), match);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(backend->Stat("arr/c/big")->size, value.size() - 1);
}

TEST_F(S3BackendTest, ObjectsWrittenByOthers) {
  std::string prefix = absl::StrCat("ext", ::getpid());
  ASSERT_TRUE(moto_->PutObject(kBucket, prefix + "/arr/zarr.json", "{}").ok());
  ASSERT_TRUE(moto_->PutObject(kBucket, prefix + "/arr/c/0", "chunk").ok());
  // A "directory marker" as consoles create them: not a key.
  ASSERT_TRUE(moto_->PutObject(kBucket, prefix + "/arr/c/", "").ok());
  auto backend = Open(absl::StrCat("s3://", kBucket, "/", prefix), MotoOptions(moto_));
  ASSERT_NE(backend, nullptr);
  server::ValueInfo info;
  auto read = backend->Read("arr/c/0", &info);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->view(), "chunk");
  EXPECT_NE(info.generation, 0u);
  auto stat = backend->Stat("arr/c/0");
  ASSERT_TRUE(stat.ok());
  EXPECT_EQ(stat->generation, info.generation);
  // Its generation (from the ETag) works in conditions.
  server::Conditions wrong, right;
  wrong.if_generation_match = info.generation + 1;
  right.if_generation_match = info.generation;
  EXPECT_EQ(backend->Write("arr/c/0", Buffer::CopyOf("x"), wrong).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto written = backend->Write("arr/c/0", Buffer::CopyOf("mine"), right);
  ASSERT_TRUE(written.ok()) << written.status();
  auto cursor = backend->List("arr/", false);
  ASSERT_TRUE(cursor.ok());
  server::ListPage page;
  ASSERT_TRUE((*cursor)->Next(100, &page).ok());
  ASSERT_EQ(page.entries.size(), 2u);
  EXPECT_EQ(page.entries[0].key, "arr/c/0");
  EXPECT_EQ(page.entries[0].size, 4u);
  EXPECT_EQ(page.entries[1].key, "arr/zarr.json");
}

TEST_F(S3BackendTest, MissingBucketFailsToOpen) {
  auto backend = server::OpenBackend("s3://no-such-bucket-here/x", MotoOptions(moto_));
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition) << backend.status();
  EXPECT_THAT(std::string(backend.status().message()), HasSubstr("does not exist"));
}

TEST(S3BackendOpenTest, RejectsBadUrlsAndFlags) {
  server::BackendOptions options;
  EXPECT_EQ(server::OpenBackend("s3://", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::OpenBackend("s3:///prefix", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::OpenBackend("s3://b/a//b", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.s3.addressing = "sideways";
  EXPECT_EQ(server::OpenBackend("s3://b", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.s3.addressing = "auto";
  options.s3.endpoint = "ftp://x";
  EXPECT_EQ(server::OpenBackend("s3://b", options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(S3BackendOpenTest, EndpointDownIsUnavailable) {
  server::BackendOptions options;
  options.s3.endpoint = absl::StrCat("http://127.0.0.1:", FreeLoopbackPort());
  options.http.max_attempts = 2;
  options.http.initial_backoff = absl::Milliseconds(5);
  auto backend = server::OpenBackend("s3://bucket/p", options);
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();
}

// An S3 endpoint that lists an empty bucket and answers object requests with `object`.
std::unique_ptr<ScriptedHttpServer> FakeS3(std::function<Reply(const std::string&, int)> object,
                                           std::string* last_request = nullptr,
                                           std::mutex* mu = nullptr) {
  return std::make_unique<ScriptedHttpServer>([=](const std::string& request, int n) {
    if (mu != nullptr) {
      std::lock_guard<std::mutex> lock(*mu);
      *last_request = request;
    }
    if (absl::StrContains(request, "list-type=2")) {
      return ScriptedHttpServer::Status(
          200,
          "<?xml version=\"1.0\"?><ListBucketResult><IsTruncated>false</IsTruncated>"
          "</ListBucketResult>");
    }
    return object(request, n);
  });
}

server::BackendOptions FakeOptions(const ScriptedHttpServer& server) {
  server::BackendOptions options;
  options.s3.endpoint = server.url();
  options.http.max_attempts = 3;
  options.http.initial_backoff = absl::Milliseconds(5);
  options.http.timeout = absl::Milliseconds(700);
  return options;
}

TEST(S3BackendFaultTest, ServerErrorsAreRetriedThenUnavailable) {
  std::atomic<int> object_requests{0};
  auto server = FakeS3([&](const std::string&, int) {
    object_requests.fetch_add(1);
    return ScriptedHttpServer::Status(
        503, "<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>");
  });
  auto backend = server::OpenBackend("s3://b/p", FakeOptions(*server));
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto r = (*backend)->Read("k", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("SlowDown"));
  EXPECT_EQ(object_requests.load(), 3);
}

TEST(S3BackendFaultTest, TruncatedBodyIsUnavailable) {
  auto server = FakeS3([](const std::string&, int) {
    return Reply{"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\r\nshort"};
  });
  auto backend = server::OpenBackend("s3://b/p", FakeOptions(*server));
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto r = (*backend)->Read("k", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("truncated"));
}

TEST(S3BackendFaultTest, SilentServerTimesOut) {
  auto server = FakeS3([](const std::string&, int) { return Reply{"", /*hang=*/true}; });
  auto options = FakeOptions(*server);
  options.http.max_attempts = 2;
  auto backend = server::OpenBackend("s3://b/p", options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto r = (*backend)->Stat("k");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("timed out"));
  server->Stop();
}

TEST(S3BackendFaultTest, RequestsAreSignedAndAddressed) {
  ::setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "secret", 1);
  ::setenv("AWS_SESSION_TOKEN", "token123", 1);
  std::string last;
  std::mutex mu;
  auto server = FakeS3([](const std::string&,
                          int) { return ScriptedHttpServer::Status(200, "v", "ETag: \"1\"\r\n"); },
                       &last, &mu);
  auto options = FakeOptions(*server);
  options.s3.region = "eu-west-3";
  auto backend = server::OpenBackend("s3://bkt/pre/fix", options);
  ::unsetenv("AWS_SESSION_TOKEN");
  ASSERT_TRUE(backend.ok()) << backend.status();
  {
    std::lock_guard<std::mutex> lock(mu);
    // The listing probe: path style, canonical (sorted) query.
    EXPECT_THAT(last,
                HasSubstr("GET /bkt/?delimiter=%2F&list-type=2&max-keys=1&prefix=pre%2Ffix%2F "));
  }
  auto r = (*backend)->Read("a b/c", nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_THAT(last, HasSubstr("GET /bkt/pre/fix/a%20b/c HTTP/1.1"));
  EXPECT_THAT(last, HasSubstr("Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"));
  EXPECT_THAT(last, HasSubstr("/eu-west-3/s3/aws4_request"));
  std::string lower = absl::AsciiStrToLower(last);
  EXPECT_THAT(lower, HasSubstr("x-amz-content-sha256: unsigned-payload"));
  EXPECT_THAT(lower, HasSubstr("x-amz-security-token: token123"));
  EXPECT_THAT(lower, HasSubstr("x-amz-date: "));
  // Every x-amz-* header is signed.
  EXPECT_THAT(lower, HasSubstr("x-amz-content-sha256;x-amz-date;x-amz-security-token"));
}

TEST(S3CredentialsTest, EnvironmentFirst) {
  auto c = server::LoadS3Credentials(
      {{"AWS_ACCESS_KEY_ID", "AK"}, {"AWS_SECRET_ACCESS_KEY", "SK"}, {"AWS_SESSION_TOKEN", "T"}},
      "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AK");
  EXPECT_EQ(c->secret_access_key, "SK");
  EXPECT_EQ(c->session_token, "T");
  EXPECT_EQ(c->source, "environment");
  EXPECT_EQ(server::LoadS3Credentials({{"AWS_ACCESS_KEY_ID", "AK"}}, "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(S3CredentialsTest, CredentialsFileProfiles) {
  TempDir dir;
  std::string path = dir.Join("credentials");
  WriteFile(path,
            "# comment\n[default]\naws_access_key_id = DEF\naws_secret_access_key=DEFSECRET\n\n"
            "[team]\n aws_access_key_id=TEAM \n aws_secret_access_key = TEAMSECRET\n"
            "aws_session_token = TOK\n[broken]\naws_access_key_id=ONLY\n");
  std::map<std::string, std::string> env = {{"AWS_SHARED_CREDENTIALS_FILE", path}};
  auto c = server::LoadS3Credentials(env, "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "DEF");
  EXPECT_EQ(c->secret_access_key, "DEFSECRET");
  EXPECT_THAT(c->source, HasSubstr("[default]"));
  env["AWS_PROFILE"] = "team";
  c = server::LoadS3Credentials(env, "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "TEAM");
  EXPECT_EQ(c->session_token, "TOK");
  // The option wins over AWS_PROFILE.
  c = server::LoadS3Credentials(env, "default");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->access_key_id, "DEF");
  EXPECT_EQ(server::LoadS3Credentials(env, "nobody").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::LoadS3Credentials(env, "broken").status().code(),
            absl::StatusCode::kInvalidArgument);
  // HOME/.aws/credentials when no file is named; none at all: unsigned.
  c = server::LoadS3Credentials({{"HOME", dir.path()}}, "");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->empty());
}

// Freshness over S3: a value written by chunkd carries the ETag the PUT returned, so the next
// revalidation is a conditional GET answered 304; an object replaced by another writer (here a
// second backend on the same prefix) is seen once the bound has passed.
TEST_F(S3BackendTest, RevalidationWithIfNoneMatch) {
  std::string url = FreshUrl();
  auto backend = Open(url, MotoOptions(moto_));
  auto other = Open(url, MotoOptions(moto_));  // a writer behind chunkd's back
  ASSERT_NE(backend, nullptr);
  ASSERT_NE(other, nullptr);
  server::ChunkStoreOptions options;
  options.cache.capacity_bytes = 16 << 20;
  options.io_threads = 2;
  options.freshness.immutable_prefixes = {"snap/"};
  server::ChunkStore store(std::move(backend), options);
  EXPECT_EQ(store.revalidate_after(), absl::Seconds(60));
  auto now = [] { return server::ReadOptions{absl::Now()}; };
  auto read = [&](const std::string& key, server::ReadOptions o = {}) {
    auto v = store.ReadAndWait(key, o);
    return v.ok() ? std::string(v->value.view()) : v.status().ToString();
  };
  auto written = store.Write("arr/c/0", Buffer::CopyOf("v1"), {});
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_FALSE(written->etag.empty());
  // 304: nothing read.
  EXPECT_EQ(read("arr/c/0", now()), "v1");
  server::ChunkStoreCounters c = store.counters();
  EXPECT_EQ(c.revalidations, 1u);
  EXPECT_EQ(c.revalidations_not_modified, 1u);
  EXPECT_EQ(c.backend_reads, 0u);
  // Replaced by another writer: served within the interval, seen past the bound.
  ASSERT_TRUE(other->Write("arr/c/0", Buffer::CopyOf("v2"), {}).ok());
  EXPECT_EQ(read("arr/c/0"), "v1");
  EXPECT_EQ(read("arr/c/0", now()), "v2");
  EXPECT_EQ(store.counters().stale_invalidations, 1u);
  // Zarr metadata: every read.
  ASSERT_TRUE(store.Write("arr/zarr.json", Buffer::CopyOf("{}"), {}).ok());
  ASSERT_TRUE(other->Write("arr/zarr.json", Buffer::CopyOf("{\"shape\":[1]}"), {}).ok());
  EXPECT_EQ(read("arr/zarr.json"), "{\"shape\":[1]}");
  // Immutable prefix: never asked, even with a bound of now.
  ASSERT_TRUE(store.Write("snap/c/0", Buffer::CopyOf("s1"), {}).ok());
  uint64_t before = store.counters().revalidations;
  ASSERT_TRUE(other->Write("snap/c/0", Buffer::CopyOf("s2"), {}).ok());
  EXPECT_EQ(read("snap/c/0", now()), "s1");
  EXPECT_EQ(store.counters().revalidations, before);
  // Deleted by the other writer.
  ASSERT_TRUE(other->Delete("arr/c/0", {}).ok());
  EXPECT_EQ(store.ReadAndWait("arr/c/0", now()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(store.cache()->Peek("arr/c/0").has_value());
}

}  // namespace
}  // namespace chunkd::testing

// The http:// backend: the conformance suite's read-only subset against a real nginx on
// loopback, and faults from a scripted server (refused connections, silence, 5xx, truncated
// bodies).
#include "server/backend/http/http_backend.h"

#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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

using ::testing::HasSubstr;
using ::testing::Not;
using Reply = ScriptedHttpServer::Reply;

void SkipBecause(const std::string& reason) { GTEST_SKIP() << reason; }

// A backend that forwards to another and keeps alive what that one needs (a server process).
class OwningBackend final : public ForwardingBackend {
 public:
  OwningBackend(std::shared_ptr<void> owned, std::unique_ptr<server::Backend> backend)
      : ForwardingBackend(std::move(backend)), owned_(std::move(owned)) {}
  // The backend goes before what it needs (members die before the base class).
  ~OwningBackend() override { inner_.reset(); }

 private:
  std::shared_ptr<void> owned_;
};

std::unique_ptr<server::Backend> MakeNginxBackend(TempDir& dir) {
  auto nginx = NginxServer::Start(dir.path());
  if (absl::IsNotFound(nginx.status())) {
    SkipBecause(absl::StrCat(nginx.status().message(), " (deploy/scripts/install-deps.sh all)"));
    return nullptr;
  }
  EXPECT_TRUE(nginx.ok()) << nginx.status();
  if (!nginx.ok()) return nullptr;
  auto backend = server::OpenBackend((*nginx)->url() + "/", server::BackendOptions{});
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return nullptr;
  return std::make_unique<OwningBackend>(std::shared_ptr<NginxServer>(std::move(*nginx)),
                                         *std::move(backend));
}

INSTANTIATE_TEST_SUITE_P(Http, BackendConformanceTest,
                         ::testing::Values(BackendFactory{
                             "http_nginx", MakeNginxBackend,
                             [](TempDir& dir, const std::string& key, const std::string& value) {
                               return WriteFileUnder(dir.path(), key, value);
                             },
                             /*lists_dot_names=*/false}),
                         BackendFactoryName);

server::BackendOptions FastOptions(int attempts = 3) {
  server::BackendOptions options;
  options.http.max_attempts = attempts;
  options.http.initial_backoff = absl::Milliseconds(5);
  options.http.max_backoff = absl::Milliseconds(20);
  options.http.connect_timeout = absl::Seconds(2);
  options.http.timeout = absl::Milliseconds(700);
  options.http.stall_timeout = absl::Seconds(1);
  return options;
}

std::unique_ptr<server::Backend> Open(const std::string& url,
                                      const server::BackendOptions& options) {
  auto backend = server::OpenBackend(url, options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

TEST(HttpBackendTest, OpensOnlyWellFormedUrls) {
  EXPECT_EQ(server::OpenBackend("http://", {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::OpenBackend("http:///path", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::OpenBackend("http://host/p?x=1", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto ok = server::OpenBackend("https://example.invalid/data.zarr/", {});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->kind(), "http");
  EXPECT_EQ((*ok)->location(), "https://example.invalid/data.zarr");
}

TEST(HttpBackendTest, ConnectionRefusedIsUnavailable) {
  int port = FreeLoopbackPort();  // nothing listens there
  auto backend = Open(absl::StrCat("http://127.0.0.1:", port), FastOptions());
  ASSERT_NE(backend, nullptr);
  auto r = backend->Read("arr/c/0", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("arr/c/0"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("after 3 attempts"));
  EXPECT_EQ(backend->Stat("k").status().code(), absl::StatusCode::kUnavailable);
  auto list = backend->List("", false);
  ASSERT_TRUE(list.ok());
  server::ListPage page;
  EXPECT_EQ((*list)->Next(10, &page).status().code(), absl::StatusCode::kUnavailable);
}

TEST(HttpBackendTest, SilentServerTimesOut) {
  ScriptedHttpServer server([](const std::string&, int) { return Reply{"", /*hang=*/true}; });
  auto backend = Open(server.url(), FastOptions(2));
  ASSERT_NE(backend, nullptr);
  absl::Time start = absl::Now();
  auto r = backend->Read("slow", nullptr);
  absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("timed out"));
  EXPECT_EQ(server.requests(), 2);
  EXPECT_LT(took, absl::Seconds(5));
  server.Stop();
}

TEST(HttpBackendTest, ServerErrorsAreRetriedThenUnavailable) {
  ScriptedHttpServer server(
      [](const std::string&, int) { return ScriptedHttpServer::Status(500, "boom"); });
  auto backend = Open(server.url(), FastOptions(3));
  ASSERT_NE(backend, nullptr);
  auto r = backend->Read("k", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("HTTP 500"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("\"k\""));
  EXPECT_EQ(server.requests(), 3);
}

TEST(HttpBackendTest, TransientErrorsRecover) {
  ScriptedHttpServer server([](const std::string&, int n) {
    if (n <= 2) return ScriptedHttpServer::Status(503);
    return ScriptedHttpServer::Status(200, "hello", "ETag: \"v1\"\r\n");
  });
  auto backend = Open(server.url(), FastOptions(3));
  ASSERT_NE(backend, nullptr);
  server::ValueInfo info;
  auto r = backend->Read("k", &info);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->view(), "hello");
  EXPECT_EQ(info.size, 5u);
  EXPECT_NE(info.generation, 0u);
  EXPECT_EQ(info.generation, server::http::HashToGeneration("etag:\"v1\""));
}

TEST(HttpBackendTest, StatusesMapToCodes) {
  ScriptedHttpServer server([](const std::string& request, int) {
    if (absl::StrContains(request, "/missing ")) return ScriptedHttpServer::Status(404);
    if (absl::StrContains(request, "/secret ")) return ScriptedHttpServer::Status(403);
    if (absl::StrContains(request, "/login ")) return ScriptedHttpServer::Status(401);
    return ScriptedHttpServer::Status(400);
  });
  auto backend = Open(server.url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->Read("missing", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend->Stat("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend->Read("secret", nullptr).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(backend->Read("login", nullptr).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(backend->Read("odd", nullptr).status().code(), absl::StatusCode::kInternal);
  // 4xx are answers, not faults: one request each, no retries.
  EXPECT_EQ(server.requests(), 5);
}

// A body shorter than its Content-Length: the connection closes early.
Reply Truncated() {
  return {"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"t\"\r\n\r\n0123456789"};
}

TEST(HttpBackendTest, TruncatedBodyIsAnErrorNeverAValue) {
  ScriptedHttpServer server([](const std::string&, int) { return Truncated(); });
  auto backend = Open(server.url(), FastOptions(2));
  ASSERT_NE(backend, nullptr);
  auto r = backend->Read("k", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("truncated"));
  EXPECT_EQ(server.requests(), 2);
  auto part = backend->ReadRange("k", 0, 100, nullptr);
  EXPECT_EQ(part.status().code(), absl::StatusCode::kUnavailable) << part.status();
}

TEST(HttpBackendTest, TruncatedBodyLeavesNoCacheEntry) {
  std::atomic<bool> healthy{false};
  const std::string value = RandomBytes(1000, 3);
  ScriptedHttpServer server([&](const std::string&, int) {
    if (!healthy.load()) return Truncated();
    return ScriptedHttpServer::Status(200, value, "ETag: \"good\"\r\n");
  });
  auto backend = Open(server.url(), FastOptions(2));
  ASSERT_NE(backend, nullptr);
  server::ChunkStoreOptions options;
  options.io_threads = 2;
  server::ChunkStore store(std::move(backend), options);
  auto first = store.ReadAndWait("arr/c/0");
  EXPECT_EQ(first.status().code(), absl::StatusCode::kUnavailable) << first.status();
  healthy = true;
  auto second = store.ReadAndWait("arr/c/0");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->value.view() == value);
  int requests = server.requests();
  // Now cached: no further request, the same bytes.
  auto third = store.ReadAndWait("arr/c/0");
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_TRUE(third->value.view() == value);
  EXPECT_EQ(server.requests(), requests);
}

TEST(HttpBackendTest, ConnectionsAreReused) {
  ScriptedHttpServer server([](const std::string&, int) {
    return Reply{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nETag: \"x\"\r\n\r\nok", false, false};
  });
  auto backend = Open(server.url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  for (int i = 0; i < 20; ++i) {
    auto r = backend->Read(absl::StrCat("k", i), nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->view(), "ok");
  }
  EXPECT_EQ(server.requests(), 20);
  EXPECT_EQ(server.connections(), 1);
}

TEST(HttpBackendTest, RangedReadSendsRange) {
  std::string seen;
  std::mutex mu;
  ScriptedHttpServer server([&](const std::string& request, int) {
    std::lock_guard<std::mutex> lock(mu);
    seen = request;
    return ScriptedHttpServer::Status(206, "23456",
                                      "Content-Range: bytes 2-6/10\r\nETag: \"r\"\r\n");
  });
  auto backend = Open(server.url() + "/base", FastOptions());
  ASSERT_NE(backend, nullptr);
  server::ValueInfo info;
  auto r = backend->ReadRange("a b/c", 2, 5, &info);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->view(), "23456");
  EXPECT_EQ(info.size, 10u);
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_THAT(seen, HasSubstr("GET /base/a%20b/c HTTP/1.1"));
  EXPECT_THAT(seen, HasSubstr("Range: bytes=2-6"));
}

// ReadSuffix and ReadRangeIfMatch are one GET each: `Range: bytes=-N`; Range with If-Match,
// a 412 answer ABORTED (the HEAD after it only tells a changed value from a removed one).
TEST(HttpBackendTest, SuffixAndIfMatchReadsAreOneGet) {
  std::vector<std::string> seen;
  std::mutex mu;
  ScriptedHttpServer server([&](const std::string& request, int) {
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back(request);
    if (absl::StartsWith(request, "HEAD")) {
      return Reply{
          "HTTP/1.1 200 X\r\nContent-Length: 10\r\nETag: \"v2\"\r\n"
          "Connection: close\r\n\r\n"};
    }
    if (absl::StrContains(request, "If-Match: \"v1\"")) return ScriptedHttpServer::Status(412);
    if (absl::StrContains(request, "Range: bytes=-4")) {
      return ScriptedHttpServer::Status(206, "6789",
                                        "Content-Range: bytes 6-9/10\r\nETag: \"v2\"\r\n");
    }
    return ScriptedHttpServer::Status(206, "234",
                                      "Content-Range: bytes 2-4/10\r\nETag: \"v2\"\r\n");
  });
  auto backend = Open(server.url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  server::ValueInfo info;
  auto suffix = backend->ReadSuffix("k", 4, &info);
  ASSERT_TRUE(suffix.ok()) << suffix.status();
  EXPECT_EQ(suffix->view(), "6789");
  EXPECT_EQ(info.size, 10u);
  EXPECT_EQ(info.etag, "\"v2\"");
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(seen.size(), 1u);
    EXPECT_THAT(seen[0], HasSubstr("Range: bytes=-4\r\n"));
    EXPECT_THAT(seen[0], Not(HasSubstr("If-Match")));
  }

  server::ValueInfo got;
  auto current = backend->ReadRangeIfMatch("k", 2, 3, info, &got);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ(current->view(), "234");
  EXPECT_EQ(got.generation, info.generation);
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(seen.size(), 2u);
    EXPECT_THAT(seen[1], HasSubstr("Range: bytes=2-4\r\n"));
    EXPECT_THAT(seen[1], HasSubstr("If-Match: \"v2\"\r\n"));
  }

  server::ValueInfo old = info;
  old.etag = "\"v1\"";
  old.generation = info.generation + 1;
  auto stale = backend->ReadRangeIfMatch("k", 2, 3, old, nullptr);
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();
  EXPECT_THAT(std::string(stale.status().message()), HasSubstr("\"k\""));
  // A weak etag cannot be sent as If-Match (it never matches): the answer's generation is
  // compared instead.
  server::ValueInfo weak = info;
  weak.etag = "W/\"v2\"";
  auto compared = backend->ReadRangeIfMatch("k", 2, 3, weak, nullptr);
  EXPECT_TRUE(compared.ok()) << compared.status();
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(seen.size(), 5u);  // the 412 was followed by one HEAD
  EXPECT_THAT(seen[3], HasSubstr("HEAD /k"));
  EXPECT_THAT(seen[4], Not(HasSubstr("If-Match")));
}

// A server that ignores Range sends the whole value: the part asked for is cut from it.
TEST(HttpBackendTest, WholeAnswersToRangesAreCut) {
  ScriptedHttpServer server([](const std::string&, int) {
    return ScriptedHttpServer::Status(200, "0123456789", "ETag: \"w\"\r\n");
  });
  auto backend = Open(server.url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  for (const auto& [length, want] : std::vector<std::pair<uint64_t, std::string>>{
           {4, "6789"}, {10, "0123456789"}, {100, "0123456789"}}) {
    server::ValueInfo whole;
    auto got = backend->ReadSuffix("k", length, &whole);
    ASSERT_TRUE(got.ok()) << length << ": " << got.status();
    EXPECT_EQ(got->view(), want) << length;
    EXPECT_EQ(whole.size, 10u) << length;
  }
  auto stat = backend->Stat("k");
  ASSERT_TRUE(stat.ok()) << stat.status();
  auto range = backend->ReadRangeIfMatch("k", 8, 5, *stat, nullptr);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_EQ(range->view(), "89");
  range = backend->ReadRange("k", 3, 2, nullptr);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_EQ(range->view(), "34");
}

TEST(HttpBackendTest, ListingWithoutJsonIndexIsUnimplemented) {
  ScriptedHttpServer server([](const std::string&, int) {
    return ScriptedHttpServer::Status(200, "<html><body>Index of /</body></html>");
  });
  auto backend = Open(server.url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  auto cursor = backend->List("", true);
  ASSERT_TRUE(cursor.ok());
  server::ListPage page;
  auto more = (*cursor)->Next(10, &page);
  EXPECT_EQ(more.status().code(), absl::StatusCode::kUnimplemented) << more.status();
  EXPECT_THAT(std::string(more.status().message()), HasSubstr("autoindex_format json"));
}

TEST(HttpBackendTest, NginxDownMidRunIsUnavailable) {
  TempDir dir;
  ASSERT_TRUE(WriteFileUnder(dir.path(), "arr/c/0", "bytes").ok());
  auto nginx = NginxServer::Start(dir.path());
  if (absl::IsNotFound(nginx.status())) {
    GTEST_SKIP() << nginx.status();
  }
  ASSERT_TRUE(nginx.ok()) << nginx.status();
  auto backend = Open((*nginx)->url(), FastOptions());
  ASSERT_NE(backend, nullptr);
  auto r = backend->Read("arr/c/0", nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->view(), "bytes");
  (*nginx)->Stop();
  r = backend->Read("arr/c/0", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
}

TEST(HttpBackendTest, SlowNginxBodyStalls) {
  // nginx sends 1 KiB per second of a 64 KiB value: past a 700 ms attempt limit.
  TempDir dir;
  ASSERT_TRUE(WriteFileUnder(dir.path(), "big", RandomBytes(64 << 10, 1)).ok());
  auto nginx = NginxServer::Start(dir.path(), "    limit_rate 1k;\n    limit_rate_after 1k;\n");
  if (absl::IsNotFound(nginx.status())) {
    GTEST_SKIP() << nginx.status();
  }
  ASSERT_TRUE(nginx.ok()) << nginx.status();
  auto backend = Open((*nginx)->url(), FastOptions(2));
  ASSERT_NE(backend, nullptr);
  absl::Time start = absl::Now();
  auto r = backend->Read("big", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("timed out"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(HttpTransportTest, PercentEncodeAndHash) {
  EXPECT_EQ(server::http::PercentEncode("a b/ç~-._"), "a%20b/%C3%A7~-._");
  EXPECT_EQ(server::http::PercentEncode("a/b=c+d", false), "a%2Fb%3Dc%2Bd");
  // Stable across runs and machines: a golden value.
  EXPECT_EQ(server::http::HashToGeneration(""), server::http::HashToGeneration(""));
  EXPECT_NE(server::http::HashToGeneration("\"a\""), server::http::HashToGeneration("\"b\""));
  EXPECT_NE(server::http::HashToGeneration("x"), 0u);
  EXPECT_EQ(server::http::TotalFromContentRange("bytes 0-9/1234"), 1234u);
  EXPECT_EQ(server::http::TotalFromContentRange("bytes */77"), 77u);
  EXPECT_FALSE(server::http::TotalFromContentRange("bytes 0-9/*").has_value());
}

// Freshness over HTTP (nginx serving a directory; its ETag is the file's mtime in seconds and
// size, so each change here also changes the size): a cached copy is revalidated with
// If-None-Match once it is older than the bound; a 304 moves no bytes.
class HttpFreshnessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto nginx = NginxServer::Start(dir_.path());
    if (absl::IsNotFound(nginx.status())) GTEST_SKIP() << nginx.status().message();
    ASSERT_TRUE(nginx.ok()) << nginx.status();
    nginx_ = *std::move(nginx);
  }
  std::unique_ptr<server::ChunkStore> Store(server::FreshnessOptions freshness) {
    auto backend = server::OpenBackend(nginx_->url(), server::BackendOptions{});
    EXPECT_TRUE(backend.ok()) << backend.status();
    server::ChunkStoreOptions options;
    options.cache.capacity_bytes = 16 << 20;
    options.io_threads = 2;
    options.freshness = std::move(freshness);
    return std::make_unique<server::ChunkStore>(*std::move(backend), options);
  }
  void Put(const std::string& key, const std::string& value) {
    ASSERT_TRUE(WriteFileUnder(dir_.path(), key, value).ok());
  }
  static std::string Read(server::ChunkStore& store, const std::string& key,
                          server::ReadOptions options = {}) {
    auto v = store.ReadAndWait(key, options);
    return v.ok() ? std::string(v->value.view()) : v.status().ToString();
  }
  static server::ReadOptions Now() { return server::ReadOptions{absl::Now()}; }

  TempDir dir_;
  std::unique_ptr<NginxServer> nginx_;
};

TEST_F(HttpFreshnessTest, ChangeIsSeenAfterTheBoundAndUnchangedCostsA304) {
  auto store = Store({});  // default: 60 s
  EXPECT_EQ(store->revalidate_after(), absl::Seconds(60));
  Put("a/c/0", "v1");
  EXPECT_EQ(Read(*store, "a/c/0"), "v1");
  // Unchanged: one conditional request, answered 304.
  EXPECT_EQ(Read(*store, "a/c/0", Now()), "v1");
  server::ChunkStoreCounters c = store->counters();
  EXPECT_EQ(c.revalidations, 1u);
  EXPECT_EQ(c.revalidations_not_modified, 1u);
  EXPECT_EQ(c.backend_reads, 1u);
  // Changed behind chunkd's back: within the interval the copy is served, past the bound the
  // change is seen.
  Put("a/c/0", "v2-longer");
  EXPECT_EQ(Read(*store, "a/c/0"), "v1");
  EXPECT_EQ(Read(*store, "a/c/0", Now()), "v2-longer");
  EXPECT_EQ(store->counters().stale_invalidations, 1u);
  EXPECT_EQ(Read(*store, "a/c/0"), "v2-longer");
  // Removed.
  ASSERT_EQ(::unlink(dir_.Join("a/c/0").c_str()), 0);
  auto gone = store->ReadAndWait("a/c/0", Now());
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
}

// Eight readers of a copy past its interval: one conditional request between them.
TEST_F(HttpFreshnessTest, EightReadersOneConditionalRequestPerInterval) {
  server::FreshnessOptions freshness;
  freshness.revalidate_after = absl::Seconds(1);
  auto store = Store(freshness);
  Put("a/c/0", "v1");
  ASSERT_EQ(Read(*store, "a/c/0"), "v1");
  absl::SleepFor(absl::Milliseconds(1100));  // the copy is now due
  std::atomic<int> ready{0};
  std::vector<std::thread> readers;
  std::atomic<int> right{0};
  for (int i = 0; i < 8; ++i) {
    readers.emplace_back([&] {
      ready.fetch_add(1);
      while (ready.load() < 8) std::this_thread::yield();
      if (Read(*store, "a/c/0") == "v1") right.fetch_add(1);
    });
  }
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(right.load(), 8);
  server::ChunkStoreCounters c = store->counters();
  EXPECT_EQ(c.revalidations, 1u);
  EXPECT_EQ(c.revalidations_not_modified, 1u);
  EXPECT_EQ(c.backend_reads, 1u);  // the first miss only
}

TEST_F(HttpFreshnessTest, MetadataAlwaysFreshImmutablePrefixNeverAsked) {
  server::FreshnessOptions freshness;
  freshness.revalidate_after = absl::ZeroDuration();
  freshness.immutable_prefixes = {"snap/"};
  auto store = Store(freshness);
  Put("snap/c/0", "s1");
  Put("snap/zarr.json", "{}");
  EXPECT_EQ(Read(*store, "snap/c/0"), "s1");
  EXPECT_EQ(Read(*store, "snap/zarr.json"), "{}");
  Put("snap/c/0", "s2-longer");
  Put("snap/zarr.json", "{\"x\":1}");
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Read(*store, "snap/c/0"), "s1");
    EXPECT_EQ(Read(*store, "snap/c/0", Now()), "s1");
    EXPECT_EQ(Read(*store, "snap/zarr.json"), "{}");
  }
  EXPECT_EQ(store->counters().revalidations, 0u);

  server::FreshnessOptions lax;
  lax.revalidate_after = absl::InfiniteDuration();
  auto other = Store(lax);
  Put("arr/zarr.json", "{}");
  Put("arr/.zarray", "{}");
  Put("arr/c/0", "c1");
  for (const char* key : {"arr/zarr.json", "arr/.zarray", "arr/c/0"})
    ASSERT_NE(Read(*other, key), "");
  Put("arr/zarr.json", "{\"shape\":[2]}");
  Put("arr/.zarray", "{\"shape\":[2]}");
  Put("arr/c/0", "c2-longer");
  EXPECT_EQ(Read(*other, "arr/zarr.json"), "{\"shape\":[2]}");
  EXPECT_EQ(Read(*other, "arr/.zarray"), "{\"shape\":[2]}");
  EXPECT_EQ(Read(*other, "arr/c/0"), "c1");  // never revalidated: a chunk, interval infinite
}

}  // namespace
}  // namespace chunkd::testing

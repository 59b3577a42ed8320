// Prometheus metrics over HTTP (--metrics_listen), scraped as Prometheus would.
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

TEST(Metrics, ServesPrometheusTextThatFollowsTheServer) {
  testing::TempDir dir;
  auto server = testing::ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.path(),
                                               "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  std::string log = (*server)->log();
  size_t at = log.find("metrics on http://127.0.0.1:");
  ASSERT_NE(at, std::string::npos) << log;
  int port = std::atoi(log.c_str() + at + std::string("metrics on http://127.0.0.1:").size());
  ASSERT_GT(port, 0);

  client::ClientOptions options;
  options.address = (*server)->address();
  auto c = *client::Client::Connect(options);
  ASSERT_TRUE(c->Put("k", buffer::cpu::Buffer::CopyOf("value")).ok());
  ASSERT_TRUE(c->Get("k").ok());
  ASSERT_FALSE(c->Get("missing").ok());

  httplib::Client http("127.0.0.1", port);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res) << "no answer from the metrics port";
  EXPECT_EQ(res->status, 200);
  EXPECT_NE(res->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  const std::string& body = res->body;
  EXPECT_NE(body.find("# TYPE chunkd_hits_total counter"), std::string::npos) << body;
  EXPECT_NE(body.find("chunkd_hits_total 1\n"), std::string::npos) << body;
  EXPECT_NE(body.find("chunkd_gets_total 2\n"), std::string::npos) << body;
  EXPECT_NE(body.find("chunkd_puts_total 1\n"), std::string::npos) << body;
  EXPECT_NE(body.find("chunkd_cache_used_bytes{tier=\"host\"} 5\n"), std::string::npos) << body;
  EXPECT_NE(body.find("chunkd_backend_read_micros_total"), std::string::npos);
  EXPECT_EQ(http.Get("/healthz")->status, 200);
  EXPECT_EQ(http.Get("/nothing")->status, 404);
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(Metrics, RefusesABadAddress) {
  testing::TempDir dir;
  auto result = testing::RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0",
                                     "--store=" + dir.path(), "--metrics_listen=nonsense"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.err.find("not HOST:PORT"), std::string::npos) << result.err;
}

}  // namespace
}  // namespace chunkd

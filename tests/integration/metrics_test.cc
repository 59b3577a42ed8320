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
  auto server = testing::ServerProcess::Start(
      {"--listen=127.0.0.1:0", "--store=" + dir.path(), "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  int port = (*server)->metrics_port();
  ASSERT_GT(port, 0) << (*server)->log();

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
  // Each metric carries its own help and kind, from where its counter is declared
  // (server/services/server_counters.h): levels are gauges, without _total.
  EXPECT_NE(body.find("# HELP chunkd_hits_total Reads answered from the host cache.\n"),
            std::string::npos)
      << body;
  EXPECT_NE(body.find("# TYPE chunkd_read_budget_bytes gauge\n"), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE chunkd_block_bytes gauge\n"), std::string::npos) << body;
  EXPECT_NE(body.find("# HELP chunkd_tensorstore_gets_total Reads"), std::string::npos) << body;
  // Every counter the server exports is declared: none falls back to the generic help.
  EXPECT_EQ(body.find("chunkd counter "), std::string::npos) << body;
  EXPECT_EQ(http.Get("/healthz")->status, 200);
  EXPECT_EQ(http.Get("/nothing")->status, 404);
  // On loopback there is nothing to warn about.
  EXPECT_EQ((*server)->log().find("WARNING: metrics"), std::string::npos) << (*server)->log();
  EXPECT_EQ((*server)->Stop(), 0);
}

// The port of the metrics endpoint from the server's log ("metrics on http://HOST:PORT/...").
int MetricsPort(const std::string& log) {
  size_t at = log.find("metrics on http://");
  if (at == std::string::npos) return 0;
  size_t colon = log.find(':', at + std::string("metrics on http://").size());
  return colon == std::string::npos ? 0 : std::atoi(log.c_str() + colon + 1);
}

TEST(Metrics, WarnsWhenOtherHostsCanScrapeWithoutAToken) {
  testing::TempDir dir;
  auto server = testing::ServerProcess::Start(
      {"--listen=127.0.0.1:0", "--store=" + dir.path(), "--metrics_listen=0.0.0.0:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_NE((*server)->log().find("WARNING: metrics on 0.0.0.0:0 are open to other hosts "
                                  "without authentication"),
            std::string::npos)
      << (*server)->log();
  EXPECT_NE((*server)->log().find("--metrics_token_file"), std::string::npos);
}

TEST(Metrics, ABearerTokenFileProtectsTheMetrics) {
  testing::TempDir dir;
  const std::string token = "0123456789abcdef0123456789abcdef";
  testing::WriteFile(dir.Join("metrics.token"), token + "\n");
  auto server = testing::ServerProcess::Start(
      {"--listen=127.0.0.1:0", "--store=" + dir.path(), "--metrics_listen=0.0.0.0:0",
       "--metrics_token_file=" + dir.Join("metrics.token")});
  ASSERT_TRUE(server.ok()) << server.status();
  std::string log = (*server)->log();
  EXPECT_EQ(log.find("WARNING: metrics"), std::string::npos) << log;
  EXPECT_NE(log.find("(bearer token required)"), std::string::npos) << log;
  int port = MetricsPort(log);
  ASSERT_GT(port, 0) << log;

  httplib::Client http("127.0.0.1", port);
  auto none = http.Get("/metrics");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 401);
  EXPECT_NE(none->get_header_value("WWW-Authenticate").find("Bearer"), std::string::npos);
  EXPECT_EQ(none->body.find("chunkd_"), std::string::npos);
  auto wrong = http.Get("/metrics", {{"Authorization", "Bearer not-the-token-0123456789"}});
  ASSERT_TRUE(wrong);
  EXPECT_EQ(wrong->status, 401);
  auto right = http.Get("/metrics", {{"Authorization", "Bearer " + token}});
  ASSERT_TRUE(right);
  EXPECT_EQ(right->status, 200);
  EXPECT_NE(right->body.find("chunkd_gets_total"), std::string::npos) << right->body;
  // Probes need no token.
  EXPECT_EQ(http.Get("/healthz")->status, 200);
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(Metrics, RefusesABadTokenFile) {
  testing::TempDir dir;
  testing::WriteFile(dir.Join("short"), "tooshort\n");
  auto result = testing::RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0",
                                     "--store=" + dir.path(), "--metrics_listen=127.0.0.1:0",
                                     "--metrics_token_file=" + dir.Join("short")});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.err.find("--metrics_token_file"), std::string::npos) << result.err;
  EXPECT_NE(result.err.find("at least 16"), std::string::npos) << result.err;
  result =
      testing::RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=" + dir.path(),
                           "--metrics_token_file=" + dir.Join("short")});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.err.find("needs --metrics_listen"), std::string::npos) << result.err;
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

// Prometheus text exposition of chunkd's counters on an optional HTTP port (--metrics_listen).
#ifndef CHUNKD_SERVER_DAEMON_METRICS_H_
#define CHUNKD_SERVER_DAEMON_METRICS_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "chunkd/v1/chunkd.pb.h"

namespace httplib {
class Server;
}

namespace chunkd::server {

class TokenTable;

// The metrics in Prometheus' text format (version 0.0.4), from a ServerInfo answer.
std::string PrometheusText(const v1::ServerInfoResponse& info);

// Serves GET /metrics (and /healthz) over HTTP on one address.
class MetricsServer {
 public:
  // `address` is HOST:PORT (port 0 picks one). `collect` runs on the HTTP thread per scrape.
  // With `token`, GET /metrics needs "Authorization: Bearer TOKEN" with a token of the table
  // (401 otherwise); /healthz stays open for probes.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& address, std::function<v1::ServerInfoResponse()> collect,
      std::shared_ptr<const TokenTable> token = nullptr);
  ~MetricsServer();

  // HOST:PORT actually bound.
  const std::string& address() const { return address_; }

 private:
  MetricsServer() = default;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  std::string address_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_DAEMON_METRICS_H_

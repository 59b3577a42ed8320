#include "server/daemon/metrics.h"

#include <algorithm>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "httplib.h"
#include "server/rpc/auth.h"
#include "server/services/server_counters.h"

namespace chunkd::server {
namespace {

void Metric(std::string* out, const std::string& name, const char* type, const std::string& help,
            const std::vector<std::pair<std::string, uint64_t>>& samples) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  for (const auto& [labels, value] : samples) absl::StrAppend(out, name, labels, " ", value, "\n");
}

}  // namespace

std::string PrometheusText(const v1::ServerInfoResponse& info) {
  std::string out;
  Metric(
      &out, "chunkd_info", "gauge", "Version, backend and store of this server.",
      {{absl::StrCat("{version=\"", info.version(), "\",backend=\"", info.backend(), "\"}"), 1}});
  std::vector<std::pair<std::string, uint64_t>> capacity, used, entries, pinned, max_pinned,
      max_client_pinned, pinning_clients, refusals;
  for (const auto& tier : info.tiers()) {
    std::string label = absl::StrCat("{tier=\"", tier.tier(), "\"}");
    capacity.emplace_back(label, tier.capacity_bytes());
    used.emplace_back(label, tier.used_bytes());
    entries.emplace_back(label, tier.entries());
    pinned.emplace_back(label, tier.pinned_bytes());
    max_pinned.emplace_back(label, tier.max_pinned_bytes());
    max_client_pinned.emplace_back(label, tier.max_client_pinned_bytes());
    pinning_clients.emplace_back(label, tier.pinning_clients());
    refusals.emplace_back(absl::StrCat("{tier=\"", tier.tier(), "\",cap=\"total\"}"),
                          tier.pin_refusals_total_cap());
    refusals.emplace_back(absl::StrCat("{tier=\"", tier.tier(), "\",cap=\"client\"}"),
                          tier.pin_refusals_client_cap());
  }
  Metric(&out, "chunkd_cache_capacity_bytes", "gauge", "Budget of each cache tier.", capacity);
  Metric(&out, "chunkd_cache_used_bytes", "gauge", "Bytes held by each cache tier.", used);
  Metric(&out, "chunkd_cache_entries", "gauge", "Values held by each cache tier.", entries);
  Metric(&out, "chunkd_pinned_bytes", "gauge",
         "Memory of each tier that leases on handles pin (in the cache or evicted).", pinned);
  Metric(&out, "chunkd_max_pinned_bytes", "gauge",
         "Cap on the memory leases pin, all clients together (device: per GPU; 0: none).",
         max_pinned);
  Metric(&out, "chunkd_max_client_pinned_bytes", "gauge",
         "Cap on the memory one client's leases pin (device: per GPU; 0: none).",
         max_client_pinned);
  Metric(&out, "chunkd_pinning_clients", "gauge", "Clients whose leases pin memory now.",
         pinning_clients);
  Metric(&out, "chunkd_pin_refusals_total", "counter",
         "Handles refused at a cap on pinned memory (served inline, or refused to clients that "
         "accept only handles).",
         refusals);
  Metric(&out, "chunkd_leases_active", "gauge", "Leases on handle deliveries now held.",
         {{"", info.leases_active()}});
  Metric(&out, "chunkd_leased_bytes", "gauge", "Bytes pinned by leases.",
         {{"", info.leased_bytes()}});
  std::vector<std::pair<std::string, uint64_t>> counters(info.counters().begin(),
                                                         info.counters().end());
  std::sort(counters.begin(), counters.end());
  // Each counter's kind and help come from where it is declared (server_counters.h).
  for (const auto& [name, value] : counters) {
    CounterDescription about = DescribeCounter(name);
    bool gauge = about.kind == MetricKind::kGauge;
    Metric(&out, absl::StrCat("chunkd_", name, gauge ? "" : "_total"), gauge ? "gauge" : "counter",
           about.help, {{"", value}});
  }
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& address, std::function<v1::ServerInfoResponse()> collect,
    std::shared_ptr<const TokenTable> token) {
  size_t colon = address.rfind(':');
  int port;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_listen=", address, " is not HOST:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->http_ = std::make_unique<httplib::Server>();
  server->http_->Get("/metrics", [collect, token](const httplib::Request& req,
                                                  httplib::Response& res) {
    if (token) {
      absl::StatusOr<std::string> presented = BearerTokenOf(req.get_header_value("Authorization"));
      if (!presented.ok() || !token->Find(*presented)) {
        res.status = 401;
        res.set_header("WWW-Authenticate", "Bearer realm=\"chunkd metrics\"");
        res.set_content(
            presented.ok() ? "unknown token\n" : std::string(presented.status().message()) + "\n",
            "text/plain");
        return;
      }
    }
    res.set_content(PrometheusText(collect()), "text/plain; version=0.0.4; charset=utf-8");
  });
  server->http_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  int bound = port == 0 ? server->http_->bind_to_any_port(host)
                        : (server->http_->bind_to_port(host, port) ? port : -1);
  if (bound < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address, " for metrics"));
  }
  server->address_ = absl::StrCat(address.substr(0, colon), ":", bound);
  httplib::Server* http = server->http_.get();
  server->thread_ = std::thread([http] { http->listen_after_bind(); });
  return server;
}

MetricsServer::~MetricsServer() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace chunkd::server

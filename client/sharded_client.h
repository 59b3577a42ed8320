// A Client over a pool of chunkd servers: each key goes to one server, chosen by rendezvous
// (highest random weight) hashing, so adding or removing a server moves only that server's
// share of the keys.
//
//   auto client = ShardedClient::Connect({.servers = {"10.0.0.1:7878", "10.0.0.2:7878"}});
//   auto client = ShardedClient::Connect({.servers = {"chunkd.ns.svc.cluster.local:7878"}});
//
// A single host name is resolved (getaddrinfo; IPv4 addresses, else IPv6) to the pool, e.g. a
// Kubernetes headless Service, and resolved again every `resolve_interval`. Servers are known
// by the address strings they are given or resolved to; give stable names (a StatefulSet's
// chunkd-0.chunkd:7878, ...) where a pod's IP may change.
//
// Routing: every (server, key) pair gets a score, Mix64(Hash64(key) ^ Hash64(server)) with
// Hash64 = FNV-1a 64 followed by the SplitMix64 finalizer; the key's servers in order of
// decreasing score are its rendezvous order. The Python ShardedClient (python/chunkd/sharded.py)
// computes the same scores, so both route every key to the same server.
//
// Failures: a call that fails with UNAVAILABLE goes on to the key's next server in rendezvous
// order, and so does one that fails with DEADLINE_EXCEEDED, once per call (conditional Puts
// excepted: their first attempt may have landed). A server that goes silent (its host cut off,
// no reset) is found by the clients' keepalive pings and connect timeout
// (ClientOptions::keepalive_time, keepalive_timeout, connect_timeout: within about 10 s by
// default): its calls then fail with UNAVAILABLE. A server that fails `failures_to_mark_down`
// times in a row is marked down for `down_backoff` and skipped (its keys go to their next
// server); then a probe in the background asks it whether it is back, and calls go to it again
// once it answered. With a shared store behind the pool (a cache in front of one S3 bucket, or
// one directory) the next server has the data; with servers that each hold their own data
// (memory://), keys of a down server are missing until it returns.
//
// Copies: after every write (Put, Delete) the pool drops the key's cached copy on the servers a
// later call may read it from (those ranked before the one that took the write, and the next
// one); a server it cannot reach for that drops its copy before it next serves the key. See
// the comment of ShardedClientImpl (sharded_client.cc) for what this covers.
//
// List fans out to every server that is not down and merges the answers (sorted, deduplicated);
// servers that are UNAVAILABLE are left out while at least one answers. ServerInfo asks the
// first server that answers. Thread-safe.
#ifndef CHUNKD_CLIENT_SHARDED_CLIENT_H_
#define CHUNKD_CLIENT_SHARDED_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace chunkd::client {

struct ShardedClientOptions {
  // Addresses of the servers ("host:port", "[::1]:port", "unix:/path"), or one host name
  // ("name:port", or "dns:///name:port") that resolves to all of them.
  std::vector<std::string> servers;
  // Options of the client of each server (`address` is set per server). Keep max_attempts
  // small: a server that is down costs its retries before the call moves on.
  ClientOptions client = [] {
    ClientOptions o;
    o.max_attempts = 2;
    return o;
  }();
  // Consecutive failures (UNAVAILABLE, DEADLINE_EXCEEDED) after which a server is marked down.
  int failures_to_mark_down = 3;
  // How long a down server is skipped before it is tried again.
  absl::Duration down_backoff = absl::Seconds(5);
  // How often a host name given as the only server is resolved again.
  absl::Duration resolve_interval = absl::Seconds(30);
};

class ShardedClient : public Client {
 public:
  // INVALID_ARGUMENT for no servers or a malformed address; NOT_FOUND (UNAVAILABLE for a
  // temporary failure) when a host name does not resolve.
  static absl::StatusOr<std::unique_ptr<ShardedClient>> Connect(
      const ShardedClientOptions& options);

  // The servers of the pool now, sorted.
  virtual std::vector<std::string> servers() = 0;
  // `key`'s servers in rendezvous order (the first is its home); down servers included.
  virtual std::vector<std::string> RankedServers(absl::string_view key) = 0;
  // Whether `server` is marked down now: from its failures until a probe (or a call) had an
  // answer from it again.
  virtual bool IsDown(const std::string& server) = 0;

 protected:
  using Client::Client;
};

// Splits chunkctl's --server value: "a:1,b:2" -> {"a:1", "b:2"} (blanks dropped).
std::vector<std::string> SplitServerList(absl::string_view list);

// The routing functions, exposed for tests and for other languages to agree with.
uint64_t ShardHash64(absl::string_view bytes);
uint64_t RendezvousScore(absl::string_view server, absl::string_view key);
// `servers` sorted by decreasing RendezvousScore(server, key); ties by name.
std::vector<std::string> RendezvousOrder(std::vector<std::string> servers, absl::string_view key);

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_SHARDED_CLIENT_H_

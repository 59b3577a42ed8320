// What protects a running chunkd: TLS on TCP listeners, bearer tokens, the UNIX socket's mode
// and group, and limits on connections and calls.
//
// - TLS (tls_cert + tls_key) applies to every TCP listener; with tls_client_ca clients must
//   present a certificate signed by that CA (mutual TLS). UNIX-socket listeners stay plaintext:
//   they never leave the host and their file mode and group decide who may connect.
// - Tokens (auth_tokens, see server/rpc/auth.h) apply to every listener, TLS or not.
// - A UNIX socket is created owner-only and then given unix_socket_mode and unix_socket_group,
//   so it is never more open than asked, not even for a moment.
// - Limits: streams per connection, keepalive pings that find dead clients, and a longest call
//   (max_call_duration): a chunkd call still running after it is cancelled, so a client that
//   stops reading cannot pin a value's memory for longer.
#ifndef CHUNKD_SERVER_RPC_SECURITY_H_
#define CHUNKD_SERVER_RPC_SECURITY_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace chunkd::server {

namespace rpc {
class Engine;
}  // namespace rpc
class TokenTable;

struct SecurityOptions {
  // PEM files: the server's certificate chain and private key (TLS on TCP listeners), and a CA
  // whose certificates clients must present (mutual TLS). Empty: plaintext.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  // Token file (server/rpc/auth.h). Empty: no tokens, every call is allowed.
  std::string auth_tokens;
  // Mode of UNIX sockets (the rw bits decide who may connect), and their group: a name or a
  // number; empty leaves the process's group.
  mode_t unix_socket_mode = 0660;
  std::string unix_socket_group;
  // Concurrent calls on one connection (0: gRPC's default, unbounded).
  int max_concurrent_streams = 1024;
  // Ping a client after this long without traffic, and drop the connection when the ping is not
  // answered within keepalive_timeout (zero keepalive_time: no pings).
  absl::Duration keepalive_time = absl::Minutes(1);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // Close connections without calls for this long (zero: never). Clients reconnect on their own.
  absl::Duration max_connection_idle = absl::ZeroDuration();
  // Cancel chunkd calls running longer than this (zero: no limit).
  absl::Duration max_call_duration = absl::Minutes(5);
};

// "0660" -> 0660; an error unless it is octal, within 0777 and lets the owner read and write.
absl::StatusOr<mode_t> ParseSocketMode(absl::string_view text);

// Whether `address` ("host:port", "[::1]:port", "unix:...") only accepts local connections.
bool IsLoopbackAddress(absl::string_view address);

class ServerSecurity {
 public:
  // Loads the token file and the TLS files and checks them (a key that does not match its
  // certificate, a malformed token file: the error says which file and what). `listen` are the
  // addresses the server will serve.
  static absl::StatusOr<std::unique_ptr<ServerSecurity>> Create(const SecurityOptions& options,
                                                                std::vector<std::string> listen);
  ~ServerSecurity();

  // When there are tokens, puts the token check in front of every authorized method of
  // `engine` (whichever service registered it); adds the connection limits and gives `engine`
  // the call-duration limit.
  void Configure(grpc::ServerBuilder& builder, rpc::Engine* engine);
  // The credentials of one listening address: TLS for TCP when configured, else plaintext.
  std::shared_ptr<grpc::ServerCredentials> CredentialsFor(absl::string_view address) const;
  // builder.BuildAndStart(), with UNIX sockets created owner-only.
  std::unique_ptr<grpc::Server> BuildAndStart(grpc::ServerBuilder& builder);
  // Once serving: gives UNIX sockets their mode and group, and logs what protects each address
  // (with a warning for a network address without authentication, or tokens without TLS).
  absl::Status Started();

  bool tls() const { return !tls_cert_pem_.empty(); }
  const TokenTable* tokens() const { return tokens_.get(); }

 private:
  ServerSecurity() = default;

  SecurityOptions options_;
  std::vector<std::string> listen_;
  std::string tls_cert_pem_, tls_key_pem_, tls_client_ca_pem_;
  std::optional<gid_t> socket_group_;
  std::shared_ptr<const TokenTable> tokens_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_RPC_SECURITY_H_

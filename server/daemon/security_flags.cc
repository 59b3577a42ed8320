#include "server/daemon/security_flags.h"

#include <string>

#include "absl/flags/flag.h"
#include "absl/time/time.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM file with the server's certificate (chain): serve TLS on every TCP address "
          "(UNIX sockets stay plaintext; their mode and group guard them). Needs --tls_key.");
ABSL_FLAG(std::string, tls_key, "", "PEM file with the private key of --tls_cert (unencrypted).");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM file with the CA(s) that sign client certificates: mutual TLS, every TCP client "
          "must present a certificate this CA verifies. Needs --tls_cert.");
ABSL_FLAG(std::string, auth_tokens, "",
          "Token file: one 'TOKEN RIGHTS' per line, RIGHTS a comma list of read (Get, Stat, List, "
          "ServerInfo, leases), write (Put, Delete) and admin (Prefetch); '#' comments. Every "
          "chunkd call (on every listener) must then carry 'authorization: Bearer TOKEN' "
          "(chunkctl --token, CHUNKD_TOKEN); the health service stays open for probes.");
ABSL_FLAG(std::string, unix_socket_mode, "0660",
          "File mode of unix: sockets; connecting needs write permission, so 0660 admits the "
          "server's user and group, 0600 the user only, 0666 every local user.");
ABSL_FLAG(std::string, unix_socket_group, "",
          "Group (name or number) given to unix: sockets; the server's user must belong to it. "
          "Empty: the server's group.");
ABSL_FLAG(int32_t, max_concurrent_streams, 1024,
          "Calls one connection may have in flight (further calls wait in the client); 0: no "
          "limit.");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(1),
          "Ping a client's connection after this long without traffic, to find dead clients "
          "and free what they held; 0 turns pings off.");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "Close a connection whose keepalive ping is not answered within this long.");
ABSL_FLAG(absl::Duration, max_connection_idle, absl::ZeroDuration(),
          "Close connections that carried no call for this long (clients reconnect on their own); "
          "0: never.");
ABSL_FLAG(absl::Duration, max_call_duration, absl::Minutes(5),
          "Cancel any chunkd call still running after this long, so a client that stops reading "
          "cannot keep a value's memory pinned; raise it for very large values over slow links. "
          "0: no limit.");

namespace chunkd::server {

absl::StatusOr<SecurityOptions> SecurityOptionsFromFlags() {
  SecurityOptions options;
  options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  options.auth_tokens = absl::GetFlag(FLAGS_auth_tokens);
  auto mode = ParseSocketMode(absl::GetFlag(FLAGS_unix_socket_mode));
  if (!mode.ok()) return mode.status();
  options.unix_socket_mode = *mode;
  options.unix_socket_group = absl::GetFlag(FLAGS_unix_socket_group);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  options.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  options.max_connection_idle = absl::GetFlag(FLAGS_max_connection_idle);
  options.max_call_duration = absl::GetFlag(FLAGS_max_call_duration);
  return options;
}

}  // namespace chunkd::server

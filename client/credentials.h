// The client's side of chunkd's security: TLS (server certificate check, client certificate for
// mutual TLS) and the bearer token sent with every call.
#ifndef CHUNKD_CLIENT_CREDENTIALS_H_
#define CHUNKD_CLIENT_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "grpcpp/channel.h"
#include "grpcpp/support/channel_arguments.h"

namespace chunkd::client {

// A channel to options.address with `args`:
// - TLS when options.tls or options.tls_ca is set and the address is TCP: the server's
//   certificate must be signed by the CA in options.tls_ca (the system's roots when empty) and
//   name the host of the address (or options.tls_server_name); options.tls_cert/tls_key are the
//   client's certificate and key for servers that require one. "unix:" addresses stay
//   plaintext, as chunkd serves them (the socket's permissions guard it).
// - With options.token, every call on the channel (the background lease calls too) carries
//   "authorization: Bearer TOKEN" metadata.
// INVALID_ARGUMENT or NOT_FOUND when a file cannot be read or the options do not fit together.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const ClientOptions& options,
                                                             grpc::ChannelArguments args);

// What chunkctl's --tls* and --token* flags say. The token comes from `token`, else the first
// line of `token_file`, else the CHUNKD_TOKEN environment variable.
struct SecurityFlags {
  std::string tls_ca;
  bool tls = false;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_server_name;
  std::string token;
  std::string token_file;
};
absl::Status ApplySecurityFlags(const SecurityFlags& flags, ClientOptions* options);

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_CREDENTIALS_H_

// Bearer tokens and the rights they grant (--auth_tokens).
//
// A token file holds one "TOKEN RIGHTS" per line, RIGHTS a comma-separated list of read, write
// and admin; '#' starts a comment, blank lines are ignored. Clients send
// "authorization: Bearer TOKEN" metadata with every call.
//
// Each method of chunkd.v1.Chunkd and of TensorStore's tensorstore_grpc.kvstore.KvStoreService
// needs one right (RequiredRight): read for Get, GetMany, Stat, List, ServerInfo, Release and
// Renew, and TensorStore's Read and List; write for Put and Delete, and TensorStore's Write and
// Delete (one key or a range); admin for Prefetch. The rights are independent: a token that
// should read and write lists both. Only these two services are checked: the standard health
// service (probes) and server reflection stay open.
//
// The check runs in the RPC engine before a call's handler (MakeTokenAuthorizer), not in each
// RPC: gRPC 1.51's server interceptors cannot refuse a call, and AuthMetadataProcessor only
// runs on TLS listeners, while tokens must also guard plaintext loopback and UNIX sockets.
#ifndef CHUNKD_SERVER_RPC_AUTH_H_
#define CHUNKD_SERVER_RPC_AUTH_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/status.h"
#include "server/rpc/rpc_engine.h"

namespace chunkd::server {

enum class Right : uint8_t { kRead = 1, kWrite = 2, kAdmin = 4 };
// A set of rights: the bits of Right.
using Rights = uint8_t;

// "read", "write", "admin".
absl::string_view RightName(Right right);
// "read,write", or "none".
std::string RightsString(Rights rights);

// The right a call of `method` needs: a full method name ("/chunkd.v1.Chunkd/Get",
// "/tensorstore_grpc.kvstore.KvStoreService/Read"), or a chunkd.v1.Chunkd method's name alone
// ("Get"); nullopt for a method this table does not know (such calls are refused).
std::optional<Right> RequiredRight(absl::string_view method);

// The tokens of a token file. Tokens are kept only as SHA-256 digests; a lookup compares the
// digest of the presented token with every entry in constant time, so neither the time a
// lookup takes nor its memory accesses depend on which stored token (or which byte) matched.
class TokenTable {
 public:
  // Parses the text of a token file; errors name `origin` and the line ("tokens.txt line 3:
  // ..."). Rules: one TOKEN and its RIGHTS per line, separated by blanks; RIGHTS is a comma list
  // of read, write, admin (blanks after commas are allowed); a field starting with '#' ends the
  // line; tokens are at least 16 printable ASCII characters and unique; at least one token.
  static absl::StatusOr<TokenTable> Parse(absl::string_view text,
                                          absl::string_view origin = "token file");
  // Reads and parses the file at `path`. The error names the file and, for syntax, the line.
  static absl::StatusOr<TokenTable> Load(const std::string& path);
  // A table of the one token a file holds alone, as Prometheus' credentials_file (surrounding
  // blanks and newlines ignored; the same rules as above): --metrics_token_file.
  static absl::StatusOr<TokenTable> ParseSingle(absl::string_view text,
                                                absl::string_view origin = "token file");
  static absl::StatusOr<TokenTable> LoadSingle(const std::string& path);

  // The rights of `token`; nullopt when no entry holds it.
  std::optional<Rights> Find(absl::string_view token) const;
  size_t size() const { return entries_.size(); }
  // The first 8 bytes of the token's SHA-256, in hex: names a token in maps and logs without
  // keeping it.
  static std::string Fingerprint(absl::string_view token);

 private:
  using Digest = std::array<unsigned char, 32>;
  struct Entry {
    Digest digest;
    Rights rights;
  };
  static Digest Hash(absl::string_view token);

  std::vector<Entry> entries_;
};

// The whole of the file at `path`; the error names it: "cannot read WHAT PATH: reason" (`what`
// ends with its own separator: "token file ", "--tls_cert=").
absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view what);

// The bearer token in a call's metadata: OK with the token, or UNAUTHENTICATED ("missing bearer
// token") when there is no usable "authorization: Bearer ..." entry.
absl::StatusOr<std::string> BearerToken(const grpc::ServerContextBase& context);
// The same from the value of an authorization header ("Bearer TOKEN"; the scheme in any case).
absl::StatusOr<std::string> BearerTokenOf(absl::string_view authorization);

// OK when the call's token holds `needed`; UNAUTHENTICATED for a missing or unknown token,
// PERMISSION_DENIED (naming the right needed) otherwise. `method` is for the message.
grpc::Status Authorize(const TokenTable& tokens, const grpc::ServerContextBase& context,
                       absl::string_view method, Right needed);

// Who a call comes from, for per-client limits (the caps on pinned memory,
// server/store/lease_table.h). With `by_token` (the server has tokens): "token:" and the first
// 8 bytes of the token's SHA-256 in hex (the token itself is not kept), so every connection of
// one token is one client. Else, for a connection whose process the kernel named
// (`kernel_pid`: SO_PEERCRED on a UNIX socket the server accepted itself,
// server/daemon/unix_listener.h), that process: "unix:pid=N". Else the connection's peer
// ("ipv4:127.0.0.1:54321": one client per connection); a UNIX peer gRPC accepted has no
// address, so there the client is told apart by the process it states
// (ClientIdentity.process_id and mount namespace): "unix:pid=N@MNT".
std::string CallerOf(const grpc::ServerContextBase& context, bool by_token,
                     std::optional<int64_t> kernel_pid, uint64_t stated_process_id,
                     uint64_t stated_mount_namespace);

// Checks each call of the services above before its handler sees it (rpc::Engine): the call's
// token must hold the right its method needs (Authorize). A method without a rule here is
// refused with PERMISSION_DENIED: a new RPC stays closed until it is given a right.
rpc::Authorizer MakeTokenAuthorizer(std::shared_ptr<const TokenTable> tokens);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_RPC_AUTH_H_

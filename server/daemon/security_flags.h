// The chunkd binary's security and limit flags (--tls_cert, --auth_tokens, --unix_socket_mode,
// --max_call_duration, ...), defined in security_flags.cc, which only the binary links.
#ifndef CHUNKD_SERVER_DAEMON_SECURITY_FLAGS_H_
#define CHUNKD_SERVER_DAEMON_SECURITY_FLAGS_H_

#include "absl/status/statusor.h"
#include "server/rpc/security.h"

namespace chunkd::server {

// The options the flags give; an error names the flag that is wrong.
absl::StatusOr<SecurityOptions> SecurityOptionsFromFlags();

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_DAEMON_SECURITY_FLAGS_H_

// The one place absl::Status becomes grpc::Status (the codes share their numbers), and the
// services' shorthand for a status of their own.
#ifndef CHUNKD_SERVER_RPC_GRPC_STATUS_H_
#define CHUNKD_SERVER_RPC_GRPC_STATUS_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace chunkd::server {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

// A status the services make themselves (a malformed request, a cancelled call).
inline grpc::Status Error(grpc::StatusCode code, std::string message) {
  return grpc::Status(code, std::move(message));
}

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_RPC_GRPC_STATUS_H_

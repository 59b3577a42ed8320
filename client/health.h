// The standard gRPC health check (grpc.health.v1.Health/Check) against a chunkd server. It
// needs no token: probes work whether or not the server requires one.
#ifndef CHUNKD_CLIENT_HEALTH_H_
#define CHUNKD_CLIENT_HEALTH_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace chunkd::client {

// The serving status the server reports for `service` ("" : the whole server), by name:
// "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN". The connection follows `options`
// (address, TLS); an error when the server cannot be asked within `timeout`.
absl::StatusOr<std::string> CheckHealth(const ClientOptions& options, absl::Duration timeout,
                                        const std::string& service = "");

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_HEALTH_H_

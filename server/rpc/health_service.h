// The standard health service, grpc.health.v1.Health (Check and Watch), on the RPC engine's
// queues. gRPC's built-in one runs on the callback API, whose threads would poll beside the
// engine's (server/rpc/rpc_engine.h). Messages are encoded by hand: Debian ships no health stub.
//
// It answers for the whole server ("") and for the service names given; Check of another name
// is NOT_FOUND and Watch of one reports SERVICE_UNKNOWN, as the protocol says. Calls of methods
// no service has (grpc.reflection when reflection is off, say) end with UNIMPLEMENTED.
#ifndef CHUNKD_SERVER_RPC_HEALTH_SERVICE_H_
#define CHUNKD_SERVER_RPC_HEALTH_SERVICE_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server_builder.h"
#include "server/rpc/rpc_engine.h"

namespace chunkd::server {

class HealthService {
 public:
  explicit HealthService(std::vector<std::string> services);

  // Before builder.BuildAndStart(): takes every call no registered service claims.
  void Register(grpc::ServerBuilder& builder) { builder.RegisterAsyncGenericService(&generic_); }
  // Before engine->Start().
  void Serve(rpc::Engine* engine);

  // SERVING or NOT_SERVING, for every name; watchers hear of a change.
  void SetServing(bool serving);
  // NOT_SERVING, and every Watch ends (so that they do not hold a shutdown for its grace).
  void Shutdown();

  class Call;

 private:
  friend class Call;
  int StatusOf(const std::string& service) const;  // a HealthCheckResponse.ServingStatus

  grpc::AsyncGenericService generic_;
  const std::vector<std::string> services_;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<Call*> watchers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_RPC_HEALTH_SERVICE_H_

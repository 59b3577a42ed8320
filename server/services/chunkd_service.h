// The chunkd.v1.Chunkd gRPC service, on gRPC's asynchronous API (server/rpc/rpc_engine.h): every
// call is handled on the completion-queue thread that received it, unless it must wait for the
// backend.
//
// Get is served raw: each reply message is the protobuf encoding of a GetResponse assembled by
// hand from a small header slice and a slice that points into the cached buffer, so a value's
// bytes are never copied on their way to the socket; the slice holds a reference to the buffer
// until gRPC has sent it. Blocking backend work runs on the ChunkStore's I/O threads, never on
// gRPC's.
#ifndef CHUNKD_SERVER_SERVICES_CHUNKD_SERVICE_H_
#define CHUNKD_SERVER_SERVICES_CHUNKD_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "buffer/host_identity.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "server/rpc/rpc_engine.h"
#include "server/services/method_calls.h"
#include "server/services/server_counters.h"
#include "server/services/service_core.h"
#include "server/store/chunk_store.h"
#include "server/store/device_tier.h"
#include "server/store/lease_table.h"

namespace chunkd::server {

// Get and GetMany are raw (replies are assembled by hand); the other methods are typed.
using ServiceBase =
    v1::Chunkd::WithRawMethod_Get<v1::Chunkd::WithRawMethod_GetMany<v1::Chunkd::AsyncService>>;

class ChunkdService final : public ServiceBase {
 public:
  // `core` (the store, limits and write budget every service shares) outlives the service.
  explicit ChunkdService(ServiceCore* core);

  // Registers every method with `engine` (before engine->Start()). Register the service with
  // the grpc::ServerBuilder that `engine` was made with, too.
  void Serve(rpc::Engine* engine);

  // The unary methods' handlers.
  void Delete(const v1::DeleteRequest& request, v1::DeleteResponse* response, UnaryDone done);
  void Stat(const v1::StatRequest& request, v1::StatResponse* response, UnaryDone done);
  void ServerInfo(const v1::ServerInfoRequest& request, v1::ServerInfoResponse* response,
                  UnaryDone done);
  void Release(const v1::ReleaseRequest& request, v1::ReleaseResponse* response, UnaryDone done);
  void Renew(const v1::RenewRequest& request, v1::RenewResponse* response, UnaryDone done);

  ChunkStore& store() { return core_->store(); }
  ServiceCore& core() { return *core_; }
  // What ServerInfo answers: version, store, tiers, leases, the counters of every service of
  // the server (also for /metrics).
  void FillServerInfo(v1::ServerInfoResponse* response);
  const ServiceOptions& options() const { return core_->options(); }
  ServiceCounters& counters() { return counters_; }

  // At most kMaxConcurrentPrefetches warm-ups run at once (each holds a thread).
  static constexpr int kMaxConcurrentPrefetches = 4;
  bool BeginPrefetch();
  void EndPrefetch();

 private:
  ServiceCore* const core_;
  ServiceCounters counters_;
  std::atomic<int> prefetches_{0};
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_CHUNKD_SERVICE_H_

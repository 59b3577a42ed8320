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

#include "chunkd/v1/chunkd.grpc.pb.h"
#include "buffer/host_identity.h"
#include "server/store/chunk_store.h"
#include "server/store/device_tier.h"
#include "server/store/lease_table.h"
#include "server/rpc/rpc_engine.h"

namespace chunkd::server {

struct ServiceOptions {
  // Values larger than this are refused with RESOURCE_EXHAUSTED before any byte is buffered.
  uint64_t max_value_bytes = 256ull << 20;
  bool read_only = false;
  // Size of the data parts of a Get reply (at most 1 MiB).
  size_t part_bytes = 1u << 20;
  // Bytes of Put values being received at once, all calls together; past it new Puts fail
  // with RESOURCE_EXHAUSTED instead of growing memory without bound.
  uint64_t max_inflight_put_bytes = 1ull << 30;
  // Where value memory comes from.
  buffer::HostAllocator* allocator = &buffer::HeapAllocator();
  // Shared-memory delivery: on when `leases` is set. Handles are offered to clients whose
  // identity shows they can map this server's segments (see buffer/host_identity.h).
  LeaseTable* leases = nullptr;
  buffer::HostIdentity host;
  // Whose memory a lease pins (the per-client cap, server/store/lease_table.h): by bearer
  // token when the server has tokens, else by connection (rpc/auth.h CallerOf).
  bool clients_by_token = false;
  // CUDA IPC delivery: on when `device_tier` (and `leases`) is set. Offered to clients with
  // the same boot id as `host` that name one of the tier's GPUs by UUID (server/store/device_tier.h).
  DeviceTier* device_tier = nullptr;
};

struct ServiceCounters {
  std::atomic<uint64_t> gets{0}, get_many_calls{0}, get_errors{0}, bytes_served_inline{0}, bytes_served_shm{0},
      gets_shm{0}, shm_fallbacks{0}, puts{0}, bytes_written{0}, deletes{0}, stats{0}, lists{0};
  std::atomic<uint64_t> gets_cuda{0}, bytes_served_cuda{0}, cuda_fallbacks{0},
      cuda_unknown_gpu{0};
};

// Get and GetMany are raw (replies are assembled by hand); the other methods are typed.
using ServiceBase =
    v1::Chunkd::WithRawMethod_Get<v1::Chunkd::WithRawMethod_GetMany<v1::Chunkd::AsyncService>>;

// Ends a unary call: OK sends the response filled in, an error only the status. Called once,
// from any thread.
using UnaryDone = std::function<void(grpc::Status)>;

class ChunkdService final : public ServiceBase {
 public:
  ChunkdService(ChunkStore* store, const ServiceOptions& options);

  // Registers every method with `engine` (before engine->Start()). Register the service with
  // the grpc::ServerBuilder that `engine` was made with, too.
  void Serve(rpc::Engine* engine);

  // The unary methods' handlers.
  void Delete(const v1::DeleteRequest& request, v1::DeleteResponse* response, UnaryDone done);
  void Stat(const v1::StatRequest& request, v1::StatResponse* response, UnaryDone done);
  void ServerInfo(const v1::ServerInfoRequest& request, v1::ServerInfoResponse* response,
                  UnaryDone done);
  void Release(const v1::ReleaseRequest& request, v1::ReleaseResponse* response,
               UnaryDone done);
  void Renew(const v1::RenewRequest& request, v1::RenewResponse* response, UnaryDone done);

  ChunkStore& store() { return *store_; }
  // What ServerInfo answers: version, store, tiers, leases, counters (also for /metrics).
  void FillServerInfo(v1::ServerInfoResponse* response);
  const ServiceOptions& options() const { return options_; }
  ServiceCounters& counters() { return counters_; }

  // At most kMaxConcurrentPrefetches warm-ups run at once (each holds a thread).
  static constexpr int kMaxConcurrentPrefetches = 4;
  bool BeginPrefetch();
  void EndPrefetch();

  // Put budget: reserve before buffering, release when the call ends.
  bool ReservePutBytes(uint64_t bytes);
  void ReleasePutBytes(uint64_t bytes);

 private:
  ChunkStore* const store_;
  const ServiceOptions options_;
  ServiceCounters counters_;
  std::atomic<uint64_t> inflight_put_bytes_{0};
  std::atomic<int> prefetches_{0};
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_CHUNKD_SERVICE_H_

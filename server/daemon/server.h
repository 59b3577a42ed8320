// A running chunkd: the store, the services (chunkd.v1 and TensorStore's key-value service) and
// the gRPC server with health checking and reflection, on one or more listening addresses.
#ifndef CHUNKD_SERVER_DAEMON_SERVER_H_
#define CHUNKD_SERVER_DAEMON_SERVER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "buffer/shm_arena.h"
#include "grpcpp/server.h"
#include "server/daemon/unix_listener.h"
#include "server/rpc/health_service.h"
#include "server/rpc/rpc_engine.h"
#include "server/rpc/security.h"
#include "server/services/chunkd_service.h"
#include "server/services/service_core.h"
#include "server/services/tensorstore_kvstore_service.h"
#include "server/store/chunk_store.h"
#include "server/store/derived_cache.h"
#include "server/store/device_tier.h"
#include "server/store/disk_tier.h"
#include "server/store/lease_table.h"
#include "server/store/process_watch.h"

namespace chunkd::server {

struct ServerConfig {
  // "host:port" (port 0 picks a free one), "[::1]:port", or "unix:/path/to/socket".
  std::vector<std::string> listen = {"127.0.0.1:7878"};
  std::string store = "chunkd-data";
  BackendOptions backend;
  ChunkStoreOptions store_options;
  ServiceOptions service;
  // Shared-memory delivery: chunk memory comes from segments in shm_arena.directory, and
  // colocated clients get handles with leases. Off, or when the directory is unusable, chunks
  // live on the heap and are served inline only.
  bool shm = true;
  buffer::ShmArenaOptions shm_arena;
  LeaseTableOptions leases;
  // CUDA IPC delivery: a device tier of device_tier.capacity_bytes per GPU (0: off). Without a
  // CUDA driver or device the server logs it once and serves host-only.
  DeviceTierOptions device_tier;
  // The disk tier below the host cache (server/store/disk_tier.h): off when disk_tier.dir is
  // empty. Remote stores only (s3, http): with another store Start refuses.
  DiskTierOptions disk_tier;
  // Derived entries (server/store/derived_cache.h): off when derived.cache.capacity_bytes is 0.
  DerivedCacheOptions derived;
  // TLS, tokens, socket mode, connection and call limits (server/rpc/security.h).
  SecurityOptions security;
  // Completion-queue threads that run the RPCs (server/rpc/rpc_engine.h); 0: rpc::DefaultThreads().
  int rpc_threads = 0;
  // gRPC server reflection (for grpcurl); off by default, see server.cc.
  bool reflection = false;
};

class ChunkdServer {
 public:
  // Opens the store and starts serving. The error says what could not be opened or bound.
  static absl::StatusOr<std::unique_ptr<ChunkdServer>> Start(ServerConfig config);
  ~ChunkdServer();

  // The addresses actually bound, with ports chosen for port 0 filled in.
  const std::vector<std::string>& addresses() const { return addresses_; }
  ChunkStore& store() { return *store_; }
  ChunkdService& service() { return *service_; }
  TensorStoreKvStoreService& tensorstore_service() { return *tensorstore_service_; }
  // Null when shared-memory delivery is off.
  const buffer::ShmArena* arena() const { return arena_.get(); }
  // Null when CUDA IPC delivery is off.
  const DeviceTier* device_tier() const { return device_tier_.get(); }
  // Null when the disk tier is off.
  const DiskTier* disk_tier() const { return disk_tier_.get(); }

  // Stops accepting calls, lets calls in flight finish for up to `grace`, cancels the rest.
  void Shutdown(absl::Duration grace);

 private:
  ChunkdServer() = default;

  std::shared_ptr<buffer::ShmArena> arena_;
  std::unique_ptr<buffer::FallbackAllocator> allocator_;
  std::unique_ptr<LeaseTable> leases_;
  // The processes of UNIX-socket clients (their leases follow them), and those listeners.
  std::unique_ptr<ProcessWatch> processes_;
  std::vector<std::unique_ptr<UnixListener>> unix_listeners_;
  std::unique_ptr<DeviceTier> device_tier_;
  std::unique_ptr<DiskTier> disk_tier_;  // outlives store_, which writes to it
  std::unique_ptr<ChunkStore> store_;
  std::unique_ptr<DerivedCache> derived_;  // after store_: it listens to the store
  std::unique_ptr<ServiceCore> core_;
  std::unique_ptr<ChunkdService> service_;
  std::unique_ptr<TensorStoreKvStoreService> tensorstore_service_;
  std::unique_ptr<ServerSecurity> security_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<rpc::Engine> engine_;  // its queues outlive grpc_server_
  std::unique_ptr<grpc::Server> grpc_server_;
  std::vector<std::string> addresses_;
  bool shut_down_ = false;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_DAEMON_SERVER_H_

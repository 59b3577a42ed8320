#include "server/daemon/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "proto/wire/transport.h"
#include "server/common/byte_size.h"
#include "server/common/log.h"

namespace chunkd::server {
namespace {

// The filesystem path of a "unix:" address, or empty for other addresses.
std::string UnixSocketPath(absl::string_view address) {
  if (absl::StartsWith(address, "unix://")) return std::string(address.substr(7));
  if (absl::StartsWith(address, "unix:")) return std::string(address.substr(5));
  return "";
}

// A socket file left behind by a server that died is removed so the address can be bound
// again; a socket some live process still accepts on is left alone (binding then fails).
absl::Status ClearStaleSocket(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot listen on unix:", path, ": the path exists and is not a socket"));
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::OkStatus();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  if (live) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot listen on unix:", path, ": another server is listening there"));
  }
  ::unlink(path.c_str());
  return absl::OkStatus();
}

// Linking gRPC's reflection library registers its plugin with every ServerBuilder; this option
// takes it out again when reflection was not asked for.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(
        std::remove_if(plugins->begin(), plugins->end(),
                       [](const auto& p) { return p->name() == "proto_server_reflection"; }),
        plugins->end());
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChunkdServer>> ChunkdServer::Start(ServerConfig config) {
  std::unique_ptr<ChunkdServer> server(new ChunkdServer());
  if (config.shm) {
    auto arena = buffer::ShmArena::Create(config.shm_arena);
    if (arena.ok()) {
      server->arena_ = *std::move(arena);
      server->allocator_ = std::make_unique<buffer::FallbackAllocator>(server->arena_);
      server->leases_ = std::make_unique<LeaseTable>(config.leases);
      config.backend.allocator = server->allocator_.get();
      config.service.leases = server->leases_.get();
      config.service.host = buffer::CurrentHostIdentity(config.shm_arena.directory);
    } else {
      Log("shared-memory delivery is off: %s", std::string(arena.status().message()));
    }
  }
  if (config.device_tier.capacity_bytes > 0) {
    // Without a CUDA driver or device the server runs host-only, and says so once, here.
    absl::StatusOr<buffer::gpu::DeviceApi*> api = buffer::gpu::CudaDeviceApi();
    if (!api.ok()) {
      Log("CUDA IPC delivery is off, serving host-only: %s", std::string(api.status().message()));
    } else {
      auto tier = DeviceTier::Create(*api, config.device_tier);
      if (!tier.ok()) return tier.status();
      server->device_tier_ = *std::move(tier);
      if (!server->leases_) server->leases_ = std::make_unique<LeaseTable>(config.leases);
      config.service.leases = server->leases_.get();
      config.service.device_tier = server->device_tier_.get();
      if (config.service.host.boot_id.empty()) {
        config.service.host = buffer::CurrentHostIdentity(config.shm_arena.directory);
      }
      std::string gpus;
      for (const auto& d : server->device_tier_->devices()) {
        absl::StrAppend(&gpus, gpus.empty() ? "" : ", ", d.ordinal, " ", d.name, " ",
                        buffer::gpu::UuidToString(d.uuid));
      }
      Log("CUDA IPC delivery: device tier of %s per GPU on %s",
          FormatBytes(config.device_tier.capacity_bytes), gpus);
    }
  }
  auto backend = OpenBackend(config.store, config.backend);
  if (!backend.ok()) return backend.status();
  config.store_options.allocator = config.backend.allocator;
  if (!config.disk_tier.dir.empty()) {
    if ((*backend)->validation() != Validation::kRemote) {
      return absl::InvalidArgumentError(
          absl::StrCat("--disk_cache_dir is for remote stores (s3://, http://, https://); the ",
                       (*backend)->kind(), " store ",
                       (*backend)->holds_values_in_memory()
                           ? "holds its values in memory: there is nothing to keep on disk"
                           : "is already on a local disk, whose page cache does that job",
                       ": drop --disk_cache_dir"));
    }
    auto disk = DiskTier::Open(config.disk_tier, config.backend.allocator);
    if (!disk.ok()) {
      return absl::Status(disk.status().code(),
                          absl::StrCat("could not open the disk tier in ", config.disk_tier.dir,
                                       ": ", disk.status().message()));
    }
    server->disk_tier_ = *std::move(disk);
    config.store_options.disk = server->disk_tier_.get();
    Log("disk tier: %s in %s (its index loads in the background)",
        FormatBytes(config.disk_tier.capacity_bytes), config.disk_tier.dir);
  }
  server->store_ = std::make_unique<ChunkStore>(*std::move(backend), config.store_options);
  if (config.derived.cache.capacity_bytes > 0) {
    server->derived_ = std::make_unique<DerivedCache>(server->store_.get(), config.derived);
    config.service.derived = server->derived_.get();
  }
  config.service.allocator = config.backend.allocator;
  config.service.clients_by_token = !config.security.auth_tokens.empty();
  server->processes_ = std::make_unique<ProcessWatch>();
  config.service.processes = server->processes_.get();
  server->core_ = std::make_unique<ServiceCore>(server->store_.get(), config.service);
  server->service_ = std::make_unique<ChunkdService>(server->core_.get());
  server->tensorstore_service_ = std::make_unique<TensorStoreKvStoreService>(server->core_.get());
  auto security = ServerSecurity::Create(config.security, config.listen);
  if (!security.ok()) return security.status();
  server->security_ = *std::move(security);

  // Reflection is gRPC's synchronous service: its threads poll beside the engine's and cost
  // every call a hand-off (server/rpc/rpc_engine.h), so it is there only when asked for.
  if (config.reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  // Put parts are at most 1 MiB by contract; allow slack for clients that send larger ones.
  builder.SetMaxReceiveMessageSize(8 << 20);
  builder.AddChannelArgument(wire::kStreamWindowArg, wire::kStreamWindowBytes);
  builder.AddChannelArgument(wire::kMaxFrameArg, wire::kMaxFrameBytes);
  int threads = config.rpc_threads > 0 ? config.rpc_threads : rpc::DefaultThreads();
  server->engine_ = std::make_unique<rpc::Engine>(builder, threads);
  // the services, tokens, limits
  builder.RegisterService(server->service_.get());
  builder.RegisterService(server->tensorstore_service_.get());
  server->security_->Configure(builder, server->engine_.get());
  server->service_->Serve(server->engine_.get());
  server->tensorstore_service_->Serve(server->engine_.get());
  server->health_ = std::make_unique<HealthService>(
      std::vector<std::string>{v1::Chunkd::service_full_name(),
                               tensorstore_grpc::kvstore::KvStoreService::service_full_name()});
  server->health_->Register(builder);
  server->health_->Serve(server->engine_.get());
  std::vector<std::unique_ptr<int>> ports;
  if (config.listen.empty()) return absl::InvalidArgumentError("no address to listen on");
  for (const std::string& address : config.listen) {
    ports.push_back(std::make_unique<int>(0));
    if (std::string path = UnixSocketPath(address); !path.empty()) {
      // Accepted here, not by gRPC, so that each connection's process is known
      // (daemon/unix_listener.h).
      if (absl::Status s = ClearStaleSocket(path); !s.ok()) return s;
      auto listener = UnixListener::Bind(path);
      if (!listener.ok()) return listener.status();
      server->unix_listeners_.push_back(*std::move(listener));
      continue;
    }
    builder.AddListeningPort(address, server->security_->CredentialsFor(address),
                             ports.back().get());
  }
  server->grpc_server_ = server->security_->BuildAndStart(builder);
  if (!server->grpc_server_) {
    return absl::UnavailableError(
        absl::StrCat("could not listen on ", absl::StrJoin(config.listen, ", "),
                     " (address in use, or not an address of this host?)"));
  }
  server->engine_->Start();
  for (auto& listener : server->unix_listeners_) {
    listener->Start(server->grpc_server_.get(), server->processes_.get());
  }
  for (size_t i = 0; i < config.listen.size(); ++i) {
    const std::string& address = config.listen[i];
    if (!UnixSocketPath(address).empty()) {
      server->addresses_.push_back(address);
      continue;
    }
    if (*ports[i] == 0) {
      server->grpc_server_->Shutdown();
      return absl::UnavailableError(absl::StrCat("could not listen on ", address));
    }
    size_t colon = address.rfind(':');
    server->addresses_.push_back(absl::StrCat(address.substr(0, colon), ":", *ports[i]));
  }
  if (absl::Status s = server->security_->Started(); !s.ok()) {
    server->grpc_server_->Shutdown();
    return s;
  }
  server->health_->SetServing(true);
  return server;
}

void ChunkdServer::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  health_->Shutdown();
  // No connection may be handed to gRPC once it shuts down.
  for (auto& listener : unix_listeners_) listener->Stop();
  // Reads waiting for a derived entry end now: no call waits out its wait behind the grace.
  if (derived_) derived_->Shutdown();
  grpc_server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  // Calls the server cancelled still finish through the engine's queues.
  engine_->Shutdown();
  grpc_server_->Wait();
}

ChunkdServer::~ChunkdServer() {
  if (grpc_server_) Shutdown(absl::ZeroDuration());
  // Every call has ended once the engine has shut down; the store's I/O threads finish what is
  // queued as the store is destroyed. The engine's queues go after the server that used them.
  unix_listeners_.clear();
  grpc_server_.reset();
  engine_.reset();
  health_.reset();
  tensorstore_service_.reset();
  service_.reset();
  core_.reset();
  derived_.reset();
  store_.reset();
  // What the store offered the disk tier is written before it closes (a SIGTERM loses nothing
  // it read), and the tier goes before the memory its reads were placed in.
  if (disk_tier_) disk_tier_->Flush();
  disk_tier_.reset();
  device_tier_.reset();
  leases_.reset();
  processes_.reset();
  allocator_.reset();
  arena_.reset();
}

}  // namespace chunkd::server

// chunkd.v1's service: the calls that write (Put, Delete), list, warm (Prefetch), and the unary
// methods (Stat, ServerInfo, Release, Renew). The reads are in files of their own: Get
// (get_call.cc), GetMany (get_many_call.cc), and how their bytes are delivered (delivery.h).
#include "server/services/chunkd_service.h"

#include <cstring>
#include <limits>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/version.h"
#include "proto/wire/convert.h"
#include "server/common/key.h"
#include "server/rpc/grpc_status.h"
#include "server/services/get_calls.h"
#include "server/services/list_call.h"
#include "server/services/requests.h"
#include "server/services/service_core.h"
#include "server/store/prefetch.h"

namespace chunkd::server {
namespace {

// A tier's pinned memory and its caps (0: no cap), for ServerInfo.
void SetPinned(const PinStats& pins, v1::CacheTierInfo* tier) {
  auto cap = [](uint64_t bytes) {
    return bytes == std::numeric_limits<uint64_t>::max() ? 0 : bytes;
  };
  tier->set_pinned_bytes(pins.pinned_bytes);
  tier->set_max_pinned_bytes(cap(pins.max_bytes));
  tier->set_max_client_pinned_bytes(cap(pins.max_holder_bytes));
  tier->set_pinning_clients(pins.holders);
  tier->set_pin_refusals_total_cap(pins.refused_total);
  tier->set_pin_refusals_client_cap(pins.refused_holder);
}

// Receives a value in parts into memory sized from the header, then writes it through.
class PutCall final : public rpc::ClientStreamCall<v1::PutRequest, v1::PutResponse> {
 public:
  PutCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : ClientStreamCall(engine, queue, "Put", SpawnerOf<PutCall>(service)), service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestPut(&context_, &reader_, queue, queue, tag);
  }

  // A read-only server refuses writes once the header shows one (derived entries are not
  // writes of the store: a read-only server takes them).
  void OnStart() override { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client finished sending (or went away).
      if (context_.IsCancelled()) {
        Finish(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      } else if (!have_header_) {
        Finish(Error(grpc::StatusCode::INVALID_ARGUMENT, "Put ended before its header"));
      } else if (received_ != size_) {
        Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("Put of key ", QuoteKey(key_), " ended after ", received_,
                                  " of its ", size_, " bytes")));
      } else {
        Commit();
      }
      return;
    }
    if (!have_header_) {
      if (grpc::Status s = StartValue(); !s.ok()) {
        Finish(std::move(s));
        return;
      }
    } else if (request_.has_header()) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   "only the first Put message may carry a header"));
      return;
    }
    const std::string& data = request_.data();
    if (data.size() > size_ - received_) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("Put of key ", QuoteKey(key_), " sent more than the ", size_,
                                " bytes its header declared")));
      return;
    }
    if (!data.empty()) std::memcpy(value_.data() + received_, data.data(), data.size());
    received_ += data.size();
    request_.Clear();
    StartRead(&request_);
  }

  void OnDone() override {
    if (reserved_ > 0) service_->core().ReleasePutBytes(reserved_);
  }

  grpc::Status StartValue() {
    if (!request_.has_header()) {
      return Error(grpc::StatusCode::INVALID_ARGUMENT,
                   "the first Put message must carry the header (key and size)");
    }
    const v1::PutHeader& header = request_.header();
    if (absl::Status s = ValidateKey(header.key()); !s.ok()) return ToGrpcStatus(s);
    key_ = header.key();
    size_ = header.size();
    conditions_ = ConditionsFromProto(header.conditions());
    if (header.has_derived()) {
      if (absl::Status s = CheckDerived(header); !s.ok()) return ToGrpcStatus(s);
      derived_ = header.derived();
    } else if (absl::Status s = service_->core().CheckWritable("writes"); !s.ok()) {
      return ToGrpcStatus(s);
    }
    if (absl::Status s = service_->core().CheckValueSize(key_, size_); !s.ok()) {
      return ToGrpcStatus(s);
    }
    if (!service_->core().ReservePutBytes(size_)) {
      return ToGrpcStatus(ServiceCore::PutBudgetExhausted());
    }
    reserved_ = size_;
    auto value = buffer::cpu::MutableBuffer::Allocate(size_, *service_->options().allocator);
    if (!value.ok()) return ToGrpcStatus(value.status());
    value_ = *std::move(value);
    have_header_ = true;
    return grpc::Status::OK;
  }

  // A derived entry's Put (PutHeader.derived): no conditions, a derivation of 1 to 4096 bytes,
  // no bytes to give a production up.
  absl::Status CheckDerived(const v1::PutHeader& header) const {
    if (service_->options().derived == nullptr) {
      return absl::FailedPreconditionError(
          "this server keeps no derived entries (--derived_cache_fraction=0)");
    }
    const v1::DerivedPut& derived = header.derived();
    if (derived.derivation().empty() || derived.derivation().size() > kMaxDerivationBytes) {
      return absl::InvalidArgumentError(absl::StrCat("Put of key ", QuoteKey(key_),
                                                     ": a derivation is 1 to ", kMaxDerivationBytes,
                                                     " bytes, not ", derived.derivation().size()));
    }
    if (header.has_conditions()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Put of key ", QuoteKey(key_),
                       ": a derived entry's Put takes no conditions (source_generation says "
                       "what it was derived from)"));
    }
    if (derived.abandon() && header.size() != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Put of key ", QuoteKey(key_), ": an abandon carries no bytes"));
    }
    return absl::OkStatus();
  }

  void Commit() {
    if (derived_) {
      DerivedCache* cache = service_->options().derived;
      if (derived_->abandon()) {
        Finish(
            ToGrpcStatus(cache->Abandon(key_, derived_->derivation(), derived_->production_id())));
        return;
      }
      cache->Publish(key_, derived_->derivation(), derived_->source_generation(),
                     derived_->production_id(), std::move(value_).Freeze(),
                     [this, generation = derived_->source_generation()](absl::Status s) {
                       if (s.ok()) {
                         response_.set_generation(generation);
                         response_.set_size(size_);
                       }
                       Finish(ToGrpcStatus(s));
                     });
      return;
    }
    service_->core().SubmitWrite(key_, std::move(value_).Freeze(), conditions_,
                                 &service_->counters(), [this](absl::StatusOr<ValueInfo> info) {
                                   if (info.ok()) {
                                     response_.set_generation(info->generation);
                                     response_.set_size(info->size);
                                   }
                                   Finish(ToGrpcStatus(info.status()));
                                 });
  }

  ChunkdService* const service_;
  v1::PutRequest request_;
  bool have_header_ = false;
  std::string key_;
  uint64_t size_ = 0;
  uint64_t received_ = 0;
  uint64_t reserved_ = 0;
  Conditions conditions_;
  std::optional<v1::DerivedPut> derived_;
  buffer::cpu::MutableBuffer value_;
};

// Streams a listing page by page (PagedListCall).
class ListCall final : public PagedListCall<v1::ListRequest, v1::ListResponse> {
 public:
  ListCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : PagedListCall(engine, queue, "List", SpawnerOf<ListCall>(service)), service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestList(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    service_->counters().lists.fetch_add(1, std::memory_order_relaxed);
    if (absl::Status s = ValidatePrefix(request_.prefix()); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    StartListing(&service_->store(), request_.prefix(), request_.directory());
  }

  bool AddPage(ListPage& page, v1::ListResponse* response) override {
    for (ListEntry& entry : page.entries) {
      v1::ListEntry* e = response->add_entries();
      e->set_key(std::move(entry.key));
      e->set_size(entry.size);
    }
    for (std::string& prefix : page.prefixes) response->add_prefixes(std::move(prefix));
    return true;
  }
  bool Empty(const v1::ListResponse& response) const override {
    return response.entries_size() == 0 && response.prefixes_size() == 0;
  }

  ChunkdService* const service_;
};

// Warms keys on a thread of its own (reads block on the store) and streams progress; one write
// is in flight at a time, so the thread waits for each progress message to be sent.
class PrefetchCall final : public rpc::ServerStreamCall<v1::PrefetchRequest, v1::PrefetchResponse> {
 public:
  PrefetchCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : ServerStreamCall(engine, queue, "Prefetch", SpawnerOf<PrefetchCall>(service)),
        service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestPrefetch(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    const v1::PrefetchRequest* request = &request_;
    for (const std::string& key : request->keys()) {
      if (absl::Status s = ValidateKey(key); !s.ok()) {
        Finish(ToGrpcStatus(s));
        return;
      }
      keys_.push_back(key);
    }
    if (request->has_prefix()) {
      if (absl::Status s = ValidatePrefix(request->prefix()); !s.ok()) {
        Finish(ToGrpcStatus(s));
        return;
      }
      prefix_ = request->prefix();
    }
    if (!service_->BeginPrefetch()) {
      Finish(Error(grpc::StatusCode::RESOURCE_EXHAUSTED,
                   "too many prefetches running; try again when one has finished"));
      return;
    }
    thread_ = std::thread([this] { Run(); });
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    write_ok_ = ok;
    writing_ = false;
  }
  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }
  void OnDone() override {
    if (thread_.joinable()) {
      // OnDone may run on the warm-up thread itself (inside its Finish); it has nothing left
      // to do then but return.
      if (thread_.get_id() == std::this_thread::get_id()) {
        thread_.detach();
      } else {
        thread_.join();
      }
      service_->EndPrefetch();
    }
  }

  void Run() {
    absl::Status status = chunkd::server::Prefetch(
        service_->store(), keys_, prefix_, /*report_every=*/64,
        [this](const PrefetchProgress& progress) { return Send(progress); });
    Finish(ToGrpcStatus(status));
  }

  // Sends one progress message and waits until it is out; false when the client is gone.
  bool Send(const PrefetchProgress& progress) {
    absl::MutexLock lock(&mu_);
    if (cancelled_ || !write_ok_) return false;
    response_.set_keys_done(progress.keys_done);
    response_.set_bytes_loaded(progress.bytes_loaded);
    response_.set_keys_failed(progress.keys_failed);
    response_.clear_errors();
    for (const std::string& e : progress.errors) response_.add_errors(e);
    writing_ = true;
    mu_.Unlock();
    StartWrite(&response_);
    mu_.Lock();
    mu_.Await(absl::Condition(
        +[](PrefetchCall* r)
             ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) { return !r->writing_ || r->cancelled_; },
        this));
    return write_ok_ && !cancelled_;
  }

  ChunkdService* const service_;
  std::vector<std::string> keys_;
  std::optional<std::string> prefix_;
  absl::Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_ok_ ABSL_GUARDED_BY(mu_) = true;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  v1::PrefetchResponse response_;
  std::thread thread_;
};

}  // namespace

ChunkdService::ChunkdService(ServiceCore* core) : core_(core) {
  core_->AddCounters("", &counters_);
}

void ChunkdService::Serve(rpc::Engine* engine) {
  // Reads come in bursts from many clients: several call objects wait on each queue, so that a
  // call is matched at once. One that arrives while none waits is queued inside gRPC, and if
  // the server shuts down then, gRPC drops it and its client sees a bare CANCELLED.
  engine->AddMethod(GetCallSpawner(this), 16);
  engine->AddMethod(GetManyCallSpawner(this), 8);
  engine->AddMethod(SpawnerOf<PutCall>(this), 4);
  engine->AddMethod(SpawnerOf<ListCall>(this), 1);
  engine->AddMethod(SpawnerOf<PrefetchCall>(this), 1);
  AddUnary(engine, this, "Delete", &ChunkdService::RequestDelete, &ChunkdService::Delete);
  AddUnary(engine, this, "Stat", &ChunkdService::RequestStat, &ChunkdService::Stat);
  AddUnary(engine, this, "ServerInfo", &ChunkdService::RequestServerInfo,
           &ChunkdService::ServerInfo);
  AddUnary(engine, this, "Release", &ChunkdService::RequestRelease, &ChunkdService::Release);
  AddUnary(engine, this, "Renew", &ChunkdService::RequestRenew, &ChunkdService::Renew);
}

void ChunkdService::Delete(const v1::DeleteRequest& request, v1::DeleteResponse* response,
                           UnaryDone done) {
  if (absl::Status s = core_->CheckWritable("deletes"); !s.ok()) {
    done(ToGrpcStatus(s));
    return;
  }
  if (absl::Status s = ValidateKey(request.key()); !s.ok()) {
    done(ToGrpcStatus(s));
    return;
  }
  core_->SubmitDelete(request.key(), ConditionsFromProto(request.conditions()), &counters_,
                      [done](absl::Status s) { done(ToGrpcStatus(s)); });
}

void ChunkdService::Stat(const v1::StatRequest& request, v1::StatResponse* response,
                         UnaryDone done) {
  counters_.stats.fetch_add(1, std::memory_order_relaxed);
  if (absl::Status s = ValidateKey(request.key()); !s.ok()) {
    done(ToGrpcStatus(s));
    return;
  }
  auto answer = [done, response](absl::StatusOr<ValueInfo> info) {
    if (info.ok()) {
      response->set_exists(true);
      response->set_size(info->size);
      response->set_generation(info->generation);
    } else if (absl::IsNotFound(info.status())) {
      response->set_exists(false);
    } else {
      done(ToGrpcStatus(info.status()));
      return;
    }
    done(grpc::Status::OK);
  };
  // A pool client's invalidation (StatRequest.invalidate): the answer then comes from the store.
  // Both on an I/O thread: with a disk tier, dropping the key is a durable write to disk.
  if (request.invalidate()) {
    counters_.invalidations.fetch_add(1, std::memory_order_relaxed);
    absl::Status queued = store().Submit([this, answer, key = request.key()] {
      store().Invalidate(key);
      answer(store().Stat(key));
    });
    if (!queued.ok()) {
      // Refused, but the caller's copy must still go (it may retry elsewhere).
      store().Invalidate(request.key());
      done(ToGrpcStatus(queued));
    }
    return;
  }
  // A cached value is answered here; only a miss asks the backend, on an I/O thread.
  if (std::optional<ValueInfo> cached = store().CachedInfo(request.key())) {
    answer(*cached);
    return;
  }
  absl::Status queued =
      store().Submit([this, answer, key = request.key()] { answer(store().Stat(key)); });
  if (!queued.ok()) done(ToGrpcStatus(queued));
}

void ChunkdService::ServerInfo(const v1::ServerInfoRequest& request,
                               v1::ServerInfoResponse* response, UnaryDone done) {
  FillServerInfo(response);
  done(grpc::Status::OK);
}

void ChunkdService::FillServerInfo(v1::ServerInfoResponse* response) {
  Backend& backend = store().backend();
  response->set_version(CHUNKD_VERSION);
  response->set_backend(std::string(backend.kind()));
  response->set_store(backend.location());
  response->set_read_only(options().read_only);
  response->set_max_value_bytes(options().max_value_bytes);
  response->add_deliveries(v1::DELIVERY_INLINE);
  LeaseStats leases = options().leases ? options().leases->stats() : LeaseStats();
  if (options().leases) {
    if (options().allocator->kind() == buffer::MemoryKind::kHostShared) {
      response->add_deliveries(v1::DELIVERY_SHM);
    }
    if (options().device_tier) response->add_deliveries(v1::DELIVERY_CUDA_IPC);
    response->set_leases_active(leases.active);
    response->set_leased_bytes(leases.bytes);
    wire::ToProto(options().host, response->mutable_host());
  }
  response->add_features("conditional-writes");
  response->add_features("byte-ranges");
  response->add_features("blocks");
  response->add_features("single-flight");
  response->add_features("prefetch");
  response->add_features("get-many");
  if (options().derived) response->add_features("derived");
  std::optional<HostCacheStats> cache_stats;
  v1::CacheTierInfo* tier = response->add_tiers();
  tier->set_tier("host");
  SetPinned(leases.host, tier);
  if (HostCache* cache = store().cache()) {
    cache_stats = cache->stats();
    tier->set_capacity_bytes(cache_stats->capacity_bytes);
    tier->set_used_bytes(cache_stats->used_bytes);
    tier->set_entries(cache_stats->entries);
    response->add_features(absl::StrCat("eviction-", EvictionPolicyName(cache->policy())));
  } else {
    tier->set_capacity_bytes(backend.memory_capacity_bytes());
    tier->set_used_bytes(backend.memory_used_bytes());
    tier->set_entries(backend.entry_count());
  }
  std::optional<DeviceTierStats> device_stats;
  if (options().device_tier) {
    device_stats = options().device_tier->stats();
    const DeviceTierStats& d = *device_stats;
    v1::CacheTierInfo* device = response->add_tiers();
    device->set_tier("device");
    SetPinned(leases.device, device);
    device->set_capacity_bytes(d.capacity_bytes);
    device->set_used_bytes(d.used_bytes);
    device->set_entries(d.entries);
  }
  std::optional<DiskTierStats> disk_stats;
  if (const DiskTier* disk = store().disk()) {
    disk_stats = disk->stats();
    v1::CacheTierInfo* tier = response->add_tiers();
    tier->set_tier("disk");
    tier->set_capacity_bytes(disk_stats->capacity_bytes);
    tier->set_used_bytes(disk_stats->used_bytes);
    tier->set_entries(disk_stats->entries);
  }
  std::optional<DerivedCacheStats> derived_stats;
  if (options().derived) {
    derived_stats = options().derived->stats();
    v1::CacheTierInfo* derived = response->add_tiers();
    derived->set_tier("derived");
    derived->set_capacity_bytes(derived_stats->cache.capacity_bytes);
    derived->set_used_bytes(derived_stats->cache.used_bytes);
    derived->set_entries(derived_stats->cache.entries);
  }
  // The counters (server_counters.h): the server's, then the calls of every service (chunkd.v1's
  // unprefixed).
  ChunkStoreCounters store_counters = store().counters();
  ReadBudgetStats budget = store().read_budget();
  CounterSources sources;
  if (options().leases) sources.leases = &leases;
  if (cache_stats) sources.cache = &*cache_stats;
  sources.store = &store_counters;
  sources.budget = &budget;
  sources.block_bytes = store().block_bytes();
  sources.service = &counters_;
  if (device_stats) sources.device = &*device_stats;
  if (disk_stats) sources.disk = &*disk_stats;
  if (derived_stats) sources.derived = &*derived_stats;
  auto& counters = *response->mutable_counters();
  auto out = [&counters](const std::string& name, uint64_t value) { counters[name] = value; };
  ExportServerCounters(sources, out);
  core_->ExportCounters(out);
}

void ChunkdService::Release(const v1::ReleaseRequest& request, v1::ReleaseResponse* response,
                            UnaryDone done) {
  std::vector<uint64_t> ids(request.lease_ids().begin(), request.lease_ids().end());
  std::vector<uint64_t> unknown =
      options().leases ? options().leases->Release(ids) : std::move(ids);
  for (uint64_t id : unknown) response->add_unknown_lease_ids(id);
  done(grpc::Status::OK);
}

void ChunkdService::Renew(const v1::RenewRequest& request, v1::RenewResponse* response,
                          UnaryDone done) {
  std::vector<uint64_t> ids(request.lease_ids().begin(), request.lease_ids().end());
  std::vector<uint64_t> unknown = options().leases ? options().leases->Renew(ids) : std::move(ids);
  for (uint64_t id : unknown) response->add_unknown_lease_ids(id);
  if (options().leases) {
    response->set_ttl_ms(absl::ToInt64Milliseconds(options().leases->ttl()));
  }
  done(grpc::Status::OK);
}

bool ChunkdService::BeginPrefetch() {
  int running = prefetches_.load();
  do {
    if (running >= kMaxConcurrentPrefetches) return false;
  } while (!prefetches_.compare_exchange_weak(running, running + 1));
  return true;
}

void ChunkdService::EndPrefetch() { prefetches_.fetch_sub(1); }

}  // namespace chunkd::server

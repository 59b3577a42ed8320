#include "server/services/delivery.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/rpc/auth.h"
#include "server/services/requests.h"
#include "server/services/service_core.h"

namespace chunkd::server {
namespace {

// Who holds the leases a call takes, for the per-client caps on pinned memory, and the
// process whose life they follow (a UNIX-socket client the server watches).
LeaseHolder HolderOf(ChunkdService* service, const grpc::ServerContextBase& context,
                     const v1::ClientIdentity& client) {
  std::optional<PeerProcess> peer;
  if (const ProcessWatch* processes = service->options().processes) {
    peer = processes->OfPeer(context.peer());
  }
  std::optional<int64_t> kernel_pid;
  if (peer && peer->pid > 0) kernel_pid = peer->pid;
  return LeaseHolder{CallerOf(context, service->options().clients_by_token, kernel_pid,
                              client.process_id(), client.mount_namespace()),
                     peer ? peer->life : nullptr};
}

// The lease part of a handle reply.
void SetLease(const LeaseTable& leases, const LeaseHolder& holder, uint64_t id,
              v1::GetHeader* header) {
  header->mutable_lease()->set_id(id);
  header->mutable_lease()->set_ttl_ms(absl::ToInt64Milliseconds(leases.ttl()));
  if (holder.process) header->mutable_lease()->set_process_bound(true);
}

}  // namespace

Recipient RecipientOf(ChunkdService* service, const grpc::ServerContextBase& context,
                      const google::protobuf::RepeatedField<int>& accept,
                      const v1::ClientIdentity& client) {
  Recipient recipient;
  for (int d : accept) {
    recipient.shm |= d == v1::DELIVERY_SHM;
    recipient.cuda |= d == v1::DELIVERY_CUDA_IPC;
    recipient.other |= d != v1::DELIVERY_CUDA_IPC;
  }
  recipient.inline_ok = accept.empty() || std::find(accept.begin(), accept.end(),
                                                    v1::DELIVERY_INLINE) != accept.end();
  if (recipient.shm) recipient.client = IdentityFromProto(client);
  if (recipient.shm || recipient.cuda) recipient.holder = HolderOf(service, context, client);
  return recipient;
}

bool TakesHandles(ChunkdService* service, const Recipient& recipient) {
  const ServiceOptions& options = service->options();
  return recipient.cuda || (recipient.shm && options.leases != nullptr &&
                            buffer::CanShareMemory(options.host, recipient.client));
}

absl::StatusOr<v1::GetHeader> HeaderFor(const CachedValue& value, const std::string& key,
                                        const ByteRange& range, const Conditions& conditions,
                                        buffer::cpu::Buffer* bytes) {
  absl::StatusOr<ReadSlice> slice = SliceForRead(value, key, range, conditions, RangeRule::kClip);
  if (!slice.ok()) return slice.status();
  v1::GetHeader header;
  header.set_total_size(slice->total_size);
  header.set_generation(slice->generation);
  header.set_range_start(slice->start);
  header.set_length(slice->length);
  *bytes = std::move(slice->bytes);
  return header;
}

void GrantedLeases::Add(uint64_t id) {
  absl::MutexLock lock(&mu_);
  ids_.push_back(id);
}

void GrantedLeases::StartTtls(LeaseTable* leases) {
  std::vector<uint64_t> ids;
  {
    absl::MutexLock lock(&mu_);
    ids.swap(ids_);
  }
  if (leases != nullptr && !ids.empty()) leases->Renew(ids);
}

absl::StatusOr<bool> OfferShm(ChunkdService* service, const Recipient& recipient,
                              const buffer::cpu::Buffer& data, v1::GetHeader* header,
                              GrantedLeases* granted) {
  if (!recipient.shm) return false;
  const ServiceOptions& options = service->options();
  std::optional<buffer::ShmLocation> location = data.shm_location();
  if (options.leases == nullptr || !location || data.empty() ||
      !buffer::CanShareMemory(options.host, recipient.client)) {
    service->counters().shm_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // The lease's TTL starts when the reply is out (the call renews it then: GrantedLeases).
  absl::StatusOr<uint64_t> lease =
      options.leases->Grant(recipient.holder, data, /*until_renewed=*/true);
  if (!lease.ok()) {
    if (!recipient.inline_ok) return lease.status();
    service->counters().shm_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  header->set_delivery(v1::DELIVERY_SHM);
  v1::ShmHandle* shm = header->mutable_shm();
  shm->set_segment(location->segment);
  shm->set_segment_size(location->segment_size);
  shm->set_offset(location->offset);
  shm->set_length(data.size());
  SetLease(*options.leases, recipient.holder, *lease, header);
  if (granted != nullptr) granted->Add(*lease);
  service->counters().gets_shm.fetch_add(1, std::memory_order_relaxed);
  service->counters().bytes_served_shm.fetch_add(data.size(), std::memory_order_relaxed);
  return true;
}

CudaRequest CudaRequestOf(const Recipient& recipient, const v1::GetRequest& request) {
  CudaRequest cuda;
  cuda.wanted = recipient.cuda;
  cuda.only = recipient.cuda_only();
  cuda.gpu_uuid = request.gpu_uuid();
  cuda.client_boot_id = request.client().boot_id();
  return cuda;
}

std::string DeviceKeyOf(const std::string& key, const CachedValue& value) {
  return value.whole()
             ? key
             : absl::StrCat(key, absl::string_view("\0", 1), value.offset, "+", value.value.size());
}

absl::StatusOr<bool> OfferCuda(ChunkdService* service, const Recipient& recipient,
                               const DeviceChunk& chunk, uint64_t chunk_offset,
                               v1::GetHeader* header, GrantedLeases* granted) {
  const ServiceOptions& options = service->options();
  absl::StatusOr<uint64_t> lease = options.leases->Grant(recipient.holder, chunk.buffer.block(),
                                                         header->length(), /*until_renewed=*/true);
  if (!lease.ok()) {
    if (recipient.cuda_only()) return lease.status();
    service->counters().cuda_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  header->set_delivery(v1::DELIVERY_CUDA_IPC);
  v1::CudaIpcHandle* cuda = header->mutable_cuda();
  cuda->set_ipc_handle(buffer::gpu::IpcHandleBytes(chunk.ipc_handle));
  cuda->set_segment(chunk.segment);
  cuda->set_offset(chunk.offset + header->range_start() - chunk_offset);
  cuda->set_length(header->length());
  cuda->set_device_uuid(buffer::gpu::UuidBytes(chunk.device_uuid));
  SetLease(*options.leases, recipient.holder, *lease, header);
  granted->Add(*lease);
  service->counters().gets_cuda.fetch_add(1, std::memory_order_relaxed);
  service->counters().bytes_served_cuda.fetch_add(header->length(), std::memory_order_relaxed);
  return true;
}

absl::StatusOr<DerivedRequest> DerivedRequestOf(ChunkdService* service,
                                                const grpc::ServerContextBase& context,
                                                const Recipient& recipient,
                                                const v1::GetRequest& request,
                                                const ReadOptions& source) {
  if (service->options().derived == nullptr) {
    return absl::FailedPreconditionError(
        "this server keeps no derived entries (--derived_cache_fraction=0): read the value "
        "itself and derive it");
  }
  const v1::DerivedRead& derived = request.derived();
  if (derived.derivation().empty() || derived.derivation().size() > kMaxDerivationBytes) {
    return absl::InvalidArgumentError(absl::StrCat("key '", request.key(),
                                                   "': a derivation is 1 to ", kMaxDerivationBytes,
                                                   " bytes, not ", derived.derivation().size()));
  }
  if (recipient.cuda_only()) {
    return absl::FailedPreconditionError(
        "derived entries are host memory: accept shared memory or inline delivery");
  }
  DerivedRequest out;
  out.key = request.key();
  out.derivation = derived.derivation();
  out.produce = derived.produce();
  out.wait = absl::Milliseconds(
      static_cast<int64_t>(std::min<uint64_t>(derived.wait_ms(), uint64_t{24} * 3600 * 1000)));
  out.source = source;
  // A production handed to a UNIX-socket client follows the life of its process.
  if (const ProcessWatch* processes = service->options().processes) {
    if (std::optional<PeerProcess> peer = processes->OfPeer(context.peer())) {
      out.process = peer->life;
    }
  }
  return out;
}

absl::StatusOr<v1::GetHeader> ProductionHeaderFor(const DerivedAnswer& answer,
                                                  const std::string& key,
                                                  const Conditions& conditions) {
  buffer::cpu::Buffer none;
  absl::StatusOr<v1::GetHeader> header =
      HeaderFor(CachedValue(buffer::cpu::Buffer(), answer.generation), key, ByteRange::All(),
                conditions, &none);
  if (!header.ok()) return header.status();
  header->set_production_id(answer.production_id);
  header->set_delivery(v1::DELIVERY_INLINE);
  return header;
}

}  // namespace chunkd::server

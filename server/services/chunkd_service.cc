#include "server/services/chunkd_service.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/version.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "proto/wire/raw_message.h"
#include "server/services/list_call.h"
#include "server/services/service_core.h"
#include "server/common/byte_range.h"
#include "server/rpc/auth.h"
#include "server/rpc/grpc_status.h"
#include "server/services/requests.h"
#include "server/common/key.h"
#include "server/store/prefetch.h"

namespace chunkd::server {
namespace {


grpc::Status Error(grpc::StatusCode code, std::string message) {
  return grpc::Status(code, std::move(message));
}

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

// The header of one Get's reply to `value` (conditions checked, range resolved: SliceForRead),
// and in `bytes` the part of the value it describes: all of the header's `length`, or its first
// part when the read was capped (ReadOptions::max_extent_bytes). Delivery and handle are the
// caller's to fill.
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

// A request's max_staleness_ms as the store's read options: the copy served must have been
// validated at or after the request's arrival minus the bound.
ReadOptions ReadOptionsFor(bool has_max_staleness, uint64_t max_staleness_ms) {
  ReadOptions options;
  if (has_max_staleness) {
    // Bounds beyond ~292 years saturate: any cached copy will do.
    options.validated_since =
        max_staleness_ms > (uint64_t{1} << 62) / 1000000
            ? absl::InfinitePast()
            : absl::Now() - absl::Milliseconds(static_cast<int64_t>(max_staleness_ms));
  }
  return options;
}

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

// Whether a request's accepted deliveries include inline bytes (none listed: inline).
bool AcceptsInline(const google::protobuf::RepeatedField<int>& accept) {
  return accept.empty() ||
         std::find(accept.begin(), accept.end(), v1::DELIVERY_INLINE) != accept.end();
}

// The leases a call granted, whose TTL starts when the call is over (LeaseTable::Grant's
// until_renewed): renewed then, however the call ended. Thread-safe: GetMany grants on I/O
// threads.
class GrantedLeases {
 public:
  void Add(uint64_t id) {
    absl::MutexLock lock(&mu_);
    ids_.push_back(id);
  }
  // The call is over: the TTLs start now.
  void StartTtls(LeaseTable* leases) {
    std::vector<uint64_t> ids;
    {
      absl::MutexLock lock(&mu_);
      ids.swap(ids_);
    }
    if (leases != nullptr && !ids.empty()) leases->Renew(ids);
  }

 private:
  absl::Mutex mu_;
  std::vector<uint64_t> ids_ ABSL_GUARDED_BY(mu_);
};

// Fills in a shared-memory handle and lease when `client` can map this server's segments and
// `data` lives in one: true. False means inline delivery. An error (RESOURCE_EXHAUSTED, naming
// the cap) when a cap on pinned memory refused the lease and the client accepts no inline bytes.
absl::StatusOr<bool> OfferShm(ChunkdService* service, const buffer::HostIdentity& client,
                              const LeaseHolder& holder, bool inline_ok,
                              const buffer::cpu::Buffer& data, v1::GetHeader* header,
                              GrantedLeases* granted) {
  const ServiceOptions& options = service->options();
  std::optional<buffer::ShmLocation> location = data.shm_location();
  if (options.leases == nullptr || !location || data.empty() ||
      !buffer::CanShareMemory(options.host, client)) {
    service->counters().shm_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // The lease's TTL starts when the reply is out (the call renews it then: GrantedLeases).
  absl::StatusOr<uint64_t> lease = options.leases->Grant(holder, data, /*until_renewed=*/true);
  if (!lease.ok()) {
    if (!inline_ok) return lease.status();
    service->counters().shm_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  header->set_delivery(v1::DELIVERY_SHM);
  v1::ShmHandle* shm = header->mutable_shm();
  shm->set_segment(location->segment);
  shm->set_segment_size(location->segment_size);
  shm->set_offset(location->offset);
  shm->set_length(data.size());
  SetLease(*options.leases, holder, *lease, header);
  if (granted != nullptr) granted->Add(*lease);
  service->counters().gets_shm.fetch_add(1, std::memory_order_relaxed);
  service->counters().bytes_served_shm.fetch_add(data.size(), std::memory_order_relaxed);
  return true;
}

// Streams one value (or range of it) as GetResponse messages, or hands out a handle.
class GetCall final : public StreamedReadCall {
 public:
  GetCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : StreamedReadCall(engine, queue, "Get", SpawnerOf<GetCall>(service),
                         &service->counters().get_errors),
        service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestGet(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    service_->counters().gets.fetch_add(1, std::memory_order_relaxed);
    v1::GetRequest request;
    if (!grpc::SerializationTraits<v1::GetRequest>::Deserialize(&request_, &request).ok()) {
      FinishWith(Error(grpc::StatusCode::INVALID_ARGUMENT, "malformed GetRequest"));
      return;
    }
    if (absl::Status s = ValidateKey(request.key()); !s.ok()) {
      FinishWith(ToGrpcStatus(s));
      return;
    }
    absl::StatusOr<ByteRange> range = RangeFromProto(request);
    if (!range.ok()) {
      FinishWith(ToGrpcStatus(range.status()));
      return;
    }
    range_ = *range;
    key_ = request.key();
    conditions_ = ConditionsFromProto(request.conditions());
    wants_shm_ = std::find(request.accept().begin(), request.accept().end(),
                           v1::DELIVERY_SHM) != request.accept().end();
    if (wants_shm_) client_ = IdentityFromProto(request.client());
    for (int d : request.accept()) {
      cuda_.wanted |= d == v1::DELIVERY_CUDA_IPC;
      other_deliveries_ |= d != v1::DELIVERY_CUDA_IPC;
    }
    inline_ok_ = AcceptsInline(request.accept());
    if (wants_shm_ || cuda_.wanted) holder_ = HolderOf(service_, context_, request.client());
    cuda_.only = cuda_.wanted && !other_deliveries_;
    cuda_.gpu_uuid = request.gpu_uuid();
    cuda_.client_boot_id = request.client().boot_id();
    // A range larger than one answer of the store (a value read by the block) is streamed
    // inline, one piece after the other, each a view of cached blocks.
    read_options_ = ReadOptionsFor(request.has_max_staleness_ms(), request.max_staleness_ms());
    // A client that maps handles gets any range as one (joined from blocks under the read
    // budget). Others get a range over several blocks streamed block by block, each a view of
    // the cache: no copy, and nothing held but the block being sent, however slow the client.
    const ServiceOptions& options = service_->options();
    bool handle = cuda_.wanted || (wants_shm_ && options.leases != nullptr &&
                                   buffer::CanShareMemory(options.host, client_));
    if (!handle) read_options_.max_extent_bytes = service_->store().block_bytes();
    // The callback may run right here (a cache hit) or later on an I/O thread.
    service_->store().Read(key_, range_, read_options_, [this](absl::StatusOr<CachedValue> value) {
      OnValue(std::move(value));
    });
  }

  void OnValue(absl::StatusOr<CachedValue> value) {
    if (cancelled()) {
      FinishWith(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    if (absl::IsResourceExhausted(value.status()) && inline_ok_ &&
        read_options_.max_extent_bytes > service_->store().block_bytes()) {
      // No room in the read budget for the range in one piece: stream it inline instead.
      read_options_.max_extent_bytes = service_->store().block_bytes();
      service_->store().Read(key_, range_, read_options_,
                             [this](absl::StatusOr<CachedValue> again) {
                               OnValue(std::move(again));
                             });
      return;
    }
    if (!value.ok()) {
      FinishWith(ToGrpcStatus(value.status()));
      return;
    }
    absl::StatusOr<v1::GetHeader> header = HeaderFor(*value, key_, range_, conditions_, &data_);
    if (!header.ok()) {
      FinishWith(ToGrpcStatus(header.status()));
      return;
    }
    generation_ = value->generation;
    next_ = header->range_start() + data_.size();
    end_ = header->range_start() + header->length();
    v1::GetResponse first;
    *first.mutable_header() = *std::move(header);
    if (next_ < end_) {
      // More than one answer of the store: no single handle can describe it, so it streams
      // inline (docs/: "Ranges over many blocks").
      if (!inline_ok_) {
        FinishWith(Error(grpc::StatusCode::FAILED_PRECONDITION,
                         absl::StrCat("key '", key_, "': ", end_ - first.header().range_start(),
                                      " bytes over several blocks found no room in the read "
                                      "budget (--read_budget_bytes) for one handle; they can "
                                      "be sent inline only: accept inline delivery or read "
                                      "smaller ranges")));
        return;
      }
      first.mutable_header()->set_delivery(v1::DELIVERY_INLINE);
      prefix_ = first.SerializeAsString();
      parts_ = wire::PartSequence(std::move(data_), wire::kDataField,
                                  service_->options().part_bytes);
      WriteNext();
      return;
    }
    if (cuda_.wanted) {
      whole_ = value->value;
      // A block or range of a value read by the block is its own device entry.
      whole_offset_ = value->offset;
      device_key_ = value->whole() ? key_
                                   : absl::StrCat(key_, absl::string_view("\0", 1),
                                                  value->offset, "+", value->value.size());
    }
    if (cuda_.wanted && TryCuda(first, value->generation)) return;
    ReplyWithoutCuda(std::move(first));
  }

  // CUDA IPC: true when the reply is taken care of here (a handle now or after a promotion on
  // an I/O thread, or an error for a client that accepts nothing else); false: go on with the
  // other deliveries.
  bool TryCuda(const v1::GetResponse& first, uint64_t generation) {
    const ServiceOptions& options = service_->options();
    CudaChoice choice = ChooseCudaDelivery(options.leases ? options.device_tier : nullptr,
                                           options.host.boot_id, cuda_);
    if (choice.unknown_gpu) {
      service_->counters().cuda_unknown_gpu.fetch_add(1, std::memory_order_relaxed);
    }
    if (choice.decision == CudaChoice::kRefuse) {
      FinishWith(ToGrpcStatus(choice.why));
      return true;
    }
    if (choice.decision == CudaChoice::kFallback) {
      service_->counters().cuda_fallbacks.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    DeviceTier* tier = options.device_tier;
    if (std::optional<DeviceChunk> hit = tier->Lookup(choice.device, device_key_, generation)) {
      ReplyCuda(first, *hit);
      return true;
    }
    // A miss copies the value to the device: on an I/O thread, not on gRPC's.
    absl::Status queued = service_->store().Submit(
        [this, first, generation, device = choice.device, whole = whole_]() mutable {
          auto chunk =
              service_->options().device_tier->Promote(device, device_key_, generation, whole);
          if (chunk.ok()) {
            ReplyCuda(first, *chunk);
          } else if (cuda_.only) {
            FinishWith(ToGrpcStatus(chunk.status()));
          } else {
            service_->counters().cuda_fallbacks.fetch_add(1, std::memory_order_relaxed);
            ReplyWithoutCuda(std::move(first));
          }
        });
    if (queued.ok()) return true;
    if (cuda_.only) {
      FinishWith(ToGrpcStatus(queued));
      return true;
    }
    service_->counters().cuda_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }

  void OnDone() override { granted_.StartTtls(service_->options().leases); }

  // Replies with the chunk's CUDA IPC handle and a lease on its device block.
  void ReplyCuda(v1::GetResponse first, const DeviceChunk& chunk) {
    const ServiceOptions& options = service_->options();
    v1::GetHeader* header = first.mutable_header();
    absl::StatusOr<uint64_t> lease =
        options.leases->Grant(holder_, chunk.buffer.block(), header->length(),
                              /*until_renewed=*/true);
    if (!lease.ok()) {
      if (cuda_.only) {
        FinishWith(ToGrpcStatus(lease.status()));
        return;
      }
      service_->counters().cuda_fallbacks.fetch_add(1, std::memory_order_relaxed);
      ReplyWithoutCuda(std::move(first));
      return;
    }
    header->set_delivery(v1::DELIVERY_CUDA_IPC);
    v1::CudaIpcHandle* cuda = header->mutable_cuda();
    cuda->set_ipc_handle(buffer::gpu::IpcHandleBytes(chunk.ipc_handle));
    cuda->set_segment(chunk.segment);
    cuda->set_offset(chunk.offset + header->range_start() - whole_offset_);
    cuda->set_length(header->length());
    cuda->set_device_uuid(buffer::gpu::UuidBytes(chunk.device_uuid));
    SetLease(*options.leases, holder_, *lease, header);
    granted_.Add(*lease);
    service_->counters().gets_cuda.fetch_add(1, std::memory_order_relaxed);
    service_->counters().bytes_served_cuda.fetch_add(header->length(), std::memory_order_relaxed);
    message_ = wire::EncodeWithData(first.SerializeAsString(), buffer::cpu::Buffer());
    StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
  }

  // Shared memory when the client accepts it and can map it, else inline.
  void ReplyWithoutCuda(v1::GetResponse first) {
    v1::GetHeader* header = first.mutable_header();
    absl::StatusOr<bool> shm =
        wants_shm_ ? OfferShm(service_, client_, holder_, inline_ok_, data_, header, &granted_)
                   : false;
    if (!shm.ok()) {
      FinishWith(ToGrpcStatus(shm.status()));
      return;
    }
    if (*shm) {
      // The handle is the whole reply: no bytes cross the connection.
      message_ = wire::EncodeWithData(first.SerializeAsString(), buffer::cpu::Buffer());
      StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
      return;
    }
    header->set_delivery(v1::DELIVERY_INLINE);
    prefix_ = first.SerializeAsString();
    parts_ = wire::PartSequence(std::move(data_), wire::kDataField, service_->options().part_bytes);
    WriteNext();
  }

  // One write is in flight at a time: OnValue starts the chain, each OnWriteDone continues it,
  // so the fields below are only touched by one thread at a time.
  void WriteNext() override {
    if (parts_.done() && next_ < end_) return ReadOn();
    size_t part;
    // The header goes with the first part; later messages carry data only.
    message_ = parts_.Next(std::move(prefix_), &part);
    prefix_.clear();
    service_->counters().bytes_served_inline.fetch_add(part, std::memory_order_relaxed);
    if (parts_.done() && next_ == end_) {
      StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      StartWrite(&message_);
    }
  }

  // The next piece of a streamed range, once the client took the last one: a view of one
  // cached block (fetched ahead by the store's read-ahead), of the version the reply began
  // with. The call holds one piece at a time however slow its client.
  void ReadOn() {
    ReadOptions options = read_options_;
    options.if_generation = generation_;
    options.max_extent_bytes = service_->store().block_bytes();
    options.read_ahead_end = end_;
    service_->store().Read(
        key_, ByteRange::Bounded(next_, end_), options, [this](absl::StatusOr<CachedValue> value) {
          if (cancelled()) {
            FinishWith(Error(grpc::StatusCode::CANCELLED, "cancelled"));
            return;
          }
          if (!value.ok()) {
            FinishWith(ToGrpcStatus(value.status()));
            return;
          }
          uint64_t at = next_ - value->offset;
          if (next_ < value->offset || at >= value->value.size()) {
            FinishWith(Error(grpc::StatusCode::INTERNAL,
                             absl::StrCat("key '", key_, "': the store answered no bytes at ",
                                          next_)));
            return;
          }
          buffer::cpu::Buffer piece =
              value->value.Slice(at, std::min<uint64_t>(value->value.size() - at, end_ - next_));
          next_ += piece.size();
          parts_ = wire::PartSequence(std::move(piece), wire::kDataField,
                                      service_->options().part_bytes);
          WriteNext();
        });
  }

  ChunkdService* const service_;
  std::string key_;
  ByteRange range_;
  Conditions conditions_;
  bool wants_shm_ = false;
  bool inline_ok_ = true;
  buffer::HostIdentity client_;
  LeaseHolder holder_;  // of the leases, when a handle may be offered
  GrantedLeases granted_;
  CudaRequest cuda_;
  bool other_deliveries_ = false;
  buffer::cpu::Buffer whole_;  // what the store answered, for a promotion to the device tier
  uint64_t whole_offset_ = 0;  // where whole_ starts in the value
  std::string device_key_;     // of whole_ in the device tier
  ReadOptions read_options_;
  // A streamed range: its version, the next byte to read and the end.
  Generation generation_ = 0;
  uint64_t next_ = 0, end_ = 0;
  buffer::cpu::Buffer data_;
  wire::PartSequence parts_;
  std::string prefix_;
  grpc::ByteBuffer message_;
};

// Serves a batch of Gets. Item reads run ahead of the sending, within a window (items and
// bytes), so memory stays bounded whatever the batch size; ready items are sent in order, small
// ones packed several to a message, large ones split into parts. One write is in flight at a
// time. Everything shared between the launching thread, read callbacks (I/O threads, or inline
// on a hit) and write completions is under `mu_`; gRPC operations start after it is dropped,
// and Finish is always the last thing a thread does with the call.
class GetManyCall final : public rpc::ServerStreamCall<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  GetManyCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : ServerStreamCall(engine, queue, "GetMany", SpawnerOf<GetManyCall>(service)),
        service_(service) {}

  static constexpr int kMaxItems = 4096;
  // Reads started but not yet sent: at most this many items, and no new read while this many
  // bytes wait to be sent.
  static constexpr size_t kWindowItems = 64;
  static constexpr uint64_t kWindowBytes = 256ull << 20;

 private:
  struct Item {
    std::string key;
    ByteRange range;
    Conditions conditions;
    bool ready = false;
    // Once ready: the encoded GetHeader or ItemError (field 2 or 3 of GetManyPart), and the
    // bytes to send inline (empty for a handle or an error).
    std::string first_fields;
    buffer::cpu::Buffer data;
    bool started = false;
    size_t sent = 0;
  };
  enum class Action { kNothing, kWrite, kWriteAndFinish, kFinish };

  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestGetMany(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    v1::GetManyRequest request;
    if (!grpc::SerializationTraits<v1::GetManyRequest>::Deserialize(&request_, &request).ok()) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT, "malformed GetManyRequest"));
      return;
    }
    if (request.items_size() > kMaxItems) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("GetMany of ", request.items_size(), " items; at most ",
                                kMaxItems, " per call")));
      return;
    }
    bool other = false, cuda = false;
    for (int d : request.accept()) {
      wants_shm_ |= d == v1::DELIVERY_SHM;
      cuda |= d == v1::DELIVERY_CUDA_IPC;
      other |= d != v1::DELIVERY_CUDA_IPC;
    }
    if (cuda && !other) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   "GetMany delivers inline or through shared memory; ask for CUDA IPC with Get"));
      return;
    }
    if (wants_shm_) {
      client_ = IdentityFromProto(request.client());
      holder_ = HolderOf(service_, context_, request.client());
    }
    inline_ok_ = AcceptsInline(request.accept());
    service_->counters().get_many_calls.fetch_add(1, std::memory_order_relaxed);
    service_->counters().gets.fetch_add(request.items_size(), std::memory_order_relaxed);
    items_.resize(request.items_size());
    for (int i = 0; i < request.items_size(); ++i) {
      const v1::GetRequest& r = request.items(i);
      Item& item = items_[i];
      if (absl::Status s = ValidateKey(r.key()); !s.ok()) {
        item.first_fields = ErrorFields(ToGrpcStatus(s));
        item.ready = true;
        continue;
      }
      absl::StatusOr<ByteRange> range = RangeFromProto(r);
      if (!range.ok()) {
        item.first_fields = ErrorFields(ToGrpcStatus(range.status()));
        item.ready = true;
        continue;
      }
      item.key = r.key();
      item.range = *range;
      item.conditions = ConditionsFromProto(r.conditions());
    }
    read_options_ = ReadOptionsFor(request.has_max_staleness_ms(), request.max_staleness_ms());
    LaunchReads();
  }

  // Starts the reads the window allows, then sends what is ready. `held`: the caller counted
  // this launcher in pending_ already, in the critical section that let it run.
  void LaunchReads(bool held = false) {
    if (!held) {
      absl::MutexLock lock(&mu_);
      ++pending_;  // nothing finishes the call while this runs
    }
    for (;;) {
      size_t i;
      {
        absl::MutexLock lock(&mu_);
        while (launched_ < items_.size() && items_[launched_].ready) ++launched_;  // refused
        if (stopping() || launched_ == items_.size() || launched_ >= next_ + kWindowItems ||
            unsent_bytes_ >= kWindowBytes) {
          break;
        }
        i = launched_++;
        ++pending_;
      }
      // The callback may run right here (a hit) or later on an I/O thread.
      // Only the blocks an item's range covers are read.
      service_->store().Read(items_[i].key, items_[i].range, read_options_,
                             [this, i](absl::StatusOr<CachedValue> value) {
                               OnValue(i, std::move(value));
                             });
    }
    Action action;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      action = PumpLocked();
    }
    if (action != Action::kNothing) Act(action);
  }

  void OnValue(size_t i, absl::StatusOr<CachedValue> value) {
    Item& item = items_[i];
    std::string fields;
    buffer::cpu::Buffer data;
    buffer::cpu::Buffer bytes;
    absl::StatusOr<v1::GetHeader> header =
        value.ok() ? HeaderFor(*value, item.key, item.range, item.conditions, &bytes)
                   : absl::StatusOr<v1::GetHeader>(value.status());
    absl::StatusOr<bool> shm = false;
    if (header.ok() && wants_shm_) {
      shm = OfferShm(service_, client_, holder_, inline_ok_, bytes, &*header, &granted_);
      if (!shm.ok()) header = shm.status();
    }
    if (!header.ok()) {
      fields = ErrorFields(ToGrpcStatus(header.status()));
    } else {
      if (!*shm) {
        header->set_delivery(v1::DELIVERY_INLINE);
        data = std::move(bytes);
      }
      std::string encoded = header->SerializeAsString();
      wire::AppendLengthDelimitedHeader(&fields, kPartHeaderField, encoded.size());
      fields += encoded;
    }
    Action action;
    {
      absl::MutexLock lock(&mu_);
      item.first_fields = std::move(fields);
      unsent_bytes_ += data.size();
      item.data = std::move(data);
      item.ready = true;
      --pending_;
      action = PumpLocked();
    }
    if (action != Action::kNothing) Act(action);
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      write_failed_ |= !ok;
      // Counted before the lock goes: once writing_ is false, a read completing on another
      // thread could otherwise finish the call, and the engine delete it, before LaunchReads.
      ++pending_;
    }
    LaunchReads(/*held=*/true);  // items sent make room in the window; then the next message goes
  }

  void OnDone() override { granted_.StartTtls(service_->options().leases); }

  void OnCancel() override {
    Action action;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      action = PumpLocked();
    }
    if (action != Action::kNothing) Act(action);
  }

  bool stopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return cancelled_ || write_failed_; }

  // Decides the next step: a message of the ready parts, the end, or nothing yet.
  Action PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return Action::kNothing;
    if (stopping()) {
      // Reads still running call back into this object: it must outlive them.
      if (pending_ > 0) return Action::kNothing;
      finished_ = true;
      status_ = Error(grpc::StatusCode::CANCELLED,
                      cancelled_ ? "cancelled" : "the client stopped reading");
      return Action::kFinish;
    }
    const size_t limit = service_->options().part_bytes;
    std::string head;
    std::vector<grpc::Slice> slices;
    size_t data_bytes = 0;
    while (next_ < items_.size() && items_[next_].ready && data_bytes < limit &&
           head.size() < limit) {
      Item& item = items_[next_];
      size_t n = std::min(limit - data_bytes, item.data.size() - item.sent);
      // GetManyPart: index, the header or error (first part only), then data.
      std::string part;
      wire::AppendVarint(&part, (1 << 3) | 0);
      wire::AppendVarint(&part, next_);
      if (!item.started) part += item.first_fields;
      if (n > 0) wire::AppendLengthDelimitedHeader(&part, wire::kDataField, n);
      wire::AppendLengthDelimitedHeader(&head, kPartsField, part.size() + n);
      head += part;
      if (n > 0) {
        buffer::cpu::Buffer piece = item.data.Slice(item.sent, n);
        if (n < kCopyBelow) {
          head.append(piece.view());
        } else {
          slices.push_back(wire::OwningSlice(std::move(head)));
          head.clear();
          slices.push_back(wire::ReferenceSlice(piece));
        }
        service_->counters().bytes_served_inline.fetch_add(n, std::memory_order_relaxed);
      }
      item.started = true;
      item.sent += n;
      data_bytes += n;
      unsent_bytes_ -= n;
      if (item.sent < item.data.size()) break;  // the message is full; the rest goes next
      item.data = buffer::cpu::Buffer();
      item.first_fields.clear();
      ++next_;
    }
    if (!head.empty()) slices.push_back(wire::OwningSlice(std::move(head)));
    bool all_sent = next_ == items_.size() && pending_ == 0;
    if (slices.empty()) {
      if (!all_sent) return Action::kNothing;
      finished_ = true;
      status_ = grpc::Status::OK;
      return Action::kFinish;
    }
    message_ = grpc::ByteBuffer(slices.data(), slices.size());
    writing_ = true;
    if (all_sent) {
      finished_ = true;
      return Action::kWriteAndFinish;
    }
    return Action::kWrite;
  }

  // Runs what PumpLocked decided, without the lock; the last thing the caller does. Called only
  // with an action (not kNothing): once the lock is released after kNothing, another thread may
  // finish the call and the engine delete this object, so the caller must not touch it again.
  void Act(Action action) {
    switch (action) {
      case Action::kNothing:
        return;
      case Action::kWrite:
        StartWrite(&message_);
        return;
      case Action::kWriteAndFinish:
        StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
        return;
      case Action::kFinish:
        if (!status_.ok()) service_->counters().get_errors.fetch_add(1, std::memory_order_relaxed);
        Finish(status_);
        return;
    }
  }

  // GetManyPart.error, encoded.
  static std::string ErrorFields(const grpc::Status& status) {
    v1::ItemError error;
    error.set_code(status.error_code());
    error.set_message(status.error_message());
    std::string encoded = error.SerializeAsString(), fields;
    wire::AppendLengthDelimitedHeader(&fields, kPartErrorField, encoded.size());
    return fields + encoded;
  }

  static constexpr uint32_t kPartsField = 1;        // GetManyResponse.parts
  static constexpr uint32_t kPartHeaderField = 2;   // GetManyPart.header
  static constexpr uint32_t kPartErrorField = 3;    // GetManyPart.error
  static constexpr size_t kCopyBelow = 16 << 10;    // smaller data is copied, not referenced

  ChunkdService* const service_;
  bool wants_shm_ = false;
  bool inline_ok_ = true;
  buffer::HostIdentity client_;
  LeaseHolder holder_;
  GrantedLeases granted_;
  std::vector<Item> items_;
  ReadOptions read_options_;
  absl::Mutex mu_;
  size_t launched_ ABSL_GUARDED_BY(mu_) = 0;  // items whose read has started (or was refused)
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;      // the item being sent
  int pending_ ABSL_GUARDED_BY(mu_) = 0;      // reads in flight, plus launchers running
  uint64_t unsent_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_;
  grpc::ByteBuffer message_;
};

// Receives a value in parts into memory sized from the header, then writes it through.
class PutCall final : public rpc::ClientStreamCall<v1::PutRequest, v1::PutResponse> {
 public:
  PutCall(ChunkdService* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : ClientStreamCall(engine, queue, "Put", SpawnerOf<PutCall>(service)), service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestPut(&context_, &reader_, queue, queue, tag);
  }

  void OnStart() override {
    if (absl::Status s = service_->core().CheckWritable("writes"); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    StartRead(&request_);
  }

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

  void Commit() {
    service_->core().SubmitWrite(key_, std::move(value_).Freeze(), conditions_,
                                 &service_->counters(),
                                 [this](absl::StatusOr<ValueInfo> info) {
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
        +[](PrefetchCall* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) {
          return !r->writing_ || r->cancelled_;
        },
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
  engine->AddMethod(SpawnerOf<GetCall>(this), 16);
  engine->AddMethod(SpawnerOf<GetManyCall>(this), 8);
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
  if (request.invalidate()) {
    store().Invalidate(request.key());
    counters_.invalidations.fetch_add(1, std::memory_order_relaxed);
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
    v1::ClientIdentity* host = response->mutable_host();
    host->set_boot_id(options().host.boot_id);
    host->set_ipc_namespace(options().host.ipc_namespace);
    host->set_mount_namespace(options().host.mount_namespace);
    host->set_shm_dir(options().host.shm_dir);
    host->set_shm_dir_dev(options().host.shm_dir_dev);
    host->set_shm_dir_ino(options().host.shm_dir_ino);
    (*response->mutable_counters())["leases_granted"] = leases.granted;
    (*response->mutable_counters())["leases_released"] = leases.released;
    (*response->mutable_counters())["leases_expired"] = leases.expired;
    (*response->mutable_counters())["leases_unknown"] = leases.unknown;
    // Live leases that follow a watched client process (UNIX socket), and grants refused at
    // the count caps (--max_client_leases and the table's total).
    (*response->mutable_counters())["leases_process_bound"] = leases.process_bound;
    (*response->mutable_counters())["lease_count_refusals"] = leases.refused_count;
  }
  response->add_features("conditional-writes");
  response->add_features("byte-ranges");
  response->add_features("blocks");
  response->add_features("single-flight");
  response->add_features("prefetch");
  response->add_features("get-many");
  auto& counters = *response->mutable_counters();
  v1::CacheTierInfo* tier = response->add_tiers();
  tier->set_tier("host");
  SetPinned(leases.host, tier);
  if (HostCache* cache = store().cache()) {
    HostCacheStats s = cache->stats();
    tier->set_capacity_bytes(s.capacity_bytes);
    tier->set_used_bytes(s.used_bytes);
    tier->set_entries(s.entries);
    counters["hits"] = s.hits;
    counters["misses"] = s.misses;
    counters["evictions"] = s.evictions;
    counters["evicted_bytes"] = s.evicted_bytes;
    counters["not_admitted"] = s.not_admitted;
    counters["detached_pinned_bytes"] = s.detached_pinned_bytes;
    response->add_features(absl::StrCat("eviction-", EvictionPolicyName(cache->policy())));
  } else {
    tier->set_capacity_bytes(backend.memory_capacity_bytes());
    tier->set_used_bytes(backend.memory_used_bytes());
    tier->set_entries(backend.entry_count());
  }
  ChunkStoreCounters c = store().counters();
  counters["backend_reads"] = c.backend_reads;
  counters["backend_read_errors"] = c.backend_read_errors;
  counters["backend_not_found"] = c.backend_not_found;
  counters["backend_read_bytes"] = c.backend_read_bytes;
  counters["backend_read_micros"] = c.backend_read_micros;
  counters["single_flight_joins"] = c.single_flight_joins;
  counters["overloaded"] = c.overloaded;
  counters["revalidations"] = c.revalidations;
  counters["revalidations_not_modified"] = c.revalidations_not_modified;
  counters["stale_invalidations"] = c.stale_invalidations;
  counters["revalidation_errors"] = c.revalidation_errors;
  counters["failed_write_invalidations"] = c.failed_write_invalidations;
  counters["block_reads"] = c.block_reads;
  counters["blocks_read"] = c.blocks_read;
  counters["read_ahead_blocks"] = c.read_ahead_blocks;
  counters["changed_during_read"] = c.changed_during_read;
  ReadBudgetStats budget = core_->store().read_budget();
  counters["read_budget_bytes"] = budget.capacity_bytes;
  counters["read_held_bytes"] = budget.held_bytes;
  counters["read_held_peak_bytes"] = budget.peak_held_bytes;
  counters["read_budget_refusals"] = budget.refusals;
  counters["block_bytes"] = core_->store().block_bytes();
  // Calls of every service (chunkd.v1's unprefixed), then chunkd.v1's own.
  core_->ExportCounters([&counters](const std::string& name, uint64_t value) {
    counters[name] = value;
  });
  counters["get_many_calls"] = counters_.get_many_calls.load();
  counters["bytes_served_shm"] = counters_.bytes_served_shm.load();
  counters["gets_shm"] = counters_.gets_shm.load();
  counters["shm_fallbacks"] = counters_.shm_fallbacks.load();
  counters["stats"] = counters_.stats.load();
  counters["invalidations"] = counters_.invalidations.load();
  counters["gets_cuda"] = counters_.gets_cuda.load();
  counters["bytes_served_cuda"] = counters_.bytes_served_cuda.load();
  counters["cuda_fallbacks"] = counters_.cuda_fallbacks.load();
  counters["cuda_unknown_gpu"] = counters_.cuda_unknown_gpu.load();
  if (options().device_tier) {
    DeviceTierStats d = options().device_tier->stats();
    v1::CacheTierInfo* device = response->add_tiers();
    device->set_tier("device");
    SetPinned(leases.device, device);
    device->set_capacity_bytes(d.capacity_bytes);
    device->set_used_bytes(d.used_bytes);
    device->set_entries(d.entries);
    counters["device_hits"] = d.hits;
    counters["device_promotions"] = d.promotions;
    counters["device_promoted_bytes"] = d.promoted_bytes;
    counters["device_promotion_failures"] = d.promotion_failures;
    counters["device_evictions"] = d.evictions;
    counters["device_evicted_bytes"] = d.evicted_bytes;
    counters["device_not_admitted"] = d.not_admitted;
    counters["device_segments"] = d.segments;
    counters["device_segment_bytes"] = d.segment_bytes;
    counters["device_ipc_exports"] = d.ipc_exports;
  }
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

// Get: one value, or a range of it, for one client. The path, top to bottom: OnStart parses the
// request once (key, range, conditions, accepted deliveries) and asks the store; OnValue checks
// the answer and picks the reply: a range longer than one answer of the store streams inline
// block by block (WriteNext, ReadOn); otherwise CUDA IPC is tried first (TryCuda, ReplyCuda),
// then shared memory or inline (ReplyWithoutCuda). Delivery rules: delivery.h.
#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/wire/raw_message.h"
#include "server/common/key.h"
#include "server/rpc/grpc_status.h"
#include "server/services/delivery.h"
#include "server/services/get_calls.h"
#include "server/services/method_calls.h"
#include "server/services/requests.h"

namespace chunkd::server {
namespace {

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

  // However the call ended, the TTLs of the leases it granted start now.
  void OnDone() override {
    granted_.StartTtls(service_->options().leases);
    // Told to produce, but the call ended cancelled (its deadline passed while the reply was on
    // its way, before the server saw the cancellation): the client got an error, not the
    // production, so the next waiter takes it now, not after --derived_produce_timeout.
    if (production_id_ != 0 && cancelled()) {
      (void)service_->options().derived->Abandon(key_, derivation_, production_id_);
    }
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
    recipient_ = RecipientOf(service_, context_, request.accept(), request.client());
    cuda_ = CudaRequestOf(recipient_, request);
    read_options_ = ReadOptionsFor(request.has_max_staleness_ms(), request.max_staleness_ms());
    // A client that maps handles gets any range as one (joined from blocks under the read
    // budget). Others get a range over several blocks streamed block by block, each a view of
    // the cache: no copy, and nothing held but the block being sent, however slow the client.
    if (!TakesHandles(service_, recipient_)) {
      read_options_.max_extent_bytes = service_->store().block_bytes();
    }
    if (request.has_derived()) {
      // A derived entry (server/store/derived_cache.h): host memory, delivered by shared memory
      // or inline like any value, never by CUDA IPC.
      absl::StatusOr<DerivedRequest> derived =
          DerivedRequestOf(service_, context_, recipient_, request, read_options_);
      if (!derived.ok()) {
        FinishWith(ToGrpcStatus(derived.status()));
        return;
      }
      cuda_ = CudaRequest();
      derivation_ = derived->derivation;
      // Answered here (a hit), on an I/O thread, or when another reader publishes it.
      service_->options().derived->Read(
          *std::move(derived),
          [this](absl::StatusOr<DerivedAnswer> answer) { OnDerived(std::move(answer)); });
      return;
    }
    // The callback may run right here (a cache hit) or later on an I/O thread.
    service_->store().Read(key_, range_, read_options_, [this](absl::StatusOr<CachedValue> value) {
      OnValue(std::move(value));
    });
  }

  // A derived read's answer: the entry (replied as any value), or the production this reader
  // is to run (a header without bytes).
  void OnDerived(absl::StatusOr<DerivedAnswer> answer) {
    if (cancelled()) {
      // A production nobody will hear of: the next waiter takes it now, not after
      // --derived_produce_timeout.
      if (answer.ok() && answer->production_id != 0) {
        (void)service_->options().derived->Abandon(key_, derivation_, answer->production_id);
      }
      FinishWith(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    if (!answer.ok()) {
      FinishWith(ToGrpcStatus(answer.status()));
      return;
    }
    if (answer->value) {
      OnValue(*std::move(answer->value));
      return;
    }
    absl::StatusOr<v1::GetHeader> header = ProductionHeaderFor(*answer, key_, conditions_);
    if (!header.ok()) {
      FinishWith(ToGrpcStatus(header.status()));
      return;
    }
    production_id_ = answer->production_id;
    v1::GetResponse first;
    *first.mutable_header() = *std::move(header);
    data_ = buffer::cpu::Buffer();
    next_ = end_ = 0;
    ReplyInline(std::move(first));
  }

  void OnValue(absl::StatusOr<CachedValue> value) {
    if (cancelled()) {
      FinishWith(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    if (absl::IsResourceExhausted(value.status()) && recipient_.inline_ok &&
        read_options_.max_extent_bytes > service_->store().block_bytes()) {
      // No room in the read budget for the range in one piece: stream it inline instead.
      read_options_.max_extent_bytes = service_->store().block_bytes();
      service_->store().Read(
          key_, range_, read_options_,
          [this](absl::StatusOr<CachedValue> again) { OnValue(std::move(again)); });
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
      if (!recipient_.inline_ok) {
        FinishWith(Error(grpc::StatusCode::FAILED_PRECONDITION,
                         absl::StrCat("key '", key_, "': ", end_ - first.header().range_start(),
                                      " bytes over several blocks found no room in the read "
                                      "budget (--read_budget_bytes) for one handle; they can "
                                      "be sent inline only: accept inline delivery or read "
                                      "smaller ranges")));
        return;
      }
      ReplyInline(std::move(first));
      return;
    }
    if (cuda_.wanted) {
      whole_ = value->value;
      // A block or range of a value read by the block is its own device entry.
      whole_offset_ = value->offset;
      device_key_ = DeviceKeyOf(key_, *value);
      if (TryCuda(first, value->generation)) return;
    }
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
    absl::Status queued = service_->store().Submit([this, first, generation, device = choice.device,
                                                    whole = whole_]() mutable {
      auto chunk = service_->options().device_tier->Promote(device, device_key_, generation, whole);
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

  // Replies with the chunk's CUDA IPC handle and a lease on its device block.
  void ReplyCuda(v1::GetResponse first, const DeviceChunk& chunk) {
    absl::StatusOr<bool> cuda =
        OfferCuda(service_, recipient_, chunk, whole_offset_, first.mutable_header(), &granted_);
    if (!cuda.ok()) {
      FinishWith(ToGrpcStatus(cuda.status()));
      return;
    }
    if (!*cuda) {
      ReplyWithoutCuda(std::move(first));
      return;
    }
    ReplyWithHandle(first);
  }

  // Shared memory when the client accepts it and can map it, else inline.
  void ReplyWithoutCuda(v1::GetResponse first) {
    v1::GetHeader* header = first.mutable_header();
    absl::StatusOr<bool> shm = OfferShm(service_, recipient_, data_, header, &granted_);
    if (!shm.ok()) {
      FinishWith(ToGrpcStatus(shm.status()));
      return;
    }
    if (*shm) {
      ReplyWithHandle(first);
      return;
    }
    ReplyInline(std::move(first));
  }

  // The bytes inline: the header goes with the first part of data_; a range longer than data_
  // (over several blocks) goes on block by block (WriteNext, ReadOn).
  void ReplyInline(v1::GetResponse first) {
    first.mutable_header()->set_delivery(v1::DELIVERY_INLINE);
    prefix_ = first.SerializeAsString();
    parts_ = wire::PartSequence(std::move(data_), wire::kDataField, service_->options().part_bytes);
    WriteNext();
  }

  // The handle is the whole reply: no bytes cross the connection.
  void ReplyWithHandle(const v1::GetResponse& first) {
    message_ = wire::EncodeWithData(first.SerializeAsString(), buffer::cpu::Buffer());
    StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
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
            FinishWith(
                Error(grpc::StatusCode::INTERNAL,
                      absl::StrCat("key '", key_, "': the store answered no bytes at ", next_)));
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
  std::string derivation_;      // of a derived read
  uint64_t production_id_ = 0;  // the production this call's reply hands its client
  ByteRange range_;
  Conditions conditions_;
  Recipient recipient_;  // the deliveries it accepts, and who asks
  GrantedLeases granted_;
  CudaRequest cuda_;
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

}  // namespace

rpc::Engine::Spawner GetCallSpawner(ChunkdService* service) { return SpawnerOf<GetCall>(service); }

}  // namespace chunkd::server

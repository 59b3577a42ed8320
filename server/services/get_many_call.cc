// GetMany: a batch of Gets in one call, each item delivered inline or through shared memory
// (delivery.h), its reply packed into GetManyResponse messages by hand.
#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
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
  // The fields of the reply, written by hand (proto/chunkd/v1/chunkd.proto).
  static constexpr uint32_t kPartsField = 1;       // GetManyResponse.parts
  static constexpr uint32_t kPartIndexField = 1;   // GetManyPart.index (a varint)
  static constexpr uint32_t kPartHeaderField = 2;  // GetManyPart.header
  static constexpr uint32_t kPartErrorField = 3;   // GetManyPart.error
  // GetManyPart.index's tag: its field number and the varint wire type (0).
  static constexpr uint32_t kPartIndexTag = (kPartIndexField << 3) | 0;
  static constexpr size_t kCopyBelow = 16 << 10;  // smaller data is copied, not referenced

  struct Item {
    std::string key;
    ByteRange range;
    Conditions conditions;
    // A derived read (GetRequest.derived), until it is launched.
    std::optional<DerivedRequest> derived;
    std::string derivation;  // of a derived read
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
                   absl::StrCat("GetMany of ", request.items_size(), " items; at most ", kMaxItems,
                                " per call")));
      return;
    }
    recipient_ = RecipientOf(service_, context_, request.accept(), request.client());
    if (recipient_.cuda_only()) {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   "GetMany delivers inline or through shared memory; ask for CUDA IPC with Get"));
      return;
    }
    service_->counters().get_many_calls.fetch_add(1, std::memory_order_relaxed);
    service_->counters().gets.fetch_add(request.items_size(), std::memory_order_relaxed);
    items_.resize(request.items_size());
    read_options_ = ReadOptionsFor(request.has_max_staleness_ms(), request.max_staleness_ms());
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
      if (r.has_derived()) {
        absl::StatusOr<DerivedRequest> derived =
            DerivedRequestOf(service_, context_, recipient_, r, read_options_);
        if (!derived.ok()) {
          item.first_fields = ErrorFields(ToGrpcStatus(derived.status()));
          item.ready = true;
          continue;
        }
        item.derivation = derived->derivation;
        item.derived = *std::move(derived);
      }
    }
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
      if (items_[i].derived) {
        // Answered here, on an I/O thread, or when another reader publishes the entry: items
        // are sent in order, so a wait for a production holds the items after it meanwhile.
        DerivedRequest derived = *std::move(items_[i].derived);
        items_[i].derived.reset();
        service_->options().derived->Read(
            std::move(derived),
            [this, i](absl::StatusOr<DerivedAnswer> answer) { OnDerived(i, std::move(answer)); });
        continue;
      }
      // The callback may run right here (a hit) or later on an I/O thread.
      // Only the blocks an item's range covers are read.
      service_->store().Read(
          items_[i].key, items_[i].range, read_options_,
          [this, i](absl::StatusOr<CachedValue> value) { OnValue(i, std::move(value)); });
    }
    Action action;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      action = PumpLocked();
    }
    if (action != Action::kNothing) Act(action);
  }

  // A derived item's answer: the entry (sent as any value), the production it is to run, or
  // an error.
  void OnDerived(size_t i, absl::StatusOr<DerivedAnswer> answer) {
    if (!answer.ok()) return OnValue(i, answer.status());
    if (answer->value) return OnValue(i, *std::move(answer->value));
    if (Stopped()) {
      // A production nobody will hear of: the next waiter takes it now, not after
      // --derived_produce_timeout.
      (void)service_->options().derived->Abandon(items_[i].key, items_[i].derivation,
                                                 answer->production_id);
      return OnValue(i, absl::CancelledError("cancelled"));
    }
    OnValue(i, CachedValue(), &*answer);
  }

  // `production`: a derived read told to produce the entry (then `value` is unused): a header
  // without bytes.
  void OnValue(size_t i, absl::StatusOr<CachedValue> value,
               const DerivedAnswer* production = nullptr) {
    Item& item = items_[i];
    std::string fields;
    buffer::cpu::Buffer data;
    buffer::cpu::Buffer bytes;
    absl::StatusOr<v1::GetHeader> header =
        production   ? ProductionHeaderFor(*production, item.key, item.conditions)
        : value.ok() ? HeaderFor(*value, item.key, item.range, item.conditions, &bytes)
                     : absl::StatusOr<v1::GetHeader>(value.status());
    absl::StatusOr<bool> shm = false;
    if (header.ok() && !production) {
      shm = OfferShm(service_, recipient_, bytes, &*header, &granted_);
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
  bool Stopped() {
    absl::MutexLock lock(&mu_);
    return stopping();
  }

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
      wire::AppendVarint(&part, kPartIndexTag);
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

  ChunkdService* const service_;
  Recipient recipient_;  // the deliveries it accepts, and who asks
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

}  // namespace

rpc::Engine::Spawner GetManyCallSpawner(ChunkdService* service) {
  return SpawnerOf<GetManyCall>(service);
}

}  // namespace chunkd::server

#include "server/services/tensorstore_kvstore_service.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/timestamp.pb.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/wire/raw_message.h"
#include "server/common/byte_range.h"
#include "server/common/key.h"
#include "server/rpc/grpc_status.h"
#include "server/services/list_call.h"

namespace chunkd::server {

namespace tsgrpc {

std::string EncodeGeneration(Generation g) {
  std::string bytes(9, '\0');
  for (int i = 0; i < 8; ++i) bytes[1 + i] = static_cast<char>((g >> (8 * i)) & 0xFF);
  return bytes;
}

std::optional<Generation> DecodeGeneration(absl::string_view bytes) {
  if (bytes.size() != 9 || bytes[0] != '\0') return std::nullopt;
  Generation g = 0;
  for (int i = 0; i < 8; ++i) g |= Generation{static_cast<unsigned char>(bytes[1 + i])} << (8 * i);
  // 0 is "no value" inside chunkd, never a stored value's generation.
  if (g == 0) return std::nullopt;
  return g;
}

TsConditions ConditionsFrom(absl::string_view if_equal, absl::string_view if_not_equal) {
  TsConditions out;
  if (if_equal == kNoValue) {
    out.conditions.if_generation_match = 0;
  } else if (!if_equal.empty()) {
    if (std::optional<Generation> g = DecodeGeneration(if_equal)) {
      out.conditions.if_generation_match = *g;
    } else {
      out.never = true;
    }
  }
  // A generation chunkd never hands out differs from every stored one: no condition.
  if (if_not_equal == kNoValue) {
    out.conditions.if_generation_not_match = 0;
  } else if (std::optional<Generation> g = DecodeGeneration(if_not_equal)) {
    out.conditions.if_generation_not_match = *g;
  }
  return out;
}

}  // namespace tsgrpc

namespace {

namespace ts = ::tensorstore_grpc;
namespace tskv = ::tensorstore_grpc::kvstore;
using tsgrpc::EncodeGeneration;
using tsgrpc::kNoValue;

constexpr uint32_t kValuePartField = 4;  // ReadResponse.value_part

void SetStamp(absl::string_view generation, absl::Time time, ts::GenerationAndTimestamp* out) {
  out->set_generation(std::string(generation));
  google::protobuf::Timestamp* t = out->mutable_timestamp();
  int64_t nanos = absl::ToUnixNanos(time);
  int64_t seconds = nanos / 1000000000;
  int32_t rest = static_cast<int32_t>(nanos % 1000000000);
  if (rest < 0) rest += 1000000000, --seconds;
  t->set_seconds(seconds);
  t->set_nanos(rest);
}

// A checked Timestamp (CheckTimestamp) as a time; the infinities as absl's.
absl::Time TimeOf(const google::protobuf::Timestamp& t) {
  if (t.seconds() == std::numeric_limits<int64_t>::max()) return absl::InfiniteFuture();
  if (t.seconds() == std::numeric_limits<int64_t>::min()) return absl::InfinitePast();
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

// INVALID_ARGUMENT for a Timestamp that is no time: outside google.protobuf.Timestamp's range
// and not one of the infinities TensorStore sends (seconds INT64_MAX or INT64_MIN, as its
// tensorstore/proto/encode_time.cc encodes absl::InfiniteFuture and InfinitePast).
absl::Status CheckTimestamp(const google::protobuf::Timestamp& t, absl::string_view what) {
  if (t.seconds() == std::numeric_limits<int64_t>::max() ||
      t.seconds() == std::numeric_limits<int64_t>::min()) {
    return absl::OkStatus();
  }
  constexpr int64_t kMinSeconds = -62135596800;  // 0001-01-01T00:00:00Z
  constexpr int64_t kMaxSeconds = 253402300799;  // 9999-12-31T23:59:59Z
  if (t.seconds() < kMinSeconds || t.seconds() > kMaxSeconds || t.nanos() < 0 ||
      t.nanos() > 999999999) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not a valid time (seconds ",
                                                   t.seconds(), ", nanos ", t.nanos(), ")"));
  }
  return absl::OkStatus();
}

// TensorStore's byte range (negative inclusive_min: a suffix; exclusive_max absent or -1: to
// the end) as chunkd's; INVALID_ARGUMENT for one TensorStore itself refuses.
absl::StatusOr<ByteRange> RangeFrom(const tskv::ReadRequest& request) {
  if (!request.has_byte_range()) return ByteRange::All();
  const ts::ByteRange& r = request.byte_range();
  int64_t min = r.inclusive_min();
  int64_t max = r.has_exclusive_max() ? r.exclusive_max() : -1;
  ByteRange range;
  if (max == -1) {
    if (min >= 0) {
      range = min == 0 ? ByteRange::All() : ByteRange::FromOffset(min);
    } else {
      // Longer than any value either way: OUT_OF_RANGE once the size is known.
      range = ByteRange::Suffix(
          min == std::numeric_limits<int64_t>::min() ? std::numeric_limits<int64_t>::max() : -min);
    }
  } else if (min < 0 || max < min) {
    return absl::InvalidArgumentError(
        absl::StrCat("byte range [", min, ", ", max, ") is not a valid TensorStore byte range"));
  } else {
    range = ByteRange::Bounded(min, max);
  }
  if (absl::Status s = range.Validate(); !s.ok()) return s;
  return range;
}

// Reads a value or a range of it. The first reply carries state, generation and time; the
// value follows in parts that refer to the cached buffer.
class ReadCall final : public StreamedReadCall {
 public:
  ReadCall(TensorStoreKvStoreService* service, rpc::Engine* engine,
           grpc::ServerCompletionQueue* queue)
      : StreamedReadCall(engine, queue, TensorStoreKvStoreService::kRead,
                         SpawnerOf<ReadCall>(service), &service->counters().get_errors),
        service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestRead(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    // What the reply is current as of (see the header): taken before the cache is consulted.
    arrived_ = absl::Now();
    service_->counters().gets.fetch_add(1, std::memory_order_relaxed);
    tskv::ReadRequest request;
    if (!grpc::SerializationTraits<tskv::ReadRequest>::Deserialize(&request_, &request).ok()) {
      FinishWith(Error(grpc::StatusCode::INVALID_ARGUMENT, "malformed ReadRequest"));
      return;
    }
    if (absl::Status s = ValidateKey(request.key()); !s.ok()) {
      FinishWith(ToGrpcStatus(s));
      return;
    }
    absl::StatusOr<ByteRange> range = RangeFrom(request);
    if (!range.ok()) {
      FinishWith(ToGrpcStatus(range.status()));
      return;
    }
    if (request.has_staleness_bound()) {
      if (absl::Status s = CheckTimestamp(request.staleness_bound(), "staleness_bound"); !s.ok()) {
        FinishWith(ToGrpcStatus(s));
        return;
      }
    }
    key_ = request.key();
    range_ = *range;
    conditions_ =
        tsgrpc::ConditionsFrom(request.generation_if_equal(), request.generation_if_not_equal());
    // staleness_bound: a cached copy serves only if the store confirmed it at or after the
    // bound (InfiniteFuture, "the latest": validated now); absent: the server's policy.
    ReadOptions options;
    if (request.has_staleness_bound()) {
      options.validated_since = TimeOf(request.staleness_bound());
    }
    // The callback may run right here (a cache hit) or later on an I/O thread.
    // Only the blocks the byte range covers are read (server/store/chunk_store.h).
    service_->core().store().Read(key_, range_, options, [this](absl::StatusOr<CachedValue> value) {
      OnValue(std::move(value));
    });
  }

  void OnValue(absl::StatusOr<CachedValue> value) {
    if (cancelled()) {
      FinishWith(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    tskv::ReadResponse first;
    if (absl::IsNotFound(value.status())) {
      // Not an error for TensorStore, whatever the conditions.
      first.set_state(tskv::ReadResponse::MISSING);
      SetStamp(kNoValue, arrived_, first.mutable_generation_and_timestamp());
      ReplyWhole(first);
      return;
    }
    if (!value.ok()) {
      FinishWith(ToGrpcStatus(value.status()));
      return;
    }
    absl::StatusOr<ReadSlice> slice =
        conditions_.never
            ? absl::FailedPreconditionError("never")
            : SliceForRead(*value, key_, range_, conditions_.conditions, RangeRule::kWithin);
    if (absl::IsFailedPrecondition(slice.status())) {
      // A condition did not hold: "aborted", with the generation that is stored.
      first.set_state(tskv::ReadResponse::UNSPECIFIED);
      SetStamp(EncodeGeneration(value->generation), StampOf(*value),
               first.mutable_generation_and_timestamp());
      ReplyWhole(first);
      return;
    }
    if (!slice.ok()) {
      FinishWith(ToGrpcStatus(slice.status()));
      return;
    }
    first.set_state(tskv::ReadResponse::VALUE);
    SetStamp(EncodeGeneration(slice->generation), StampOf(*value),
             first.mutable_generation_and_timestamp());
    head_ = first.SerializeAsString();
    parts_ = wire::PartSequence(std::move(slice->bytes), kValuePartField,
                                service_->core().options().part_bytes);
    WriteNext();
  }

  // What a value is current as of: when the store last confirmed it, not the call's arrival
  // (a cached copy may be older, a validation for this call later).
  absl::Time StampOf(const CachedValue& value) const {
    return value.validated == absl::InfinitePast() ? arrived_ : value.validated;
  }

  // A reply of one message without value bytes.
  void ReplyWhole(const tskv::ReadResponse& response) {
    message_ =
        wire::EncodeWithField(response.SerializeAsString(), kValuePartField, buffer::cpu::Buffer());
    StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
  }

  // One write in flight at a time: OnValue starts the chain, each OnWriteDone continues it.
  void WriteNext() override {
    size_t part;
    message_ = parts_.Next(std::move(head_), &part);
    head_.clear();
    service_->counters().bytes_served_inline.fetch_add(part, std::memory_order_relaxed);
    if (parts_.done()) {
      StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      StartWrite(&message_);
    }
  }

  TensorStoreKvStoreService* const service_;
  absl::Time arrived_;
  std::string key_;
  ByteRange range_;
  tsgrpc::TsConditions conditions_;
  std::string head_;
  wire::PartSequence parts_;
  grpc::ByteBuffer message_;
};

// Receives a value in parts (their total is not announced: each part is checked against the
// size limit and reserved from the write budget as it arrives), then writes it through.
class WriteCall final : public rpc::ClientStreamCall<tskv::WriteRequest, tskv::WriteResponse> {
 public:
  WriteCall(TensorStoreKvStoreService* service, rpc::Engine* engine,
            grpc::ServerCompletionQueue* queue)
      : ClientStreamCall(engine, queue, TensorStoreKvStoreService::kWrite,
                         SpawnerOf<WriteCall>(service)),
        service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestWrite(&context_, &reader_, queue, queue, tag);
  }

  void OnStart() override {
    arrived_ = absl::Now();
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
      } else if (!started_) {
        Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                     "Write ended before its first message (the key)"));
      } else {
        Commit();
      }
      return;
    }
    if (!started_) {
      // The key and the condition come with the first message only.
      if (absl::Status s = ValidateKey(request_.key()); !s.ok()) {
        Finish(ToGrpcStatus(s));
        return;
      }
      key_ = request_.key();
      conditions_ = tsgrpc::ConditionsFrom(request_.generation_if_equal());
      started_ = true;
    }
    std::string* part = request_.mutable_value_part();
    if (!part->empty()) {
      if (absl::Status s = service_->core().CheckValueSize(key_, received_ + part->size());
          !s.ok()) {
        // chunkd.v1 says RESOURCE_EXHAUSTED, but TensorStore's driver retries that code (up to
        // 32 times, with backoff to 32 s) and this write can never succeed: INVALID_ARGUMENT,
        // with the same message, ends it at once.
        Finish(Error(grpc::StatusCode::INVALID_ARGUMENT, std::string(s.message())));
        return;
      }
      if (!service_->core().ReservePutBytes(part->size(), received_)) {
        Finish(ToGrpcStatus(ServiceCore::PutBudgetExhausted()));
        return;
      }
      received_ += part->size();
      parts_.push_back(std::move(*part));
    }
    request_.Clear();
    StartRead(&request_);
  }

  void OnDone() override {
    if (received_ > 0) service_->core().ReleasePutBytes(received_);
  }

  void Commit() {
    if (conditions_.never) {
      Aborted();
      return;
    }
    auto value =
        buffer::cpu::MutableBuffer::Allocate(received_, *service_->core().options().allocator);
    if (!value.ok()) {
      Finish(ToGrpcStatus(value.status()));
      return;
    }
    size_t offset = 0;
    for (std::string& part : parts_) {
      std::memcpy(value->data() + offset, part.data(), part.size());
      offset += part.size();
      std::string().swap(part);  // give each part back as soon as it is copied
    }
    parts_.clear();
    service_->core().SubmitWrite(key_, std::move(*value).Freeze(), conditions_.conditions,
                                 &service_->counters(), [this](absl::StatusOr<ValueInfo> info) {
                                   if (absl::IsFailedPrecondition(info.status())) {
                                     Aborted();
                                     return;
                                   }
                                   if (info.ok()) {
                                     SetStamp(EncodeGeneration(info->generation), absl::Now(),
                                              response_.mutable_generation_and_timestamp());
                                   }
                                   Finish(ToGrpcStatus(info.status()));
                                 });
  }

  // The condition did not hold: an OK reply with the "unknown" generation.
  void Aborted() {
    SetStamp("", arrived_, response_.mutable_generation_and_timestamp());
    Finish(grpc::Status::OK);
  }

  TensorStoreKvStoreService* const service_;
  absl::Time arrived_;
  tskv::WriteRequest request_;
  bool started_ = false;
  std::string key_;
  tsgrpc::TsConditions conditions_;
  std::vector<std::string> parts_;
  uint64_t received_ = 0;
};

// Deletes one key, or every key of a range: the range is listed page by page and its keys
// deleted on an I/O thread, one page per task, until the range is done or the call is
// cancelled.
class DeleteCall final : public rpc::UnaryCall<tskv::DeleteRequest, tskv::DeleteResponse> {
 public:
  DeleteCall(TensorStoreKvStoreService* service, rpc::Engine* engine,
             grpc::ServerCompletionQueue* queue)
      : UnaryCall(engine, queue, TensorStoreKvStoreService::kDelete,
                  SpawnerOf<DeleteCall>(service)),
        service_(service) {}

 private:
  static constexpr size_t kPageItems = 1000;

  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestDelete(&context_, &request_, &responder_, queue, queue, tag);
  }

  void OnCancel() override { cancelled_.store(true); }

  void OnStart() override {
    arrived_ = absl::Now();
    if (absl::Status s = service_->core().CheckWritable("deletes"); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    if (request_.has_key()) {
      DeleteKey();
    } else if (request_.has_range()) {
      DeleteRange();
    } else {
      Finish(Error(grpc::StatusCode::INVALID_ARGUMENT,
                   "DeleteRequest names neither a key nor a range"));
    }
  }

  void DeleteKey() {
    if (absl::Status s = ValidateKey(request_.key()); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    tsgrpc::TsConditions cond = tsgrpc::ConditionsFrom(request_.generation_if_equal());
    if (cond.never) {
      Reply("");
      return;
    }
    service_->core().SubmitDelete(request_.key(), cond.conditions, &service_->counters(),
                                  [this, cond](absl::Status s) {
                                    if (absl::IsNotFound(s)) {
                                      // Nothing to delete: done when "no value" was what the
                                      // condition wanted (or there was none), aborted when it
                                      // wanted a value.
                                      s = cond.conditions.Check(request_.key(), std::nullopt);
                                    }
                                    if (absl::IsFailedPrecondition(s)) {
                                      Reply("");
                                    } else if (s.ok()) {
                                      Reply(kNoValue);
                                    } else {
                                      Finish(ToGrpcStatus(s));
                                    }
                                  });
  }

  // An OK reply: `generation` is "no value" when the key is gone, "" when a condition did not
  // hold.
  void Reply(absl::string_view generation) {
    SetStamp(generation, generation.empty() ? arrived_ : absl::Now(),
             response_.mutable_generation_and_timestamp());
    Finish(grpc::Status::OK);
  }

  void DeleteRange() {
    min_ = request_.range().inclusive_min();
    max_ = request_.range().exclusive_max();
    if (!max_.empty() && min_ >= max_) {
      Finish(grpc::Status::OK);  // an empty range
      return;
    }
    absl::StatusOr<std::string> prefix = PrefixOfKeyRange(min_, max_);
    if (!prefix.ok()) {
      Finish(ToGrpcStatus(prefix.status()));
      return;
    }
    prefix_ = *std::move(prefix);
    ScheduleNextPage();
  }

  void ScheduleNextPage() {
    absl::Status queued = service_->core().store().Submit([this] { NextPage(); });
    if (!queued.ok()) Finish(ToGrpcStatus(queued));
  }

  void NextPage() {
    ChunkStore& store = service_->core().store();
    if (cancelled_.load()) {
      Finish(Error(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    if (!cursor_) {
      auto cursor = store.List(prefix_, /*directory=*/false);
      if (!cursor.ok()) {
        Finish(ToGrpcStatus(cursor.status()));
        return;
      }
      cursor_ = *std::move(cursor);
    }
    ListPage page;
    absl::StatusOr<bool> more = cursor_->Next(kPageItems, &page);
    if (!more.ok()) {
      Finish(ToGrpcStatus(more.status()));
      return;
    }
    for (const ListEntry& entry : page.entries) {
      if (!max_.empty() && entry.key >= max_) {
        *more = false;  // listings come in key order: the rest is past the range
        break;
      }
      if (entry.key < min_) continue;
      absl::Status s = store.Delete(entry.key, Conditions());
      if (s.ok()) {
        service_->counters().deletes.fetch_add(1, std::memory_order_relaxed);
      } else if (!absl::IsNotFound(s)) {  // gone meanwhile is as good as deleted
        Finish(ToGrpcStatus(s));
        return;
      }
    }
    if (*more) {
      ScheduleNextPage();
    } else {
      Finish(grpc::Status::OK);
    }
  }

  TensorStoreKvStoreService* const service_;
  absl::Time arrived_;
  std::atomic<bool> cancelled_{false};
  std::string min_, max_, prefix_;
  std::unique_ptr<ListCursor> cursor_;
};

// Lists the keys of a range (PagedListCall over the range's common prefix).
class ListCall final : public PagedListCall<tskv::ListRequest, tskv::ListResponse> {
 public:
  ListCall(TensorStoreKvStoreService* service, rpc::Engine* engine,
           grpc::ServerCompletionQueue* queue)
      : PagedListCall(engine, queue, TensorStoreKvStoreService::kList,
                      SpawnerOf<ListCall>(service)),
        service_(service) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    service_->RequestList(&context_, &request_, &writer_, queue, queue, tag);
  }

  void OnStart() override {
    service_->counters().lists.fetch_add(1, std::memory_order_relaxed);
    if (request_.has_staleness_bound()) {
      if (absl::Status s = CheckTimestamp(request_.staleness_bound(), "staleness_bound"); !s.ok()) {
        Finish(ToGrpcStatus(s));
        return;
      }
    }
    min_ = request_.range().inclusive_min();
    max_ = request_.range().exclusive_max();
    strip_ = request_.strip_prefix_length();
    if (!max_.empty() && min_ >= max_) {
      Finish(grpc::Status::OK);  // an empty range
      return;
    }
    absl::StatusOr<std::string> prefix = PrefixOfKeyRange(min_, max_);
    if (!prefix.ok()) {
      Finish(ToGrpcStatus(prefix.status()));
      return;
    }
    StartListing(&service_->core().store(), *std::move(prefix), /*directory=*/false);
  }

  bool AddPage(ListPage& page, tskv::ListResponse* response) override {
    for (ListEntry& entry : page.entries) {
      if (!max_.empty() && entry.key >= max_) return false;  // in key order: the rest is past
      if (entry.key < min_) continue;
      tskv::ListResponse::Entry* e = response->add_entry();
      e->set_key(entry.key.substr(std::min<uint64_t>(strip_, entry.key.size())));
      e->set_size(static_cast<int64_t>(entry.size));
    }
    return true;
  }
  bool Empty(const tskv::ListResponse& response) const override {
    return response.entry_size() == 0;
  }

  TensorStoreKvStoreService* const service_;
  std::string min_, max_;
  uint64_t strip_ = 0;
};

}  // namespace

TensorStoreKvStoreService::TensorStoreKvStoreService(ServiceCore* core) : core_(core) {
  core_->AddCounters("tensorstore_", &counters_);
}

void TensorStoreKvStoreService::Serve(rpc::Engine* engine) {
  // TensorStore reads a zarr array's chunks as many concurrent Reads: several wait per queue,
  // as for chunkd.v1's Get.
  engine->AddMethod(SpawnerOf<ReadCall>(this), 16);
  engine->AddMethod(SpawnerOf<WriteCall>(this), 4);
  engine->AddMethod(SpawnerOf<DeleteCall>(this), 2);
  engine->AddMethod(SpawnerOf<ListCall>(this), 1);
}

}  // namespace chunkd::server

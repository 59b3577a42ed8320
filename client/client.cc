#include "client/client.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/credentials.h"
#include "client/cuda_import.h"
#include "client/lease_keeper.h"
#include "client/replies.h"
#include "client/retry.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/client_callback.h"
#include "grpcpp/support/sync_stream.h"
#include "proto/wire/convert.h"
#include "proto/wire/handoff.h"
#include "proto/wire/raw_message.h"
#include "proto/wire/transport.h"

namespace chunkd::client {
namespace {

constexpr char kGetMethod[] = "/chunkd.v1.Chunkd/Get";
constexpr char kGetManyMethod[] = "/chunkd.v1.Chunkd/GetMany";
constexpr char kPutMethod[] = "/chunkd.v1.Chunkd/Put";
// Field number of PutRequest.header.
constexpr uint32_t kHeaderField = 1;

using wire::ToProto;

int ClampMillis(absl::Duration d) {
  return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 1, INT_MAX));
}

grpc::ByteBuffer Serialize(const google::protobuf::Message& message) {
  grpc::ByteBuffer out;
  bool own;
  (void)grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, &out, &own);
  return out;
}

template <typename T, typename Start>
absl::StatusOr<T> WaitFor(Start start) {
  absl::Notification done;
  absl::StatusOr<T> out;
  start([&](absl::StatusOr<T> result) {
    out = std::move(result);
    done.Notify();
  });
  done.WaitForNotification();
  return out;
}

// Keeps a unary call's context and messages alive until its callback ran.
template <typename Request, typename Response>
struct UnaryCall {
  grpc::ClientContext context;
  Request request;
  Response response;
};

absl::StatusOr<GetResult> FinishReply(GetReply& reply, const grpc::Status& status) {
  return reply.Finish(status);
}
absl::StatusOr<GetManyResults> FinishReply(GetManyReply& reply, const grpc::Status& status) {
  if (!status.ok()) return FromGrpc(status);
  return reply.Finish();
}

// One asynchronous server-streaming call, Get or GetMany (`Reply`: GetReply or GetManyReply):
// the request goes out raw, the replies are assembled as they arrive.
template <typename Reply, typename T>
class StreamCall final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamCall(grpc::GenericStub* stub, const char* method, Reply reply,
             const grpc::ByteBuffer& request, absl::Time deadline, Cancellation* cancellation,
             Callback<T> done)
      : done_(std::move(done)),
        context_(std::make_shared<grpc::ClientContext>()),
        request_(request),
        reply_(std::move(reply)) {
    context_->set_deadline(absl::ToChronoTime(deadline));
    // A call cancelled before this attempt could start ends at once with CANCELLED.
    if (cancellation != nullptr && !cancellation->Arm(context_)) context_->TryCancel();
    stub->PrepareBidiStreamingCall(context_.get(), method, grpc::StubOptions(), this);
    StartWriteLast(&request_, grpc::WriteOptions());
    wire::Started(&response_);
    StartRead(&response_);
    wire::Started(this);
    StartCall();
  }

  // The reactor's callbacks run on gRPC's threads; wire::Started/Completed tell
  // ThreadSanitizer of the order gRPC keeps between starting an operation and its callback.
  void OnReadDone(bool ok) override {
    wire::Completed(&response_);
    if (!ok) return;  // the stream ended; OnDone brings the status
    if (absl::Status s = reply_.Absorb(response_); !s.ok()) {
      error_ = s;
      context_->TryCancel();
      return;
    }
    wire::Started(&response_);
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    wire::Completed(this);
    wire::Completed(&response_);
    absl::StatusOr<T> result = error_.ok() ? FinishReply(reply_, status) : error_;
    Callback<T> done = std::move(done_);
    delete this;
    done(std::move(result));
  }

 private:
  Callback<T> done_;
  // Shared with the call's Cancellation, which may outlive this object.
  std::shared_ptr<grpc::ClientContext> context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  absl::Status error_;
  Reply reply_;
};

// One Put: the header, then the value in parts that refer to the caller's buffer.
class PutCall final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // `derived`: a derived entry's Put (then `conditions` is unused).
  PutCall(grpc::GenericStub* stub, absl::string_view key, buffer::cpu::Buffer value,
          const Conditions& conditions, size_t part_bytes, absl::Time deadline,
          Callback<PutResult> done, const DerivedPut* derived = nullptr)
      : done_(std::move(done)), value_(std::move(value)), part_bytes_(part_bytes) {
    context_.set_deadline(absl::ToChronoTime(deadline));
    v1::PutHeader header;
    header.set_key(std::string(key));
    header.set_size(value_.size());
    if (derived) {
      v1::DerivedPut* d = header.mutable_derived();
      d->set_derivation(derived->derivation);
      d->set_source_generation(derived->source_generation);
      d->set_production_id(derived->production_id);
      d->set_abandon(derived->abandon);
    } else {
      ToProto(conditions, header.mutable_conditions());
    }
    std::string head;
    wire::AppendLengthDelimitedHeader(&head, kHeaderField, header.ByteSizeLong());
    header.AppendToString(&head);
    stub->PrepareBidiStreamingCall(&context_, kPutMethod, grpc::StubOptions(), this);
    wire::Started(&response_);
    StartRead(&response_);
    WriteNext(std::move(head));
    wire::Started(this);
    StartCall();
  }

  // On gRPC's threads; wire::Started/Completed as in StreamCall.
  void OnWriteDone(bool ok) override {
    wire::Completed(&message_);
    // When !ok the server ended the call (an error); OnDone brings its status.
    if (ok) WriteNext("");
  }

  void OnReadDone(bool ok) override {
    wire::Completed(&response_);
    if (ok) got_response_ = true;
  }

  void OnDone(const grpc::Status& status) override {
    wire::Completed(this);
    wire::Completed(&response_);
    wire::Completed(&message_);
    absl::StatusOr<PutResult> result;
    v1::PutResponse response;
    if (!status.ok()) {
      result = FromGrpc(status);
    } else if (!got_response_ ||
               !grpc::SerializationTraits<v1::PutResponse>::Deserialize(&response_, &response)
                    .ok()) {
      result = absl::DataLossError("malformed Put reply");
    } else {
      result = PutResult{response.generation(), response.size()};
    }
    Callback<PutResult> done = std::move(done_);
    delete this;
    done(std::move(result));
  }

 private:
  void WriteNext(std::string head) {
    if (finished_writing_) return;
    size_t part = std::min(part_bytes_, value_.size() - sent_);
    message_ = wire::EncodeWithData(std::move(head), value_.Slice(sent_, part));
    sent_ += part;
    if (sent_ == value_.size()) {
      finished_writing_ = true;
      wire::Started(&message_);
      StartWriteLast(&message_, grpc::WriteOptions());
    } else {
      wire::Started(&message_);
      StartWrite(&message_);
    }
  }

  Callback<PutResult> done_;
  grpc::ClientContext context_;
  buffer::cpu::Buffer value_;
  const size_t part_bytes_;
  size_t sent_ = 0;
  bool finished_writing_ = false;
  grpc::ByteBuffer message_;
  grpc::ByteBuffer response_;
  bool got_response_ = false;
};

// One List call: the listing page by page, as the server streams it.
class ListCall final : public grpc::ClientReadReactor<v1::ListResponse> {
 public:
  ListCall(v1::Chunkd::Stub* stub, absl::string_view prefix, bool directory, absl::Time deadline,
           Callback<std::vector<ListResult>> done)
      : done_(std::move(done)) {
    context_.set_deadline(absl::ToChronoTime(deadline));
    request_.set_prefix(std::string(prefix));
    request_.set_directory(directory);
    stub->async()->List(&context_, &request_, this);
    wire::Started(&response_);
    StartRead(&response_);
    wire::Started(this);
    StartCall();
  }

  // On gRPC's threads; wire::Started/Completed as in StreamCall.
  void OnReadDone(bool ok) override {
    wire::Completed(&response_);
    if (!ok) return;
    ListResult& page = pages_.emplace_back();
    for (v1::ListEntry& e : *response_.mutable_entries()) {
      page.entries.push_back({std::move(*e.mutable_key()), e.size()});
    }
    for (std::string& p : *response_.mutable_prefixes()) page.prefixes.push_back(std::move(p));
    response_.Clear();
    wire::Started(&response_);
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    wire::Completed(this);
    wire::Completed(&response_);
    absl::StatusOr<std::vector<ListResult>> result =
        status.ok() ? absl::StatusOr<std::vector<ListResult>>(std::move(pages_)) : FromGrpc(status);
    Callback<std::vector<ListResult>> done = std::move(done_);
    delete this;
    done(std::move(result));
  }

 private:
  Callback<std::vector<ListResult>> done_;
  grpc::ClientContext context_;
  v1::ListRequest request_;
  v1::ListResponse response_;
  std::vector<ListResult> pages_;
};

ListResult MergePages(std::vector<ListResult> pages) {
  if (pages.size() == 1) return std::move(pages.front());
  ListResult all;
  for (ListResult& page : pages) {
    std::move(page.entries.begin(), page.entries.end(), std::back_inserter(all.entries));
    std::move(page.prefixes.begin(), page.prefixes.end(), std::back_inserter(all.prefixes));
  }
  return all;
}

struct Empty {};

class ClientImpl final : public Client {
 public:
  ClientImpl(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel)
      : Client(options),
        channel_(channel),
        stub_(v1::Chunkd::NewStub(channel)),
        generic_(std::make_unique<grpc::GenericStub>(channel)),
        keeper_(NewLeaseKeeper(channel, options.shm_dir)) {
    buffer::HostIdentity id =
        options.identity ? *options.identity : buffer::CurrentHostIdentity(options.shm_dir);
    ToProto(id, &identity_);
    // Tells this process apart from others on the same UNIX socket (the server's cap on the
    // memory one client's leases pin, server/store/lease_table.h).
    identity_.set_process_id(static_cast<uint64_t>(::getpid()));
  }

  size_t leases_held() const override { return keeper_->held(); }
  bool FlushReleases() override { return keeper_->Flush(); }
  std::string shm_disabled() const override {
    absl::MutexLock lock(&disabled_mu_);
    return shm_disabled_;
  }

  void GetAsync(absl::string_view key, const GetOptions& options,
                Callback<GetResult> done) override {
    GetAsyncOnce(std::string(key), options, /*import_retry=*/true, std::move(done));
  }

  // The blocking Get runs on gRPC's synchronous API: the calling thread drives the call
  // itself, which saves the hand-offs between threads that a callback call makes (they cost
  // more than the whole call for small values).
  absl::StatusOr<GetResult> Get(absl::string_view key, const GetOptions& options) override {
    std::shared_ptr<InterruptedGet> resume =
        options.resume ? options.resume : std::make_shared<InterruptedGet>();
    for (bool import_retry = true;; import_retry = false) {
      v1::GetRequest proto = MakeGetRequest(key, options);
      grpc::ByteBuffer request = Serialize(proto);
      absl::Time deadline = Deadline(options.timeout);
      absl::StatusOr<GetResult> result =
          RetryBlocking<GetResult>(options_, deadline, [&]() -> absl::StatusOr<GetResult> {
            GetReply reply(keeper_, options_.max_value_bytes, resume);
            Streamed call = ReadStream(get_method_, deadline, AttemptRequest(reply, proto, request),
                                       [&](const grpc::ByteBuffer& m) { return reply.Absorb(m); });
            if (!call.reply_error.ok()) return call.reply_error;
            return reply.Finish(call.status);
          });
      if (!import_retry || !DisableDeliveryAfter(result.status())) return result;
    }
  }

  absl::StatusOr<GetManyResults> GetMany(const std::vector<GetManyItem>& items,
                                         const GetOptions& options) override {
    for (bool import_retry = true;; import_retry = false) {
      grpc::ByteBuffer raw = Serialize(MakeGetManyRequest(items, options));
      absl::Time deadline = Deadline(options.timeout);
      absl::StatusOr<GetManyResults> result = RetryBlocking<GetManyResults>(
          options_, deadline, [&]() -> absl::StatusOr<GetManyResults> {
            GetManyReply reply(keeper_, items.size(), options_.max_value_bytes);
            Streamed call = ReadStream(get_many_method_, deadline, raw,
                                       [&](const grpc::ByteBuffer& m) { return reply.Absorb(m); });
            if (!call.reply_error.ok()) return call.reply_error;
            if (!call.status.ok()) return FromGrpc(call.status);
            return reply.Finish();
          });
      if (!import_retry || !DisableDeliveryAfter(result.status())) return result;
    }
  }

  void GetManyAsync(std::vector<GetManyItem> items, const GetOptions& options,
                    Callback<GetManyResults> done) override {
    GetManyAsyncOnce(std::make_shared<const std::vector<GetManyItem>>(std::move(items)), options,
                     /*import_retry=*/true, std::move(done));
  }

  void GetManyEachAsync(std::vector<GetManyItem> items, const GetOptions& options,
                        ItemsCallback each, StatusCallback done) override {
    auto call = std::make_shared<EachCall>();
    call->items = std::move(items);
    call->options = options;
    call->each = std::move(each);
    call->done = std::move(done);
    call->deadline = Deadline(options.timeout);
    GetManyEachAttempts(std::move(call), /*import_retry=*/true);
  }

  void PutDerivedAsync(absl::string_view key, buffer::cpu::Buffer value, const DerivedPut& derived,
                       Callback<PutResult> done) override {
    // Repeating a publication or an abandon is harmless: the second finds the first's result.
    size_t part = std::clamp<size_t>(options_.put_part_bytes, 1, 1u << 20);
    Retrier<PutResult>::Run(
        options_, Deadline(std::nullopt), /*retryable=*/true,
        [this, key = std::string(key), value, derived, part](absl::Time deadline,
                                                             Callback<PutResult> attempt_done) {
          new PutCall(generic_.get(), key, value, Conditions(), part, deadline,
                      std::move(attempt_done), &derived);
        },
        std::move(done));
  }
  absl::StatusOr<PutResult> PutDerived(absl::string_view key, buffer::cpu::Buffer value,
                                       const DerivedPut& derived) override {
    return WaitFor<PutResult>(
        [&](Callback<PutResult> cb) { PutDerivedAsync(key, std::move(value), derived, cb); });
  }

  void PutAsync(absl::string_view key, buffer::cpu::Buffer value, const Conditions& conditions,
                Callback<PutResult> done) override {
    // A conditional write may have landed before the connection broke; retrying it could
    // report a failed condition for the caller's own write.
    bool retryable = !conditions.if_generation_match && !conditions.if_generation_not_match;
    size_t part = std::clamp<size_t>(options_.put_part_bytes, 1, 1u << 20);
    Retrier<PutResult>::Run(
        options_, Deadline(std::nullopt), retryable,
        [this, key = std::string(key), value, conditions, part](absl::Time deadline,
                                                                Callback<PutResult> attempt_done) {
          new PutCall(generic_.get(), key, value, conditions, part, deadline,
                      std::move(attempt_done));
        },
        std::move(done));
  }
  absl::StatusOr<PutResult> Put(absl::string_view key, buffer::cpu::Buffer value,
                                const Conditions& conditions) override {
    return WaitFor<PutResult>(
        [&](Callback<PutResult> cb) { PutAsync(key, std::move(value), conditions, cb); });
  }

  void DeleteAsync(absl::string_view key, const Conditions& conditions,
                   StatusCallback done) override {
    v1::DeleteRequest request;
    request.set_key(std::string(key));
    ToProto(conditions, request.mutable_conditions());
    Unary<v1::DeleteRequest, v1::DeleteResponse, Empty>(
        request,
        [](auto* async, auto* context, auto* req, auto* resp, auto cb) {
          async->Delete(context, req, resp, std::move(cb));
        },
        [](const v1::DeleteResponse&) { return Empty{}; },
        [done](absl::StatusOr<Empty> r) { done(r.status()); });
  }
  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    v1::DeleteRequest request;
    request.set_key(std::string(key));
    ToProto(conditions, request.mutable_conditions());
    return BlockingUnary<v1::DeleteRequest, v1::DeleteResponse, Empty>(
               request, &v1::Chunkd::Stub::Delete,
               [](const v1::DeleteResponse&) { return Empty{}; })
        .status();
  }

  void StatAsync(absl::string_view key, Callback<StatResult> done) override {
    v1::StatRequest request;
    request.set_key(std::string(key));
    Unary<v1::StatRequest, v1::StatResponse, StatResult>(
        request,
        [](auto* async, auto* context, auto* req, auto* resp, auto cb) {
          async->Stat(context, req, resp, std::move(cb));
        },
        [](const v1::StatResponse& r) {
          return StatResult{r.exists(), r.size(), r.generation()};
        },
        std::move(done));
  }
  absl::StatusOr<StatResult> Stat(absl::string_view key) override {
    v1::StatRequest request;
    request.set_key(std::string(key));
    return BlockingUnary<v1::StatRequest, v1::StatResponse, StatResult>(
        request, &v1::Chunkd::Stub::Stat, [](const v1::StatResponse& r) {
          return StatResult{r.exists(), r.size(), r.generation()};
        });
  }

  // A Stat that drops the server's cached copy first (StatRequest.invalidate).
  void InvalidateAsync(absl::string_view key, StatusCallback done) override {
    v1::StatRequest request;
    request.set_key(std::string(key));
    request.set_invalidate(true);
    Unary<v1::StatRequest, v1::StatResponse, Empty>(
        request,
        [](auto* async, auto* context, auto* req, auto* resp, auto cb) {
          async->Stat(context, req, resp, std::move(cb));
        },
        [](const v1::StatResponse&) { return Empty{}; },
        [done](absl::StatusOr<Empty> r) { done(r.status()); });
  }
  absl::Status Invalidate(absl::string_view key) override {
    v1::StatRequest request;
    request.set_key(std::string(key));
    request.set_invalidate(true);
    return BlockingUnary<v1::StatRequest, v1::StatResponse, Empty>(
               request, &v1::Chunkd::Stub::Stat, [](const v1::StatResponse&) { return Empty{}; })
        .status();
  }

  void ListPagesAsync(absl::string_view prefix, bool directory,
                      Callback<std::vector<ListResult>> done) override {
    Retrier<std::vector<ListResult>>::Run(
        options_, Deadline(std::nullopt), /*retryable=*/true,
        [this, prefix = std::string(prefix), directory](
            absl::Time deadline, Callback<std::vector<ListResult>> attempt_done) {
          new ListCall(stub_.get(), prefix, directory, deadline, std::move(attempt_done));
        },
        std::move(done));
  }
  absl::StatusOr<std::vector<ListResult>> ListPages(absl::string_view prefix,
                                                    bool directory) override {
    return WaitFor<std::vector<ListResult>>(
        [&](Callback<std::vector<ListResult>> cb) { ListPagesAsync(prefix, directory, cb); });
  }
  void ListAsync(absl::string_view prefix, bool directory, Callback<ListResult> done) override {
    ListPagesAsync(prefix, directory, [done = std::move(done)](auto pages) {
      if (!pages.ok()) return done(pages.status());
      done(MergePages(*std::move(pages)));
    });
  }
  absl::StatusOr<ListResult> List(absl::string_view prefix, bool directory) override {
    auto pages = ListPages(prefix, directory);
    if (!pages.ok()) return pages.status();
    return MergePages(*std::move(pages));
  }

  void ServerInfoAsync(Callback<v1::ServerInfoResponse> done) override {
    Unary<v1::ServerInfoRequest, v1::ServerInfoResponse, v1::ServerInfoResponse>(
        v1::ServerInfoRequest(),
        [](auto* async, auto* context, auto* req, auto* resp, auto cb) {
          async->ServerInfo(context, req, resp, std::move(cb));
        },
        [](const v1::ServerInfoResponse& r) { return r; }, std::move(done));
  }
  absl::StatusOr<v1::ServerInfoResponse> ServerInfo() override {
    return BlockingUnary<v1::ServerInfoRequest, v1::ServerInfoResponse, v1::ServerInfoResponse>(
        v1::ServerInfoRequest(), &v1::Chunkd::Stub::ServerInfo,
        [](const v1::ServerInfoResponse& r) { return r; });
  }

 private:
  absl::Time Deadline(std::optional<absl::Duration> timeout) const {
    return absl::Now() + timeout.value_or(options_.timeout);
  }

  static void SetDerived(const DerivedRead& derived, v1::GetRequest* request) {
    v1::DerivedRead* d = request->mutable_derived();
    d->set_derivation(derived.derivation);
    d->set_produce(derived.produce);
    d->set_wait_ms(derived.wait_ms);
  }

  v1::GetRequest MakeGetRequest(absl::string_view key, const GetOptions& options) const {
    v1::GetRequest request;
    request.set_key(std::string(key));
    ToProto(options.range, &request);
    ToProto(options.conditions, request.mutable_conditions());
    if (options.derived) SetDerived(*options.derived, &request);
    if (std::optional<absl::Duration> staleness =
            options.max_staleness ? options.max_staleness : options_.max_staleness) {
      request.set_max_staleness_ms(
          static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Milliseconds(*staleness))));
    }
    bool handles = false, cuda = false;
    bool shm_off, cuda_off;
    {
      absl::MutexLock lock(&disabled_mu_);
      shm_off = !shm_disabled_.empty();
      cuda_off = !cuda_disabled_.empty();
    }
    for (v1::Delivery d : options.accept.value_or(options_.accept)) {
      // A delivery this client could not import before is asked for no more.
      if ((d == v1::DELIVERY_SHM && shm_off) || (d == v1::DELIVERY_CUDA_IPC && cuda_off)) continue;
      request.add_accept(d);
      handles |= d != v1::DELIVERY_INLINE;
      cuda |= d == v1::DELIVERY_CUDA_IPC;
    }
    if (request.accept().empty()) request.add_accept(v1::DELIVERY_INLINE);
    if (handles) *request.mutable_client() = identity_;
    // The GPU by UUID; without a device the server falls back (or refuses a CUDA-only Get).
    if (cuda)
      (void)PrepareCudaRequest(options.cuda_device.value_or(options_.cuda_device), &request);
    return request;
  }

  // The request of one Get attempt: the call's, or, when the attempt continues a value an
  // earlier one was cut off in, the request for the rest of it.
  static grpc::ByteBuffer AttemptRequest(const GetReply& reply, const v1::GetRequest& proto,
                                         const grpc::ByteBuffer& request) {
    if (!reply.continues()) return request;
    v1::GetRequest rest = proto;
    reply.RewriteRequest(&rest);
    return Serialize(rest);
  }

  v1::GetManyRequest MakeGetManyRequest(const std::vector<GetManyItem>& items,
                                        const GetOptions& options) const {
    v1::GetManyRequest request;
    request.mutable_items()->Reserve(items.size());
    for (const GetManyItem& item : items) {
      v1::GetRequest* r = request.add_items();
      r->set_key(item.key);
      ToProto(item.range, r);
      ToProto(item.conditions, r->mutable_conditions());
      if (item.derived) SetDerived(*item.derived, r);
    }
    v1::GetRequest shared = MakeGetRequest("", options);
    *request.mutable_accept() = shared.accept();
    if (shared.has_client()) *request.mutable_client() = shared.client();
    if (shared.has_max_staleness_ms()) request.set_max_staleness_ms(shared.max_staleness_ms());
    return request;
  }

  // After a call failed because this process could not import a handle (map a shared-memory
  // segment, open a CUDA IPC handle): turns that delivery off for this client, with a log line,
  // and says whether to make the call again (then inline).
  bool DisableDeliveryAfter(const absl::Status& status) {
    v1::Delivery failed = ImportFailure(status);
    if (failed == v1::DELIVERY_UNSPECIFIED) return false;
    absl::MutexLock lock(&disabled_mu_);
    std::string& reason = failed == v1::DELIVERY_SHM ? shm_disabled_ : cuda_disabled_;
    if (reason.empty()) {
      reason = std::string(status.message());
      std::fprintf(stderr, "chunkd client: %s delivery from %s is off: %s (values arrive inline)\n",
                   failed == v1::DELIVERY_SHM ? "shared-memory" : "CUDA IPC",
                   options_.address.c_str(), reason.c_str());
    }
    return true;
  }

  void GetAsyncOnce(std::string key, const GetOptions& options, bool import_retry,
                    Callback<GetResult> done) {
    auto proto = std::make_shared<const v1::GetRequest>(MakeGetRequest(key, options));
    grpc::ByteBuffer request = Serialize(*proto);
    std::shared_ptr<InterruptedGet> resume =
        options.resume ? options.resume : std::make_shared<InterruptedGet>();
    Retrier<GetResult>::Run(
        options_, Deadline(options.timeout), /*retryable=*/true,
        [this, proto, request, resume, cancellation = options.cancellation](
            absl::Time deadline, Callback<GetResult> attempt_done) {
          GetReply reply(keeper_, options_.max_value_bytes, resume);
          grpc::ByteBuffer attempt_request = AttemptRequest(reply, *proto, request);
          new StreamCall<GetReply, GetResult>(generic_.get(), kGetMethod, std::move(reply),
                                              attempt_request, deadline, cancellation.get(),
                                              std::move(attempt_done));
        },
        [this, key = std::move(key), options, import_retry,
         done = std::move(done)](absl::StatusOr<GetResult> result) mutable {
          if (import_retry && DisableDeliveryAfter(result.status())) {
            return GetAsyncOnce(std::move(key), options, false, std::move(done));
          }
          done(std::move(result));
        },
        options.cancellation);
  }

  // A GetManyEachAsync call: its items, and how many of them were handed over. Each attempt
  // asks for the items from there on (so a retry repeats none), one attempt at a time.
  struct EachCall {
    std::vector<GetManyItem> items;
    GetOptions options;
    ItemsCallback each;
    StatusCallback done;
    absl::Time deadline;
    std::atomic<size_t> next{0};
  };

  void GetManyEachAttempts(std::shared_ptr<EachCall> call, bool import_retry) {
    if (call->next == call->items.size()) return call->done(absl::OkStatus());
    Retrier<GetManyResults>::Run(
        options_, call->deadline, /*retryable=*/true,
        [this, call](absl::Time deadline, Callback<GetManyResults> attempt_done) {
          size_t base = call->next;
          std::vector<GetManyItem> rest(call->items.begin() + base, call->items.end());
          ItemsCallback each = [call](size_t first,
                                      std::vector<absl::StatusOr<GetResult>> results) {
            call->next = first + results.size();
            call->each(first, std::move(results));
          };
          new StreamCall<GetManyReply, GetManyResults>(
              generic_.get(), kGetManyMethod,
              GetManyReply(keeper_, rest.size(), options_.max_value_bytes, std::move(each), base),
              Serialize(MakeGetManyRequest(rest, call->options)), deadline,
              call->options.cancellation.get(), std::move(attempt_done));
        },
        [this, call, import_retry](absl::StatusOr<GetManyResults> result) {
          if (import_retry && DisableDeliveryAfter(result.status())) {
            return GetManyEachAttempts(call, false);  // the rest, inline
          }
          call->done(result.status());
        },
        call->options.cancellation);
  }

  void GetManyAsyncOnce(std::shared_ptr<const std::vector<GetManyItem>> items,
                        const GetOptions& options, bool import_retry,
                        Callback<GetManyResults> done) {
    grpc::ByteBuffer request = Serialize(MakeGetManyRequest(*items, options));
    Retrier<GetManyResults>::Run(
        options_, Deadline(options.timeout), /*retryable=*/true,
        [this, request, n = items->size(), cancellation = options.cancellation](
            absl::Time deadline, Callback<GetManyResults> attempt_done) {
          new StreamCall<GetManyReply, GetManyResults>(
              generic_.get(), kGetManyMethod, GetManyReply(keeper_, n, options_.max_value_bytes),
              request, deadline, cancellation.get(), std::move(attempt_done));
        },
        [this, items, options, import_retry,
         done = std::move(done)](absl::StatusOr<GetManyResults> result) mutable {
          if (import_retry && DisableDeliveryAfter(result.status())) {
            return GetManyAsyncOnce(std::move(items), options, false, std::move(done));
          }
          done(std::move(result));
        },
        options.cancellation);
  }

  // A unary call through the generated async stub, retried on UNAVAILABLE (every unary call
  // of chunkd.v1 is idempotent or, for Delete, harmless to repeat: a repeat reports NOT_FOUND
  // only if the first attempt's delete already landed).
  template <typename Request, typename Response, typename T, typename Method, typename Convert>
  void Unary(const Request& request, Method method, Convert convert, Callback<T> done) {
    Retrier<T>::Run(
        options_, Deadline(std::nullopt), /*retryable=*/true,
        [this, request, method, convert](absl::Time deadline, Callback<T> attempt_done) {
          auto* call = new UnaryCall<Request, Response>();
          call->context.set_deadline(absl::ToChronoTime(deadline));
          call->request = request;
          wire::Started(call);  // the callback runs on a gRPC thread
          method(
              stub_->async(), &call->context, &call->request, &call->response,
              std::function<void(grpc::Status)>([call, convert, attempt_done](grpc::Status status) {
                wire::Completed(call);
                absl::StatusOr<T> result = status.ok() ? absl::StatusOr<T>(convert(call->response))
                                                       : absl::StatusOr<T>(FromGrpc(status));
                delete call;
                attempt_done(std::move(result));
              }));
        },
        std::move(done));
  }

  // How a server-streaming call ended: the first error in its replies (the call was cancelled
  // then), and the call's status.
  struct Streamed {
    absl::Status reply_error;
    grpc::Status status;
  };

  // One server-streaming call of `method` on gRPC's synchronous API, each reply message handed
  // to `absorb` (which returns an error for a malformed one).
  template <typename Absorb>
  Streamed ReadStream(const grpc::internal::RpcMethod& method, absl::Time deadline,
                      const grpc::ByteBuffer& request, Absorb absorb) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
        grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel_.get(), method,
                                                                      &context, request));
    Streamed out;
    grpc::ByteBuffer message;
    while (reader->Read(&message)) {
      if (!out.reply_error.ok()) continue;
      out.reply_error = absorb(message);
      if (!out.reply_error.ok()) context.TryCancel();
    }
    out.status = reader->Finish();
    return out;
  }

  // The blocking form of Unary, on gRPC's synchronous API: the calling thread drives the call,
  // and a process that only makes blocking calls starts none of the callback API's threads
  // (which would take part in polling and hand every event to another thread).
  template <typename Request, typename Response, typename T, typename Method, typename Convert>
  absl::StatusOr<T> BlockingUnary(const Request& request, Method method, Convert convert) {
    absl::Time deadline = Deadline(std::nullopt);
    return RetryBlocking<T>(options_, deadline, [&]() -> absl::StatusOr<T> {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(deadline));
      Response response;
      grpc::Status status = (stub_.get()->*method)(&context, request, &response);
      if (!status.ok()) return FromGrpc(status);
      return convert(response);
    });
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Chunkd::Stub> stub_;
  std::unique_ptr<grpc::GenericStub> generic_;
  std::shared_ptr<LeaseKeeper> keeper_;
  v1::ClientIdentity identity_;
  // Why shared-memory / CUDA IPC delivery is off for this client ("": on).
  mutable absl::Mutex disabled_mu_;
  std::string shm_disabled_ ABSL_GUARDED_BY(disabled_mu_);
  std::string cuda_disabled_ ABSL_GUARDED_BY(disabled_mu_);
  const grpc::internal::RpcMethod get_method_{kGetMethod,
                                              grpc::internal::RpcMethod::SERVER_STREAMING};
  const grpc::internal::RpcMethod get_many_method_{kGetManyMethod,
                                                   grpc::internal::RpcMethod::SERVER_STREAMING};
};

}  // namespace

void Cancellation::Cancel() {
  std::shared_ptr<grpc::ClientContext> context;
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    context = context_;
  }
  if (context) context->TryCancel();
}

bool Cancellation::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

bool Cancellation::Arm(std::shared_ptr<grpc::ClientContext> context) {
  absl::MutexLock lock(&mu_);
  context_ = std::move(context);
  return !cancelled_;
}

namespace {

// gRPC 1.51 completes the C++ callback API's calls on one process-wide completion queue with
// threads of its own (its "callback alternative" queue, used with the poll engine), made with
// the first channel that starts a callback call and torn down when the last such channel is
// destroyed. When that last destruction runs on one of the queue's own threads (a Client, or
// the lease keeper that holds a channel, dropped by a callback that thread ran: a buffer's last
// reference going with a completed call), the teardown joins the thread it runs on and frees the
// queue under it: the thread then polls freed memory and the process aborts ("assertion failed:
// prior > 0" in grpc_cq_internal_unref). One channel that starts a callback call and is never
// destroyed keeps the queue, and its threads, for the life of the process.
// Not in ThreadSanitizer builds: that call's completion reaches gRPC's callback thread without
// a lock TSan can see (its deadline has passed, so no connection is involved), and TSan reports
// gRPC's own tag as raced; there the test that needs the anchor skips
// (AClientDroppedByItsOwnCallbackLeavesTheProcessWhole).
void KeepCallbackQueueForTheProcess() {
#ifndef CHUNKD_TSAN
  static std::shared_ptr<grpc::Channel>* const anchor = [] {
    auto* channel = new std::shared_ptr<grpc::Channel>(grpc::CreateChannel(
        "unix:/nonexistent/chunkd-callback-queue", grpc::InsecureChannelCredentials()));
    struct Call {
      grpc::ClientContext context;
      v1::ServerInfoRequest request;
      v1::ServerInfoResponse response;
    };
    auto* call = new Call;  // deleted by its completion: the deadline has passed already
    call->context.set_deadline(std::chrono::system_clock::now());
    wire::Started(call);
    v1::Chunkd::NewStub(*channel)->async()->ServerInfo(
        &call->context, &call->request, &call->response, [call](const grpc::Status&) {
          wire::Completed(call);
          delete call;
        });
    return channel;
  }();
  (void)anchor;
#endif
}

}  // namespace

void InitProcess() {
  // Each item, and why it is process-wide: client.h.
  static const bool done = [] {
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
    if (std::getenv("GRPC_POLL_STRATEGY") == nullptr) ::setenv("GRPC_POLL_STRATEGY", "poll", 0);
    KeepCallbackQueueForTheProcess();
    return true;
  }();
  (void)done;
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  InitProcess();  // a no-op after the first time, or after the program's own call
  if (options.address.empty()) return absl::InvalidArgumentError("server address is empty");
  if (std::find(options.accept.begin(), options.accept.end(), v1::DELIVERY_CUDA_IPC) !=
      options.accept.end()) {
    if (absl::Status s = CheckCudaDelivery(options.cuda_device); !s.ok()) return s;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetMaxSendMessageSize(16 << 20);
  args.SetInt(wire::kStreamWindowArg, wire::kStreamWindowBytes);
  args.SetInt(wire::kMaxFrameArg, wire::kMaxFrameBytes);
  // Each Client gets connections of its own: gRPC otherwise shares one connection among every
  // channel to an address in the process, so Clients made for parallelism would all queue on
  // one socket.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // A server whose host went silent (cut off, no reset) is found by pings, not by the calls'
  // deadlines: a ping unanswered within keepalive_timeout closes the connection and fails its
  // calls with UNAVAILABLE (gRPC also sets TCP_USER_TIMEOUT to it). Idle connections are
  // pinged too, and with no cap on pings between data frames (a long Get waiting for a slow
  // store sends none).
  if (options.keepalive_time > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ClampMillis(options.keepalive_time));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ClampMillis(options.keepalive_timeout));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  // A connection attempt to a silent host gives up after connect_timeout (gRPC's default is
  // 20 s, and grows with its reconnect backoff up to 2 minutes: calls wait for an attempt in
  // progress). The backoff between attempts stays under it too.
  if (options.connect_timeout > absl::ZeroDuration()) {
    int connect_ms = ClampMillis(options.connect_timeout);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, connect_ms);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, connect_ms);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(connect_ms, 1000));
  }
  auto channel = CreateChannel(options, args);  // TLS and token, when the options ask for them
  if (!channel.ok()) return channel.status();
  if (!*channel) {
    return absl::InvalidArgumentError(absl::StrCat("cannot use address '", options.address, "'"));
  }
  return std::unique_ptr<Client>(new ClientImpl(options, *std::move(channel)));
}

}  // namespace chunkd::client

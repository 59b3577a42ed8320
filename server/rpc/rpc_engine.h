// The server's RPC engine: gRPC's asynchronous (completion queue) API, with each call handled
// on the thread that polled its event.
//
// Why not gRPC's callback API: there, every event is polled by one thread and handed to
// another ("nexting" threads, then executor threads), and gRPC's epoll engine also hands the
// polling role from thread to thread. Measured on loopback, a 4 KiB Get cost the server about
// five context switches on the callback API and one here; on a virtual machine, where a switch
// costs tens of microseconds, that is most of a small call's time. So every service of the
// server (chunkd.v1.Chunkd, TensorStore's tensorstore_grpc.kvstore.KvStoreService and
// grpc.health.v1.Health) runs on these queues, and nothing else
// in the process polls gRPC: a callback or synchronous service would bring its own polling
// threads back (server reflection is synchronous, hence opt-in).
//
// A call is an object derived from one of the call templates below, created "armed" (requested
// on a queue) and deleted after its last completion. The templates give the shape of gRPC's
// reactors: StartRead/StartWrite/StartWriteAndFinish/Finish to act, OnReadDone/OnWriteDone/
// OnCancel/OnDone to hear back. Acting is allowed from any thread (I/O threads finish calls
// after a cache miss); one read and one write may be in flight at a time, as with reactors.
#ifndef CHUNKD_SERVER_RPC_RPC_ENGINE_H_
#define CHUNKD_SERVER_RPC_RPC_ENGINE_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/alarm.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/async_stream.h"
#include "grpcpp/support/async_unary_call.h"
#include "proto/wire/handoff.h"

namespace chunkd::server::rpc {

class AlarmTag;

// What every completion-queue tag points at: a call's event or a queue's alarm.
class CompletionTag {
 public:
  virtual void Completed(bool ok) = 0;

 protected:
  ~CompletionTag() = default;
};

// Checks a call before its handler sees it (bearer tokens); OK lets it through.
using Authorizer =
    std::function<grpc::Status(const grpc::ServerContextBase& context, absl::string_view method)>;

// The default number of queue threads: half the cores, at least one. One thread polls without
// hand-offs (the fastest for small calls); more spread large transfers over cores.
int DefaultThreads();

class Engine {
 public:
  // Arms `waiting` calls of one method on the queue given; each is one `new` of a call object.
  using Spawner = std::function<void(Engine* engine, grpc::ServerCompletionQueue* queue)>;

  // Adds `threads` completion queues to `builder`; construct before builder.BuildAndStart().
  Engine(grpc::ServerBuilder& builder, int threads);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Before Start: a method to serve, with how many calls wait for it on each queue.
  void AddMethod(Spawner spawn, int waiting);
  void set_authorizer(Authorizer authorizer) { authorizer_ = std::move(authorizer); }
  // Before Start: cancel calls of authorized methods (not the health service's, whose Watch
  // may rightly last) running longer than `limit` (zero: never). Each queue's thread keeps its
  // calls in arrival order, which is the order their time runs out, and looks at the oldest a
  // few times per limit: no lock, no thread and no interceptor on any call's path.
  void set_call_limit(absl::Duration limit) { call_limit_ = limit; }

  // After BuildAndStart: arms the calls and starts one thread per queue.
  void Start();
  // After the grpc::Server's Shutdown: waits for the calls in progress to end (the server has
  // cancelled those past its grace), then shuts the queues down and joins their threads.
  void Shutdown();

  // For the call templates.
  void CallStarted();
  void CallEnded();
  grpc::Status Authorize(const grpc::ServerContextBase& context, absl::string_view method) const;
  int threads() const { return static_cast<int>(queues_.size()); }

  // One completion queue, its thread's calls (for the call limit) and the limit's alarm.
  struct Queue;

 private:
  friend class Call;
  friend class AlarmTag;
  void ArmLimitCheck(Queue* queue);
  void CheckLimit(Queue* queue);

  std::vector<std::unique_ptr<Queue>> queues_;
  std::vector<std::pair<Spawner, int>> methods_;
  std::vector<std::thread> threads_;
  Authorizer authorizer_;
  absl::Duration call_limit_ = absl::ZeroDuration();
  absl::Mutex mu_;
  int live_calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ = false;
  bool shut_down_ = false;
};

// What every call shares: its context, its tags and its lifetime. Not used directly.
class Call {
 public:
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  // Requests the call on the queue; the object then waits for one RPC of its method.
  void Arm();

 protected:
  // `method` names the RPC for authorization and messages ("Get"; null: open to every caller,
  // as the health service is); `spawn` makes the object that waits for the next RPC of the
  // same method once this one has arrived.
  Call(Engine* engine, grpc::ServerCompletionQueue* queue, const char* method,
       Engine::Spawner spawn);
  virtual ~Call() = default;

  // gRPC's Request<Method>(..., queue, queue, tag) for this call's method.
  virtual void Request(grpc::ServerCompletionQueue* queue, void* tag) = 0;
  // The RPC has arrived (and passed authorization); the request, if any, is in place.
  virtual void OnStart() = 0;
  // Ends the call with `status` (templates below).
  virtual void Finish(grpc::Status status) = 0;
  virtual void OnReadDone(bool ok) {}
  virtual void OnWriteDone(bool ok) {}
  // The client cancelled, the deadline passed or the server is shutting down; the handler must
  // still Finish (the status goes nowhere).
  virtual void OnCancel() {}
  // The last event: no operation is in flight and none will come; the object is deleted next.
  virtual void OnDone() {}

  // Around every operation started: the object lives until each has completed.
  void BeginOp() { refs_.fetch_add(1, std::memory_order_relaxed); }
  // Tags go to gRPC as CompletionTag pointers, which is what the queue threads cast them back
  // to; each is asked for as its operation starts (wire::Started, for ThreadSanitizer).
  void* read_tag() { return Handed(&read_); }
  void* write_tag() { return Handed(&write_); }
  void* finish_tag() { return Handed(&finish_); }

  // A generic context (a ServerContext that also knows its method) serves every kind of call.
  grpc::GenericServerContext context_;

 private:
  enum class Event { kArrived, kDone, kRead, kWrite, kFinish };
  class Tag;
  friend class Engine;
  void Completed(Event event, bool ok);
  void WatchLimit();
  static void* Handed(CompletionTag* tag) {
    wire::Started(tag);
    return tag;
  }
  void Release(int n);

  class Tag final : public CompletionTag {
   public:
    Tag(Call* call, Event event) : call_(call), event_(event) {}
    void Completed(bool ok) override { call_->Completed(event_, ok); }

   private:
    Call* const call_;
    const Event event_;
  };

  Engine* const engine_;
  grpc::ServerCompletionQueue* const queue_;
  const char* const method_;
  // In its queue's list of calls under the call limit (touched by that queue's thread only).
  Engine::Queue* limited_in_ = nullptr;
  Call* older_ = nullptr;
  Call* newer_ = nullptr;
  absl::Time arrived_at_;
  bool limit_cancelled_ = false;
  const Engine::Spawner spawn_;
  // One reference for the done notification and one until Finish completes, plus one per
  // read or write in flight.
  std::atomic<int> refs_{2};
  bool started_ = false;
  Tag arrived_{this, Event::kArrived}, done_{this, Event::kDone}, read_{this, Event::kRead},
      write_{this, Event::kWrite}, finish_{this, Event::kFinish};
};

// One request in, a stream of responses out (Get, List, Prefetch).
template <class RequestT, class ResponseT>
class ServerStreamCall : public Call {
 protected:
  using Call::Call;

  void StartWrite(const ResponseT* response, grpc::WriteOptions options = grpc::WriteOptions()) {
    BeginOp();
    writer_.Write(*response, options, write_tag());
  }
  void StartWriteAndFinish(const ResponseT* response, grpc::WriteOptions options,
                           grpc::Status status) {
    BeginOp();
    writer_.WriteAndFinish(*response, options, status, finish_tag());
  }
  void Finish(grpc::Status status) override {
    BeginOp();
    writer_.Finish(status, finish_tag());
  }

  RequestT request_;
  grpc::ServerAsyncWriter<ResponseT> writer_{&context_};
};

// A stream of requests in, one response out (Put).
template <class RequestT, class ResponseT>
class ClientStreamCall : public Call {
 protected:
  using Call::Call;

  void StartRead(RequestT* request) {
    BeginOp();
    reader_.Read(request, read_tag());
  }
  void Finish(grpc::Status status) override {
    BeginOp();
    if (status.ok()) {
      reader_.Finish(response_, status, finish_tag());
    } else {
      reader_.FinishWithError(status, finish_tag());
    }
  }

  ResponseT response_;
  grpc::ServerAsyncReader<ResponseT, RequestT> reader_{&context_};
};

// One request, one response.
template <class RequestT, class ResponseT>
class UnaryCall : public Call {
 protected:
  using Call::Call;

  void Finish(grpc::Status status) override {
    BeginOp();
    if (status.ok()) {
      responder_.Finish(response_, status, finish_tag());
    } else {
      responder_.FinishWithError(status, finish_tag());
    }
  }

  RequestT request_;
  ResponseT response_;
  grpc::ServerAsyncResponseWriter<ResponseT> responder_{&context_};
};

}  // namespace chunkd::server::rpc

#endif  // CHUNKD_SERVER_RPC_RPC_ENGINE_H_

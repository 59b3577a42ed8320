#include "server/rpc/rpc_engine.h"

#include <algorithm>

#include "server/common/log.h"

namespace chunkd::server::rpc {

// The alarm's completions come back through this tag.
class AlarmTag final : public CompletionTag {
 public:
  AlarmTag(Engine* engine, Engine::Queue* queue) : engine_(engine), queue_(queue) {}
  void Completed(bool ok) override;

 private:
  Engine* const engine_;
  Engine::Queue* const queue_;
};

struct Engine::Queue {
  std::unique_ptr<grpc::ServerCompletionQueue> completion_queue;
  // Calls under the call limit, oldest first (this queue's thread only).
  Call* oldest = nullptr;
  Call* newest = nullptr;
  grpc::Alarm alarm;
  std::unique_ptr<AlarmTag> alarm_tag;
  absl::Mutex mu;  // between re-arming the alarm and shutting the queue down
  bool stopping ABSL_GUARDED_BY(mu) = false;
};

int DefaultThreads() {
  unsigned cores = std::thread::hardware_concurrency();
  return std::clamp<int>(static_cast<int>(cores / 2), 1, 8);
}

Engine::Engine(grpc::ServerBuilder& builder, int threads) {
  for (int i = 0; i < std::max(threads, 1); ++i) {
    auto queue = std::make_unique<Queue>();
    queue->completion_queue = builder.AddCompletionQueue();
    queue->alarm_tag = std::make_unique<AlarmTag>(this, queue.get());
    queues_.push_back(std::move(queue));
  }
}

Engine::~Engine() { Shutdown(); }

void Engine::AddMethod(Spawner spawn, int waiting) {
  methods_.emplace_back(std::move(spawn), std::max(waiting, 1));
}

void Engine::Start() {
  started_ = true;
  for (auto& queue : queues_) {
    grpc::ServerCompletionQueue* cq = queue->completion_queue.get();
    for (auto& [spawn, waiting] : methods_) {
      for (int i = 0; i < waiting; ++i) spawn(this, cq);
    }
    if (call_limit_ > absl::ZeroDuration()) ArmLimitCheck(queue.get());
    threads_.emplace_back([this, cq] {
      void* tag;
      bool ok;
      while (cq->Next(&tag, &ok)) {
        wire::Completed(tag);  // what its starter did happened before (ThreadSanitizer)
        static_cast<CompletionTag*>(tag)->Completed(ok);
      }
    });
  }
}

void Engine::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  if (started_) {
    // Calls still running finish from their own threads (an I/O thread after a backend read):
    // the queues must take their completions until the last one has ended.
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* live) { return *live == 0; }, &live_calls_));
  }
  for (auto& queue : queues_) {
    {
      absl::MutexLock lock(&queue->mu);
      queue->stopping = true;
    }
    queue->alarm.Cancel();  // its tag comes back (not ok) and is not re-armed
    queue->completion_queue->Shutdown();
  }
  if (!started_) {
    // Nobody polls these queues: drain them here.
    for (auto& queue : queues_) {
      void* tag;
      bool ok;
      while (queue->completion_queue->Next(&tag, &ok)) {
        wire::Completed(tag);
        static_cast<CompletionTag*>(tag)->Completed(ok);
      }
    }
  }
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
}

void Engine::ArmLimitCheck(Queue* queue) {
  // A few looks per limit: a call is cancelled at most a quarter of the limit (or a second)
  // after its time ran out.
  absl::Duration period = std::clamp(call_limit_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  absl::MutexLock lock(&queue->mu);
  if (queue->stopping) return;
  CompletionTag* tag = queue->alarm_tag.get();
  wire::Started(tag);
  queue->alarm.Set(queue->completion_queue.get(), absl::ToChronoTime(absl::Now() + period), tag);
}

void Engine::CheckLimit(Queue* queue) {
  absl::Time now = absl::Now();
  for (Call* call = queue->oldest; call != nullptr && now - call->arrived_at_ > call_limit_;
       call = call->newer_) {
    if (call->limit_cancelled_) continue;
    call->limit_cancelled_ = true;
    Log("cancelling a %s call: it ran longer than --max_call_duration=%s", call->method_,
        absl::FormatDuration(call_limit_));
    call->context_.TryCancel();
  }
  ArmLimitCheck(queue);
}

void AlarmTag::Completed(bool ok) {
  if (ok) engine_->CheckLimit(queue_);
}

void Engine::CallStarted() {
  absl::MutexLock lock(&mu_);
  ++live_calls_;
}

void Engine::CallEnded() {
  absl::MutexLock lock(&mu_);
  --live_calls_;
}

grpc::Status Engine::Authorize(const grpc::ServerContextBase& context,
                               absl::string_view method) const {
  return authorizer_ ? authorizer_(context, method) : grpc::Status::OK;
}

Call::Call(Engine* engine, grpc::ServerCompletionQueue* queue, const char* method,
           Engine::Spawner spawn)
    : engine_(engine), queue_(queue), method_(method), spawn_(std::move(spawn)) {}

void Call::Arm() {
  // Delivered once the call has ended, if it ever starts (server_context.h).
  context_.AsyncNotifyWhenDone(Handed(&done_));
  Request(queue_, Handed(&arrived_));
}

void Call::Completed(Event event, bool ok) {
  switch (event) {
    case Event::kArrived:
      if (!ok) {  // the server is shutting down: no call came, and none will
        delete this;
        return;
      }
      started_ = true;
      engine_->CallStarted();
      if (method_ != nullptr && engine_->call_limit_ > absl::ZeroDuration()) WatchLimit();
      spawn_(engine_, queue_);  // the next RPC of this method finds a call waiting
      if (grpc::Status s = method_ ? engine_->Authorize(context_, method_) : grpc::Status::OK;
          !s.ok()) {
        Finish(std::move(s));
        return;
      }
      OnStart();
      return;
    case Event::kDone:
      if (context_.IsCancelled()) OnCancel();
      Release(1);
      return;
    case Event::kRead:
      OnReadDone(ok);
      Release(1);
      return;
    case Event::kWrite:
      OnWriteDone(ok);
      Release(1);
      return;
    case Event::kFinish:
      Release(2);  // the operation, and the reference held until the call was finished
      return;
  }
}

void Call::WatchLimit() {
  for (auto& queue : engine_->queues_) {
    if (queue->completion_queue.get() == queue_) limited_in_ = queue.get();
  }
  if (limited_in_ == nullptr) return;
  arrived_at_ = absl::Now();
  older_ = limited_in_->newest;
  (older_ ? older_->newer_ : limited_in_->oldest) = this;
  limited_in_->newest = this;
}

void Call::Release(int n) {
  if (refs_.fetch_sub(n, std::memory_order_acq_rel) != n) return;
  OnDone();
  if (limited_in_ != nullptr) {  // on this queue's thread, like every completion of the call
    (older_ ? older_->newer_ : limited_in_->oldest) = newer_;
    (newer_ ? newer_->older_ : limited_in_->newest) = older_;
  }
  Engine* engine = engine_;
  bool started = started_;
  delete this;
  if (started) engine->CallEnded();
}

}  // namespace chunkd::server::rpc

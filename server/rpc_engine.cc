#include "server/rpc_engine.h"

#include <algorithm>

namespace chunkd::server::rpc {

int DefaultThreads() {
  unsigned cores = std::thread::hardware_concurrency();
  return std::clamp<int>(static_cast<int>(cores / 2), 1, 8);
}

Engine::Engine(grpc::ServerBuilder& builder, int threads) {
  for (int i = 0; i < std::max(threads, 1); ++i) queues_.push_back(builder.AddCompletionQueue());
}

Engine::~Engine() { Shutdown(); }

void Engine::AddMethod(Spawner spawn, int waiting) {
  methods_.emplace_back(std::move(spawn), std::max(waiting, 1));
}

void Engine::Start() {
  started_ = true;
  for (auto& queue : queues_) {
    for (auto& [spawn, waiting] : methods_) {
      for (int i = 0; i < waiting; ++i) spawn(this, queue.get());
    }
    threads_.emplace_back([queue = queue.get()] {
      void* tag;
      bool ok;
      while (queue->Next(&tag, &ok)) static_cast<Call::Tag*>(tag)->Completed(ok);
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
  for (auto& queue : queues_) queue->Shutdown();
  if (!started_) {
    // Nobody polls these queues: drain them here.
    for (auto& queue : queues_) {
      void* tag;
      bool ok;
      while (queue->Next(&tag, &ok)) static_cast<Call::Tag*>(tag)->Completed(ok);
    }
  }
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
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
  context_.AsyncNotifyWhenDone(&done_);
  Request(queue_, &arrived_);
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

void Call::Release(int n) {
  if (refs_.fetch_sub(n, std::memory_order_acq_rel) != n) return;
  OnDone();
  Engine* engine = engine_;
  bool started = started_;
  delete this;
  if (started) engine->CallEnded();
}

}  // namespace chunkd::server::rpc

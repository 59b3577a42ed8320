// A fixed pool of threads for blocking work (backend I/O), with a bounded queue: when the
// queue is full new work is refused instead of piling up in memory.
#ifndef CHUNKD_SERVER_COMMON_EXECUTOR_H_
#define CHUNKD_SERVER_COMMON_EXECUTOR_H_

#include <cstddef>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace chunkd::server {

class Executor {
 public:
  Executor(size_t threads, size_t max_queued);
  // Runs what is queued, then joins the threads.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task`; false (and `task` dropped unrun) when the queue is full or shut down.
  bool TrySchedule(absl::AnyInvocable<void() &&> task);

  size_t threads() const { return threads_.size(); }
  size_t queued() const;

 private:
  void Loop();

  const size_t max_queued_;
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_EXECUTOR_H_

// A point that a test backend's calls pass through: each call is counted as it arrives, and
// waits there while the test holds the gate (to line up concurrent misses, or to let a write
// land while a read is in flight).
#ifndef CHUNKD_TESTS_UNIT_HOLD_GATE_H_
#define CHUNKD_TESTS_UNIT_HOLD_GATE_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace chunkd::testing {

class HoldGate {
 public:
  // Calls that reach the gate from now on wait until Release().
  void Hold() {
    absl::MutexLock lock(&mu_);
    hold_ = true;
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    hold_ = false;
  }
  // Counts the call, then waits while the gate is held.
  void Pass() {
    absl::MutexLock lock(&mu_);
    ++entered_;
    mu_.Await(absl::Condition(
        +[](HoldGate* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) { return !self->hold_; },
        this));
  }
  // Waits until `n` calls in all have reached the gate (a test failure after 20 s).
  void AwaitEntered(int n) {
    absl::MutexLock lock(&mu_);
    auto entered = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return entered_ >= n; };
    ASSERT_TRUE(mu_.AwaitWithTimeout(absl::Condition(&entered), absl::Seconds(20)))
        << "timed out waiting for " << n << " backend calls";
  }

 private:
  absl::Mutex mu_;
  bool hold_ ABSL_GUARDED_BY(mu_) = false;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_UNIT_HOLD_GATE_H_

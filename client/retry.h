// Retries of the client's calls: attempts that fail with UNAVAILABLE are made again with
// exponential backoff and jitter, within the call's deadline and ClientOptions::max_attempts.
// Internal to the client library (client.cc); the policy is documented in client.h.
#ifndef CHUNKD_CLIENT_RETRY_H_
#define CHUNKD_CLIENT_RETRY_H_

#include <algorithm>
#include <functional>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "grpcpp/alarm.h"
#include "proto/wire/handoff.h"

namespace chunkd::client {

// The delays between attempts: exponential with jitter.
class Backoff {
 public:
  explicit Backoff(const ClientOptions& options)
      : next_(options.initial_backoff), max_(options.max_backoff) {}
  // The delay before the next attempt: between half and all of the current step, which then
  // doubles up to max_backoff.
  absl::Duration Next();

 private:
  absl::Duration next_, max_;
};

// Runs `attempt` until it succeeds, fails with a status other than UNAVAILABLE, or the attempts
// or the deadline run out; on the calling thread.
template <typename T, typename Attempt>
absl::StatusOr<T> RetryBlocking(const ClientOptions& options, absl::Time deadline,
                                Attempt attempt) {
  Backoff backoff(options);
  for (int left = std::max(1, options.max_attempts);; --left) {
    absl::StatusOr<T> result = attempt();
    if (result.ok() || !absl::IsUnavailable(result.status()) || left <= 1) return result;
    absl::Duration delay = backoff.Next();
    if (absl::Now() + delay >= deadline) return result;
    absl::SleepFor(delay);
  }
}

// Runs one attempt of a call after another while they fail with UNAVAILABLE, with
// exponential backoff and jitter, until the call's deadline or the attempt limit.
//
// Lifetime: nothing owns a Retrier but the callbacks that will run it next (the attempt's
// completion, or the alarm of the delay before the next attempt), so it and everything its
// attempt holds (a Put's payload) go away as soon as the call has ended. Each delay's alarm
// deletes itself from its own callback: gRPC keeps an alarm's callback, and what it captures,
// until the alarm is destroyed, so an alarm the Retrier kept would keep the Retrier alive
// through its own callback, for ever. (gRPC holds a reference of its own to the alarm's state
// while the callback runs, so destroying the alarm there is safe.)
template <typename T>
class Retrier : public std::enable_shared_from_this<Retrier<T>> {
 public:
  using Attempt = std::function<void(absl::Time deadline, Callback<T> done)>;

  static void Run(const ClientOptions& options, absl::Time deadline, bool retryable,
                  Attempt attempt, Callback<T> done,
                  std::shared_ptr<Cancellation> cancellation = nullptr) {
    auto self = std::shared_ptr<Retrier>(new Retrier());
    self->attempt_ = std::move(attempt);
    self->done_ = std::move(done);
    self->deadline_ = deadline;
    self->attempts_left_ = retryable ? std::max(1, options.max_attempts) : 1;
    self->backoff_ = std::make_unique<Backoff>(options);
    self->cancellation_ = std::move(cancellation);
    self->Next();
  }

 private:
  void Next() {
    auto self = this->shared_from_this();
    if (cancellation_ && cancellation_->cancelled()) {
      done_(absl::CancelledError("cancelled by the caller"));
      return;
    }
    attempt_(deadline_, [self](absl::StatusOr<T> result) {
      if (result.ok() || !absl::IsUnavailable(result.status()) || --self->attempts_left_ <= 0) {
        self->done_(std::move(result));
        return;
      }
      absl::Duration delay = self->backoff_->Next();
      if (absl::Now() + delay >= self->deadline_) {
        self->done_(std::move(result));
        return;
      }
      auto* alarm = new grpc::Alarm();
      wire::Started(alarm);  // the alarm's callback runs on a gRPC thread
      alarm->Set(absl::ToChronoTime(absl::Now() + delay), [self, alarm](bool) mutable {
        wire::Completed(alarm);
        delete alarm;
        // The next attempt holds the Retrier from here on, not this (already spent) callback.
        std::shared_ptr<Retrier> retrier = std::move(self);
        retrier->Next();
      });
    });
  }

  Attempt attempt_;
  Callback<T> done_;
  absl::Time deadline_;
  // Touched by one attempt's completion at a time (attempts run one after another).
  int attempts_left_ = 1;
  std::unique_ptr<Backoff> backoff_;
  std::shared_ptr<Cancellation> cancellation_;
};

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_RETRY_H_

#include "client/retry.h"

#include <random>

namespace chunkd::client {

absl::Duration Backoff::Next() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  absl::Duration delay = next_ * std::uniform_real_distribution<double>(0.5, 1.0)(rng);
  next_ = std::min(next_ * 2, max_);
  return delay;
}

}  // namespace chunkd::client

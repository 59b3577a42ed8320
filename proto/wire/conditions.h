// Conditions on a key's generation, as a request carries them (chunkd.v1 Conditions): one
// definition for the client (which sets them) and the server (whose stores check them), as
// TensorStore's kvstore/generation.h serves every driver. No gRPC, no protobuf: the proto
// conversions are in proto/wire/convert.h.
#ifndef CHUNKD_PROTO_WIRE_CONDITIONS_H_
#define CHUNKD_PROTO_WIRE_CONDITIONS_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace chunkd::wire {

// A value's generation: changes with every write of its key; 0 stands for "no value".
using Generation = uint64_t;

// Preconditions on the generation stored under a key when an operation runs.
struct Conditions {
  std::optional<Generation> if_generation_match;  // 0: only if the key holds no value
  std::optional<Generation> if_generation_not_match;

  bool empty() const { return !if_generation_match && !if_generation_not_match; }
  // OK when `current` (nullopt: the key holds no value) satisfies the conditions, else
  // FAILED_PRECONDITION naming the key and both generations.
  absl::Status Check(absl::string_view key, std::optional<Generation> current) const;
};

// Quotes `key` for an error message: printable ASCII as is, other bytes escaped, long keys cut.
std::string QuoteKey(absl::string_view key);

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_CONDITIONS_H_

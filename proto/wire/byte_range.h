// Byte ranges with the semantics of Zarr's stores: what a Get asks for, one definition for the
// client (which builds them) and the server (which validates and resolves them), as
// TensorStore's kvstore/byte_range.h serves every driver. No gRPC, no protobuf: the proto
// conversions are in proto/wire/convert.h.
#ifndef CHUNKD_PROTO_WIRE_BYTE_RANGE_H_
#define CHUNKD_PROTO_WIRE_BYTE_RANGE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace chunkd::wire {

// What a client asks for; END is exclusive. Values are signed so that a negative request can be
// refused.
struct ByteRange {
  enum class Kind { kAll, kBounded, kOffset, kSuffix };
  Kind kind = Kind::kAll;
  int64_t start = 0;   // kBounded: first byte; kOffset: offset
  int64_t end = 0;     // kBounded: one past the last byte
  int64_t suffix = 0;  // kSuffix: number of bytes at the end

  static ByteRange All() { return {}; }
  static ByteRange Bounded(int64_t start, int64_t end) { return {Kind::kBounded, start, end, 0}; }
  static ByteRange FromOffset(int64_t offset) { return {Kind::kOffset, offset, 0, 0}; }
  static ByteRange Suffix(int64_t n) { return {Kind::kSuffix, 0, 0, n}; }
  // "START-END", "START-" or "-N" (as chunkctl's --range takes them); INVALID_ARGUMENT else.
  static absl::StatusOr<ByteRange> Parse(absl::string_view text);

  // INVALID_ARGUMENT for negative values or end < start.
  absl::Status Validate() const;
  std::string ToString() const;
};

// The bytes a valid range selects from a value of `size` bytes: a range past the end selects
// what exists (possibly nothing), a suffix longer than the value selects all of it.
struct ResolvedRange {
  uint64_t start = 0;
  uint64_t length = 0;
};
// REQUIRES: range.Validate().ok().
ResolvedRange Resolve(const ByteRange& range, uint64_t size);

// The bytes a valid range selects when it must lie within a value of `size` bytes, as
// TensorStore's kvstores require: OUT_OF_RANGE when it starts or ends past the end, or a suffix
// is longer than the value. REQUIRES: range.Validate().ok().
absl::StatusOr<ResolvedRange> ResolveWithin(const ByteRange& range, uint64_t size);

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_BYTE_RANGE_H_

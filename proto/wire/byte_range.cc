#include "proto/wire/byte_range.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace chunkd::wire {

absl::StatusOr<ByteRange> ByteRange::Parse(absl::string_view text) {
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("range '", text, "' is not START-END (END exclusive), START- or -N"));
  };
  size_t dash = text.find('-');
  if (dash == absl::string_view::npos) return bad();
  absl::string_view left = text.substr(0, dash), right = text.substr(dash + 1);
  int64_t a = 0, b = 0;
  if (left.empty()) {
    if (!absl::SimpleAtoi(right, &b) || b < 0) return bad();
    return Suffix(b);
  }
  if (!absl::SimpleAtoi(left, &a) || a < 0) return bad();
  if (right.empty()) return FromOffset(a);
  if (!absl::SimpleAtoi(right, &b) || b < 0) return bad();
  return Bounded(a, b);
}

absl::Status ByteRange::Validate() const {
  switch (kind) {
    case Kind::kAll:
      return absl::OkStatus();
    case Kind::kBounded:
      if (start < 0 || end < 0) {
        return absl::InvalidArgumentError(absl::StrCat("byte range ", ToString(), " is negative"));
      }
      if (end < start) {
        return absl::InvalidArgumentError(
            absl::StrCat("byte range ", ToString(), " ends before it starts"));
      }
      return absl::OkStatus();
    case Kind::kOffset:
      if (start < 0) {
        return absl::InvalidArgumentError(absl::StrCat("byte offset ", start, " is negative"));
      }
      return absl::OkStatus();
    case Kind::kSuffix:
      if (suffix < 0) {
        return absl::InvalidArgumentError(absl::StrCat("suffix length ", suffix, " is negative"));
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unknown byte range kind");
}

std::string ByteRange::ToString() const {
  switch (kind) {
    case Kind::kAll:
      return "all";
    case Kind::kBounded:
      return absl::StrCat("[", start, ", ", end, ")");
    case Kind::kOffset:
      return absl::StrCat("[", start, ", end)");
    case Kind::kSuffix:
      return absl::StrCat("last ", suffix, " bytes");
  }
  return "?";
}

ResolvedRange Resolve(const ByteRange& range, uint64_t size) {
  switch (range.kind) {
    case ByteRange::Kind::kAll:
      return {0, size};
    case ByteRange::Kind::kBounded: {
      uint64_t start = std::min<uint64_t>(range.start, size);
      uint64_t end = std::min<uint64_t>(range.end, size);
      return {start, end - start};
    }
    case ByteRange::Kind::kOffset: {
      uint64_t start = std::min<uint64_t>(range.start, size);
      return {start, size - start};
    }
    case ByteRange::Kind::kSuffix: {
      uint64_t n = std::min<uint64_t>(range.suffix, size);
      return {size - n, n};
    }
  }
  return {0, 0};
}

absl::StatusOr<ResolvedRange> ResolveWithin(const ByteRange& range, uint64_t size) {
  bool within = true;
  switch (range.kind) {
    case ByteRange::Kind::kAll:
      break;
    case ByteRange::Kind::kBounded:
      within = static_cast<uint64_t>(range.end) <= size;
      break;
    case ByteRange::Kind::kOffset:
      within = static_cast<uint64_t>(range.start) <= size;
      break;
    case ByteRange::Kind::kSuffix:
      within = static_cast<uint64_t>(range.suffix) <= size;
      break;
  }
  if (!within) {
    return absl::OutOfRangeError(absl::StrCat(
        "byte range ", range.ToString(), " does not lie within the value of ", size, " bytes"));
  }
  return Resolve(range, size);
}

}  // namespace chunkd::wire

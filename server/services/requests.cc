#include "server/services/requests.h"

namespace chunkd::server {

Conditions ConditionsFromProto(const v1::Conditions& proto) {
  Conditions conditions;
  if (proto.has_if_generation_match()) conditions.if_generation_match = proto.if_generation_match();
  if (proto.has_if_generation_not_match()) {
    conditions.if_generation_not_match = proto.if_generation_not_match();
  }
  return conditions;
}

absl::StatusOr<ByteRange> RangeFromProto(const v1::GetRequest& request) {
  if (!request.has_range()) return ByteRange::All();
  const v1::ByteRange& r = request.range();
  ByteRange range;
  switch (r.kind_case()) {
    case v1::ByteRange::kBounded:
      range = ByteRange::Bounded(r.bounded().start(), r.bounded().end());
      break;
    case v1::ByteRange::kOffset:
      range = ByteRange::FromOffset(r.offset());
      break;
    case v1::ByteRange::kSuffix:
      range = ByteRange::Suffix(r.suffix());
      break;
    case v1::ByteRange::KIND_NOT_SET:
      range = ByteRange::All();
      break;
  }
  if (absl::Status s = range.Validate(); !s.ok()) return s;
  return range;
}

ReadOptions ReadOptionsFor(bool has_max_staleness, uint64_t max_staleness_ms) {
  ReadOptions options;
  if (has_max_staleness) {
    // Bounds beyond ~292 years saturate: any cached copy will do.
    options.validated_since =
        max_staleness_ms > (uint64_t{1} << 62) / 1000000
            ? absl::InfinitePast()
            : absl::Now() - absl::Milliseconds(static_cast<int64_t>(max_staleness_ms));
  }
  return options;
}

}  // namespace chunkd::server

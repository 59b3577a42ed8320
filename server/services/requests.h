// What the services take from chunkd.v1 requests beyond their keys: byte ranges and
// generation conditions, checked. Requests come from any client, so these take any message
// protobuf can parse; they are fuzzed with the key checks (tests/fuzz/get_request_fuzz.cc).
#ifndef CHUNKD_SERVER_SERVICES_REQUESTS_H_
#define CHUNKD_SERVER_SERVICES_REQUESTS_H_

#include "absl/status/statusor.h"
#include "chunkd/v1/chunkd.pb.h"
#include "server/backend/backend.h"
#include "server/common/byte_range.h"
#include "server/store/chunk_store.h"

namespace chunkd::server {

// The range a Get asks for (all of the value when it names none); INVALID_ARGUMENT, with the
// reason, for a negative or inverted one.
absl::StatusOr<ByteRange> RangeFromProto(const v1::GetRequest& request);

Conditions ConditionsFromProto(const v1::Conditions& proto);

// A request's max_staleness_ms as the store's read options: the copy served must have been
// validated at or after the request's arrival minus the bound.
ReadOptions ReadOptionsFor(bool has_max_staleness, uint64_t max_staleness_ms);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_REQUESTS_H_

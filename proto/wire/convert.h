// The wire types (proto/wire/byte_range.h, conditions.h, buffer/host_identity.h) to and from
// their chunkd.v1 messages: the one place both the client (which writes requests) and the
// server (which reads them) convert them.
#ifndef CHUNKD_PROTO_WIRE_CONVERT_H_
#define CHUNKD_PROTO_WIRE_CONVERT_H_

#include "absl/status/statusor.h"
#include "buffer/host_identity.h"
#include "chunkd/v1/chunkd.pb.h"
#include "proto/wire/byte_range.h"
#include "proto/wire/conditions.h"

namespace chunkd::wire {

// Sets request->range (left unset for ByteRange::All()).
void ToProto(const ByteRange& range, v1::GetRequest* request);
// The range a Get asks for (all of the value when it names none); INVALID_ARGUMENT, with the
// reason, for a negative or inverted one. Requests come from any client: this takes any
// message protobuf can parse (fuzzed, tests/fuzz/get_request_fuzz.cc).
absl::StatusOr<ByteRange> RangeFromProto(const v1::GetRequest& request);

void ToProto(const Conditions& conditions, v1::Conditions* out);
Conditions ConditionsFromProto(const v1::Conditions& proto);

// The host identity a client presents with requests that accept handles. The process id is
// the client's to add (ClientIdentity.process_id: not part of the host's identity).
void ToProto(const buffer::HostIdentity& identity, v1::ClientIdentity* out);
buffer::HostIdentity IdentityFromProto(const v1::ClientIdentity& proto);

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_CONVERT_H_

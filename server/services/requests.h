// What the services take from chunkd.v1 requests beyond their keys: byte ranges, generation
// conditions and the client's host identity, checked. The conversions are the wire's
// (proto/wire/convert.h), shared with the client, which writes them.
#ifndef CHUNKD_SERVER_SERVICES_REQUESTS_H_
#define CHUNKD_SERVER_SERVICES_REQUESTS_H_

#include "proto/wire/convert.h"
#include "server/backend/backend.h"
#include "server/common/byte_range.h"
#include "server/store/chunk_store.h"

namespace chunkd::server {

using wire::ConditionsFromProto;
using wire::IdentityFromProto;
using wire::RangeFromProto;

// A request's max_staleness_ms as the store's read options: the copy served must have been
// validated at or after the request's arrival minus the bound.
ReadOptions ReadOptionsFor(bool has_max_staleness, uint64_t max_staleness_ms);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_REQUESTS_H_

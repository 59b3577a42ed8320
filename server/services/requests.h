// What the services take from chunkd.v1 requests beyond their keys: byte ranges, generation
// conditions and the client's host identity, checked. The conversions are the wire's
// (proto/wire/convert.h), shared with the client, which writes them.
#ifndef CHUNKD_SERVER_SERVICES_REQUESTS_H_
#define CHUNKD_SERVER_SERVICES_REQUESTS_H_

#include "proto/wire/convert.h"
#include "server/backend/backend.h"
#include "server/common/byte_range.h"

namespace chunkd::server {

using wire::ConditionsFromProto;
using wire::IdentityFromProto;
using wire::RangeFromProto;

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_REQUESTS_H_

// The server's names for the byte ranges of the wire (proto/wire/byte_range.h, the one
// definition the client shares).
#ifndef CHUNKD_SERVER_COMMON_BYTE_RANGE_H_
#define CHUNKD_SERVER_COMMON_BYTE_RANGE_H_

#include "proto/wire/byte_range.h"

namespace chunkd::server {

using wire::ByteRange;
using wire::Resolve;
using wire::ResolvedRange;
using wire::ResolveWithin;

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_BYTE_RANGE_H_

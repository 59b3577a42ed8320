// Validation of store keys.
//
// Keys are '/'-separated UTF-8 strings as in Zarr ("arr/c/0/1", "arr/zarr.json"). The rules
// below make every valid key a safe relative path for the file backend, and give a client one
// clear reason when its key is refused.
#ifndef CHUNKD_SERVER_COMMON_KEY_H_
#define CHUNKD_SERVER_COMMON_KEY_H_

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/wire/conditions.h"

namespace chunkd::server {

inline constexpr size_t kMaxKeyBytes = 1024;

// OK, or INVALID_ARGUMENT naming the problem: empty key, leading '/', empty segment ("a//b",
// trailing '/'), "." or ".." segment, NUL or another control character, invalid UTF-8, longer
// than kMaxKeyBytes.
absl::Status ValidateKey(absl::string_view key);

// Prefixes for List: empty, or a string a key may start with (a trailing '/' allowed).
absl::Status ValidatePrefix(absl::string_view prefix);

// Keys in [inclusive_min, exclusive_max) (an empty exclusive_max: no upper bound), as
// TensorStore's kvstores name a listing or a deletion: the longest prefix every key of the
// range starts with that ValidatePrefix accepts (the bounds' common prefix, cut to whole UTF-8
// characters), to list and then filter by InKeyRange. INVALID_ARGUMENT, from ValidatePrefix,
// when that prefix can start no valid key ("/x", a control character).
absl::StatusOr<std::string> PrefixOfKeyRange(absl::string_view inclusive_min,
                                             absl::string_view exclusive_max);
inline bool InKeyRange(absl::string_view key, absl::string_view inclusive_min,
                       absl::string_view exclusive_max) {
  return key >= inclusive_min && (exclusive_max.empty() || key < exclusive_max);
}

// How an error message names a key (proto/wire/conditions.h: the client's messages too).
using wire::QuoteKey;

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_KEY_H_

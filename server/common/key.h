// Validation of store keys.
//
// Keys are '/'-separated UTF-8 strings as in Zarr ("arr/c/0/1", "arr/zarr.json"). The rules
// below make every valid key a safe relative path for the file backend, and give a client one
// clear reason when its key is refused.
#ifndef CHUNKD_SERVER_COMMON_KEY_H_
#define CHUNKD_SERVER_COMMON_KEY_H_

#include <cstddef>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"

namespace chunkd::server {

inline constexpr size_t kMaxKeyBytes = 1024;

// OK, or INVALID_ARGUMENT naming the problem: empty key, leading '/', empty segment ("a//b",
// trailing '/'), "." or ".." segment, NUL or another control character, invalid UTF-8, longer
// than kMaxKeyBytes.
absl::Status ValidateKey(absl::string_view key);

// Prefixes for List: empty, or a string a key may start with (a trailing '/' allowed).
absl::Status ValidatePrefix(absl::string_view prefix);

// Quotes `key` for an error message: printable ASCII as is, other bytes escaped, long keys cut.
std::string QuoteKey(absl::string_view key);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_KEY_H_

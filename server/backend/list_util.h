// Helpers shared by the backends' listings.
#ifndef CHUNKD_SERVER_BACKEND_LIST_UTIL_H_
#define CHUNKD_SERVER_BACKEND_LIST_UTIL_H_

#include <string>
#include <string_view>

namespace chunkd::server {

// The smallest string greater than every string that starts with `prefix` ("a/" -> "a0").
// REQUIRES: prefix ends with '/'.
inline std::string NextPrefixAfter(absl::string_view prefix) {
  std::string next(prefix);
  next.back() = static_cast<char>(next.back() + 1);
  return next;
}

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_LIST_UTIL_H_

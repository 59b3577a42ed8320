// nginx's JSON directory index (autoindex on; autoindex_format json;), which the http(s)://
// backend lists directories with: an array of flat objects whose values are strings, numbers,
// booleans or null. The text comes from the network; the parser is fuzzed
// (tests/fuzz/nginx_index_fuzz.cc).
#ifndef CHUNKD_SERVER_BACKEND_HTTP_NGINX_INDEX_H_
#define CHUNKD_SERVER_BACKEND_HTTP_NGINX_INDEX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace chunkd::server {

struct NginxIndexEntry {
  std::string name;  // unescaped; not checked to be a valid key
  std::string type;  // "file", "directory", ...
  uint64_t size = 0;
};

// Appends the entries of `text` to `entries`; false when `text` is not such an index (what was
// appended is then meaningless).
bool ParseNginxIndex(absl::string_view text, std::vector<NginxIndexEntry>* entries);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_HTTP_NGINX_INDEX_H_

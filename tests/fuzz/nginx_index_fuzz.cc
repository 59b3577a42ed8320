// nginx's JSON directory index (server/backend/http/nginx_index.h), as an http(s):// store's
// server sends it.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/backend/http/nginx_index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<chunkd::server::NginxIndexEntry> entries;
  (void)chunkd::server::ParseNginxIndex(text, &entries);
  return 0;
}

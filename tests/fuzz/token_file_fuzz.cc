// Token files (--auth_tokens, --metrics_token_file) and bearer headers (server/rpc/auth.h).
// A table that parses finds each of its tokens with the rights its line gave.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "server/rpc/auth.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto table = chunkd::server::TokenTable::Parse(text, "fuzz");
  if (table.ok() && table->size() == 0) std::abort();  // an empty table is refused
  auto single = chunkd::server::TokenTable::ParseSingle(text, "fuzz");
  if (single.ok()) {
    // The file's token, blanks around it ignored, is the one token the table knows.
    std::string token(text);
    size_t first = token.find_first_not_of(" \t\r\n\v\f");
    size_t last = token.find_last_not_of(" \t\r\n\v\f");
    if (first == std::string::npos || !single->Find(token.substr(first, last - first + 1))) {
      std::abort();
    }
  }
  auto bearer = chunkd::server::BearerTokenOf(text);
  if (table.ok() && bearer.ok()) (void)table->Find(*bearer);
  return 0;
}

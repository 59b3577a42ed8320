// Key and prefix validation (server/common/key.h): every key a client sends goes through
// ValidateKey before it names a file in the store, so a key that passes must be a safe relative
// path, whatever the bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/str_split.h"
#include "server/common/key.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string key(reinterpret_cast<const char*>(data), size);
  bool valid = chunkd::server::ValidateKey(key).ok();
  if (valid) {
    // What the file store relies on.
    if (key.empty() || key.size() > chunkd::server::kMaxKeyBytes || key.front() == '/')
      std::abort();
    for (absl::string_view segment : absl::StrSplit(key, '/')) {
      if (segment.empty() || segment == "." || segment == "..") std::abort();
    }
    for (unsigned char c : key) {
      if (c < 0x20 || c == 0x7f) std::abort();
    }
    // A valid key is a valid prefix, and so is the key of a "directory".
    if (!chunkd::server::ValidatePrefix(key).ok()) std::abort();
    if (key.size() < chunkd::server::kMaxKeyBytes &&
        !chunkd::server::ValidatePrefix(key + "/").ok()) {
      std::abort();
    }
  }
  (void)chunkd::server::ValidatePrefix(key);
  std::string quoted = chunkd::server::QuoteKey(key);
  for (unsigned char c : quoted) {
    if (c < 0x20 || c >= 0x7f) std::abort();  // quoted keys are printable ASCII
  }
  return 0;
}

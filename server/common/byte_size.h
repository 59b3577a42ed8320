// A byte count flag type that reads "1GiB", "512MiB", "64k", "1e9" or a plain number.
#ifndef CHUNKD_SERVER_COMMON_BYTE_SIZE_H_
#define CHUNKD_SERVER_COMMON_BYTE_SIZE_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace chunkd::server {

struct ByteSize {
  uint64_t bytes = 0;
};

// Binary units (KiB, MiB, GiB, TiB, and the short K, M, G, T) are powers of 1024; decimal ones
// (kB, MB, GB, TB) powers of 1000; a plain number is bytes.
bool AbslParseFlag(absl::string_view text, ByteSize* out, std::string* error);
std::string AbslUnparseFlag(ByteSize size);

// "1.5 GiB", for messages.
std::string FormatBytes(uint64_t bytes);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_BYTE_SIZE_H_

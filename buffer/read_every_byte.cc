#include "buffer/read_every_byte.h"

#include <cstring>

namespace chunkd::buffer {

uint64_t ReadEveryByte(std::string_view value) {
  uint64_t lane[4] = {0, 0, 0, 0};
  const char* p = value.data();
  size_t n = value.size(), i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    std::memcpy(w, p + i, 32);
    for (int k = 0; k < 4; ++k) lane[k] += w[k];
  }
  for (; i < n; ++i) lane[0] += static_cast<unsigned char>(p[i]);
  return lane[0] + lane[1] + lane[2] + lane[3];
}

}  // namespace chunkd::buffer

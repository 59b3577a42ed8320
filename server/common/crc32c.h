// CRC-32C (Castagnoli), the checksum of the disk tier's records. Debian has no libcrc32c-dev;
// this is small: the SSE4.2 crc32 instruction when the CPU has it (checked once at run time),
// else a byte table.
#ifndef CHUNKD_SERVER_COMMON_CRC32C_H_
#define CHUNKD_SERVER_COMMON_CRC32C_H_

#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"

namespace chunkd::server {

// The CRC-32C of `data` continued from `crc` (the value of an earlier call over the bytes
// before it; 0 to start). Crc32c("123456789") == 0xE3069283.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t size);
inline uint32_t Crc32c(absl::string_view data) { return Crc32cExtend(0, data.data(), data.size()); }
// Whether the hardware instruction is used (the table otherwise).
bool Crc32cHardware();

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_CRC32C_H_

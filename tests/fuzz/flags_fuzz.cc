// The flags that take more than a number: sizes (--host_cache_bytes=64MiB), durations
// (--lease_ttl=1s; Abseil's parser), --cuda_device, --unix_socket_mode, --eviction. A size that
// parses prints back to text that parses to the same size.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/flags/marshalling.h"
#include "absl/time/time.h"
#include "server/common/byte_size.h"
#include "server/rpc/security.h"
#include "server/store/device_tier.h"
#include "server/store/host_cache.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::string error;
  chunkd::server::ByteSize bytes;
  if (chunkd::server::AbslParseFlag(text, &bytes, &error)) {
    chunkd::server::ByteSize again;
    std::string printed = chunkd::server::AbslUnparseFlag(bytes);
    if (!chunkd::server::AbslParseFlag(printed, &again, &error) || again.bytes != bytes.bytes) {
      std::abort();
    }
    (void)chunkd::server::FormatBytes(bytes.bytes);
  }
  absl::Duration duration;
  (void)absl::AbslParseFlag(text, &duration, &error);
  (void)chunkd::server::ParseCudaDevices(text);
  (void)chunkd::server::ParseSocketMode(text);
  (void)chunkd::server::ParseEvictionPolicy(text);
  return 0;
}

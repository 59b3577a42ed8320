#include "server/common/log.h"

#include <cstdio>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace chunkd::server {

void LogLine(absl::string_view message) {
  std::string line = absl::StrFormat(
      "chunkd: %s %s\n", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
      message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace chunkd::server

// One line per event on stderr: "chunkd: 2026-11-25T15:42:00Z message".
#ifndef CHUNKD_SERVER_COMMON_LOG_H_
#define CHUNKD_SERVER_COMMON_LOG_H_

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace chunkd::server {

void LogLine(absl::string_view message);

template <typename... Args>
void Log(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(absl::StrFormat(format, args...));
}

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_COMMON_LOG_H_

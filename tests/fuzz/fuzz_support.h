// What several fuzz targets share.
#ifndef CHUNKD_TESTS_FUZZ_FUZZ_SUPPORT_H_
#define CHUNKD_TESTS_FUZZ_FUZZ_SUPPORT_H_

#include <string>

#include "google/protobuf/stubs/logging.h"

namespace chunkd::fuzz {

// protobuf logs every string field that is not UTF-8, and a fuzzer makes many: call from
// LLVMFuzzerInitialize.
inline void SilenceProtobufLogs() {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
}

}  // namespace chunkd::fuzz

#endif  // CHUNKD_TESTS_FUZZ_FUZZ_SUPPORT_H_

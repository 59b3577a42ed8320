// S3's XML answers (server/backend/s3/s3_xml.h): listings, error bodies, multipart UploadIds,
// from whatever answers at the store's endpoint. The first byte picks the store's prefix.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/match.h"
#include "server/backend/s3/s3_xml.h"
#include "server/common/key.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const char* const kRoots[] = {"", "era5.zarr/", "a/b/"};
  std::string root = kRoots[data[0] % 3];
  std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  auto page = chunkd::server::ParseS3ListPage(body, root, "list s3://fuzz/");
  if (page.ok()) {
    // Whatever the answer, what reaches clients are valid keys and prefixes.
    for (const auto& entry : page->entries) {
      if (!chunkd::server::ValidateKey(entry.key).ok()) std::abort();
    }
    for (const std::string& prefix : page->prefixes) {
      if (!absl::EndsWith(prefix, "/") || !chunkd::server::ValidatePrefix(prefix).ok()) {
        std::abort();
      }
    }
    if (page->truncated && page->next_token.empty()) std::abort();
  }
  (void)chunkd::server::S3ErrorDetail(body);
  (void)chunkd::server::S3UploadId(body);
  return 0;
}

#include "server/backend/backend.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/backend/file/file_backend.h"
#include "server/backend/memory/memory_backend.h"
#include "server/key.h"

namespace chunkd::server {

absl::Status Conditions::Check(absl::string_view key, std::optional<Generation> current) const {
  Generation have = current.value_or(0);
  if (if_generation_match && *if_generation_match != have) {
    return absl::FailedPreconditionError(absl::StrCat(
        "key ", QuoteKey(key), ": generation is ", have, ", condition wants ",
        *if_generation_match, have == 0 ? " (the key holds no value)" : ""));
  }
  if (if_generation_not_match && *if_generation_not_match == have) {
    return absl::FailedPreconditionError(absl::StrCat(
        "key ", QuoteKey(key), ": generation is ", have, ", condition wants any other"));
  }
  return absl::OkStatus();
}

absl::Status KeyNotFoundError(absl::string_view key) {
  return absl::NotFoundError(absl::StrCat("key ", QuoteKey(key), " not found"));
}

absl::StatusOr<std::unique_ptr<Backend>> OpenBackend(absl::string_view url,
                                                     const BackendOptions& options) {
  if (url.empty()) return absl::InvalidArgumentError("store URL is empty");
  if (url == "memory://" || url == "memory:") return NewMemoryBackend(options);
  if (absl::StartsWith(url, "memory://")) {
    return absl::InvalidArgumentError(
        absl::StrCat("store ", url, ": memory:// takes no path"));
  }
  if (absl::StartsWith(url, "file://")) return OpenFileBackend(url.substr(7), options);
  size_t scheme = url.find("://");
  if (scheme != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("store ", url, ": unknown scheme '", url.substr(0, scheme),
                     "' (supported: file://, memory://, or a directory path)"));
  }
  return OpenFileBackend(url, options);
}

}  // namespace chunkd::server

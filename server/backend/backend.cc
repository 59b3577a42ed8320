#include "server/backend/backend.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/backend/file/file_backend.h"
#include "server/backend/http/http_backend.h"
#include "server/backend/memory/memory_backend.h"
#include "server/backend/s3/s3_backend.h"
#include "server/common/key.h"

namespace chunkd::server {

absl::StatusOr<buffer::cpu::Buffer> Backend::ReadRange(absl::string_view key, uint64_t offset,
                                                       uint64_t length, ValueInfo* info) {
  ValueInfo whole;
  auto value = Read(key, &whole);
  if (!value.ok()) return value.status();
  if (info) *info = whole;
  uint64_t size = value->size();
  if (offset >= size) return buffer::cpu::Buffer();
  return value->Slice(offset, std::min(length, size - offset));
}

absl::StatusOr<buffer::cpu::Buffer> Backend::ReadSuffix(absl::string_view key, uint64_t length,
                                                        ValueInfo* info) {
  // Stat, then the range it implies: a value replaced in between shows as another generation
  // in ReadRange's info (its bytes are then of the new version, at the old size's offset).
  for (int attempt = 1;; ++attempt) {
    auto stat = Stat(key);
    if (!stat.ok()) return stat.status();
    uint64_t take = std::min(length, stat->size);
    ValueInfo read_info;
    auto value = ReadRange(key, stat->size - take, take, &read_info);
    if (!value.ok()) return value.status();
    if (read_info.generation == stat->generation) {
      if (info) *info = std::move(read_info);
      return value;
    }
    if (attempt >= 2) return VersionChangedError(key, stat->generation);
  }
}

absl::StatusOr<buffer::cpu::Buffer> Backend::ReadRangeIfMatch(absl::string_view key,
                                                              uint64_t offset, uint64_t length,
                                                              const ValueInfo& expected,
                                                              ValueInfo* info) {
  ValueInfo read_info;
  auto value = ReadRange(key, offset, length, &read_info);
  if (!value.ok()) return value.status();
  if (read_info.generation != expected.generation) {
    return VersionChangedError(key, expected.generation);
  }
  if (info) *info = std::move(read_info);
  return value;
}

absl::StatusOr<bool> Backend::IsCurrent(absl::string_view key, const ValueInfo& cached) {
  auto now = Stat(key);
  if (absl::IsNotFound(now.status())) return false;
  if (!now.ok()) return now.status();
  return now->generation == cached.generation;
}

absl::StatusOr<std::optional<buffer::cpu::Buffer>> Backend::ReadIfChanged(absl::string_view key,
                                                                          const ValueInfo& cached,
                                                                          ValueInfo* info) {
  auto current = IsCurrent(key, cached);
  if (!current.ok()) return current.status();
  if (*current) return std::nullopt;
  auto value = Read(key, info);
  if (!value.ok()) return value.status();
  return std::optional<buffer::cpu::Buffer>(*std::move(value));
}

absl::Status KeyNotFoundError(absl::string_view key) {
  return absl::NotFoundError(absl::StrCat("key ", QuoteKey(key), " not found"));
}

absl::Status VersionChangedError(absl::string_view key, Generation expected) {
  return absl::AbortedError(absl::StrCat("key ", QuoteKey(key),
                                         " changed while being read by range (expected generation ",
                                         expected, ")"));
}

absl::StatusOr<std::unique_ptr<Backend>> OpenBackend(absl::string_view url,
                                                     const BackendOptions& options) {
  if (url.empty()) return absl::InvalidArgumentError("store URL is empty");
  if (url == "memory://" || url == "memory:") return NewMemoryBackend(options);
  if (absl::StartsWith(url, "memory://")) {
    return absl::InvalidArgumentError(absl::StrCat("store ", url, ": memory:// takes no path"));
  }
  if (absl::StartsWith(url, "file://")) return OpenFileBackend(url.substr(7), options);
  if (absl::StartsWith(url, "http://") || absl::StartsWith(url, "https://")) {
    return OpenHttpBackend(url, options);
  }
  if (absl::StartsWith(url, "s3://")) return OpenS3Backend(url, options);
  size_t scheme = url.find("://");
  if (scheme != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "store ", url, ": unknown scheme '", url.substr(0, scheme),
        "' (supported: file://, memory://, http://, https://, s3://, or a directory path)"));
  }
  return OpenFileBackend(url, options);
}

}  // namespace chunkd::server

// file:// — a directory in Zarr's layout (v2 or v3); keys are relative paths under it.
//
// Writes are atomic: a temporary file in the key's directory (named with the pid, a counter
// and 64 random bits of the store, so that writers of the same pid on one volume never
// collide), fsync, rename, fsync of the directory; directories created for a key are synced
// into their parents. A failed sync fails the write. Cached copies are validated with a stat
// of the path (Validation::kLocal: device, inode, size, mtime in ns). No key can reach outside the
// root: keys never hold "." or ".." segments (see server/common/key.h), and every file or directory
// opened is checked to resolve beneath the root, so a symbolic link inside the store that points
// out of it is refused (PERMISSION_DENIED). Links that stay inside the root are followed when
// reading. Listings do not descend into linked directories.
#ifndef CHUNKD_SERVER_BACKEND_FILE_FILE_BACKEND_H_
#define CHUNKD_SERVER_BACKEND_FILE_FILE_BACKEND_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/backend/backend.h"

namespace chunkd::server {

// Prefix of the temporary files a write makes beside its target; listings skip them and keys
// whose last segment starts with it are refused.
inline constexpr absl::string_view kFileBackendTempPrefix = ".chunkd-tmp-";

// Opens the directory at `path` (which must exist and be a directory).
absl::StatusOr<std::unique_ptr<Backend>> OpenFileBackend(absl::string_view path,
                                                         const BackendOptions& options);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_FILE_FILE_BACKEND_H_

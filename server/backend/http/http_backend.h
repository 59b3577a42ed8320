// http:// and https:// — a read-only store served by any HTTP server (nginx, a CDN, a bucket's
// public website endpoint), read over libcurl.
//
//   chunkd --store=https://data.example.org/era5.zarr
//
// A key "arr/c/0/1" is fetched from URL "<store URL>/arr/c/0/1" (each byte outside
// [A-Za-z0-9-._~/] percent-encoded).
//
// - Read: GET (ReadRange: GET with a Range header; ReadSuffix: with `Range: bytes=-N`;
//   ReadRangeIfMatch: with Range and If-Match: the expected ETag, a 412 answer ABORTED); the
//   value lands straight in memory from BackendOptions::allocator. A body shorter than its
//   Content-Length is UNAVAILABLE ("truncated"), never returned as a value.
// - Stat: HEAD. Size from Content-Length; generation from the ETag (else Last-Modified and
//   the size), hashed to a nonzero 64-bit number. Servers whose validators have a coarse clock
//   (nginx: modification second and size) may give a replaced value the same generation.
// - Errors: 404 and a directory (a URL that redirects to one ending in '/') NOT_FOUND;
//   401/403 PERMISSION_DENIED; 5xx, 429, connection refused, timeouts, stalls and truncated
//   bodies are retried with backoff (HttpBackendOptions), then UNAVAILABLE.
// - Write and Delete: PERMISSION_DENIED ("read-only backend"), as on a --read_only server.
// - List: parses nginx's JSON directory index (`autoindex on; autoindex_format json;`), walking
//   directories for recursive listings. nginx hides names that start with '.', so .zarray and
//   friends are not listed (they are still read). A server without such an index: UNIMPLEMENTED
//   (Zarr over HTTP reads consolidated metadata and needs no listing).
// Connections are reused (a pool of libcurl handles).
#ifndef CHUNKD_SERVER_BACKEND_HTTP_HTTP_BACKEND_H_
#define CHUNKD_SERVER_BACKEND_HTTP_HTTP_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/backend/backend.h"

namespace chunkd::server {

// Opens the store at `url` (http://HOST[:PORT][/PATH] or https://...). Nothing is fetched
// yet: a server that is down shows as UNAVAILABLE on the first request.
absl::StatusOr<std::unique_ptr<Backend>> OpenHttpBackend(absl::string_view url,
                                                         const BackendOptions& options);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_HTTP_HTTP_BACKEND_H_

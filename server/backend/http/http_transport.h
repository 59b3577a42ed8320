// HTTP requests over libcurl for the remote backends (http/, s3/): a pool of reusable
// connections, timeouts, retries with backoff, bodies received straight into chunk buffers,
// the mapping of HTTP outcomes to absl::Status, and the reads by range both backends share
// (RangedHttpBackend).
#ifndef CHUNKD_SERVER_BACKEND_HTTP_HTTP_TRANSPORT_H_
#define CHUNKD_SERVER_BACKEND_HTTP_HTTP_TRANSPORT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "buffer/cpu/buffer.h"
#include "buffer/memory.h"
#include "server/backend/backend.h"

namespace chunkd::server::http {

struct HttpRequest {
  std::string method = "GET";  // GET, HEAD, PUT, POST, DELETE
  std::string url;
  std::vector<std::string> headers;  // "Name: value"
  // The request body (PUT, POST); it must outlive the call.
  std::string_view body;
  // May the request be sent again after an attempt whose outcome is unknown (a timeout, a
  // connection lost mid-request)? Requests that are not are retried only when the server
  // certainly did not act: the connection was refused, or it answered 5xx/429.
  bool idempotent = true;
  // Where a 2xx response body goes: a buffer from this allocator when set (and the length is
  // announced), else HttpResponse::text.
  buffer::HostAllocator* allocator = nullptr;
  // AWS Signature V4 ("aws:amz:REGION:s3") and the access key and secret to sign with.
  std::string aws_sigv4;
  std::string aws_access_key;
  std::string aws_secret_key;
};

struct HttpResponse {
  long status = 0;
  std::string effective_url;                                 // after redirects
  std::vector<std::pair<std::string, std::string>> headers;  // names lowercased
  buffer::cpu::Buffer body;  // 2xx bodies, with HttpRequest::allocator
  std::string text;          // other bodies
  int attempts = 0;

  // The last value of header `name` (lowercase).
  std::optional<std::string> Header(absl::string_view name) const;
  // The body as text, whichever of the two holds it.
  absl::string_view BodyText() const;
};

// Makes requests; thread-safe. Idle connections are kept for reuse (up to
// HttpBackendOptions::max_idle_connections).
class HttpTransport {
 public:
  explicit HttpTransport(const HttpBackendOptions& options);
  ~HttpTransport();
  HttpTransport(const HttpTransport&) = delete;
  HttpTransport& operator=(const HttpTransport&) = delete;

  // Performs `request`, retrying as HttpBackendOptions says. Returns the response whatever its
  // status (the caller maps 4xx/5xx, see StatusForHttpError); UNAVAILABLE when no complete
  // response came (connection refused, timeout, stall, truncated body) after all attempts.
  // `what` names the operation and key for messages ("GET key \"a/b\"").
  absl::StatusOr<HttpResponse> Perform(const HttpRequest& request, absl::string_view what);

  const HttpBackendOptions& options() const { return options_; }

 private:
  struct Handle;
  absl::StatusOr<HttpResponse> PerformOnce(const HttpRequest& request, bool* retryable);
  void* Acquire();
  void Release(void* handle);

  const HttpBackendOptions options_;
  absl::Mutex mu_;
  std::vector<void*> idle_ ABSL_GUARDED_BY(mu_);
};

// The status of a non-2xx response to `what`: 404 NOT_FOUND, 401/403 PERMISSION_DENIED,
// 412 FAILED_PRECONDITION, 5xx/429 UNAVAILABLE, others INTERNAL. The message names `what`,
// the status and `detail` (e.g. S3's error code).
absl::Status StatusForHttpError(long status, absl::string_view what, absl::string_view detail);

// Percent-encodes `path` for a URL: bytes outside [A-Za-z0-9-._~/] become %XX (uppercase hex,
// as AWS Signature V4 wants); with `keep_slash` false, '/' is encoded too.
std::string PercentEncode(absl::string_view path, bool keep_slash = true);

// A stable, nonzero 64-bit generation from a validator string (an ETag, a date): the same on
// every run and every machine.
Generation HashToGeneration(absl::string_view text);

// Parses "bytes START-END/TOTAL" (or "bytes */TOTAL"); the TOTAL, or nullopt.
std::optional<uint64_t> TotalFromContentRange(absl::string_view content_range);

// The backends over HTTP (http, s3): a transport, and the reads by range, each one GET with a
// Range header. ReadRange: `Range: bytes=A-B` (ends past 2^62 read to the end); ReadSuffix:
// `Range: bytes=-N`; ReadRangeIfMatch: Range and `If-Match: <expected etag>` when that is a
// strong etag (a 412 answer is ABORTED; a HEAD after it tells a removed value, NOT_FOUND),
// and the answer's generation must be the expected one. A 206 answer's total size comes from
// Content-Range; a 200 answer (a server that ignores Range) is the whole value, cut here.
// Where the answer has no bytes to give (an empty range asks for none: no GET; a 416 answer:
// the range starts at or past the end, or the value is empty) the size and generation come
// from Stat; should they contradict the 416 (the value was replaced in between) the GET is
// sent once more, then ABORTED. `info` gets the whole value's size, generation and etag.
// Subclasses say how a GET of a key is made and judged.
class RangedHttpBackend : public Backend {
 public:
  // GET, the value whole.
  absl::StatusOr<buffer::cpu::Buffer> Read(absl::string_view key, ValueInfo* info) override;
  // A GET with If-None-Match: the cached ETag. 304: unchanged, no bytes; 200: the new value. A
  // copy without an ETag (a server that sends none) is checked with Stat (HEAD: Last-Modified
  // and size), then read with GET when it changed.
  absl::StatusOr<std::optional<buffer::cpu::Buffer>> ReadIfChanged(absl::string_view key,
                                                                   const ValueInfo& cached,
                                                                   ValueInfo* info) override;
  absl::StatusOr<buffer::cpu::Buffer> ReadRange(absl::string_view key, uint64_t offset,
                                                uint64_t length, ValueInfo* info) override;
  absl::StatusOr<buffer::cpu::Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                                 ValueInfo* info) override;
  absl::StatusOr<buffer::cpu::Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset,
                                                       uint64_t length, const ValueInfo& expected,
                                                       ValueInfo* info) override;

 protected:
  explicit RangedHttpBackend(const HttpBackendOptions& options) : transport_(options) {}

  // A GET of `key`, signed as the store wants, with the body allocator set.
  virtual HttpRequest NewGet(absl::string_view key) const = 0;
  // OK when the answer to `method` ("GET", "HEAD", ...) of `key` is to be used (2xx), else
  // its error.
  virtual absl::Status CheckResponse(const HttpResponse& r, absl::string_view key,
                                     absl::string_view method) const = 0;
  // The generation of the value of `size` bytes that an answer describes (a ranged answer's
  // Content-Length is the part's, so the size comes from the caller).
  virtual Generation GenerationOf(const HttpResponse& r, uint64_t size) const = 0;

  // "GET key 'k'": what a request is, in its errors.
  static std::string What(absl::string_view method, absl::string_view key);

  HttpTransport transport_;

 private:
  // The value an answer to a whole GET carries (200), with `info` filled.
  absl::StatusOr<buffer::cpu::Buffer> WholeValue(HttpResponse& r, absl::string_view key,
                                                 ValueInfo* info) const;
  // What one GET asks for.
  struct ByteRange {
    // Bytes [offset, offset + length); with `suffix`, the last `length` bytes.
    uint64_t offset = 0;
    uint64_t length = 0;
    bool suffix = false;
    // ReadRangeIfMatch: only of this version.
    const ValueInfo* expected = nullptr;
  };
  absl::StatusOr<buffer::cpu::Buffer> RangedGet(absl::string_view key, const ByteRange& range,
                                                ValueInfo* info);
  static std::string RangeHeader(const ByteRange& range);
  // The part of a whole value of `size` bytes that `range` asks for: {start, length}.
  static std::pair<uint64_t, uint64_t> PartOf(const ByteRange& range, uint64_t size);
};

}  // namespace chunkd::server::http

#endif  // CHUNKD_SERVER_BACKEND_HTTP_HTTP_TRANSPORT_H_

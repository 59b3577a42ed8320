// The one interface every store backend implements (file, memory, ...).
//
// A backend is the store of record: the host cache sits in front of it. Each backend lives in
// a folder of its own and registers a URL scheme with OpenBackend(). Every backend passes the
// same conformance suite (tests/unit/backend_conformance.h).
//
// Errors carry the key they concern. NOT_FOUND: no value under the key. FAILED_PRECONDITION:
// a generation condition failed. RESOURCE_EXHAUSTED: no room (memory backend). ABORTED: the
// value changed while being read (retrying reads the new version).
#ifndef CHUNKD_SERVER_BACKEND_BACKEND_H_
#define CHUNKD_SERVER_BACKEND_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "buffer/memory.h"
#include "proto/wire/conditions.h"

namespace chunkd::server {

// Identifies one stored version of a value. Never 0 for a stored value: 0 stands for "no value"
// in conditions (proto/wire/conditions.h).
using wire::Generation;

struct ValueInfo {
  ValueInfo() = default;
  // Not an aggregate, so that {size, generation} (no validator) says all it means.
  ValueInfo(uint64_t size, Generation generation, std::string etag = {})
      : size(size), generation(generation), etag(std::move(etag)) {}

  uint64_t size = 0;
  Generation generation = 0;
  // The store's validator of this version for conditional reads (an HTTP ETag, quoted as the
  // server sent it); empty when the backend has none.
  std::string etag;
};

// How a backend tells whether a cached copy is still the stored version.
enum class Validation {
  // The backend is the cache (memory://): nothing to validate.
  kNone,
  // A metadata lookup on this host (the file store's stat): cheap enough for the caller's
  // thread, see Backend::IsCurrent.
  kLocal,
  // A request to a remote store (a conditional GET): on an I/O thread, one per key at a time,
  // see Backend::ReadIfChanged.
  kRemote,
};

// Preconditions on the generation stored under a key (proto/wire/conditions.h: the one
// definition the client shares).
using wire::Conditions;

struct ListEntry {
  std::string key;
  uint64_t size = 0;
};

struct ListPage {
  std::vector<ListEntry> entries;
  std::vector<std::string> prefixes;  // directory listings only, each ending in '/'
};

// Walks a listing page by page, so that a listing of millions of keys is never held at once.
class ListCursor {
 public:
  virtual ~ListCursor() = default;
  // Appends up to about `max_items` entries and prefixes to `page`, in lexicographic order
  // continuing from the previous page. Returns false once the listing is exhausted (the
  // page may still hold its last items).
  virtual absl::StatusOr<bool> Next(size_t max_items, ListPage* page) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Short name of the kind: "file", "memory".
  virtual absl::string_view kind() const = 0;
  // Where the data lives, for ServerInfo and logs ("file:///data", "memory://").
  virtual std::string location() const = 0;
  // True when the backend keeps its values in memory itself: the server then serves them
  // straight from the backend and keeps no second copy in the cache.
  virtual bool holds_values_in_memory() const { return false; }
  // Bytes of memory the backend holds for values, and its budget (0 when not applicable).
  virtual uint64_t memory_used_bytes() const { return 0; }
  virtual uint64_t memory_capacity_bytes() const { return 0; }
  virtual uint64_t entry_count() const { return 0; }

  // The whole value under `key`. REQUIRES: ValidateKey(key).ok(). Thread-safe.
  virtual absl::StatusOr<buffer::cpu::Buffer> Read(absl::string_view key, ValueInfo* info) = 0;

  // Bytes [offset, offset + length) of the value under `key`: fewer where the value ends
  // first, none when `offset` is at or past its end (kToEnd: up to the end). `info` gets the
  // size, generation and etag of the whole value. The default reads the whole value and slices
  // it; backends that can read part of a value (file: pread of the range; http, s3: a GET with
  // Range) override it and read only the range.
  // REQUIRES: ValidateKey(key).ok(). Thread-safe.
  static constexpr uint64_t kToEnd = ~uint64_t{0};
  virtual absl::StatusOr<buffer::cpu::Buffer> ReadRange(absl::string_view key, uint64_t offset,
                                                        uint64_t length, ValueInfo* info);

  // The last `length` bytes of the value under `key`: the whole value when it is shorter, none
  // when `length` is 0 (what a reader of a Zarr shard's index or a Parquet footer asks for
  // before it knows the size). `info` (may be null) gets the size, generation and etag of the
  // whole value. The default is two operations, Stat then ReadRange, and so not atomic: when
  // ReadRange reports another generation than Stat saw (the value was replaced in between) it
  // tries once more, then fails with ABORTED. Backends that can do it in one operation
  // override it (file: one descriptor; http, s3: one GET with `Range: bytes=-N`).
  // REQUIRES: ValidateKey(key).ok(). Thread-safe.
  virtual absl::StatusOr<buffer::cpu::Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                                         ValueInfo* info);

  // ReadRange of the stored version `expected` only (as an earlier read's `info` describes it:
  // its generation, and on http and s3 its etag), so that the pieces of one value read by
  // several calls are never of two versions. ABORTED, naming the key and the expected
  // generation, when the key now holds another version; NOT_FOUND when it holds none. The
  // default reads the range and compares the generation it reports; http and s3 send
  // `If-Match: <etag>` (a 412 answer is ABORTED); the file store checks the descriptor it
  // reads from. REQUIRES: ValidateKey(key).ok(). Thread-safe.
  virtual absl::StatusOr<buffer::cpu::Buffer> ReadRangeIfMatch(absl::string_view key,
                                                               uint64_t offset, uint64_t length,
                                                               const ValueInfo& expected,
                                                               ValueInfo* info);

  // Size and generation without reading the value. Thread-safe.
  virtual absl::StatusOr<ValueInfo> Stat(absl::string_view key) = 0;

  // Freshness of cached copies (see server/store/chunk_store.h). How a copy is validated, and
  // how long a copy may be served unvalidated when the operator sets no policy: the file store
  // validates every read (a stat costs about a microsecond); remote stores revalidate after a
  // minute (a conditional request costs a round trip).
  virtual Validation validation() const { return Validation::kRemote; }
  virtual absl::Duration default_revalidate_after() const { return absl::Seconds(60); }

  // Whether `cached` is still the version stored under `key`: false when the key now holds
  // another version or none. For Validation::kLocal backends this does no more I/O than a
  // metadata lookup and may run on any thread. The default compares Stat's generation.
  virtual absl::StatusOr<bool> IsCurrent(absl::string_view key, const ValueInfo& cached);

  // Revalidates `cached`: nullopt when the stored version is still `cached` (an HTTP 304, no
  // bytes moved), else the current value with `info` filled; NOT_FOUND when the key holds no
  // value any more. Remote backends make one conditional request; the default is IsCurrent,
  // then Read on a change. REQUIRES: ValidateKey(key).ok(). Thread-safe.
  virtual absl::StatusOr<std::optional<buffer::cpu::Buffer>> ReadIfChanged(absl::string_view key,
                                                                           const ValueInfo& cached,
                                                                           ValueInfo* info);

  // Stores `value` under `key` when `conditions` hold, atomically: a reader sees the old value
  // or the new one, never a mix; nothing is changed on failure. Returns the new generation.
  // Thread-safe; checking the conditions and writing is one atomic step.
  virtual absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                          const Conditions& conditions) = 0;

  // Removes the value under `key` when `conditions` hold. NOT_FOUND when there is none.
  virtual absl::Status Delete(absl::string_view key, const Conditions& conditions) = 0;

  // Keys starting with `prefix`. With `directory`, only the immediate children: keys with no
  // further '/' after the prefix's last '/' are entries; deeper keys are grouped into prefixes
  // up to and including the next '/'. REQUIRES: ValidatePrefix(prefix).ok().
  virtual absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                           bool directory) = 0;
};

// Remote backends (http://, https://, s3://): how requests are made and retried.
struct HttpBackendOptions {
  absl::Duration connect_timeout = absl::Seconds(10);
  // Limit of one attempt, transfer included.
  absl::Duration timeout = absl::Seconds(120);
  // An attempt that moves no byte for this long is given up (a server that accepts and never
  // answers, or stalls mid-body).
  absl::Duration stall_timeout = absl::Seconds(20);
  // Attempts of a request that fails with a connection error, a timeout, a truncated body or
  // a 5xx/429 answer, with exponential backoff (jittered) between them.
  int max_attempts = 4;
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(4);
  // Idle connections (libcurl handles) kept for reuse.
  size_t max_idle_connections = 64;
};

struct S3BackendOptions {
  // Base URL of the S3 API ("http://127.0.0.1:9000"); empty: AWS (https://s3.REGION.amazonaws.com).
  std::string endpoint;
  std::string region = "us-east-1";
  // "path" (ENDPOINT/BUCKET/KEY), "virtual" (BUCKET.HOST/KEY) or "auto": path style for a custom
  // endpoint, virtual-hosted for AWS.
  std::string addressing = "auto";
  // Values larger than this are uploaded in parts of `multipart_part_bytes`.
  uint64_t multipart_threshold_bytes = 64ull << 20;
  uint64_t multipart_part_bytes = 16ull << 20;
  // Profile of the credentials file (~/.aws/credentials); empty: $AWS_PROFILE, else "default".
  std::string profile;
};

struct BackendOptions {
  // Where value memory comes from (the memory backend keeps values there).
  buffer::HostAllocator* allocator = &buffer::HeapAllocator();
  // Budget of the memory backend; writes that do not fit fail with RESOURCE_EXHAUSTED.
  uint64_t memory_capacity_bytes = 1ull << 30;
  bool fsync = true;
  // File store, for tests: called instead of fsync(2) (on value files and on directories) when
  // set. Lets a test see which directories are synced and make a sync fail.
  std::function<int(int fd)> fsync_for_testing;
  HttpBackendOptions http;
  S3BackendOptions s3;
};

// Opens the backend a store URL names: a directory path or file:///path (file backend),
// memory:// (memory backend), http://HOST/PATH or https://... (read-only HTTP backend),
// s3://BUCKET/PREFIX (S3 backend). INVALID_ARGUMENT for an unknown scheme; the backend's own
// error when it cannot open (e.g. NOT_FOUND for a missing directory).
absl::StatusOr<std::unique_ptr<Backend>> OpenBackend(absl::string_view url,
                                                     const BackendOptions& options);

// Statuses that name the key they concern.
absl::Status KeyNotFoundError(absl::string_view key);
// ABORTED: `key` no longer holds the version of generation `expected` that a read by range
// asked for (see Backend::ReadRangeIfMatch).
absl::Status VersionChangedError(absl::string_view key, Generation expected);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_BACKEND_H_

// s3://BUCKET/PREFIX — objects in an S3 bucket (AWS or any S3-compatible store), under PREFIX.
//
//   chunkd --store=s3://my-bucket/era5.zarr --s3_region=eu-west-1
//   chunkd --store=s3://bucket/data --s3_endpoint=http://127.0.0.1:9000   (MinIO, moto, Ceph...)
//
// Requests are signed with AWS Signature Version 4 (libcurl's CURLOPT_AWS_SIGV4), with
// credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else from the
// credentials file ($AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, profile
// S3BackendOptions::profile, $AWS_PROFILE or "default"); with none, requests go unsigned (public
// buckets).
//
// - Read: GET (ReadRange: GET with Range; ReadSuffix: with `Range: bytes=-N`; ReadRangeIfMatch:
//   with Range and If-Match: the expected ETag, a 412 answer ABORTED). Stat: HEAD. List:
//   ListObjectsV2 (prefix, delimiter
//   '/' for directory listings, continuation tokens), parsed with pugixml.
// - Write: PUT, or a multipart upload above S3BackendOptions::multipart_threshold_bytes. Each
//   write stores a fresh random generation in the object's metadata (x-amz-meta-chunkd-generation),
//   so every write is a new generation even for identical bytes; objects written by others get
//   their generation from the ETag, hashed to a nonzero 64-bit number.
// - Conditions (Write and Delete): checked with a HEAD under a per-key lock of this backend, so
//   writers through one chunkd never race. Against other writers, a conditional PUT carries
//   If-None-Match: * (the key was absent) or If-Match: <ETag seen> (it was present), which S3
//   and most compatible stores enforce atomically (412: FAILED_PRECONDITION); a store that
//   answers 501 to them is written without them from then on. Conditional deletes have no such
//   guard: another writer may replace the value between the HEAD and the DELETE.
// - Errors: 404 NOT_FOUND, 401/403 PERMISSION_DENIED, 412 FAILED_PRECONDITION; connection
//   errors, timeouts, truncated bodies, 5xx and 429 (SlowDown) are retried with backoff, then
//   UNAVAILABLE.
#ifndef CHUNKD_SERVER_BACKEND_S3_S3_BACKEND_H_
#define CHUNKD_SERVER_BACKEND_S3_S3_BACKEND_H_

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/backend/backend.h"

namespace chunkd::server {

// Opens s3://BUCKET[/PREFIX]. Checks that the bucket can be listed (one small request), so a
// missing bucket or refused credentials fail here with a clear message.
absl::StatusOr<std::unique_ptr<Backend>> OpenS3Backend(absl::string_view url,
                                                       const BackendOptions& options);

struct S3Credentials {
  std::string access_key_id;
  std::string secret_access_key;
  std::string session_token;
  std::string
      source;  // where they came from, for logs: "environment", "/root/.aws/credentials [default]"
  bool empty() const { return access_key_id.empty(); }
};

// The credentials the backend uses, from `env` (variable name -> value; the process
// environment in the server) and the credentials file. Empty when none are found;
// INVALID_ARGUMENT when the file names the profile but lacks a key.
absl::StatusOr<S3Credentials> LoadS3Credentials(const std::map<std::string, std::string>& env,
                                                absl::string_view profile);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_S3_S3_BACKEND_H_

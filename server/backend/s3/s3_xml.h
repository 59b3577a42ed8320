// The XML answers of S3 that the s3:// backend reads: ListObjectsV2 pages, error bodies and the
// UploadId of a multipart upload. Bodies come from the network (any S3-compatible store, or
// whatever answers at --s3_endpoint), so every function here takes arbitrary bytes; they are
// fuzzed (tests/fuzz/s3_xml_fuzz.cc).
#ifndef CHUNKD_SERVER_BACKEND_S3_S3_XML_H_
#define CHUNKD_SERVER_BACKEND_S3_S3_XML_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/backend/backend.h"

namespace chunkd::server {

struct S3ListPage {
  std::vector<ListEntry> entries;     // keys relative to the store's root
  std::vector<std::string> prefixes;  // "directories" (with a delimiter), ending in '/'
  bool truncated = false;
  std::string next_token;
};

// One ListObjectsV2 answer (ListBucketResult). Keys and prefixes outside `root` (the store's
// prefix in the bucket, "" or ending in '/'), "directory markers" and names that are not valid
// keys are left out. INTERNAL for a body that is not a ListBucketResult or a truncated page
// without a continuation token; `what` names the listing in messages.
absl::StatusOr<S3ListPage> ParseS3ListPage(absl::string_view body, absl::string_view root,
                                           absl::string_view what);

// "Code: Message" of an S3 <Error> body (just the code when there is no message); empty when
// the body is not one.
std::string S3ErrorDetail(absl::string_view body);

// The UploadId of an InitiateMultipartUploadResult; empty when there is none.
std::string S3UploadId(absl::string_view body);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_S3_S3_XML_H_

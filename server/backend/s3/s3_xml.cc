#include "server/backend/s3/s3_xml.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/common/key.h"
#include <pugixml.hpp>

namespace chunkd::server {

absl::StatusOr<S3ListPage> ParseS3ListPage(absl::string_view body, absl::string_view root,
                                           absl::string_view what) {
  pugi::xml_document doc;
  pugi::xml_node result;
  if (doc.load_buffer(body.data(), body.size())) result = doc.child("ListBucketResult");
  if (!result) {
    return absl::InternalError(absl::StrCat(what, ": the answer is not a ListBucketResult"));
  }
  S3ListPage out;
  for (pugi::xml_node c : result.children("Contents")) {
    std::string key = c.child_value("Key");
    if (!absl::StartsWith(key, root)) continue;
    key.erase(0, root.size());
    // "Directory markers" (keys ending in '/') and names that are not valid keys are skipped.
    if (!ValidateKey(key).ok()) continue;
    uint64_t size = 0;
    if (!absl::SimpleAtoi(c.child_value("Size"), &size)) continue;
    out.entries.push_back({std::move(key), size});
  }
  for (pugi::xml_node p : result.children("CommonPrefixes")) {
    std::string name = p.child_value("Prefix");
    if (!absl::StartsWith(name, root)) continue;
    name.erase(0, root.size());
    // With the delimiter '/', a prefix ends with it; one that does not is not a "directory".
    if (name.size() < 2 || !absl::EndsWith(name, "/") || !ValidatePrefix(name).ok() ||
        !ValidateKey(name.substr(0, name.size() - 1)).ok()) {
      continue;
    }
    out.prefixes.push_back(std::move(name));
  }
  out.truncated = absl::AsciiStrToLower(result.child_value("IsTruncated")) == "true";
  out.next_token = result.child_value("NextContinuationToken");
  if (out.truncated && out.next_token.empty()) {
    return absl::InternalError(
        absl::StrCat(what, ": a truncated listing without a continuation token"));
  }
  return out;
}

std::string S3ErrorDetail(absl::string_view body) {
  if (body.empty()) return "";
  pugi::xml_document doc;
  if (!doc.load_buffer(body.data(), body.size())) return "";
  pugi::xml_node error = doc.child("Error");
  if (!error) return "";
  std::string code = error.child_value("Code");
  std::string message = error.child_value("Message");
  if (message.empty()) return code;
  return absl::StrCat(code, ": ", message);
}

std::string S3UploadId(absl::string_view body) {
  pugi::xml_document doc;
  if (!doc.load_buffer(body.data(), body.size())) return "";
  return doc.child("InitiateMultipartUploadResult").child_value("UploadId");
}

}  // namespace chunkd::server

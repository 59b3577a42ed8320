#include "server/backend/s3/s3_backend.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"
#include "server/backend/http/http_transport.h"
#include "server/backend/s3/s3_xml.h"
#include "server/common/key.h"
#include "server/common/log.h"

extern char** environ;

namespace chunkd::server {
namespace {

using http::HttpRequest;
using http::HttpResponse;
using http::HttpTransport;

constexpr char kGenerationHeader[] = "x-amz-meta-chunkd-generation";

// S3's error code and message from an error response body, for messages.
std::string ErrorDetail(const HttpResponse& r) { return S3ErrorDetail(r.BodyText()); }

// A fresh, random, nonzero generation for a write.
Generation NewGeneration() {
  thread_local std::mt19937_64 rng{std::random_device{}() ^
                                   (static_cast<uint64_t>(std::random_device{}()) << 32)};
  Generation g;
  do {
    g = rng();
  } while (g == 0);
  return g;
}

struct Current {
  Generation generation = 0;
  std::string etag;
};

class S3Backend;

class S3ListCursor final : public ListCursor {
 public:
  S3ListCursor(S3Backend* backend, std::string prefix, bool directory)
      : backend_(backend), prefix_(std::move(prefix)), directory_(directory) {}
  absl::StatusOr<bool> Next(size_t max_items, ListPage* page) override;

 private:
  S3Backend* backend_;
  const std::string prefix_;
  const bool directory_;
  std::string token_;
  bool done_ = false;
};

class S3Backend final : public http::RangedHttpBackend {
 public:
  S3Backend(std::string bucket, std::string root, std::string bucket_url, S3Credentials creds,
            const BackendOptions& options)
      : RangedHttpBackend(options.http),
        bucket_(std::move(bucket)),
        root_(std::move(root)),
        bucket_url_(std::move(bucket_url)),
        creds_(std::move(creds)),
        options_(options.s3),
        allocator_(options.allocator) {
    sigv4_ = absl::StrCat("aws:amz:", options_.region, ":s3");
  }

  absl::string_view kind() const override { return "s3"; }
  std::string location() const override {
    return absl::StrCat("s3://", bucket_, root_.empty() ? "" : "/",
                        root_.empty() ? "" : root_.substr(0, root_.size() - 1));
  }

  absl::StatusOr<ValueInfo> Stat(absl::string_view key) override {
    auto current = Head(key);
    if (!current.ok()) return current.status();
    return current->first;
  }

  absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                  const Conditions& conditions) override {
    absl::MutexLock lock(&LockFor(key));
    std::optional<Current> current;
    if (!conditions.empty()) {
      auto head = Head(key);
      if (head.ok()) {
        current = Current{head->first.generation, head->second};
      } else if (!absl::IsNotFound(head.status())) {
        return head.status();
      }
      if (absl::Status s = conditions.Check(
              key, current ? std::optional<Generation>(current->generation) : std::nullopt);
          !s.ok()) {
        return s;
      }
    }
    Generation generation = NewGeneration();
    std::vector<std::string> headers = {absl::StrCat(kGenerationHeader, ": ", generation)};
    // Guards against writers outside this process between the HEAD above and the write.
    if (!conditions.empty() && conditional_writes_.load()) {
      if (current && !current->etag.empty()) {
        headers.push_back(absl::StrCat("If-Match: ", current->etag));
      } else if (!current) {
        headers.push_back("If-None-Match: *");
      }
    }
    absl::StatusOr<std::string> etag =
        value.size() > options_.multipart_threshold_bytes
            ? MultipartUpload(key, value, headers, !conditions.empty())
            : PutObject(key, value, headers, !conditions.empty());
    if (absl::IsUnimplemented(etag.status()) && headers.size() > 1) {
      // The store refuses conditional writes: write without the guard from now on (the HEAD
      // under this backend's lock still orders writers through this server).
      if (conditional_writes_.exchange(false)) {
        Log("s3 store %s: conditional writes (If-Match / If-None-Match) are not supported; "
            "conditions are checked with HEAD only, so writers outside this server may race",
            location());
      }
      headers.resize(1);
      etag = value.size() > options_.multipart_threshold_bytes
                 ? MultipartUpload(key, value, headers, true)
                 : PutObject(key, value, headers, true);
    }
    if (!etag.ok()) return etag.status();
    // The ETag the store gave the new object: what a later revalidation asks about.
    return ValueInfo{value.size(), generation, *std::move(etag)};
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    absl::MutexLock lock(&LockFor(key));
    auto head = Head(key);
    if (!head.ok()) return head.status();
    if (absl::Status s = conditions.Check(key, head->first.generation); !s.ok()) return s;
    HttpRequest request = NewRequest("DELETE", ObjectUrl(key));
    auto r = transport_.Perform(request, What("DELETE", key));
    if (!r.ok()) return r.status();
    return CheckResponse(*r, key, "DELETE");
  }

  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                   bool directory) override {
    return std::make_unique<S3ListCursor>(this, std::string(prefix), directory);
  }

  // One ListObjectsV2 request: keys under root_ + `prefix`, relative to root_.
  absl::StatusOr<S3ListPage> ListObjects(absl::string_view prefix, bool directory,
                                         const std::string& token, size_t max_keys) {
    // The query in canonical form (parameters sorted, values encoded), as Signature V4 signs it.
    std::string query;
    if (!token.empty()) {
      absl::StrAppend(&query, "continuation-token=", http::PercentEncode(token, false), "&");
    }
    if (directory) absl::StrAppend(&query, "delimiter=%2F&");
    absl::StrAppend(&query, "list-type=2&max-keys=", max_keys,
                    "&prefix=", http::PercentEncode(absl::StrCat(root_, prefix), false));
    HttpRequest request = NewRequest("GET", absl::StrCat(bucket_url_, "/?", query));
    std::string what = absl::StrCat("list s3://", bucket_, "/", root_, prefix);
    auto r = transport_.Perform(request, what);
    if (!r.ok()) return r.status();
    if (r->status != 200) return BucketError(*r, what);
    return ParseS3ListPage(r->BodyText(), root_, what);
  }

  // Checks that the bucket can be listed.
  absl::Status Probe() {
    auto r = ListObjects("", true, "", 1);
    return r.ok() ? absl::OkStatus() : r.status();
  }

 private:
  absl::Mutex& LockFor(absl::string_view key) {
    return write_locks_[absl::HashOf(key) % write_locks_.size()];
  }

  std::string ObjectUrl(absl::string_view key, absl::string_view query = "") const {
    std::string url = absl::StrCat(bucket_url_, "/", http::PercentEncode(absl::StrCat(root_, key)));
    if (!query.empty()) absl::StrAppend(&url, "?", query);
    return url;
  }

  HttpRequest NewRequest(absl::string_view method, std::string url) const {
    HttpRequest request;
    request.method = std::string(method);
    request.url = std::move(url);
    if (!creds_.empty()) {
      request.aws_sigv4 = sigv4_;
      request.aws_access_key = creds_.access_key_id;
      request.aws_secret_key = creds_.secret_access_key;
      // The payload is not hashed into the signature (TLS protects it); libcurl signs this
      // header's value as the payload hash.
      request.headers.push_back("x-amz-content-sha256: UNSIGNED-PAYLOAD");
      if (!creds_.session_token.empty()) {
        request.headers.push_back(absl::StrCat("x-amz-security-token: ", creds_.session_token));
      }
    }
    return request;
  }

  absl::Status BucketError(const HttpResponse& r, absl::string_view what) const {
    std::string detail = ErrorDetail(r);
    if (r.status == 404 && absl::StartsWith(detail, "NoSuchBucket")) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": bucket '", bucket_, "' does not exist (", detail, ")"));
    }
    return http::StatusForHttpError(r.status, what, detail);
  }

  // OK for 2xx; NOT_FOUND naming the key for a missing object; the mapped error otherwise.
  absl::Status CheckResponse(const HttpResponse& r, absl::string_view key,
                             absl::string_view method) const override {
    if (r.status >= 200 && r.status < 300) return absl::OkStatus();
    std::string detail = ErrorDetail(r);
    if (r.status == 404 && !absl::StartsWith(detail, "NoSuchBucket")) return KeyNotFoundError(key);
    if (r.status == 501) {
      return absl::UnimplementedError(absl::StrCat(What(method, key), ": HTTP 501 (", detail, ")"));
    }
    std::string what = What(method, key);
    if (r.attempts > 1) absl::StrAppend(&what, " (after ", r.attempts, " attempts)");
    return BucketError(r, what);
  }

  // The value's info and ETag, or NOT_FOUND.
  absl::StatusOr<std::pair<ValueInfo, std::string>> Head(absl::string_view key) {
    HttpRequest request = NewRequest("HEAD", ObjectUrl(key));
    auto r = transport_.Perform(request, What("HEAD", key));
    if (!r.ok()) return r.status();
    if (absl::Status s = CheckResponse(*r, key, "HEAD"); !s.ok()) return s;
    uint64_t size = 0;
    if (!absl::SimpleAtoi(r->Header("content-length").value_or(""), &size)) {
      return absl::InternalError(
          absl::StrCat("HEAD key ", QuoteKey(key), ": the answer has no Content-Length"));
    }
    std::string etag = r->Header("etag").value_or("");
    return std::make_pair(ValueInfo{size, GenerationOf(*r, size), etag}, etag);
  }

  // The new object's ETag ("" when the store sends none).
  absl::StatusOr<std::string> PutObject(absl::string_view key, const buffer::cpu::Buffer& value,
                                        const std::vector<std::string>& headers, bool conditional) {
    HttpRequest request = NewRequest("PUT", ObjectUrl(key));
    request.headers.insert(request.headers.end(), headers.begin(), headers.end());
    request.body = value.view();
    // A conditional PUT whose first attempt may have landed would fail its condition when
    // sent again: it is retried only when the store certainly did not act.
    request.idempotent = !conditional;
    auto r = transport_.Perform(request, What("PUT", key));
    if (!r.ok()) return r.status();
    if (absl::Status s = CheckResponse(*r, key, "PUT"); !s.ok()) return s;
    return r->Header("etag").value_or("");
  }

  absl::StatusOr<std::string> MultipartUpload(absl::string_view key,
                                              const buffer::cpu::Buffer& value,
                                              const std::vector<std::string>& headers,
                                              bool conditional) {
    // 1. Create: the object's metadata goes here.
    HttpRequest create = NewRequest("POST", ObjectUrl(key, "uploads="));
    create.headers.push_back(headers.front());
    auto r = transport_.Perform(create, What("create a multipart upload of", key));
    if (!r.ok()) return r.status();
    if (absl::Status s = CheckResponse(*r, key, "POST ?uploads"); !s.ok()) return s;
    std::string upload_id = S3UploadId(r->BodyText());
    if (upload_id.empty()) {
      return absl::InternalError(
          absl::StrCat("multipart upload of key ", QuoteKey(key), ": no UploadId in the answer"));
    }
    std::string id = http::PercentEncode(upload_id, false);
    auto abort = [&](absl::Status s) {
      HttpRequest del = NewRequest("DELETE", ObjectUrl(key, absl::StrCat("uploadId=", id)));
      (void)transport_.Perform(del, What("abort the multipart upload of", key));
      return s;
    };
    // 2. The parts.
    uint64_t part_size = std::max<uint64_t>(options_.multipart_part_bytes, 5ull << 20);
    std::string complete = "<CompleteMultipartUpload>";
    int part = 0;
    for (uint64_t offset = 0; offset < value.size(); offset += part_size) {
      ++part;
      HttpRequest put =
          NewRequest("PUT", ObjectUrl(key, absl::StrCat("partNumber=", part, "&uploadId=", id)));
      put.body = value.view().substr(offset, std::min<uint64_t>(part_size, value.size() - offset));
      auto pr =
          transport_.Perform(put, absl::StrCat("upload part ", part, " of key ", QuoteKey(key)));
      if (!pr.ok()) return abort(pr.status());
      if (absl::Status s = CheckResponse(*pr, key, "PUT part"); !s.ok()) return abort(s);
      std::string etag = pr->Header("etag").value_or("");
      if (etag.empty()) {
        return abort(absl::InternalError(absl::StrCat("multipart upload of key ", QuoteKey(key),
                                                      ": part ", part, " has no ETag")));
      }
      absl::StrAppend(&complete, "<Part><PartNumber>", part, "</PartNumber><ETag>", etag,
                      "</ETag></Part>");
    }
    absl::StrAppend(&complete, "</CompleteMultipartUpload>");
    // 3. Complete, with the conditions.
    HttpRequest finish = NewRequest("POST", ObjectUrl(key, absl::StrCat("uploadId=", id)));
    finish.headers.insert(finish.headers.end(), headers.begin() + 1, headers.end());
    finish.headers.push_back("Content-Type: application/xml");
    finish.body = complete;
    finish.idempotent = !conditional;
    auto fr = transport_.Perform(finish, What("complete the multipart upload of", key));
    if (!fr.ok()) return abort(fr.status());
    if (absl::Status s = CheckResponse(*fr, key, "POST ?uploadId"); !s.ok()) return abort(s);
    // S3 may answer 200 and still report an error in the body.
    if (std::string detail = ErrorDetail(*fr); !detail.empty()) {
      absl::Status s =
          absl::StartsWith(detail, "PreconditionFailed")
              ? absl::FailedPreconditionError(absl::StrCat("key ", QuoteKey(key), ": ", detail))
              : absl::UnavailableError(
                    absl::StrCat("multipart upload of key ", QuoteKey(key), ": ", detail));
      return abort(s);
    }
    // The ETag of the whole object, in the answer's XML (quotes escaped as &quot;).
    absl::string_view body = fr->BodyText();
    size_t open = body.find("<ETag>"), close = body.find("</ETag>");
    if (open == absl::string_view::npos || close == absl::string_view::npos || close < open) {
      return std::string();
    }
    return absl::StrReplaceAll(body.substr(open + 6, close - open - 6), {{"&quot;", "\""}});
  }

  HttpRequest NewGet(absl::string_view key) const override {
    HttpRequest request = NewRequest("GET", ObjectUrl(key));
    request.allocator = allocator_;
    return request;
  }
  // chunkd's own generation (x-amz-meta-chunkd-generation), else from the ETag, else from
  // Last-Modified and the size.
  Generation GenerationOf(const HttpResponse& r, uint64_t size) const override {
    if (auto g = r.Header(kGenerationHeader)) {
      uint64_t value = 0;
      if (absl::SimpleAtoi(*g, &value) && value != 0) return value;
    }
    if (auto etag = r.Header("etag"); etag && !etag->empty()) {
      return http::HashToGeneration(absl::StrCat("etag:", *etag));
    }
    return http::HashToGeneration(
        absl::StrCat("modified:", r.Header("last-modified").value_or(""), "/", size));
  }

  const std::string bucket_;
  const std::string root_;        // "" or "prefix/"
  const std::string bucket_url_;  // no trailing '/'
  const S3Credentials creds_;
  const S3BackendOptions options_;
  buffer::HostAllocator* const allocator_;
  std::string sigv4_;
  std::atomic<bool> conditional_writes_{true};
  // Writers and deleters of one key are serialized: a condition is checked and acted on as
  // one step for every writer going through this backend.
  std::array<absl::Mutex, 64> write_locks_;
};

absl::StatusOr<bool> S3ListCursor::Next(size_t max_items, ListPage* page) {
  if (done_) return false;
  size_t max_keys = std::clamp<size_t>(max_items, 1, 1000);
  auto result = backend_->ListObjects(prefix_, directory_, token_, max_keys);
  if (!result.ok()) return result.status();
  for (ListEntry& e : result->entries) page->entries.push_back(std::move(e));
  for (std::string& p : result->prefixes) page->prefixes.push_back(std::move(p));
  token_ = std::move(result->next_token);
  done_ = !result->truncated;
  return !done_;
}

std::string Trim(absl::string_view s) { return std::string(absl::StripAsciiWhitespace(s)); }

}  // namespace

absl::StatusOr<S3Credentials> LoadS3Credentials(const std::map<std::string, std::string>& env,
                                                absl::string_view profile_option) {
  auto get = [&](const char* name) -> std::string {
    auto it = env.find(name);
    return it == env.end() ? "" : it->second;
  };
  S3Credentials creds;
  if (!get("AWS_ACCESS_KEY_ID").empty() || !get("AWS_SECRET_ACCESS_KEY").empty()) {
    creds.access_key_id = get("AWS_ACCESS_KEY_ID");
    creds.secret_access_key = get("AWS_SECRET_ACCESS_KEY");
    creds.session_token = get("AWS_SESSION_TOKEN");
    creds.source = "environment";
    if (creds.access_key_id.empty() || creds.secret_access_key.empty()) {
      return absl::InvalidArgumentError(
          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together");
    }
    return creds;
  }
  std::string profile(profile_option);
  bool explicit_profile = !profile.empty() || !get("AWS_PROFILE").empty();
  if (profile.empty()) profile = get("AWS_PROFILE");
  if (profile.empty()) profile = "default";
  std::string path = get("AWS_SHARED_CREDENTIALS_FILE");
  if (path.empty() && !get("HOME").empty()) path = absl::StrCat(get("HOME"), "/.aws/credentials");
  std::ifstream in(path);
  if (path.empty() || !in) {
    if (explicit_profile) {
      return absl::InvalidArgumentError(
          absl::StrCat("AWS profile '", profile, "': no credentials file (", path, ")"));
    }
    return creds;  // none: unsigned requests
  }
  std::string line, section;
  bool found = false;
  while (std::getline(in, line)) {
    std::string t = Trim(line);
    if (t.empty() || t[0] == '#' || t[0] == ';') continue;
    if (t.front() == '[' && t.back() == ']') {
      section = Trim(t.substr(1, t.size() - 2));
      if (absl::StartsWith(section, "profile ")) section = Trim(section.substr(8));
      if (section == profile) found = true;
      continue;
    }
    if (section != profile) continue;
    size_t eq = t.find('=');
    if (eq == std::string::npos) continue;
    std::string name = absl::AsciiStrToLower(Trim(t.substr(0, eq)));
    std::string value = Trim(t.substr(eq + 1));
    if (name == "aws_access_key_id") creds.access_key_id = value;
    if (name == "aws_secret_access_key") creds.secret_access_key = value;
    if (name == "aws_session_token") creds.session_token = value;
  }
  if (!found) {
    if (explicit_profile) {
      return absl::InvalidArgumentError(
          absl::StrCat("AWS profile '", profile, "' is not in ", path));
    }
    return S3Credentials{};
  }
  if (creds.access_key_id.empty() || creds.secret_access_key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AWS profile '", profile, "' in ", path,
                     " lacks aws_access_key_id or aws_secret_access_key"));
  }
  creds.source = absl::StrCat(path, " [", profile, "]");
  return creds;
}

absl::StatusOr<std::unique_ptr<Backend>> OpenS3Backend(absl::string_view url,
                                                       const BackendOptions& options) {
  if (!absl::StartsWith(url, "s3://")) {
    return absl::InvalidArgumentError(absl::StrCat("store ", url, ": not an s3:// URL"));
  }
  absl::string_view rest = url.substr(5);
  size_t slash = rest.find('/');
  std::string bucket(rest.substr(0, slash));
  std::string root;
  if (slash != absl::string_view::npos) {
    absl::string_view prefix = rest.substr(slash + 1);
    while (!prefix.empty() && prefix.back() == '/') prefix.remove_suffix(1);
    if (!prefix.empty()) {
      if (!ValidateKey(prefix).ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("store ", url, ": the prefix '", prefix, "' is not a valid key path"));
      }
      root = absl::StrCat(prefix, "/");
    }
  }
  if (bucket.empty() || bucket.find_first_of("?#:@ ") != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("store ", url, ": an S3 store URL is s3://BUCKET[/PREFIX]"));
  }
  const S3BackendOptions& s3 = options.s3;
  if (s3.region.empty()) return absl::InvalidArgumentError("--s3_region is empty");
  std::string endpoint = s3.endpoint;
  bool custom = !endpoint.empty();
  if (!custom) endpoint = absl::StrCat("https://s3.", s3.region, ".amazonaws.com");
  while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
  size_t scheme = endpoint.find("://");
  if (scheme == std::string::npos ||
      (!absl::StartsWith(endpoint, "http://") && !absl::StartsWith(endpoint, "https://"))) {
    return absl::InvalidArgumentError(
        absl::StrCat("--s3_endpoint=", endpoint, ": expected http://HOST[:PORT] or https://..."));
  }
  bool path_style;
  if (s3.addressing == "path") {
    path_style = true;
  } else if (s3.addressing == "virtual") {
    path_style = false;
  } else if (s3.addressing == "auto" || s3.addressing.empty()) {
    // Bucket names with dots break TLS for virtual-hosted names; use the path then too.
    path_style = custom || bucket.find('.') != std::string::npos;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--s3_addressing=", s3.addressing, ": expected auto, path or virtual"));
  }
  std::string bucket_url = path_style ? absl::StrCat(endpoint, "/", bucket)
                                      : absl::StrCat(endpoint.substr(0, scheme + 3), bucket, ".",
                                                     endpoint.substr(scheme + 3));
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    absl::string_view kv(*e);
    size_t eq = kv.find('=');
    if (eq != absl::string_view::npos && absl::StartsWith(kv, "AWS_")) {
      env.emplace(std::string(kv.substr(0, eq)), std::string(kv.substr(eq + 1)));
    } else if (eq != absl::string_view::npos && kv.substr(0, eq) == "HOME") {
      env.emplace("HOME", std::string(kv.substr(eq + 1)));
    }
  }
  auto creds = LoadS3Credentials(env, s3.profile);
  if (!creds.ok()) return creds.status();
  std::string source = creds->empty() ? "none: unsigned requests" : creds->source;
  auto backend = std::make_unique<S3Backend>(std::move(bucket), std::move(root),
                                             std::move(bucket_url), *std::move(creds), options);
  if (absl::Status s = backend->Probe(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("s3 store ", url, ": ", s.message()));
  }
  Log("s3 store %s via %s (region %s, %s-style, credentials: %s)", backend->location(), endpoint,
      s3.region, path_style ? "path" : "virtual", source);
  return backend;
}

}  // namespace chunkd::server

#include "server/backend/http/http_backend.h"

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/backend/http/http_transport.h"
#include "server/backend/http/nginx_index.h"
#include "server/backend/tree_walk.h"
#include "server/common/key.h"

namespace chunkd::server {
namespace {

using http::HttpRequest;
using http::HttpResponse;
using http::HttpTransport;

using Child = TreeChild;

class HttpBackend;

class HttpListCursor final : public TreeWalkCursor<std::monostate> {
 public:
  HttpListCursor(HttpBackend* backend, std::string prefix, bool directory)
      : TreeWalkCursor(std::move(prefix), directory), backend_(backend) {}

 private:
  absl::StatusOr<std::optional<Frame>> ReadFirst(std::string rel,
                                                 absl::string_view name_filter) override {
    return ReadFrame(std::move(rel), name_filter);
  }
  absl::StatusOr<std::optional<Frame>> ReadChild(const Frame& parent, const Child& child,
                                                 std::string rel) override {
    return ReadFrame(std::move(rel), "");
  }
  absl::StatusOr<Frame> ReadFrame(std::string rel, absl::string_view name_filter);

  HttpBackend* backend_;
};

class HttpBackend final : public http::RangedHttpBackend {
 public:
  HttpBackend(std::string base, const BackendOptions& options)
      : RangedHttpBackend(options.http), base_(std::move(base)), allocator_(options.allocator) {}

  absl::string_view kind() const override { return "http"; }
  std::string location() const override { return base_; }

  absl::StatusOr<ValueInfo> Stat(absl::string_view key) override {
    HttpRequest request;
    request.method = "HEAD";
    request.url = UrlFor(key);
    auto r = transport_.Perform(request, What("HEAD", key));
    if (!r.ok()) return r.status();
    if (absl::Status s = CheckResponse(*r, key, "HEAD"); !s.ok()) return s;
    uint64_t size = 0;
    auto length = r->Header("content-length");
    if (!length || !absl::SimpleAtoi(*length, &size)) {
      return absl::InternalError(
          absl::StrCat("HEAD key ", QuoteKey(key), ": the server announced no Content-Length"));
    }
    return ValueInfo{size, GenerationOf(*r, size), r->Header("etag").value_or("")};
  }

  absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                  const Conditions& conditions) override {
    return ReadOnlyError(key);
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    return ReadOnlyError(key);
  }

  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                   bool directory) override {
    return std::make_unique<HttpListCursor>(this, std::string(prefix), directory);
  }

  // The children of directory `rel` ("" or "a/b/") from the server's JSON index; empty when
  // the directory does not exist.
  absl::StatusOr<std::vector<Child>> ListDirectory(const std::string& rel) {
    HttpRequest request;
    request.url = absl::StrCat(base_, "/", http::PercentEncode(rel));
    request.headers.push_back("Accept: application/json");
    std::string what = absl::StrCat("list ", QuoteKey(rel.empty() ? "/" : rel));
    auto r = transport_.Perform(request, what);
    if (!r.ok()) return r.status();
    if (r->status == 404) return std::vector<Child>();
    if (r->status == 403 || r->status == 405) {
      return absl::UnimplementedError(absl::StrCat(
          what, ": the server refused to list the directory (HTTP ", r->status,
          "). Listing an http:// store needs a JSON directory index (nginx: autoindex on; "
          "autoindex_format json;); reading keys works without one, and Zarr over HTTP "
          "reads consolidated metadata instead of listing."));
    }
    if (r->status != 200) return http::StatusForHttpError(r->status, what, "");
    std::vector<NginxIndexEntry> items;
    if (!ParseNginxIndex(r->BodyText(), &items)) {
      return absl::UnimplementedError(absl::StrCat(
          what,
          ": the server's directory index is not JSON. Listing an http:// store needs "
          "nginx's autoindex_format json (or the same format from another server); reading "
          "keys works without it."));
    }
    std::vector<Child> children;
    for (NginxIndexEntry& item : items) {
      if (item.name.empty() || item.name == "." || item.name == "..") continue;
      Child child;
      child.is_dir = item.type == "directory";
      if (!child.is_dir && item.type != "file") continue;
      child.name = std::move(item.name);
      child.size = item.size;
      child.sort_key = child.is_dir ? child.name + "/" : child.name;
      // Names that are not valid keys cannot be asked for, so they are not listed either.
      if (!ValidateKey(rel + child.name).ok()) continue;
      children.push_back(std::move(child));
    }
    std::sort(children.begin(), children.end(),
              [](const Child& a, const Child& b) { return a.sort_key < b.sort_key; });
    return children;
  }

 private:
  std::string UrlFor(absl::string_view key) const {
    return absl::StrCat(base_, "/", http::PercentEncode(key));
  }
  static absl::Status ReadOnlyError(absl::string_view key) {
    return absl::PermissionDeniedError(absl::StrCat(
        "key ", QuoteKey(key), ": the http store is a read-only backend (no writes or deletes)"));
  }

  // NOT_FOUND for 404 and for a key that names a directory (redirected to a URL ending in
  // '/'); the mapped error for other non-2xx statuses.
  absl::Status CheckResponse(const HttpResponse& r, absl::string_view key,
                             absl::string_view method) const override {
    if (r.status == 404 || r.status == 410 || absl::EndsWith(r.effective_url, "/") ||
        (r.status >= 300 && r.status < 400)) {
      return KeyNotFoundError(key);
    }
    if (r.status >= 200 && r.status < 300) return absl::OkStatus();
    std::string what = What(method, key);
    if (r.attempts > 1) absl::StrAppend(&what, " (after ", r.attempts, " attempts)");
    return http::StatusForHttpError(r.status, what, "");
  }

  HttpRequest NewGet(absl::string_view key) const override {
    HttpRequest request;
    request.url = UrlFor(key);
    request.allocator = allocator_;
    return request;
  }
  // From the ETag, else Last-Modified and the size, else the size alone.
  Generation GenerationOf(const HttpResponse& r, uint64_t size) const override {
    if (auto etag = r.Header("etag"); etag && !etag->empty()) {
      return http::HashToGeneration(absl::StrCat("etag:", *etag));
    }
    if (auto modified = r.Header("last-modified"); modified && !modified->empty()) {
      return http::HashToGeneration(absl::StrCat("modified:", *modified, "/", size));
    }
    return http::HashToGeneration(absl::StrCat("size:", size));
  }

  const std::string base_;  // no trailing '/'
  buffer::HostAllocator* const allocator_;
};

absl::StatusOr<HttpListCursor::Frame> HttpListCursor::ReadFrame(std::string rel,
                                                                absl::string_view name_filter) {
  auto children = backend_->ListDirectory(rel);
  if (!children.ok()) return children.status();
  Frame frame;
  frame.rel = std::move(rel);
  for (Child& child : *children) {
    if (absl::StartsWith(child.sort_key, name_filter)) frame.children.push_back(std::move(child));
  }
  return frame;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> OpenHttpBackend(absl::string_view url,
                                                         const BackendOptions& options) {
  size_t scheme_end = url.find("://");
  if (scheme_end == absl::string_view::npos || url.size() <= scheme_end + 3 ||
      url[scheme_end + 3] == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("store ", url, ": an http store URL is http://HOST[:PORT][/PATH]"));
  }
  if (url.find_first_of("?#") != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("store ", url, ": the URL may not hold a query or fragment"));
  }
  std::string base(url);
  while (!base.empty() && base.back() == '/') base.pop_back();
  return std::make_unique<HttpBackend>(std::move(base), options);
}

}  // namespace chunkd::server

#include "server/backend/http/http_transport.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <mutex>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/key.h"

namespace chunkd::server::http {
namespace {

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// What one attempt receives; filled by libcurl's callbacks.
struct Receiver {
  const HttpRequest* request = nullptr;
  bool head = false;
  HttpResponse response;
  std::optional<uint64_t> content_length;
  buffer::cpu::MutableBuffer buffer;
  bool use_buffer = false;
  uint64_t received = 0;
  bool overflow = false;
  std::string allocation_error;

  void StartResponse(long status) {
    response.status = status;
    response.headers.clear();
    response.text.clear();
    content_length.reset();
    buffer = {};
    use_buffer = false;
    received = 0;
  }
};

size_t OnHeader(char* data, size_t size, size_t count, void* user) {
  auto* r = static_cast<Receiver*>(user);
  size_t n = size * count;
  absl::string_view line(data, n);
  line = absl::StripTrailingAsciiWhitespace(line);
  if (absl::StartsWith(line, "HTTP/")) {
    // A new response (the first, or one after a redirect or a 100 Continue).
    long status = 0;
    size_t space = line.find(' ');
    if (space != absl::string_view::npos) {
      int parsed = 0;
      if (absl::SimpleAtoi(line.substr(space + 1, 3), &parsed)) status = parsed;
    }
    r->StartResponse(status);
    return n;
  }
  size_t colon = line.find(':');
  if (colon == absl::string_view::npos) return n;
  std::string name = absl::AsciiStrToLower(absl::StripAsciiWhitespace(line.substr(0, colon)));
  std::string value(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  if (name == "content-length") {
    uint64_t length = 0;
    if (absl::SimpleAtoi(value, &length)) r->content_length = length;
  }
  r->response.headers.emplace_back(std::move(name), std::move(value));
  return n;
}

size_t OnBody(char* data, size_t size, size_t count, void* user) {
  auto* r = static_cast<Receiver*>(user);
  size_t n = size * count;
  if (r->received == 0 && !r->use_buffer && r->response.text.empty()) {
    // First bytes of this response's body: decide where they go.
    bool success = r->response.status >= 200 && r->response.status < 300;
    if (success && r->request->allocator != nullptr && r->content_length) {
      auto buffer =
          buffer::cpu::MutableBuffer::Allocate(*r->content_length, *r->request->allocator);
      if (!buffer.ok()) {
        r->allocation_error = buffer.status().ToString();
        return 0;
      }
      r->buffer = *std::move(buffer);
      r->use_buffer = true;
    }
  }
  if (r->use_buffer) {
    if (r->received + n > r->buffer.size()) {
      r->overflow = true;
      return 0;
    }
    std::memcpy(r->buffer.data() + r->received, data, n);
  } else {
    r->response.text.append(data, n);
  }
  r->received += n;
  return n;
}

bool RetryableCurlError(CURLcode code, bool idempotent) {
  switch (code) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      return true;  // nothing was sent
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return idempotent;
    default:
      return false;
  }
}

long Millis(absl::Duration d) {
  return static_cast<long>(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

absl::Duration Jittered(absl::Duration d) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  std::uniform_real_distribution<double> factor(0.5, 1.0);
  return d * factor(rng);
}

}  // namespace

std::optional<std::string> HttpResponse::Header(absl::string_view name) const {
  std::optional<std::string> out;
  for (const auto& [n, v] : headers) {
    if (n == name) out = v;
  }
  return out;
}

absl::string_view HttpResponse::BodyText() const {
  if (text.empty()) return absl::string_view(body.view().data(), body.view().size());
  return text;
}

HttpTransport::HttpTransport(const HttpBackendOptions& options) : options_(options) {
  GlobalInit();
}

HttpTransport::~HttpTransport() {
  absl::MutexLock lock(&mu_);
  for (void* h : idle_) curl_easy_cleanup(static_cast<CURL*>(h));
}

void* HttpTransport::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    if (!idle_.empty()) {
      void* h = idle_.back();
      idle_.pop_back();
      return h;
    }
  }
  return curl_easy_init();
}

void HttpTransport::Release(void* handle) {
  {
    absl::MutexLock lock(&mu_);
    if (idle_.size() < options_.max_idle_connections) {
      idle_.push_back(handle);
      return;
    }
  }
  curl_easy_cleanup(static_cast<CURL*>(handle));
}

absl::StatusOr<HttpResponse> HttpTransport::PerformOnce(const HttpRequest& request,
                                                        bool* retryable) {
  *retryable = false;
  CURL* curl = static_cast<CURL*>(Acquire());
  if (curl == nullptr) return absl::ResourceExhaustedError("cannot create a libcurl handle");
  // Resets the options and keeps the handle's connections and caches: reuse.
  curl_easy_reset(curl);

  Receiver receiver;
  receiver.request = &request;
  receiver.head = request.method == "HEAD";
  char error[CURL_ERROR_SIZE] = {0};

  curl_easy_setopt(curl, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, Millis(options_.connect_timeout));
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, Millis(options_.timeout));
  // Fewer than 1 byte per second for stall_timeout: the attempt is given up.
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME,
                   std::max<long>(1, absl::ToInt64Seconds(options_.stall_timeout)));
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &receiver);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &receiver);
  if (request.method == "GET" || request.method == "HEAD") {
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(curl, CURLOPT_MAXREDIRS, 5L);
  }
  if (request.method == "HEAD") {
    curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  } else if (request.method == "GET") {
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
  } else {
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    if (request.method == "PUT" || request.method == "POST") {
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                       static_cast<curl_off_t>(request.body.size()));
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request.body.empty() ? "" : request.body.data());
    }
  }
  struct curl_slist* headers = nullptr;
  for (const std::string& h : request.headers) headers = curl_slist_append(headers, h.c_str());
  // No "Expect: 100-continue" round trip before bodies. Not for signed requests: libcurl 7.88
  // would sign the removed header ("expect" in SignedHeaders, absent from the request) and S3
  // would refuse the signature; S3 handles 100-continue well anyway.
  if (request.aws_sigv4.empty()) headers = curl_slist_append(headers, "Expect:");
  if (request.method == "PUT" || request.method == "POST") {
    bool has_type = std::any_of(
        request.headers.begin(), request.headers.end(),
        [](const std::string& h) { return absl::StartsWithIgnoreCase(h, "content-type:"); });
    if (!has_type) headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  if (!request.aws_sigv4.empty()) {
    curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, request.aws_sigv4.c_str());
    curl_easy_setopt(curl, CURLOPT_USERNAME, request.aws_access_key.c_str());
    curl_easy_setopt(curl, CURLOPT_PASSWORD, request.aws_secret_key.c_str());
  }

  CURLcode code = curl_easy_perform(curl);
  char* effective = nullptr;
  curl_easy_getinfo(curl, CURLINFO_EFFECTIVE_URL, &effective);
  if (effective != nullptr) receiver.response.effective_url = effective;
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  curl_slist_free_all(headers);
  Release(curl);

  if (!receiver.allocation_error.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no memory for the body: ", receiver.allocation_error));
  }
  uint64_t expected = receiver.content_length.value_or(0);
  bool has_body =
      !receiver.head && receiver.response.status != 204 && receiver.response.status != 304;
  if (receiver.overflow) {
    *retryable = request.idempotent;
    return absl::UnavailableError(
        absl::StrCat("the body is longer than its Content-Length of ", expected, " bytes"));
  }
  if (code == CURLE_PARTIAL_FILE ||
      (code == CURLE_OK && has_body && receiver.content_length && receiver.received != expected)) {
    *retryable = request.idempotent;
    return absl::UnavailableError(
        absl::StrCat("truncated body: received ", receiver.received, " of ", expected, " bytes"));
  }
  if (code != CURLE_OK) {
    *retryable = RetryableCurlError(code, request.idempotent);
    std::string detail = error[0] != 0 ? std::string(error) : curl_easy_strerror(code);
    if (code == CURLE_OPERATION_TIMEDOUT) {
      return absl::UnavailableError(absl::StrCat("timed out (", detail, ")"));
    }
    return absl::UnavailableError(detail);
  }
  HttpResponse response = std::move(receiver.response);
  bool success = response.status >= 200 && response.status < 300;
  if (receiver.use_buffer) {
    response.body = std::move(receiver.buffer).Freeze();
  } else if (success && request.allocator != nullptr && !receiver.head) {
    // No length announced (chunked): the bytes were collected as text; one copy into memory
    // from the allocator.
    auto buffer = buffer::cpu::MutableBuffer::Allocate(response.text.size(), *request.allocator);
    if (!buffer.ok()) return buffer.status();
    if (!response.text.empty())
      std::memcpy(buffer->data(), response.text.data(), response.text.size());
    response.body = std::move(*buffer).Freeze();
    response.text.clear();
  }
  return response;
}

absl::StatusOr<HttpResponse> HttpTransport::Perform(const HttpRequest& request,
                                                    absl::string_view what) {
  int attempts = std::max(1, options_.max_attempts);
  absl::Duration backoff = options_.initial_backoff;
  absl::Status last;
  for (int attempt = 1;; ++attempt) {
    bool retryable = false;
    auto response = PerformOnce(request, &retryable);
    if (response.ok()) {
      response->attempts = attempt;
      long s = response->status;
      bool server_error = s >= 500 || s == 429;
      if (!server_error || attempt >= attempts) return response;
    } else {
      last = response.status();
      if (!retryable || attempt >= attempts) {
        if (!absl::IsUnavailable(last)) return last;
        return absl::UnavailableError(
            absl::StrCat(what, ": ", last.message(),
                         attempt > 1 ? absl::StrCat(" (after ", attempt, " attempts)") : ""));
      }
    }
    absl::SleepFor(Jittered(backoff));
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

absl::Status StatusForHttpError(long status, absl::string_view what, absl::string_view detail) {
  std::string message = absl::StrCat(what, ": HTTP ", status);
  if (!detail.empty()) absl::StrAppend(&message, " (", detail, ")");
  if (status == 404 || status == 410) return absl::NotFoundError(message);
  if (status == 401 || status == 403) return absl::PermissionDeniedError(message);
  if (status == 412) return absl::FailedPreconditionError(message);
  if (status >= 500 || status == 429) return absl::UnavailableError(message);
  return absl::InternalError(message);
}

std::string PercentEncode(absl::string_view path, bool keep_slash) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(path.size());
  for (unsigned char c : path) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' ||
        (keep_slash && c == '/')) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

Generation HashToGeneration(absl::string_view text) {
  // FNV-1a over the bytes, then a SplitMix64 finalizer: stable across runs and machines.
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 31;
  return h == 0 ? 1 : h;
}

std::optional<uint64_t> TotalFromContentRange(absl::string_view content_range) {
  size_t slash = content_range.rfind('/');
  if (slash == absl::string_view::npos) return std::nullopt;
  uint64_t total = 0;
  if (!absl::SimpleAtoi(content_range.substr(slash + 1), &total)) return std::nullopt;
  return total;
}

namespace {

// Range ends past what servers parse (63 bits) stand for "to the end".
constexpr uint64_t kLargestRangeEnd = uint64_t{1} << 62;

// An etag If-Match can use: weak ones (W/"...") never match it (RFC 9110 13.1.1 compares
// strongly).
bool StrongEtag(absl::string_view etag) { return !etag.empty() && !absl::StartsWith(etag, "W/"); }

}  // namespace

std::string RangedHttpBackend::What(absl::string_view method, absl::string_view key) {
  return absl::StrCat(method, " key ", QuoteKey(key));
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::WholeValue(HttpResponse& r,
                                                                  absl::string_view key,
                                                                  ValueInfo* info) const {
  if (absl::Status s = CheckResponse(r, key, "GET"); !s.ok()) return s;
  if (r.status != 200) {
    return absl::InternalError(
        absl::StrCat("GET key ", QuoteKey(key), ": unexpected HTTP ", r.status));
  }
  if (info) *info = {r.body.size(), GenerationOf(r, r.body.size()), r.Header("etag").value_or("")};
  return std::move(r.body);
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::Read(absl::string_view key,
                                                            ValueInfo* info) {
  HttpRequest request = NewGet(key);
  auto r = transport_.Perform(request, What("GET", key));
  if (!r.ok()) return r.status();
  return WholeValue(*r, key, info);
}

absl::StatusOr<std::optional<buffer::cpu::Buffer>> RangedHttpBackend::ReadIfChanged(
    absl::string_view key, const ValueInfo& cached, ValueInfo* info) {
  if (cached.etag.empty()) return Backend::ReadIfChanged(key, cached, info);
  HttpRequest request = NewGet(key);
  request.headers.push_back(absl::StrCat("If-None-Match: ", cached.etag));
  auto r = transport_.Perform(request, What("conditional GET", key));
  if (!r.ok()) return r.status();
  if (r->status == 304) return std::nullopt;
  auto value = WholeValue(*r, key, info);
  if (!value.ok()) return value.status();
  return std::optional<buffer::cpu::Buffer>(*std::move(value));
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::ReadRange(absl::string_view key,
                                                                 uint64_t offset, uint64_t length,
                                                                 ValueInfo* info) {
  if (offset == 0 && length == kToEnd) return Read(key, info);
  return RangedGet(key, {.offset = offset, .length = length}, info);
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::ReadSuffix(absl::string_view key,
                                                                  uint64_t length,
                                                                  ValueInfo* info) {
  return RangedGet(key, {.length = length, .suffix = true}, info);
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::ReadRangeIfMatch(absl::string_view key,
                                                                        uint64_t offset,
                                                                        uint64_t length,
                                                                        const ValueInfo& expected,
                                                                        ValueInfo* info) {
  return RangedGet(key, {.offset = offset, .length = length, .expected = &expected}, info);
}

std::string RangedHttpBackend::RangeHeader(const ByteRange& range) {
  if (range.suffix) {
    return absl::StrCat("Range: bytes=-", std::min(range.length, kLargestRangeEnd));
  }
  if (range.length > kLargestRangeEnd || range.offset > kLargestRangeEnd) {
    return absl::StrCat("Range: bytes=", range.offset, "-");
  }
  return absl::StrCat("Range: bytes=", range.offset, "-", range.offset + range.length - 1);
}

std::pair<uint64_t, uint64_t> RangedHttpBackend::PartOf(const ByteRange& range, uint64_t size) {
  if (range.suffix) {
    uint64_t take = std::min(range.length, size);
    return {size - take, take};
  }
  if (range.offset >= size) return {size, 0};
  return {range.offset, std::min(range.length, size - range.offset)};
}

absl::StatusOr<buffer::cpu::Buffer> RangedHttpBackend::RangedGet(absl::string_view key,
                                                                 const ByteRange& range,
                                                                 ValueInfo* info) {
  // The answer's version must be the expected one, If-Match or not: servers without etags or
  // with weak ones get no If-Match, and an S3 object rewritten with the same bytes keeps its
  // etag but not its generation.
  auto finish = [&](ValueInfo got,
                    buffer::cpu::Buffer bytes) -> absl::StatusOr<buffer::cpu::Buffer> {
    if (range.expected && got.generation != range.expected->generation) {
      return VersionChangedError(key, range.expected->generation);
    }
    if (info) *info = std::move(got);
    return bytes;
  };
  const std::string what = absl::StrCat("GET key ", QuoteKey(key));
  const bool if_match = range.expected && StrongEtag(range.expected->etag);
  // What is asked of the server: the range, or after a 416 for a range that runs past the end
  // (some servers, cpp-httplib's among them, refuse those instead of sending what exists), the
  // part of it the value holds.
  ByteRange asked = range;
  for (int attempt = 1;; ++attempt) {
    if (range.length == 0) {
      auto now = Stat(key);
      if (!now.ok()) return now.status();
      return finish(*std::move(now), buffer::cpu::Buffer());
    }
    HttpRequest request = NewGet(key);
    request.headers.push_back(RangeHeader(asked));
    if (if_match) request.headers.push_back(absl::StrCat("If-Match: ", range.expected->etag));
    auto r = transport_.Perform(request, what);
    if (!r.ok()) return r.status();
    if (r->status == 412 && if_match) {
      // Another version, or none: some stores answer 412 for a missing object too.
      auto now = Stat(key);
      if (absl::IsNotFound(now.status())) return now.status();
      return VersionChangedError(key, range.expected->generation);
    }
    if (r->status == 416) {
      // No byte to give: the range starts at or past the end, or the value is empty.
      auto now = Stat(key);
      if (!now.ok()) return now.status();
      auto [start, length] = PartOf(range, now->size);
      if (length == 0) return finish(*std::move(now), buffer::cpu::Buffer());
      // The value has bytes there: ask for exactly those (a server that refuses ranges past
      // the end), once; a second 416 means it was replaced meanwhile.
      if (attempt >= 2) {
        return absl::AbortedError(
            absl::StrCat("key ", QuoteKey(key), " changed while being read by range; try again"));
      }
      asked = range;
      asked.suffix = false;
      asked.offset = start;
      asked.length = length;
      continue;
    }
    if (absl::Status s = CheckResponse(*r, key, "GET"); !s.ok()) return s;
    std::string etag = r->Header("etag").value_or("");
    if (r->status == 206) {
      auto total = TotalFromContentRange(r->Header("content-range").value_or(""));
      if (!total) {
        return absl::InternalError(absl::StrCat(what, ": a partial answer without a total size"));
      }
      return finish({*total, GenerationOf(*r, *total), std::move(etag)}, std::move(r->body));
    }
    // 200: the server sent the whole value (it ignores Range, or the range is all of it).
    uint64_t size = r->body.size();
    auto [start, length] = PartOf(range, size);
    return finish({size, GenerationOf(*r, size), std::move(etag)}, r->body.Slice(start, length));
  }
}

}  // namespace chunkd::server::http

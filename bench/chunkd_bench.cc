// chunkd_bench: one measurement per invocation, printed as one JSON line on stdout.
//
// The same keys and the same value bytes go to every peer: value i of a set is a deterministic
// function of (prefix, i, size), so `load` (files and Redis), the memcpy ceiling and the checks
// of fetched bytes all agree without sharing state between processes.
//
//   --action=load           write the values as files under --dir and/or SET them into --redis
//   --action=measure        fetch values from one peer with --clients threads: warm-up, then a
//                           timed phase; throughput, latency percentiles, server CPU and RSS
//   --action=replay         replay one fixed Zipf trace against chunkd; miss ratio from counters
//   --action=single_flight  N concurrent Gets of a value that is in the store but not cached;
//                           backend reads from counters (expected: 1 per key)
//   --action=churn          Puts and Gets of many distinct keys, far beyond the cache budget;
//                           peak RSS of the server against budget * 1.1 + 64 MiB
//
// Peers (--peer) of `measure`: chunkd (--delivery=inline over TCP or a UNIX socket, by
// --address; --delivery=shm: a handle to the server's shared memory, every byte of the value
// then read in place (a checksum); --delivery=shm-handles: the handle and its mapped view
// only, no byte read: handles per second, not bytes), redis (hiredis GET), pread (the values
// as files), memcpy (copying the same bytes from this process's memory: the single-copy
// ceiling), read (reading them in place: the ceiling of the shm rows) and s3 (a GET of the same
// objects straight from an S3 server, signed by libcurl: --s3_url).
#include <curl/curl.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/grpc_floor.h"
#include "buffer/cpu/buffer.h"
#include "buffer/read_every_byte.h"
#include "client/client.h"

ABSL_FLAG(std::string, action, "measure",
          "load | measure | replay | single_flight | churn | grpc_floor_server");
ABSL_FLAG(std::string, ready_file, "",
          "grpc_floor_server: write the bound address here once serving");
ABSL_FLAG(std::string, peer, "chunkd",
          "measure: chunkd | redis | grpc (the gRPC floor, bench/grpc_floor.h) | pread | memcpy | "
          "read (every byte of in-process values read: the in-place reader's ceiling) | s3");
ABSL_FLAG(std::string, delivery, "inline",
          "chunkd: inline | shm (every byte of each value read in the shared memory, a "
          "checksum, before the request counts) | shm-handles (the mapped view only, no "
          "byte read: a count of handles, not of bytes). The transport follows --address");
ABSL_FLAG(std::string, shm_dir, "/dev/shm",
          "chunkd: this process's path of the server's --shm_dir (shm deliveries)");
ABSL_FLAG(std::string, address, "",
          "chunkd or Redis address: HOST:PORT or unix:/path. For chunkd, a comma-separated list: "
          "client thread t uses address t % N. gRPC channels to the same address share one "
          "connection, so a list of as many listening addresses as clients gives each client its "
          "own connection, as Redis clients have");
ABSL_FLAG(std::string, dir, "",
          "directory holding the values as files: pread peer; load target; "
          "chunkd's store directory for single_flight");
ABSL_FLAG(std::string, s3_url, "",
          "s3 peer: base URL of the objects, path style (http://HOST:PORT/BUCKET/PREFIX); key K is "
          "the object BASE/K, as chunkd --store=s3://BUCKET/PREFIX names it. Signed with AWS "
          "Signature V4 (libcurl) from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
          "(/ AWS_SESSION_TOKEN); unsigned without them");
ABSL_FLAG(std::string, s3_region, "us-east-1", "s3 peer: the region requests are signed for");
ABSL_FLAG(std::string, redis, "", "load: Redis address (HOST:PORT or unix:/path) to SET into");
ABSL_FLAG(std::string, prefix, "bench", "value i of the set has key PREFIX/%06d");
ABSL_FLAG(int64_t, size, 65536, "bytes per value");
ABSL_FLAG(int64_t, keys, 1024, "values in the set");
ABSL_FLAG(int32_t, clients, 1, "concurrent clients (threads, each with its own connection)");
ABSL_FLAG(int32_t, batch, 1,
          "measure: values per request. chunkd: one GetMany of BATCH keys; redis: BATCH GETs "
          "pipelined in one round trip. rps and GB/s count values; latencies are per request "
          "(per batch)");
ABSL_FLAG(absl::Duration, warmup, absl::Seconds(1), "untimed requests before the timed phase");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(3),
          "timed phase; it goes on past this until --clients requests have completed (so a slow "
          "peer still gets one request per client counted), up to 10 times this");
ABSL_FLAG(std::string, workload, "hit",
          "hit: every key fetched once before timing, then uniform draws; zipf: Zipf draws; "
          "s3: uniform draws, 16 keys per client fetched and checked before timing (a remote "
          "store is slow to read whole sets; bench/run warms chunkd with a pass of its own)");
ABSL_FLAG(double, zipf_alpha, 0.99, "skew of the Zipf draws and traces");
ABSL_FLAG(uint64_t, seed, 1, "seed of draws and traces (same seed: same trace)");
ABSL_FLAG(int32_t, server_pid, 0, "pid of the server process (CPU and peak RSS); 0: none");
ABSL_FLAG(int64_t, requests, 100000, "replay: length of the trace");
ABSL_FLAG(double, warm_fraction, 0.2, "replay: share of the trace replayed before counting");
ABSL_FLAG(int32_t, rounds, 3, "single_flight: keys tried, one after another");
ABSL_FLAG(int64_t, budget, 0, "churn: the server's --host_cache_bytes");
ABSL_FLAG(std::string, label, "",
          "replay: a label for the row (the eviction policy); measure: appended to the "
          "delivery's name (\"shm\" + \"-novalidate\"), for a server run with other flags");

namespace {

using chunkd::client::Client;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Values and keys.

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::string KeyOf(const std::string& prefix, int64_t i) {
  return absl::StrFormat("%s/%06d", prefix, i);
}

// Value i of a set: pseudo-random bytes, the same in every process.
void FillValue(const std::string& prefix, int64_t i, char* out, size_t size) {
  uint64_t state = Fnv1a(prefix) ^ (static_cast<uint64_t>(i) * 0x2545f4914f6cdd1dull);
  size_t n = 0;
  for (; n + 8 <= size; n += 8) {
    uint64_t v = SplitMix(state);
    std::memcpy(out + n, &v, 8);
  }
  if (n < size) {
    uint64_t v = SplitMix(state);
    std::memcpy(out + n, &v, size - n);
  }
}

std::string MakeValue(const std::string& prefix, int64_t i, size_t size) {
  std::string v(size, '\0');
  FillValue(prefix, i, v.data(), size);
  return v;
}

// Runs fn(i) for i in [0, n) on `threads` threads.
template <typename Fn>
void ParallelFor(int64_t n, int threads, Fn fn) {
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i);
    });
  }
  for (auto& th : pool) th.join();
}

// Zipf(alpha) over n ranks; ranks map to keys through a fixed permutation, so the hot keys are
// spread over the set rather than being its first names.
class Zipf {
 public:
  Zipf(int64_t n, double alpha, uint64_t seed) : cdf_(n), perm_(n) {
    double sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      sum += 1.0 / std::pow(static_cast<double>(r + 1), alpha);
      cdf_[r] = sum;
    }
    for (double& c : cdf_) c /= sum;
    for (int64_t r = 0; r < n; ++r) perm_[r] = r;
    std::mt19937_64 rng(seed ^ 0x5a5a5a5aull);
    std::shuffle(perm_.begin(), perm_.end(), rng);
  }
  int64_t operator()(std::mt19937_64& rng) const {
    double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    auto it = std::lower_bound(cdf_.begin(), cdf_.end(), u);
    int64_t r = std::min<int64_t>(it - cdf_.begin(), static_cast<int64_t>(cdf_.size()) - 1);
    return perm_[r];
  }

 private:
  std::vector<double> cdf_;
  std::vector<int64_t> perm_;
};

// ---------------------------------------------------------------------------------------------
// Latency: a log-linear histogram (64 buckets per power of two: under 1.6% error), in ns.

class Histogram {
 public:
  static constexpr int kSub = 64;
  Histogram() : counts_(kSub * 48, 0) {}
  void Add(uint64_t ns) {
    ++counts_[Index(ns)];
    ++total_;
  }
  void Merge(const Histogram& o) {
    for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += o.counts_[i];
    total_ += o.total_;
  }
  uint64_t total() const { return total_; }
  // The q-quantile in microseconds (the midpoint of its bucket); NaN when empty.
  double QuantileUs(double q) const {
    if (total_ == 0) return NAN;
    uint64_t want = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(q * total_)));
    uint64_t seen = 0;
    for (size_t i = 0; i < counts_.size(); ++i) {
      seen += counts_[i];
      if (seen >= want) {
        auto [lo, width] = Bounds(i);
        return (lo + width / 2.0) / 1000.0;
      }
    }
    return NAN;
  }

 private:
  static size_t Index(uint64_t v) {
    if (v < kSub) return v;
    int e = 63 - std::countl_zero(v);  // >= 6
    size_t idx = static_cast<size_t>(e - 5) * kSub + ((v >> (e - 6)) & (kSub - 1));
    return std::min(idx, static_cast<size_t>(kSub * 48 - 1));
  }
  static std::pair<double, double> Bounds(size_t idx) {
    if (idx < kSub) return {static_cast<double>(idx), 1.0};
    int e = static_cast<int>(idx / kSub) + 5;
    uint64_t sub = idx % kSub;
    return {static_cast<double>((kSub + sub) << (e - 6)), static_cast<double>(1ull << (e - 6))};
  }
  std::vector<uint64_t> counts_;
  uint64_t total_ = 0;
};

// ---------------------------------------------------------------------------------------------
// The server process: CPU time and peak RSS from /proc.

double ProcessCpuSeconds(int pid) {
  if (pid <= 0) return NAN;
  std::ifstream in(absl::StrFormat("/proc/%d/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return NAN;
  // Fields after "pid (comm)": state is field 3; utime and stime are fields 14 and 15.
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(stat).substr(paren + 2), ' ', absl::SkipEmpty());
  uint64_t utime = 0, stime = 0;
  if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &utime) ||
      !absl::SimpleAtoi(fields[12], &stime)) {
    return NAN;
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// A "VmHWM:" or "VmRSS:" line of /proc/PID/status, in MiB.
double ProcessMemMb(int pid, absl::string_view field) {
  if (pid <= 0) return NAN;
  std::ifstream in(absl::StrFormat("/proc/%d/status", pid));
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, field)) {
      int64_t kb = 0;
      absl::string_view rest = absl::string_view(line).substr(field.size());
      rest = rest.substr(0, rest.find("kB"));
      if (absl::SimpleAtoi(absl::StripAsciiWhitespace(rest), &kb)) return kb / 1024.0;
    }
  }
  return NAN;
}

// Resets the peak RSS (VmHWM) of the process to its current RSS.
bool ResetPeakRss(int pid) {
  if (pid <= 0) return false;
  std::ofstream out(absl::StrFormat("/proc/%d/clear_refs", pid));
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

double ClientCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
         u.ru_stime.tv_usec / 1e6;
}

// ---------------------------------------------------------------------------------------------
// One JSON object on one line.

class Json {
 public:
  Json& Str(const char* k, std::string_view v) { return Raw(k, Quote(v)); }
  Json& Int(const char* k, int64_t v) { return Raw(k, absl::StrFormat("%d", v)); }
  Json& Num(const char* k, double v) {
    return Raw(k, std::isfinite(v) ? absl::StrFormat("%.6g", v) : "null");
  }
  Json& Bool(const char* k, bool v) { return Raw(k, v ? "true" : "false"); }
  Json& Null(const char* k) { return Raw(k, "null"); }
  Json& Raw(const char* k, const std::string& v) {
    if (!body_.empty()) body_ += ",";
    body_ += absl::StrFormat("\"%s\":%s", k, v);
    return *this;
  }
  void Print() const {
    std::printf("{%s}\n", body_.c_str());
    std::fflush(stdout);
  }
  static std::string Quote(std::string_view s) {
    std::string out = "\"";
    for (unsigned char c : s) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += static_cast<char>(c);
      } else if (c < 0x20) {
        out += absl::StrFormat("\\u%04x", c);
      } else {
        out += static_cast<char>(c);
      }
    }
    return out + "\"";
  }

 private:
  std::string body_;
};

// ---------------------------------------------------------------------------------------------
// chunkd ServerInfo counters.

using Counters = std::map<std::string, uint64_t>;

absl::StatusOr<Counters> ReadCounters(Client& client) {
  auto info = client.ServerInfo();
  if (!info.ok()) return info.status();
  return Counters(info->counters().begin(), info->counters().end());
}

int64_t Delta(const Counters& before, const Counters& after, const std::string& name) {
  auto a = after.find(name), b = before.find(name);
  return (a == after.end() ? 0 : static_cast<int64_t>(a->second)) -
         (b == before.end() ? 0 : static_cast<int64_t>(b->second));
}

absl::StatusOr<std::unique_ptr<Client>> ConnectChunkd(const std::string& address) {
  chunkd::client::ClientOptions options;
  options.address = address;
  options.timeout = absl::Seconds(30);
  options.shm_dir = absl::GetFlag(FLAGS_shm_dir);
  return Client::Connect(options);
}

// ---------------------------------------------------------------------------------------------
// Sessions: one per client thread, each with its own connection.

// Reads every byte of `v` once, writing nothing: buffer/read_every_byte.h's sum (the routine the
// Python driver calls too), kept from being optimised away. What a reader that decodes or checks
// a value in place pays at the least; the shm rows and the `read` ceiling both use it.
inline void ReadEveryByte(std::string_view v) {
  uint64_t sum = chunkd::buffer::ReadEveryByte(v);
  asm volatile("" : : "r"(sum));
}

class Session {
 public:
  virtual ~Session() = default;
  // Fetches value i. The view stays valid until the next Fetch.
  virtual absl::StatusOr<std::string_view> Fetch(int64_t i) = 0;
  // Fetches values `indexes` in one request (--batch); the views stay valid until the next
  // fetch. Peers without a batched form say so.
  virtual absl::Status FetchMany(const std::vector<int64_t>& indexes,
                                 std::vector<absl::StatusOr<std::string_view>>* out) {
    return absl::UnimplementedError("this peer has no batched form (--batch)");
  }
};

// Shared-memory delivery. The client library gains a way to ask for it (GetOptions::accept);
// until it has one, the shm row prints as not available. Detected at compile time, so the row
// appears by itself once the client can ask; the check of GetResult::delivery in Fetch keeps a
// silent fallback to inline from ever counting as shm.
template <typename Options>
constexpr bool CanAskForShm() {
  return requires(Options o) { o.accept = std::vector<chunkd::v1::Delivery>{}; };
}
constexpr bool kClientCanAskForShm = CanAskForShm<chunkd::client::GetOptions>();

template <typename Options>
void AskForShm(Options& options) {
  if constexpr (CanAskForShm<Options>()) {
    options.accept = std::vector<chunkd::v1::Delivery>{chunkd::v1::DELIVERY_SHM};
  }
}

class ChunkdSession final : public Session {
 public:
  static absl::StatusOr<std::unique_ptr<Session>> Create(const std::string& address,
                                                         const std::string& delivery,
                                                         const std::vector<std::string>* keys) {
    auto client = ConnectChunkd(address);
    if (!client.ok()) return client.status();
    auto s = std::unique_ptr<ChunkdSession>(new ChunkdSession(std::move(*client), keys));
    if (delivery == "inline") {
      s->want_ = chunkd::v1::DELIVERY_INLINE;
    } else if (delivery == "shm" || delivery == "shm-handles") {
      s->want_ = chunkd::v1::DELIVERY_SHM;
      s->read_bytes_ = delivery == "shm";
      AskForShm(s->options_);
    } else {
      return absl::InvalidArgumentError("--delivery: inline, shm or shm-handles");
    }
    return std::unique_ptr<Session>(std::move(s));
  }

  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    auto r = client_->Get((*keys_)[i], options_);
    if (!r.ok()) return r.status();
    if (r->delivery != want_) {
      return absl::InternalError(absl::StrFormat("asked for %s, got %s",
                                                 chunkd::v1::Delivery_Name(want_),
                                                 chunkd::v1::Delivery_Name(r->delivery)));
    }
    last_ = std::move(*r);
    // Inline bytes were all written by the socket into the client's buffer; a shared-memory
    // view has had none of its bytes read: read them all (a checksum, as the `read` peer does)
    // before the request counts. The lease goes back at the next fetch.
    if (read_bytes_) ReadEveryByte(last_.data.view());
    return last_.data.view();
  }

  absl::Status FetchMany(const std::vector<int64_t>& indexes,
                         std::vector<absl::StatusOr<std::string_view>>* out) override {
    std::vector<chunkd::client::GetManyItem> items;
    items.reserve(indexes.size());
    for (int64_t i : indexes) items.push_back({(*keys_)[i], {}, {}});
    last_many_.clear();  // the previous batch's leases go back before the next one
    auto r = client_->GetMany(items, options_);
    if (!r.ok()) return r.status();
    last_many_ = *std::move(r);
    out->clear();
    for (auto& item : last_many_) {
      if (!item.ok()) {
        out->push_back(item.status());
      } else if (item->delivery != want_) {
        out->push_back(absl::InternalError(
            absl::StrFormat("asked for %s, got %s", chunkd::v1::Delivery_Name(want_),
                            chunkd::v1::Delivery_Name(item->delivery))));
      } else {
        if (read_bytes_) ReadEveryByte(item->data.view());  // as in Fetch
        out->push_back(item->data.view());
      }
    }
    return absl::OkStatus();
  }

 private:
  ChunkdSession(std::unique_ptr<Client> client, const std::vector<std::string>* keys)
      : client_(std::move(client)), keys_(keys) {}

  std::unique_ptr<Client> client_;
  const std::vector<std::string>* keys_;
  chunkd::client::GetOptions options_;
  chunkd::v1::Delivery want_ = chunkd::v1::DELIVERY_INLINE;
  bool read_bytes_ = false;
  chunkd::client::GetResult last_;
  chunkd::client::GetManyResults last_many_;
};

absl::StatusOr<redisContext*> ConnectRedis(const std::string& address) {
  redisContext* c = nullptr;
  timeval tv{10, 0};
  if (absl::StartsWith(address, "unix:")) {
    c = redisConnectUnixWithTimeout(address.substr(5).c_str(), tv);
  } else {
    size_t colon = address.rfind(':');
    int port = 0;
    if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port)) {
      return absl::InvalidArgumentError("redis address: HOST:PORT or unix:/path");
    }
    c = redisConnectWithTimeout(address.substr(0, colon).c_str(), port, tv);
  }
  if (c == nullptr || c->err) {
    std::string why = c ? c->errstr : "out of memory";
    if (c) redisFree(c);
    return absl::UnavailableError("redis connect " + address + ": " + why);
  }
  return c;
}

class RedisSession final : public Session {
 public:
  static absl::StatusOr<std::unique_ptr<Session>> Create(const std::string& address,
                                                         const std::vector<std::string>* keys) {
    auto c = ConnectRedis(address);
    if (!c.ok()) return c.status();
    return std::unique_ptr<Session>(new RedisSession(*c, keys));
  }
  ~RedisSession() override {
    FreeMany();
    if (last_) freeReplyObject(last_);
    redisFree(c_);
  }
  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    if (last_) freeReplyObject(last_);
    const std::string& key = (*keys_)[i];
    last_ = static_cast<redisReply*>(redisCommand(c_, "GET %b", key.data(), key.size()));
    if (last_ == nullptr) return absl::UnavailableError(absl::StrCat("redis: ", c_->errstr));
    if (last_->type != REDIS_REPLY_STRING) {
      return absl::NotFoundError(absl::StrFormat("redis GET %s: reply type %d", key, last_->type));
    }
    return std::string_view(last_->str, last_->len);
  }

  // Redis's own batching: the GETs are pipelined (written together, then the replies read).
  absl::Status FetchMany(const std::vector<int64_t>& indexes,
                         std::vector<absl::StatusOr<std::string_view>>* out) override {
    FreeMany();
    for (int64_t i : indexes) {
      const std::string& key = (*keys_)[i];
      if (redisAppendCommand(c_, "GET %b", key.data(), key.size()) != REDIS_OK) {
        return absl::UnavailableError(absl::StrCat("redis: ", c_->errstr));
      }
    }
    out->clear();
    for (int64_t i : indexes) {
      void* reply = nullptr;
      if (redisGetReply(c_, &reply) != REDIS_OK || reply == nullptr) {
        return absl::UnavailableError(absl::StrCat("redis: ", c_->errstr));
      }
      auto* r = static_cast<redisReply*>(reply);
      many_.push_back(r);
      if (r->type != REDIS_REPLY_STRING) {
        out->push_back(absl::NotFoundError(
            absl::StrFormat("redis GET %s: reply type %d", (*keys_)[i], r->type)));
      } else {
        out->push_back(std::string_view(r->str, r->len));
      }
    }
    return absl::OkStatus();
  }

 private:
  RedisSession(redisContext* c, const std::vector<std::string>* keys) : c_(c), keys_(keys) {}
  void FreeMany() {
    for (redisReply* r : many_) freeReplyObject(r);
    many_.clear();
  }
  redisContext* c_;
  const std::vector<std::string>* keys_;
  redisReply* last_ = nullptr;
  std::vector<redisReply*> many_;
};

// The gRPC floor (bench/grpc_floor.h): the same call with no chunkd code in it.
class GrpcFloorSession final : public Session {
 public:
  explicit GrpcFloorSession(std::unique_ptr<chunkd::bench::GrpcFloorClient> client)
      : client_(std::move(client)) {}
  absl::StatusOr<std::string_view> Fetch(int64_t) override { return client_->Fetch(); }

 private:
  std::unique_ptr<chunkd::bench::GrpcFloorClient> client_;
};

// The local-disk reference: open, pread the whole file, close, as a file store would.
class PreadSession final : public Session {
 public:
  PreadSession(const std::string& dir, const std::vector<std::string>* keys, size_t size)
      : dir_(dir), keys_(keys), buffer_(size + 1) {}
  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    std::string path = dir_ + "/" + (*keys_)[i];
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::NotFoundError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
    size_t n = 0;
    while (n < buffer_.size()) {
      ssize_t r = ::pread(fd, buffer_.data() + n, buffer_.size() - n, static_cast<off_t>(n));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        int err = errno;
        ::close(fd);
        return absl::InternalError(absl::StrCat("pread ", path, ": ", std::strerror(err)));
      }
      if (r == 0) break;
      n += static_cast<size_t>(r);
    }
    ::close(fd);
    return std::string_view(buffer_.data(), n);
  }

 private:
  std::string dir_;
  const std::vector<std::string>* keys_;
  std::vector<char> buffer_;
};

// The ceiling: one copy of the same bytes from this process's memory.
class MemcpySession final : public Session {
 public:
  MemcpySession(const std::vector<std::string>* values, size_t size)
      : values_(values), buffer_(size) {
    std::memset(buffer_.data(), 1, size);  // fault the pages in before timing
  }
  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    const std::string& v = (*values_)[i];
    std::memcpy(buffer_.data(), v.data(), v.size());
    asm volatile("" : : "r"(buffer_.data()) : "memory");
    return std::string_view(buffer_.data(), v.size());
  }

 private:
  const std::vector<std::string>* values_;
  std::vector<char> buffer_;
};

// The in-place reader's ceiling: every byte of the same values read (ReadEveryByte) in this
// process's memory, as the shm rows read the server's.
class ReadSession final : public Session {
 public:
  explicit ReadSession(const std::vector<std::string>* values) : values_(values) {}
  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    ReadEveryByte((*values_)[i]);
    return std::string_view((*values_)[i]);
  }

 private:
  const std::vector<std::string>* values_;
};

// A remote store read directly: one GET per value from an S3 server (path-style URL), signed
// with AWS Signature V4 by libcurl. One easy handle per client thread, reused, so its
// connection stays open between requests (as chunkd's own S3 backend does).
class S3Session final : public Session {
 public:
  static absl::StatusOr<std::unique_ptr<Session>> Create(const std::string& base,
                                                         const std::vector<std::string>* keys,
                                                         size_t size) {
    if (base.empty()) return absl::InvalidArgumentError("s3: give --s3_url");
    CURL* curl = curl_easy_init();
    if (curl == nullptr) return absl::InternalError("curl_easy_init failed");
    auto s = std::unique_ptr<S3Session>(new S3Session(curl, base, keys, size));
    const char* id = std::getenv("AWS_ACCESS_KEY_ID");
    const char* secret = std::getenv("AWS_SECRET_ACCESS_KEY");
    const char* token = std::getenv("AWS_SESSION_TOKEN");
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT, 120L);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &S3Session::Write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, s.get());
    if (id != nullptr && secret != nullptr && *id != '\0') {
      s->sigv4_ = absl::StrCat("aws:amz:", absl::GetFlag(FLAGS_s3_region), ":s3");
      s->userpwd_ = absl::StrCat(id, ":", secret);
      curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, s->sigv4_.c_str());
      curl_easy_setopt(curl, CURLOPT_USERPWD, s->userpwd_.c_str());
      if (token != nullptr && *token != '\0') {
        s->headers_ =
            curl_slist_append(nullptr, absl::StrCat("x-amz-security-token: ", token).c_str());
        curl_easy_setopt(curl, CURLOPT_HTTPHEADER, s->headers_);
      }
    }
    return std::unique_ptr<Session>(std::move(s));
  }
  ~S3Session() override {
    curl_easy_cleanup(curl_);
    if (headers_) curl_slist_free_all(headers_);
  }
  absl::StatusOr<std::string_view> Fetch(int64_t i) override {
    body_.clear();
    std::string url = absl::StrCat(base_, "/", (*keys_)[i]);
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    CURLcode rc = curl_easy_perform(curl_);
    if (rc != CURLE_OK) {
      return absl::UnavailableError(absl::StrCat("GET ", url, ": ", curl_easy_strerror(rc)));
    }
    long code = 0;
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &code);
    if (code != 200) {
      return absl::UnavailableError(
          absl::StrFormat("GET %s: HTTP %d %s", url, code, body_.substr(0, 200)));
    }
    return std::string_view(body_);
  }

 private:
  S3Session(CURL* curl, const std::string& base, const std::vector<std::string>* keys, size_t size)
      : curl_(curl), base_(base), keys_(keys) {
    while (!base_.empty() && base_.back() == '/') base_.pop_back();
    body_.reserve(size + 1);
  }
  static size_t Write(char* data, size_t one, size_t n, void* self) {
    static_cast<S3Session*>(self)->body_.append(data, one * n);
    return one * n;
  }
  CURL* curl_;
  std::string base_;
  const std::vector<std::string>* keys_;
  std::string sigv4_, userpwd_;
  curl_slist* headers_ = nullptr;
  std::string body_;
};

// ---------------------------------------------------------------------------------------------
// Actions.

std::vector<std::string> Addresses() {
  return absl::StrSplit(absl::GetFlag(FLAGS_address), ',', absl::SkipEmpty());
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "chunkd_bench: %s\n", message.c_str());
  return 1;
}

std::vector<std::string> MakeKeys(const std::string& prefix, int64_t n) {
  std::vector<std::string> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = KeyOf(prefix, i);
  return keys;
}

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::string temp = absl::StrFormat("%s.tmp.%d", path, getpid());
  int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", temp, ": ", std::strerror(errno)));
  size_t n = 0;
  while (n < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + n, bytes.size() - n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("write ", temp, ": ", std::strerror(errno)));
    }
    n += static_cast<size_t>(w);
  }
  ::close(fd);
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("rename ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

int Load() {
  const std::string prefix = absl::GetFlag(FLAGS_prefix), dir = absl::GetFlag(FLAGS_dir),
                    redis = absl::GetFlag(FLAGS_redis);
  const int64_t n = absl::GetFlag(FLAGS_keys), size = absl::GetFlag(FLAGS_size);
  if (dir.empty() && redis.empty()) return Fail("load: give --dir and/or --redis");
  absl::Time start = absl::Now();
  std::atomic<int64_t> files{0};
  std::string error;
  std::mutex error_mu;
  const int threads = std::max(1u, std::min(4u, std::thread::hardware_concurrency()));
  std::vector<redisContext*> conns(threads, nullptr);
  if (!redis.empty()) {
    for (auto& c : conns) {
      auto r = ConnectRedis(redis);
      if (!r.ok()) return Fail(std::string(r.status().message()));
      c = *r;
    }
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::string value(size, '\0');
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        FillValue(prefix, i, value.data(), size);
        std::string key = KeyOf(prefix, i);
        if (!dir.empty()) {
          if (absl::Status s = WriteFileAtomically(dir + "/" + key, value); !s.ok()) {
            std::lock_guard<std::mutex> lock(error_mu);
            error = std::string(s.message());
            return;
          }
          files.fetch_add(1);
        }
        if (conns[t]) {
          auto* reply = static_cast<redisReply*>(redisCommand(
              conns[t], "SET %b %b", key.data(), key.size(), value.data(), value.size()));
          bool ok = reply && reply->type == REDIS_REPLY_STATUS;
          if (reply) freeReplyObject(reply);
          if (!ok) {
            std::lock_guard<std::mutex> lock(error_mu);
            error = absl::StrCat("redis SET ", key, " failed: ", conns[t]->errstr);
            return;
          }
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto* c : conns) {
    if (c) redisFree(c);
  }
  if (!error.empty()) return Fail(error);
  Json()
      .Str("action", "load")
      .Str("prefix", prefix)
      .Int("keys", n)
      .Int("size", size)
      .Bool("files", !dir.empty())
      .Bool("redis", !redis.empty())
      .Num("seconds", absl::ToDoubleSeconds(absl::Now() - start))
      .Print();
  return 0;
}

std::string DeliveryLabel(const std::string& peer, const std::string& delivery,
                          const std::string& address) {
  bool unix_socket = absl::StartsWith(address, "unix:");
  if (peer == "chunkd") {
    if (delivery == "inline") return unix_socket ? "inline-unix" : "inline-tcp";
    return delivery;
  }
  if (peer == "redis") return unix_socket ? "unix" : "tcp";
  if (peer == "pread") return "file";
  if (peer == "s3") return "http";
  if (peer == "grpc") return "floor";
  return "memory";
}

// The first fields of the rows of replay, single_flight and churn: the same keys as measure's
// rows, so every line of results.jsonl has them (throughput and latency are not their point).
Json SpecialRow(const char* workload, const std::string& address, int64_t size, int clients) {
  Json row;
  row.Str("peer", "chunkd").Str("delivery", DeliveryLabel("chunkd", "inline", address));
  row.Int("size", size).Int("clients", clients).Str("workload", workload);
  row.Null("gbps").Null("rps").Null("p50_us").Null("p99_us");
  return row;
}

struct ThreadResult {
  Histogram hist;
  int64_t requests = 0;
  int64_t bytes = 0;
  int64_t errors = 0;
  int64_t warm_errors = 0;
  int64_t mismatches = 0;
  std::string first_error;
  Clock::time_point last_end{};
};

int Measure() {
  const std::string peer = absl::GetFlag(FLAGS_peer), delivery = absl::GetFlag(FLAGS_delivery),
                    address = absl::GetFlag(FLAGS_address), prefix = absl::GetFlag(FLAGS_prefix),
                    workload = absl::GetFlag(FLAGS_workload), dir = absl::GetFlag(FLAGS_dir);
  const int64_t n = absl::GetFlag(FLAGS_keys), size = absl::GetFlag(FLAGS_size);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int pid = absl::GetFlag(FLAGS_server_pid);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (workload != "hit" && workload != "zipf" && workload != "s3") {
    return Fail("--workload: hit, zipf or s3");
  }
  if (clients < 1 || n < 1 || size < 1) return Fail("--clients, --keys, --size must be positive");

  const std::vector<std::string> addresses = absl::StrSplit(address, ',', absl::SkipEmpty());
  if ((peer == "chunkd" || peer == "redis" || peer == "grpc") && addresses.empty()) {
    return Fail("give --address");
  }
  const std::string label = DeliveryLabel(peer, delivery, address) + absl::GetFlag(FLAGS_label);
  Json row;
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1 || batch > 4096) return Fail("--batch: 1 to 4096");
  if (batch > 1 && peer != "chunkd" && peer != "redis") {
    return Fail("--batch: chunkd (GetMany) and redis (pipelined GETs) only");
  }
  row.Str("peer", peer).Str("delivery", label).Int("size", size).Int("clients", clients);
  row.Str("workload", workload).Int("keys", n).Int("batch", batch);
  // What a request counts: the value's bytes delivered to (and so read by) the client, or only
  // a handle to them (shm-handles: its gbps are bytes made readable, never read).
  row.Str("counts", peer == "chunkd" && delivery == "shm-handles" ? "handles" : "bytes");
  if (peer == "chunkd") {
    row.Int("connections", std::min<int64_t>(clients, static_cast<int64_t>(addresses.size())));
  } else if (peer == "redis" || peer == "s3" || peer == "grpc") {
    row.Int("connections", clients);
  }

  const std::vector<std::string> keys = MakeKeys(prefix, n);
  std::vector<std::string> values;  // the source of memcpy and read
  if (peer == "memcpy" || peer == "read") {
    values.resize(n);
    ParallelFor(n, 2, [&](int64_t i) { values[i] = MakeValue(prefix, i, size); });
  }

  // chunkd: a separate connection for ServerInfo counters; for shm, whether it can be measured.
  std::unique_ptr<Client> info_client;
  if (peer == "chunkd") {
    auto c = ConnectChunkd(addresses[0]);
    if (!c.ok()) return Fail(std::string(c.status().message()));
    info_client = std::move(*c);
    auto info = info_client->ServerInfo();
    if (!info.ok()) return Fail(absl::StrCat("ServerInfo: ", info.status().message()));
    if (delivery == "shm" || delivery == "shm-handles") {
      bool offered = std::find(info->deliveries().begin(), info->deliveries().end(),
                               chunkd::v1::DELIVERY_SHM) != info->deliveries().end();
      std::string why;
      if (!offered) why = "the server does not offer DELIVERY_SHM (ServerInfo.deliveries)";
      if (!kClientCanAskForShm) {
        if (!why.empty()) why += "; ";
        why += "the C++ client cannot ask for DELIVERY_SHM yet";
      }
      if (!why.empty()) {
        row.Bool("available", false).Str("reason", why).Null("gbps").Null("rps");
        row.Null("p50_us").Null("p99_us");
        row.Print();
        return 0;
      }
    }
  }

  std::vector<std::unique_ptr<Session>> sessions;
  for (int t = 0; t < clients; ++t) {
    absl::StatusOr<std::unique_ptr<Session>> s;
    if (peer == "chunkd") {
      s = ChunkdSession::Create(addresses[t % addresses.size()], delivery, &keys);
    } else if (peer == "redis") {
      s = RedisSession::Create(addresses[t % addresses.size()], &keys);
    } else if (peer == "grpc") {
      auto floor = chunkd::bench::GrpcFloorClient::Connect(addresses[t % addresses.size()], t);
      if (floor.ok())
        s = std::unique_ptr<Session>(new GrpcFloorSession(*std::move(floor)));
      else
        s = floor.status();
    } else if (peer == "pread") {
      if (dir.empty()) return Fail("pread: give --dir");
      s = std::unique_ptr<Session>(new PreadSession(dir, &keys, size));
    } else if (peer == "memcpy") {
      s = std::unique_ptr<Session>(new MemcpySession(&values, size));
    } else if (peer == "read") {
      s = std::unique_ptr<Session>(new ReadSession(&values));
    } else if (peer == "s3") {
      s = S3Session::Create(absl::GetFlag(FLAGS_s3_url), &keys, size);
    } else {
      return Fail("--peer: chunkd, redis, grpc, pread, memcpy, read or s3");
    }
    if (!s.ok()) return Fail(std::string(s.status().message()));
    sessions.push_back(*std::move(s));
  }

  std::optional<Zipf> zipf;
  if (workload == "zipf") zipf.emplace(n, absl::GetFlag(FLAGS_zipf_alpha), seed);

  // Phases: 0 priming (hit: every key once, checked), 1 warm-up, 2 timed, 3 stop.
  std::atomic<int> phase{0};
  std::atomic<int> primed{0};
  std::atomic<int64_t> timed_done{0};
  std::vector<ThreadResult> results(clients);
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      Session& session = *sessions[t];
      ThreadResult& res = results[t];
      std::string expected(size, '\0');
      auto check = [&](int64_t i, const absl::StatusOr<std::string_view>& got) {
        if (!got.ok()) {
          ++res.warm_errors;
          if (res.first_error.empty()) res.first_error = std::string(got.status().message());
          return;
        }
        // The gRPC floor's replies are filler of the right size, not the stored values.
        if (peer == "grpc") {
          if (got->size() != static_cast<size_t>(size)) ++res.mismatches;
          return;
        }
        FillValue(prefix, i, expected.data(), size);
        if (*got != std::string_view(expected)) ++res.mismatches;
      };
      if (workload == "hit") {
        for (int64_t i = t; i < n; i += clients) check(i, session.Fetch(i));
      } else {
        for (int k = 0; k < 16; ++k) {
          int64_t i = (t * 16 + k) % n;
          check(i, session.Fetch(i));
        }
      }
      primed.fetch_add(1);
      while (phase.load(std::memory_order_acquire) == 0) std::this_thread::yield();
      std::mt19937_64 rng(seed * 7919 + t);
      std::uniform_int_distribution<int64_t> uniform(0, n - 1);
      std::vector<int64_t> indexes(batch);
      std::vector<absl::StatusOr<std::string_view>> many;
      while (true) {
        int ph = phase.load(std::memory_order_acquire);
        if (ph == 3) break;
        for (int64_t& i : indexes) i = zipf ? (*zipf)(rng) : uniform(rng);
        Clock::time_point t0 = Clock::now();
        absl::Status call = absl::OkStatus();
        if (batch == 1) {
          many.assign(1, session.Fetch(indexes[0]));
        } else {
          call = session.FetchMany(indexes, &many);
        }
        Clock::time_point t1 = Clock::now();
        int64_t good = 0, bytes = 0;
        std::string why = call.ok() ? "" : std::string(call.message());
        for (const auto& got : many) {
          if (got.ok() && got->size() == static_cast<size_t>(size)) {
            ++good;
            bytes += static_cast<int64_t>(got->size());
          } else if (why.empty()) {
            why = got.ok() ? absl::StrFormat("value of %d bytes", got->size())
                           : std::string(got.status().message());
          }
        }
        bool ok = call.ok() && good == batch;
        if (!ok && res.first_error.empty()) res.first_error = why;
        if (ph != 2) {
          if (!ok) ++res.warm_errors;
          continue;
        }
        res.last_end = t1;
        timed_done.fetch_add(1, std::memory_order_relaxed);
        if (!ok) {
          ++res.errors;
          continue;
        }
        res.hist.Add(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        res.requests += batch;
        res.bytes += bytes;
      }
    });
  }
  while (primed.load() < clients) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  phase.store(1, std::memory_order_release);
  absl::SleepFor(absl::GetFlag(FLAGS_warmup));

  Counters before, after;
  if (info_client) {
    auto c = ReadCounters(*info_client);
    if (c.ok()) before = *c;
  }
  bool hwm_reset = ResetPeakRss(pid);
  double server_cpu0 = ProcessCpuSeconds(pid), client_cpu0 = ClientCpuSeconds();
  Clock::time_point start = Clock::now();
  phase.store(2, std::memory_order_release);
  const absl::Duration duration = absl::GetFlag(FLAGS_duration);
  absl::SleepFor(duration);
  const Clock::time_point longest = start + absl::ToChronoNanoseconds(duration * 10);
  while (timed_done.load(std::memory_order_relaxed) < clients && Clock::now() < longest) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  phase.store(3, std::memory_order_release);
  for (auto& th : threads) th.join();
  Clock::time_point end = start;
  for (const auto& r : results) end = std::max(end, r.last_end);
  double server_cpu1 = ProcessCpuSeconds(pid), client_cpu1 = ClientCpuSeconds();
  double peak_rss = ProcessMemMb(pid, "VmHWM:");
  if (info_client) {
    auto c = ReadCounters(*info_client);
    if (c.ok()) after = *c;
  }

  ThreadResult total;
  for (const auto& r : results) {
    total.hist.Merge(r.hist);
    total.requests += r.requests;
    total.bytes += r.bytes;
    total.errors += r.errors;
    total.warm_errors += r.warm_errors;
    total.mismatches += r.mismatches;
    if (total.first_error.empty()) total.first_error = r.first_error;
  }
  double seconds = std::chrono::duration<double>(end - start).count();
  double gb = total.bytes / 1e9;
  row.Bool("available", true);
  row.Num("gbps", seconds > 0 ? gb / seconds : NAN);
  row.Num("rps", seconds > 0 ? total.requests / seconds : NAN);
  row.Num("p50_us", total.hist.QuantileUs(0.50));
  row.Num("p99_us", total.hist.QuantileUs(0.99));
  row.Num("p999_us", total.hist.QuantileUs(0.999));
  row.Num("max_us", total.hist.QuantileUs(1.0));
  row.Int("requests", total.requests).Int("bytes", total.bytes).Num("seconds", seconds);
  row.Num("server_cpu_s_per_gb", gb > 0 ? (server_cpu1 - server_cpu0) / gb : NAN);
  row.Num("client_cpu_s_per_gb", gb > 0 ? (client_cpu1 - client_cpu0) / gb : NAN);
  row.Num("peak_rss_mb", hwm_reset ? peak_rss : NAN);
  if (info_client && !before.empty() && !after.empty()) {
    int64_t hits = Delta(before, after, "hits"), misses = Delta(before, after, "misses");
    row.Num("hit_ratio", hits + misses > 0 ? static_cast<double>(hits) / (hits + misses) : NAN);
    row.Int("backend_reads", Delta(before, after, "backend_reads"));
    row.Int("evictions", Delta(before, after, "evictions"));
  }
  row.Int("errors", total.errors).Int("warm_errors", total.warm_errors);
  row.Int("mismatches", total.mismatches);
  if (!total.first_error.empty()) row.Str("first_error", total.first_error);
  row.Print();
  return total.requests > 0 && total.mismatches == 0 ? 0 : 3;
}

// Replays one Zipf trace (fixed by --seed) against chunkd; the first --warm_fraction of it fills
// the cache, the miss ratio is counted over the rest.
int Replay() {
  const std::string address = absl::GetFlag(FLAGS_address), prefix = absl::GetFlag(FLAGS_prefix);
  const int64_t n = absl::GetFlag(FLAGS_keys), size = absl::GetFlag(FLAGS_size),
                length = absl::GetFlag(FLAGS_requests);
  const int clients = absl::GetFlag(FLAGS_clients);
  const std::vector<std::string> keys = MakeKeys(prefix, n);
  Zipf zipf(n, absl::GetFlag(FLAGS_zipf_alpha), absl::GetFlag(FLAGS_seed));
  std::vector<int64_t> trace(length);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  for (int64_t& k : trace) k = zipf(rng);
  const int64_t warm = static_cast<int64_t>(length * absl::GetFlag(FLAGS_warm_fraction));

  const std::vector<std::string> addresses = Addresses();
  if (addresses.empty()) return Fail("give --address");
  auto info = ConnectChunkd(addresses[0]);
  if (!info.ok()) return Fail(std::string(info.status().message()));
  std::vector<std::unique_ptr<Session>> sessions;
  for (int t = 0; t < clients; ++t) {
    auto s = ChunkdSession::Create(addresses[t % addresses.size()], "inline", &keys);
    if (!s.ok()) return Fail(std::string(s.status().message()));
    sessions.push_back(*std::move(s));
  }
  std::atomic<int64_t> errors{0};
  std::string first_error;
  std::mutex mu;
  auto run = [&](int64_t from, int64_t to) {
    std::atomic<int64_t> next{from};
    std::vector<std::thread> pool;
    for (int t = 0; t < clients; ++t) {
      pool.emplace_back([&, t] {
        for (int64_t j; (j = next.fetch_add(1)) < to;) {
          auto got = sessions[t]->Fetch(trace[j]);
          if (!got.ok() || got->size() != static_cast<size_t>(size)) {
            errors.fetch_add(1);
            std::lock_guard<std::mutex> lock(mu);
            if (first_error.empty()) {
              first_error = got.ok() ? "wrong size" : std::string(got.status().message());
            }
          }
        }
      });
    }
    for (auto& th : pool) th.join();
  };
  auto c0 = ReadCounters(**info);
  absl::Time start = absl::Now();
  run(0, warm);
  auto c1 = ReadCounters(**info);
  run(warm, length);
  auto c2 = ReadCounters(**info);
  double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  if (!c0.ok() || !c1.ok() || !c2.ok()) return Fail("ServerInfo failed during the replay");
  int64_t hits = Delta(*c1, *c2, "hits"), misses = Delta(*c1, *c2, "misses");
  int64_t hits_all = Delta(*c0, *c2, "hits"), misses_all = Delta(*c0, *c2, "misses");
  std::vector<bool> seen(n, false);
  int64_t distinct = 0;
  for (int64_t k : trace) {
    if (!seen[k]) ++distinct, seen[k] = true;
  }
  Json row = SpecialRow("eviction", address, size, clients);
  row.Str("eviction", absl::GetFlag(FLAGS_label)).Int("keys", n).Int("trace", length);
  row.Int("warm_requests", warm).Num("zipf_alpha", absl::GetFlag(FLAGS_zipf_alpha));
  row.Int("distinct_keys", distinct);
  row.Num("miss_ratio", hits + misses > 0 ? static_cast<double>(misses) / (hits + misses) : NAN);
  row.Num("miss_ratio_all", hits_all + misses_all > 0
                                ? static_cast<double>(misses_all) / (hits_all + misses_all)
                                : NAN);
  row.Int("hits", hits).Int("misses", misses);
  row.Int("evictions", Delta(*c0, *c2, "evictions"));
  row.Int("backend_reads", Delta(*c0, *c2, "backend_reads"));
  row.Num("seconds", seconds).Int("errors", errors.load());
  if (!first_error.empty()) row.Str("first_error", first_error);
  row.Print();
  return errors.load() == 0 ? 0 : 3;
}

// --clients concurrent Gets of a value written straight into the store directory (so the cache
// has never seen it), released together; the backend reads they cause, from the counters.
int SingleFlight() {
  const std::string address = absl::GetFlag(FLAGS_address), dir = absl::GetFlag(FLAGS_dir);
  const int64_t size = absl::GetFlag(FLAGS_size);
  const int clients = absl::GetFlag(FLAGS_clients), rounds = absl::GetFlag(FLAGS_rounds);
  if (dir.empty()) return Fail("single_flight: give --dir (chunkd's store directory)");
  const std::vector<std::string> addresses = Addresses();
  if (addresses.empty()) return Fail("give --address");
  auto info = ConnectChunkd(addresses[0]);
  if (!info.ok()) return Fail(std::string(info.status().message()));
  std::vector<std::unique_ptr<Client>> conns;
  for (int t = 0; t < clients; ++t) {
    auto c = ConnectChunkd(addresses[t % addresses.size()]);
    if (!c.ok()) return Fail(std::string(c.status().message()));
    if (auto s = (*c)->ServerInfo(); !s.ok()) return Fail(std::string(s.status().message()));
    conns.push_back(std::move(*c));
  }
  std::vector<int64_t> reads_per_round, joins_per_round;
  int64_t errors = 0;
  std::string first_error;
  for (int r = 0; r < rounds; ++r) {
    const std::string prefix = absl::StrFormat("singleflight/%d-%d", getpid(), r);
    const std::string key = KeyOf(prefix, 0);
    const std::string value = MakeValue(prefix, 0, size);
    if (absl::Status s = WriteFileAtomically(dir + "/" + key, value); !s.ok()) {
      return Fail(std::string(s.message()));
    }
    auto c0 = ReadCounters(**info);
    std::atomic<bool> go{false};
    std::atomic<int> ready{0};
    std::vector<absl::StatusOr<chunkd::client::GetResult>> got(clients);
    std::vector<std::thread> pool;
    for (int t = 0; t < clients; ++t) {
      pool.emplace_back([&, t] {
        ready.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) {
        }
        got[t] = conns[t]->Get(key);
      });
    }
    while (ready.load() < clients) std::this_thread::yield();
    go.store(true, std::memory_order_release);
    for (auto& th : pool) th.join();
    auto c1 = ReadCounters(**info);
    if (!c0.ok() || !c1.ok()) return Fail("ServerInfo failed");
    for (auto& g : got) {
      if (!g.ok() || g->data.view() != value) {
        ++errors;
        if (first_error.empty()) {
          first_error = g.ok() ? "wrong bytes" : std::string(g.status().message());
        }
      }
    }
    reads_per_round.push_back(Delta(*c0, *c1, "backend_reads"));
    joins_per_round.push_back(Delta(*c0, *c1, "single_flight_joins"));
  }
  auto list = [](const std::vector<int64_t>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += absl::StrFormat("%s%d", i ? "," : "", v[i]);
    return s + "]";
  };
  int64_t worst = *std::max_element(reads_per_round.begin(), reads_per_round.end());
  int64_t least = *std::min_element(reads_per_round.begin(), reads_per_round.end());
  Json row = SpecialRow("single_flight", address, size, clients);
  row.Int("rounds", rounds).Raw("backend_reads", list(reads_per_round));
  row.Raw("single_flight_joins", list(joins_per_round));
  // A round where no Get joined another's read tested nothing (the Gets came one after the
  // other, the later ones hits): the target holds only when every round had joins.
  int64_t fewest_joins = *std::min_element(joins_per_round.begin(), joins_per_round.end());
  row.Int("max_backend_reads", worst).Int("min_single_flight_joins", fewest_joins);
  row.Int("errors", errors);
  row.Bool("held", worst == 1 && least == 1 && fewest_joins > 0 && errors == 0);
  if (!first_error.empty()) row.Str("first_error", first_error);
  row.Print();
  return 0;
}

// Puts and Gets of distinct keys, far more bytes than the cache budget; the server's peak RSS
// over its whole life (not reset) against budget * 1.1 + 64 MiB.
int Churn() {
  const std::string address = absl::GetFlag(FLAGS_address);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int64_t budget = absl::GetFlag(FLAGS_budget);
  const int pid = absl::GetFlag(FLAGS_server_pid);
  const absl::Duration duration = absl::GetFlag(FLAGS_duration);
  if (budget <= 0 || pid <= 0) return Fail("churn: give --budget and --server_pid");
  const std::vector<size_t> sizes = {64 << 10, 256 << 10, 1 << 20};
  std::vector<chunkd::buffer::cpu::Buffer> payloads;
  for (size_t s : sizes)
    payloads.push_back(
        chunkd::buffer::cpu::Buffer::CopyOf(MakeValue("churn", static_cast<int64_t>(s), s)));
  const std::vector<std::string> addresses = Addresses();
  if (addresses.empty()) return Fail("give --address");
  auto info = ConnectChunkd(addresses[0]);
  if (!info.ok()) return Fail(std::string(info.status().message()));
  auto c0 = ReadCounters(**info);
  std::atomic<int64_t> put_bytes{0}, get_bytes{0}, puts{0}, gets{0}, errors{0};
  std::string first_error;
  std::mutex mu;
  absl::Time deadline = absl::Now() + duration;
  std::vector<std::thread> pool;
  for (int t = 0; t < clients; ++t) {
    pool.emplace_back([&, t] {
      auto client = ConnectChunkd(addresses[t % addresses.size()]);
      if (!client.ok()) {
        errors.fetch_add(1);
        return;
      }
      std::mt19937_64 rng(1000 + t);
      std::vector<std::string> written;
      auto error = [&](const absl::Status& s) {
        errors.fetch_add(1);
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.empty()) first_error = std::string(s.message());
      };
      for (int64_t k = 0; absl::Now() < deadline; ++k) {
        if (written.empty() || rng() % 2 == 0) {
          std::string key = absl::StrFormat("churn/%d/%08d", t, k);
          const auto& payload = payloads[rng() % payloads.size()];
          auto r = (*client)->Put(key, payload);
          if (!r.ok()) {
            error(r.status());
            continue;
          }
          puts.fetch_add(1);
          put_bytes.fetch_add(static_cast<int64_t>(payload.size()));
          written.push_back(std::move(key));
        } else {
          // Half recent keys (likely cached), half any key written so far (likely evicted).
          size_t j = rng() % 2 == 0
                         ? written.size() - 1 - rng() % std::min<size_t>(written.size(), 32)
                         : rng() % written.size();
          auto r = (*client)->Get(written[j]);
          if (!r.ok()) {
            error(r.status());
            continue;
          }
          gets.fetch_add(1);
          get_bytes.fetch_add(static_cast<int64_t>(r->data.size()));
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  auto c1 = ReadCounters(**info);
  double peak = ProcessMemMb(pid, "VmHWM:"), rss = ProcessMemMb(pid, "VmRSS:");
  double limit = budget * 1.1 / (1 << 20) + 64;
  Json row = SpecialRow("churn", address, 0, clients);
  row.Num("budget_mb", budget / double(1 << 20)).Num("limit_mb", limit);
  row.Num("peak_rss_mb", peak).Num("rss_end_mb", rss);
  row.Int("puts", puts.load()).Int("gets", gets.load());
  row.Int("put_bytes", put_bytes.load()).Int("get_bytes", get_bytes.load());
  row.Num("written_over_budget", put_bytes.load() / double(budget));
  if (c0.ok() && c1.ok()) {
    row.Int("evictions", Delta(*c0, *c1, "evictions"));
    row.Int("backend_reads", Delta(*c0, *c1, "backend_reads"));
  }
  row.Num("seconds", absl::ToDoubleSeconds(duration)).Int("errors", errors.load());
  row.Bool("held", std::isfinite(peak) && peak <= limit);
  if (!first_error.empty()) row.Str("first_error", first_error);
  row.Print();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "one benchmark measurement of chunkd or a peer, printed as one JSON line (see "
      "bench/README.md; bench/run drives it).");
  absl::ParseCommandLine(argc, argv);
  // The driver keeps the memory it frees. glibc gives the top of its heap back to the kernel
  // once more than twice its (adaptive) mmap threshold is free there: with Redis's pipelined
  // batch (16 replies of 1 MiB held, then freed together) that was every batch, and the next
  // batch faulted 16 MiB of fresh zeroed pages in again. Measured on the 2-core VM, 1 client,
  // 1 MiB values: 46,000-57,000 minor faults per 0.6 s run and 0.59-0.80 s of client CPU per
  // GB against 2,600 faults and 0.13-0.30 s/GB for single GETs; with the heap kept, 6,200
  // faults and 0.16-0.19 s/GB. Every peer runs under the same setting.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  const std::string action = absl::GetFlag(FLAGS_action);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (action == "load") return Load();
  if (action == "measure") return Measure();
  if (action == "replay") return Replay();
  if (action == "single_flight") return SingleFlight();
  if (action == "churn") return Churn();
  if (action == "grpc_floor_server") {
    if (absl::GetFlag(FLAGS_ready_file).empty())
      return Fail("grpc_floor_server: give --ready_file");
    return chunkd::bench::RunGrpcFloorServer(
        static_cast<size_t>(absl::GetFlag(FLAGS_size)),
        absl::GetFlag(FLAGS_address).empty() ? "127.0.0.1:0" : absl::GetFlag(FLAGS_address),
        absl::GetFlag(FLAGS_ready_file));
  }
  return Fail("--action: load, measure, replay, single_flight or churn");
}

#include "client/sharded_client.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/replies.h"

namespace chunkd::client {

uint64_t ShardHash64(absl::string_view bytes) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a 64
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  // SplitMix64 finalizer.
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 31;
  return h;
}

namespace {

uint64_t Mix64(uint64_t h) {
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 31;
  return h;
}

}  // namespace

uint64_t RendezvousScore(absl::string_view server, absl::string_view key) {
  return Mix64(ShardHash64(key) ^ ShardHash64(server));
}

std::vector<std::string> RendezvousOrder(std::vector<std::string> servers, absl::string_view key) {
  uint64_t key_hash = ShardHash64(key);
  std::vector<std::pair<uint64_t, std::string>> scored;
  scored.reserve(servers.size());
  for (std::string& s : servers) {
    scored.emplace_back(Mix64(key_hash ^ ShardHash64(s)), std::move(s));
  }
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<std::string> out;
  out.reserve(scored.size());
  for (auto& [score, s] : scored) out.push_back(std::move(s));
  return out;
}

std::vector<std::string> SplitServerList(absl::string_view list) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    out.emplace_back(absl::StripAsciiWhitespace(part));
  }
  return out;
}

namespace {

// "name:port" when `address` is a host name to resolve (not an IP literal, not unix:).
bool IsHostName(absl::string_view address, std::string* host, std::string* port) {
  if (absl::ConsumePrefix(&address, "dns:///")) {
    // Explicit.
  } else if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "[")) {
    return false;
  }
  size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  *host = std::string(address.substr(0, colon));
  *port = std::string(address.substr(colon + 1));
  in_addr v4;
  in6_addr v6;
  if (inet_pton(AF_INET, host->c_str(), &v4) == 1 || inet_pton(AF_INET6, host->c_str(), &v6) == 1) {
    return false;
  }
  return true;
}

absl::StatusOr<std::vector<std::string>> Resolve(const std::string& host, const std::string& port) {
  for (int family : {AF_INET, AF_INET6}) {
    addrinfo hints{};
    hints.ai_family = family;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* result = nullptr;
    int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
    if (rc == EAI_AGAIN) {
      return absl::UnavailableError(absl::StrCat("resolve ", host, ": ", gai_strerror(rc)));
    }
    if (rc != 0) continue;
    std::set<std::string> found;
    for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
      char text[INET6_ADDRSTRLEN] = {0};
      if (a->ai_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, text,
                  sizeof(text));
        found.insert(absl::StrCat(text, ":", port));
      } else if (a->ai_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, text,
                  sizeof(text));
        found.insert(absl::StrCat("[", text, "]:", port));
      }
    }
    ::freeaddrinfo(result);
    if (!found.empty()) return std::vector<std::string>(found.begin(), found.end());
  }
  return absl::NotFoundError(absl::StrCat("host name ", host, " does not resolve"));
}

// A failure of the server rather than of the call: it counts towards marking the server down,
// and a call that may be repeated goes on to the key's next server. UNAVAILABLE: down,
// restarting, or its connection found dead (keepalive pings, connect timeout); DEADLINE_EXCEEDED:
// a server that took the whole deadline (silent, or overloaded).
bool ServerFailure(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}

// Whether a call that may be repeated goes on to the next server after `s`. A deadline is
// failed over once per call: the call then takes at most twice its timeout.
bool FailsOver(const absl::Status& s, int* deadlines) {
  if (absl::IsUnavailable(s)) return true;
  return absl::IsDeadlineExceeded(s) && ++*deadlines <= 1;
}

// A write that failed with one of these was refused before anything changed: no copy went stale.
bool RefusedBeforeWriting(const absl::Status& s) {
  return absl::IsInvalidArgument(s) || absl::IsFailedPrecondition(s) ||
         absl::IsPermissionDenied(s) || absl::IsUnauthenticated(s) || absl::IsResourceExhausted(s);
}

// Keys remembered per server for a later invalidation; past this, a warning (the rest rely on the
// servers' own revalidation of their store).
constexpr size_t kMaxStaleKeysPerServer = size_t{1} << 16;

// Consistency of the copies (docs/remote-stores.md, "Many servers: a pool"). Every server of a pool
// reads one shared store and caches what it read or was written; a server's copy of a key goes
// stale when the key is written through another server (the writer's cache and the store get the
// new value). Calls for a key go to its home server, so other servers hold a copy only where a call
// failed over to them (the home was down or cut off, for this client or for another one). So after
// every write (Put, Delete), whichever server took it, the pool drops the key's cached copy
// (StatRequest.invalidate, one small call each)
//   - on every server ranked before the writer in the key's rendezvous order: they were skipped,
//     down or failing, and reads of the key go to them first once they are back; and
//   - on the servers ranked after it, down to the deepest rank this client has seen a call
//     served from, and at least the next one: where any client's calls for the key went while
//     the writer could not be reached.
// A server that cannot be reached for that is remembered with the key, and before it serves the
// key again the pool drops its copy (or, if it still cannot, fails over). Reads cost nothing
// extra; a write costs one more small call in the common case (the key's second server).
// Left to the servers' own revalidation of their store (the file store checks every hit; S3 and
// HTTP after an interval): copies left where another client's calls failed over past the second
// server, and a partition that only some clients see (while this client writes a key through its
// second server, a client that still reaches the home reads the home's old copy until this
// client reaches the home again).
class ShardedClientImpl final : public ShardedClient {
 public:
  ShardedClientImpl(const ShardedClientOptions& options, std::string host, std::string port)
      : ShardedClient(options.client),
        options_(options),
        host_(std::move(host)),
        port_(std::move(port)) {}

  // Probes in flight use the clients: cancel them and wait (in the process that started them:
  // a forked child's copy of a probe in flight never ends, its thread is the parent's).
  ~ShardedClientImpl() override {
    if (::getpid() != pid_) return;
    std::vector<std::shared_ptr<Cancellation>> probes;
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      for (auto& [name, cancel] : probes_) probes.push_back(cancel);
    }
    for (auto& cancel : probes) cancel->Cancel();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](ShardedClientImpl* p)
             ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) { return p->probes_.empty(); },
        this));
  }

  absl::Status Init() {
    if (!host_.empty()) return Refresh(/*force=*/true);
    absl::MutexLock lock(&mu_);
    std::vector<std::string> servers = options_.servers;
    std::sort(servers.begin(), servers.end());
    servers.erase(std::unique(servers.begin(), servers.end()), servers.end());
    return SetServersLocked(servers);
  }

  std::vector<std::string> servers() override {
    (void)Refresh(false);
    absl::MutexLock lock(&mu_);
    return current_;
  }

  std::vector<std::string> RankedServers(absl::string_view key) override {
    return RendezvousOrder(servers(), key);
  }

  bool IsDown(const std::string& server) override {
    absl::MutexLock lock(&mu_);
    auto it = states_.find(server);
    // Down until a probe (or a call) had an answer from it, also after its down time.
    if (it == states_.end()) return false;
    return it->second.probing || it->second.down_until != absl::InfinitePast();
  }

  // One InterruptedGet for the call: a value cut off on one server is continued on the next.
  static GetOptions WithResume(const GetOptions& options) {
    GetOptions call = options;
    if (!call.resume) call.resume = std::make_shared<InterruptedGet>();
    return call;
  }
  absl::StatusOr<GetResult> Get(absl::string_view key, const GetOptions& options) override {
    GetOptions call = WithResume(options);
    return Route<GetResult>(key, true, [&](Client& c) { return c.Get(key, call); });
  }
  void GetAsync(absl::string_view key, const GetOptions& options,
                Callback<GetResult> done) override {
    RouteAsync<GetResult>(
        key, true,
        [key = std::string(key), options = WithResume(options)](Client& c, Callback<GetResult> cb) {
          c.GetAsync(key, options, std::move(cb));
        },
        std::move(done));
  }

  // The pool's blocking GetMany waits for the asynchronous one: one implementation of the
  // grouping and of the failover of each group.
  absl::StatusOr<GetManyResults> GetMany(const std::vector<GetManyItem>& items,
                                         const GetOptions& options) override {
    absl::Notification finished;
    absl::StatusOr<GetManyResults> out;
    GetManyAsync(items, options, [&](absl::StatusOr<GetManyResults> r) {
      out = std::move(r);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }

  // Items go to their keys' servers, one GetMany per server, in parallel. The items of a server
  // that fails (UNAVAILABLE, or a deadline once) go on together to each item's next server,
  // grouped again; `done` runs once every item has an answer, or with the first error that
  // ended a group.
  void GetManyAsync(std::vector<GetManyItem> items, const GetOptions& options,
                    Callback<GetManyResults> done) override {
    if (items.empty()) return done(GetManyResults());
    auto batch = std::make_shared<Batch>();
    batch->items = std::move(items);
    batch->options = options;
    batch->done = std::move(done);
    std::vector<size_t> all(batch->items.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    {
      absl::MutexLock lock(&batch->mu);
      batch->pending = 1;  // FetchGroups's own, ended just below
      batch->results.assign(batch->items.size(), absl::UnknownError("not fetched"));
    }
    FetchGroups(batch, std::move(all), {}, 0);
    FinishOne(batch);
  }

  // The items are handed over together when every group's call has ended.
  void GetManyEachAsync(std::vector<GetManyItem> items, const GetOptions& options,
                        ItemsCallback each, StatusCallback done) override {
    GetManyAsync(
        std::move(items), options,
        [each = std::move(each), done = std::move(done)](absl::StatusOr<GetManyResults> r) {
          if (!r.ok()) return done(r.status());
          if (!r->empty()) each(0, *std::move(r));
          done(absl::OkStatus());
        });
  }

  absl::StatusOr<PutResult> Put(absl::string_view key, buffer::cpu::Buffer value,
                                const Conditions& conditions) override {
    absl::Notification finished;
    absl::StatusOr<PutResult> out;
    PutAsync(key, std::move(value), conditions, [&](absl::StatusOr<PutResult> r) {
      out = std::move(r);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }
  void PutAsync(absl::string_view key, buffer::cpu::Buffer value, const Conditions& conditions,
                Callback<PutResult> done) override {
    bool conditional = conditions.if_generation_match || conditions.if_generation_not_match;
    RouteAsync<PutResult>(
        key, !conditional,
        [key = std::string(key), value = std::move(value), conditions](Client& c,
                                                                       Callback<PutResult> cb) {
          c.PutAsync(key, value, conditions, std::move(cb));
        },
        std::move(done), /*write=*/true);
  }

  absl::StatusOr<PutResult> PutDerived(absl::string_view key, buffer::cpu::Buffer value,
                                       const DerivedPut& derived) override {
    absl::Notification finished;
    absl::StatusOr<PutResult> out;
    PutDerivedAsync(key, std::move(value), derived, [&](absl::StatusOr<PutResult> r) {
      out = std::move(r);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }
  // On the key's server, as its reads go: the store is not written, so no other server's copy
  // is dropped.
  void PutDerivedAsync(absl::string_view key, buffer::cpu::Buffer value, const DerivedPut& derived,
                       Callback<PutResult> done) override {
    RouteAsync<PutResult>(
        key, /*retryable=*/true,
        [key = std::string(key), value = std::move(value), derived](Client& c,
                                                                    Callback<PutResult> cb) {
          c.PutDerivedAsync(key, value, derived, std::move(cb));
        },
        std::move(done), /*write=*/false);
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    absl::Notification finished;
    absl::Status out;
    DeleteAsync(key, conditions, [&](absl::Status s) {
      out = std::move(s);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }
  void DeleteAsync(absl::string_view key, const Conditions& conditions,
                   StatusCallback done) override {
    RouteAsync<bool>(
        key, true,
        [key = std::string(key), conditions](Client& c, Callback<bool> cb) {
          c.DeleteAsync(key, conditions, [cb = std::move(cb)](absl::Status s) {
            if (s.ok()) {
              cb(true);
            } else {
              cb(s);
            }
          });
        },
        [done = std::move(done)](absl::StatusOr<bool> r) { done(r.status()); }, /*write=*/true);
  }

  absl::StatusOr<StatResult> Stat(absl::string_view key) override {
    return Route<StatResult>(key, true, [&](Client& c) { return c.Stat(key); });
  }
  void StatAsync(absl::string_view key, Callback<StatResult> done) override {
    RouteAsync<StatResult>(
        key, true,
        [key = std::string(key)](Client& c, Callback<StatResult> cb) {
          c.StatAsync(key, std::move(cb));
        },
        std::move(done));
  }

  // Every server's copy: for a key changed in the store behind the pool's back. A server that
  // cannot be reached drops its copy before it next serves the key.
  absl::Status Invalidate(absl::string_view key) override {
    absl::Notification finished;
    absl::Status out;
    InvalidateAsync(key, [&](absl::Status s) {
      out = std::move(s);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }
  void InvalidateAsync(absl::string_view key, StatusCallback done) override {
    std::vector<std::string> targets = servers();
    InvalidateAt(std::string(key), std::move(targets), std::move(done));
  }

  absl::StatusOr<std::vector<ListResult>> ListPages(absl::string_view prefix,
                                                    bool directory) override {
    auto all = List(prefix, directory);
    if (!all.ok()) return all.status();
    return std::vector<ListResult>{*std::move(all)};
  }
  void ListPagesAsync(absl::string_view prefix, bool directory,
                      Callback<std::vector<ListResult>> done) override {
    ListAsync(prefix, directory, [done = std::move(done)](absl::StatusOr<ListResult> all) {
      if (!all.ok()) return done(all.status());
      done(std::vector<ListResult>{*std::move(all)});
    });
  }

  absl::StatusOr<ListResult> List(absl::string_view prefix, bool directory) override {
    absl::Notification finished;
    absl::StatusOr<ListResult> out;
    ListAsync(prefix, directory, [&](absl::StatusOr<ListResult> r) {
      out = std::move(r);
      finished.Notify();
    });
    finished.WaitForNotification();
    return out;
  }

  void ListAsync(absl::string_view prefix, bool directory, Callback<ListResult> done) override {
    std::vector<std::pair<std::string, Client*>> targets = UpServers();
    if (targets.empty()) {
      done(absl::UnavailableError("no chunkd server of the pool is up"));
      return;
    }
    struct Merge {
      absl::Mutex mu;
      size_t pending;
      std::map<std::string, uint64_t> entries;
      std::set<std::string> prefixes;
      int answered = 0;
      absl::Status first_error;  // of the call, not of a server
      absl::Status first_unavailable;
      Callback<ListResult> done;
    };
    auto merge = std::make_shared<Merge>();
    merge->pending = targets.size();
    merge->done = std::move(done);
    for (auto& [name, client] : targets) {
      client->ListAsync(prefix, directory,
                        [this, merge, name = name](absl::StatusOr<ListResult> r) {
                          Record(name, r.status());
                          bool last;
                          {
                            absl::MutexLock lock(&merge->mu);
                            if (r.ok()) {
                              ++merge->answered;
                              for (ListEntry& e : r->entries) merge->entries.emplace(e.key, e.size);
                              for (std::string& p : r->prefixes) merge->prefixes.insert(p);
                            } else if (ServerFailure(r.status())) {
                              if (merge->first_unavailable.ok())
                                merge->first_unavailable = r.status();
                            } else if (merge->first_error.ok()) {
                              merge->first_error = r.status();
                            }
                            last = --merge->pending == 0;
                          }
                          if (!last) return;
                          if (!merge->first_error.ok()) {
                            merge->done(merge->first_error);
                          } else if (merge->answered == 0) {
                            merge->done(merge->first_unavailable);
                          } else {
                            ListResult out;
                            for (auto& [key, size] : merge->entries)
                              out.entries.push_back({key, size});
                            out.prefixes.assign(merge->prefixes.begin(), merge->prefixes.end());
                            merge->done(std::move(out));
                          }
                        });
    }
  }

  absl::StatusOr<v1::ServerInfoResponse> ServerInfo() override {
    absl::Status last = absl::UnavailableError("no chunkd server of the pool is up");
    for (auto& [name, client] : UpServers()) {
      auto r = client->ServerInfo();
      Record(name, r.status());
      if (r.ok() || !ServerFailure(r.status())) return r;
      last = r.status();
    }
    return last;
  }
  void ServerInfoAsync(Callback<v1::ServerInfoResponse> done) override { done(ServerInfo()); }

  size_t leases_held() const override {
    absl::MutexLock lock(&mu_);
    size_t n = 0;
    for (const auto& [name, c] : clients_) n += c->leases_held();
    return n;
  }
  bool FlushReleases() override {
    absl::MutexLock lock(&mu_);
    bool ok = true;
    for (auto& [name, c] : clients_) ok &= c->FlushReleases();
    return ok;
  }
  std::string shm_disabled() const override {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, c] : clients_) {
      if (std::string why = c->shm_disabled(); !why.empty()) return why;
    }
    return "";
  }

 private:
  struct State {
    int consecutive_failures = 0;
    // Marked down until then (InfinitePast: up).
    absl::Time down_until = absl::InfinitePast();
    // Its down time is over and a probe asks whether it is back; calls keep away meanwhile.
    bool probing = false;
    // Keys whose copy here may be older than the store's: dropped before it serves them again.
    absl::flat_hash_set<std::string> stale;
    bool stale_overflow_logged = false;
  };

  // One of a key's servers, with its place in the key's rendezvous order.
  struct Candidate {
    std::string name;
    Client* client;
    size_t rank;
  };

  absl::Status SetServersLocked(const std::vector<std::string>& servers)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (servers.empty()) return absl::InvalidArgumentError("no chunkd servers given");
    for (const std::string& s : servers) {
      if (clients_.contains(s)) continue;
      ClientOptions o = options_.client;
      o.address = s;
      auto c = Client::Connect(o);
      if (!c.ok()) return c.status();
      // Clients of servers that leave the pool are kept: calls in flight may still use them.
      clients_.emplace(s, *std::move(c));
    }
    current_ = servers;
    return absl::OkStatus();
  }

  // Resolves the host name again when it is time (or `force`).
  absl::Status Refresh(bool force) {
    if (host_.empty()) return absl::OkStatus();
    {
      absl::MutexLock lock(&mu_);
      if (!force && absl::Now() < next_resolve_) return absl::OkStatus();
      next_resolve_ = absl::Now() + options_.resolve_interval;
    }
    auto resolved = Resolve(host_, port_);
    absl::MutexLock lock(&mu_);
    if (!resolved.ok()) return current_.empty() ? resolved.status() : absl::OkStatus();
    return SetServersLocked(*resolved);
  }

  // Whether calls may go to `server` now. A server marked down is kept away from calls until its
  // down time is over and then until a probe in the background has had an answer from it, so
  // that no call waits for a server that is still cut off (a connection attempt to a silent host
  // takes connect_timeout). Appends the server to `probes` when a probe is to start.
  bool UsableLocked(const std::string& server, absl::Time now,
                    std::vector<std::pair<std::string, Client*>>* probes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    State& state = states_[server];
    if (state.probing) return false;
    if (state.down_until == absl::InfinitePast()) return true;
    if (state.down_until > now || closing_) return false;
    state.probing = true;
    probes->emplace_back(server, clients_.at(server).get());
    return false;
  }

  // Asks `server` whether it is back: any answer from it (this Get of the empty key is refused
  // as INVALID_ARGUMENT without touching the store) ends its down time; a failure starts another.
  void StartProbes(std::vector<std::pair<std::string, Client*>> probes) {
    for (auto& [name, client] : probes) {
      auto cancel = std::make_shared<Cancellation>();
      {
        absl::MutexLock lock(&mu_);
        probes_[name] = cancel;
      }
      GetOptions options;
      options.cancellation = cancel;
      options.timeout = std::min(options_.client.timeout,
                                 std::max(absl::Seconds(1), 2 * options_.client.connect_timeout));
      client->GetAsync("", options, [this, name = name](absl::StatusOr<GetResult> r) {
        absl::MutexLock lock(&mu_);
        State& state = states_[name];
        state.probing = false;
        if (r.ok() || (!ServerFailure(r.status()) && !absl::IsCancelled(r.status()))) {
          state.consecutive_failures = 0;
          state.down_until = absl::InfinitePast();
        } else {
          state.down_until = absl::Now() + options_.down_backoff;
        }
        probes_.erase(name);
      });
    }
  }

  // The key's servers in rendezvous order, those that calls may use first (each group in rank
  // order).
  std::vector<Candidate> Candidates(absl::string_view key) {
    (void)Refresh(false);
    std::vector<Candidate> up, down;
    std::vector<std::pair<std::string, Client*>> probes;
    {
      absl::MutexLock lock(&mu_);
      std::vector<std::string> order = RendezvousOrder(current_, key);
      absl::Time now = absl::Now();
      for (size_t rank = 0; rank < order.size(); ++rank) {
        Client* c = clients_.at(order[rank]).get();
        bool usable = UsableLocked(order[rank], now, &probes);
        (usable ? up : down).push_back({std::move(order[rank]), c, rank});
      }
    }
    StartProbes(std::move(probes));
    up.insert(up.end(), down.begin(), down.end());
    return up;
  }

  std::vector<std::pair<std::string, Client*>> UpServers() {
    (void)Refresh(false);
    std::vector<std::pair<std::string, Client*>> up, all, probes;
    {
      absl::MutexLock lock(&mu_);
      absl::Time now = absl::Now();
      for (const std::string& s : current_) {
        all.emplace_back(s, clients_.at(s).get());
        if (UsableLocked(s, now, &probes)) up.emplace_back(s, clients_.at(s).get());
      }
    }
    StartProbes(std::move(probes));
    return up.empty() ? all : up;
  }

  // Notes the outcome of a call to `server`.
  void Record(const std::string& server, const absl::Status& s) {
    absl::MutexLock lock(&mu_);
    State& state = states_[server];
    if (!ServerFailure(s)) {
      state.consecutive_failures = 0;
      state.down_until = absl::InfinitePast();
      return;
    }
    if (++state.consecutive_failures >= options_.failures_to_mark_down) {
      state.down_until = absl::Now() + options_.down_backoff;
    }
  }

  // A call was served by the key's server of rank `rank`: later writes drop copies down to there.
  void NoteServedAt(size_t rank) {
    size_t deepest = deepest_served_.load(std::memory_order_relaxed);
    while (rank > deepest && !deepest_served_.compare_exchange_weak(deepest, rank)) {
    }
  }

  void MarkStale(const std::string& server, const std::string& key) {
    absl::MutexLock lock(&mu_);
    State& state = states_[server];
    if (state.stale.size() < kMaxStaleKeysPerServer) {
      state.stale.insert(key);
    } else if (!state.stale_overflow_logged) {
      state.stale_overflow_logged = true;
      std::fprintf(stderr,
                   "chunkd pool: more than %zu keys written while %s was unreachable; copies it "
                   "holds of the others are fresh again only when it revalidates its store\n",
                   kMaxStaleKeysPerServer, server.c_str());
    }
  }

  // Before `server` serves `keys`: drops its copies of those written elsewhere while it could not
  // be reached. `then` gets OK, or the failure of an invalidation (the keys stay marked).
  void Reconcile(const std::string& server, Client* client, std::vector<std::string> keys,
                 StatusCallback then) {
    std::vector<std::string> stale;
    {
      absl::MutexLock lock(&mu_);
      State& state = states_[server];
      if (!state.stale.empty()) {
        for (std::string& k : keys) {
          if (state.stale.erase(k)) stale.push_back(std::move(k));
        }
      }
    }
    if (stale.empty()) return then(absl::OkStatus());
    struct Pending {
      absl::Mutex mu;
      size_t left;
      absl::Status first_error;
      StatusCallback then;
    };
    auto pending = std::make_shared<Pending>();
    pending->left = stale.size();
    pending->then = std::move(then);
    for (std::string& key : stale) {
      client->InvalidateAsync(key, [this, pending, server, key](absl::Status s) {
        if (!s.ok()) MarkStale(server, key);
        bool last;
        {
          absl::MutexLock lock(&pending->mu);
          if (!s.ok() && pending->first_error.ok()) pending->first_error = s;
          last = --pending->left == 0;
        }
        if (last) pending->then(pending->first_error);
      });
    }
  }

  // Drops `key`'s copies on `targets`; those that cannot be reached (or are down) drop theirs
  // before they next serve the key. `done` gets OK, or an error other than a server's failure.
  void InvalidateAt(std::string key, std::vector<std::string> targets, StatusCallback done) {
    struct Pending {
      absl::Mutex mu;
      size_t left;
      absl::Status first_error;
      StatusCallback done;
    };
    auto pending = std::make_shared<Pending>();
    pending->left = targets.size() + 1;
    pending->done = std::move(done);
    auto finish = [pending](const absl::Status& s) {
      bool last;
      {
        absl::MutexLock lock(&pending->mu);
        if (!s.ok() && pending->first_error.ok()) pending->first_error = s;
        last = --pending->left == 0;
      }
      if (last) pending->done(pending->first_error);
    };
    for (const std::string& target : targets) {
      Client* client;
      {
        absl::MutexLock lock(&mu_);
        client = clients_.at(target).get();
      }
      if (IsDown(target)) {
        MarkStale(target, key);
        finish(absl::OkStatus());
        continue;
      }
      client->InvalidateAsync(key, [this, target, key, finish](absl::Status s) {
        Record(target, s);
        if (ServerFailure(s)) {
          MarkStale(target, key);
          s = absl::OkStatus();
        }
        finish(s);
      });
    }
    finish(absl::OkStatus());
  }

  // After a write of `key` that `writer` took (or may have taken): drops the copies of its old
  // value (see the comment above the class).
  // `failed`: servers that failed this write; they are marked without a call.
  void AfterWrite(const std::string& key, const std::string& writer,
                  const std::vector<std::string>& failed, StatusCallback done) {
    std::vector<std::string> order = RankedServers(key);
    size_t w = std::find(order.begin(), order.end(), writer) - order.begin();
    size_t last =
        std::max(w == order.size() ? 0 : w + 1, deepest_served_.load(std::memory_order_relaxed));
    std::vector<std::string> targets;
    for (size_t rank = 0; rank <= last && rank < order.size(); ++rank) {
      if (rank == w) continue;
      if (std::find(failed.begin(), failed.end(), order[rank]) != failed.end()) {
        MarkStale(order[rank], key);
      } else {
        targets.push_back(order[rank]);
      }
    }
    InvalidateAt(key, std::move(targets), std::move(done));
  }

  template <typename T, typename Call>
  absl::StatusOr<T> Route(absl::string_view key, bool fail_over, Call call) {
    std::vector<Candidate> candidates = Candidates(key);
    absl::StatusOr<T> result = absl::UnavailableError("no chunkd server");
    int deadlines = 0;
    for (const Candidate& c : candidates) {
      absl::Notification reconciled;
      absl::Status ready;
      Reconcile(c.name, c.client, {std::string(key)}, [&](absl::Status s) {
        ready = std::move(s);
        reconciled.Notify();
      });
      reconciled.WaitForNotification();
      result = ready.ok() ? call(*c.client) : absl::StatusOr<T>(ready);
      Record(c.name, result.status());
      if (result.ok()) NoteServedAt(c.rank);
      if (!fail_over || !FailsOver(result.status(), &deadlines)) return result;
    }
    return result;
  }

  // `write`: a Put or Delete, followed by AfterWrite.
  template <typename T, typename Start>
  void RouteAsync(absl::string_view key, bool fail_over, Start start, Callback<T> done,
                  bool write = false) {
    struct Attempt {
      std::string key;
      std::vector<Candidate> candidates;
      size_t next = 0;
      bool fail_over;
      bool write;
      int deadlines = 0;
      // Servers that failed this call (a write may have landed on them all the same).
      std::vector<std::string> failed;
      Start start;
      Callback<T> done;
    };
    auto attempt = std::make_shared<Attempt>(Attempt{std::string(key),
                                                     Candidates(key),
                                                     0,
                                                     fail_over,
                                                     write,
                                                     0,
                                                     {},
                                                     std::move(start),
                                                     std::move(done)});
    Next<T>(std::move(attempt));
  }

  template <typename T, typename A>
  void Next(std::shared_ptr<A> a) {
    const Candidate& c = a->candidates[a->next++];
    Reconcile(c.name, c.client, {a->key}, [this, a, c](absl::Status ready) {
      auto finish = [this, a, c](absl::StatusOr<T> r) {
        Record(c.name, r.status());
        if (r.ok()) NoteServedAt(c.rank);
        if (ServerFailure(r.status())) a->failed.push_back(c.name);
        if (a->fail_over && FailsOver(r.status(), &a->deadlines) &&
            a->next < a->candidates.size()) {
          Next<T>(a);
          return;
        }
        if (!a->write || RefusedBeforeWriting(r.status())) return a->done(std::move(r));
        // The write may have landed on any server tried; the last one tried is the writer.
        AfterWrite(a->key, c.name, a->failed,
                   [a, r = std::move(r)](absl::Status) mutable { a->done(std::move(r)); });
      };
      if (!ready.ok()) return finish(ready);
      a->start(*c.client, std::move(finish));
    });
  }

  // A GetMany in flight over the pool.
  struct Batch {
    std::vector<GetManyItem> items;
    GetOptions options;
    absl::Mutex mu;
    GetManyResults results ABSL_GUARDED_BY(mu);
    absl::Status failure ABSL_GUARDED_BY(mu);
    size_t pending ABSL_GUARDED_BY(mu) = 0;
    Callback<GetManyResults> done;
  };

  void FinishOne(const std::shared_ptr<Batch>& batch) {
    absl::Status failure;
    GetManyResults results;
    {
      absl::MutexLock lock(&batch->mu);
      if (--batch->pending != 0) return;
      failure = batch->failure;
      results = std::move(batch->results);
    }
    if (!failure.ok()) return batch->done(failure);
    batch->done(std::move(results));
  }

  // Sends the items `indexes` of `batch` to their keys' first servers not in `tried`, one
  // GetMany per server.
  void FetchGroups(const std::shared_ptr<Batch>& batch, std::vector<size_t> indexes,
                   std::set<std::string> tried, int deadlines) {
    struct Group {
      Candidate server;
      std::vector<size_t> indexes;
      std::vector<size_t> ranks;
      bool last_resort = false;  // every other server was tried
    };
    std::vector<Group> groups;
    absl::flat_hash_map<std::string, size_t> group_of;
    for (size_t i : indexes) {
      // Every key's candidates are all the servers of the pool, in its own order.
      std::vector<Candidate> candidates = Candidates(batch->items[i].key);
      auto it = std::find_if(candidates.begin(), candidates.end(),
                             [&](const Candidate& c) { return !tried.contains(c.name); });
      if (it == candidates.end()) {  // the pool shrank meanwhile (a host name resolved again)
        absl::MutexLock lock(&batch->mu);
        batch->results[i] = absl::UnavailableError("no chunkd server of the pool is left");
        continue;
      }
      auto [g, inserted] = group_of.try_emplace(it->name, groups.size());
      if (inserted) groups.push_back({*it, {}, {}, tried.size() + 1 >= candidates.size()});
      Group& group = groups[g->second];
      group.indexes.push_back(i);
      group.ranks.push_back(it->rank);
    }
    {
      absl::MutexLock lock(&batch->mu);
      batch->pending += groups.size();
    }
    for (Group& group : groups) {
      std::vector<std::string> keys;
      std::vector<GetManyItem> sub;
      for (size_t i : group.indexes) {
        keys.push_back(batch->items[i].key);
        sub.push_back(batch->items[i]);
      }
      Candidate server = group.server;
      Reconcile(server.name, server.client, std::move(keys),
                [this, batch, group = std::move(group), sub = std::move(sub), tried,
                 deadlines](absl::Status ready) mutable {
                  auto finish = [this, batch, group, tried,
                                 deadlines](absl::StatusOr<GetManyResults> got) mutable {
                    Record(group.server.name, got.status());
                    if (got.ok()) {
                      absl::MutexLock lock(&batch->mu);
                      for (size_t j = 0; j < group.indexes.size(); ++j) {
                        batch->results[group.indexes[j]] = std::move((*got)[j]);
                      }
                    }
                    if (got.ok()) {
                      for (size_t rank : group.ranks) NoteServedAt(rank);
                    } else if (!group.last_resort && FailsOver(got.status(), &deadlines)) {
                      tried.insert(group.server.name);
                      FetchGroups(batch, std::move(group.indexes), std::move(tried), deadlines);
                    } else {
                      absl::MutexLock lock(&batch->mu);
                      if (batch->failure.ok()) batch->failure = got.status();
                    }
                    FinishOne(batch);
                  };
                  if (!ready.ok()) return finish(ready);
                  group.server.client->GetManyAsync(std::move(sub), batch->options,
                                                    std::move(finish));
                });
    }
  }

  const ShardedClientOptions options_;
  const std::string host_, port_;  // set when the pool is one host name
  mutable absl::Mutex mu_;
  std::vector<std::string> current_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<Client>> clients_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, State> states_ ABSL_GUARDED_BY(mu_);
  absl::Time next_resolve_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Probes in flight, by server; the destructor cancels them and waits.
  absl::flat_hash_map<std::string, std::shared_ptr<Cancellation>> probes_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  const pid_t pid_ = ::getpid();
  // The deepest rank (in a key's rendezvous order) a call was served from; at least 1, the
  // next server, which any client may have failed over to.
  std::atomic<size_t> deepest_served_{1};
};

}  // namespace

absl::StatusOr<std::unique_ptr<ShardedClient>> ShardedClient::Connect(
    const ShardedClientOptions& options) {
  if (options.servers.empty()) return absl::InvalidArgumentError("no chunkd servers given");
  if (options.failures_to_mark_down < 1) {
    return absl::InvalidArgumentError("failures_to_mark_down must be at least 1");
  }
  std::string host, port;
  if (options.servers.size() == 1 && IsHostName(options.servers[0], &host, &port)) {
    auto client = std::make_unique<ShardedClientImpl>(options, host, port);
    if (absl::Status s = client->Init(); !s.ok()) return s;
    return std::unique_ptr<ShardedClient>(std::move(client));
  }
  auto client = std::make_unique<ShardedClientImpl>(options, "", "");
  if (absl::Status s = client->Init(); !s.ok()) return s;
  return std::unique_ptr<ShardedClient>(std::move(client));
}

}  // namespace chunkd::client

#include "client/sharded_client.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

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

std::vector<std::string> RendezvousOrder(std::vector<std::string> servers,
                                         absl::string_view key) {
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

bool FailsOver(const absl::Status& s) { return absl::IsUnavailable(s); }

class ShardedClientImpl final : public ShardedClient {
 public:
  ShardedClientImpl(const ShardedClientOptions& options, std::string host, std::string port)
      : ShardedClient(options.client), options_(options), host_(std::move(host)),
        port_(std::move(port)) {}

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
    return it != states_.end() && it->second.down_until > absl::Now();
  }

  absl::StatusOr<GetResult> Get(absl::string_view key, const GetOptions& options) override {
    return Route<GetResult>(key, true, [&](Client& c) { return c.Get(key, options); });
  }
  void GetAsync(absl::string_view key, const GetOptions& options,
                Callback<GetResult> done) override {
    RouteAsync<GetResult>(key, true,
                          [key = std::string(key), options](Client& c, Callback<GetResult> cb) {
                            c.GetAsync(key, options, std::move(cb));
                          },
                          std::move(done));
  }

  // Items go to their keys' servers, one GetMany per server, in parallel; a group whose server
  // is down fails over as a whole, like its first key would (every server reads the same store).
  absl::StatusOr<GetManyResults> GetMany(const std::vector<GetManyItem>& items,
                                         const GetOptions& options) override {
    std::vector<std::vector<size_t>> groups = GroupByHome(items);
    GetManyResults results(items.size(), absl::UnknownError("not fetched"));
    std::vector<absl::Status> failures(groups.size());
    auto fetch = [&](size_t g) {
      const std::vector<size_t>& indexes = groups[g];
      std::vector<GetManyItem> group;
      for (size_t i : indexes) group.push_back(items[i]);
      auto got = Route<GetManyResults>(group.front().key, true,
                                       [&](Client& c) { return c.GetMany(group, options); });
      if (!got.ok()) {
        failures[g] = got.status();
        return;
      }
      for (size_t j = 0; j < indexes.size(); ++j) results[indexes[j]] = std::move((*got)[j]);
    };
    if (groups.size() == 1) {
      fetch(0);
    } else {
      std::vector<std::thread> threads;
      for (size_t g = 0; g < groups.size(); ++g) threads.emplace_back(fetch, g);
      for (std::thread& t : threads) t.join();
    }
    for (const absl::Status& s : failures) {
      if (!s.ok()) return s;
    }
    return results;
  }

  // As GetMany, each group's call asynchronous; `done` runs once every group has finished.
  void GetManyAsync(std::vector<GetManyItem> items, const GetOptions& options,
                    Callback<GetManyResults> done) override {
    if (items.empty()) return done(GetManyResults());
    struct Batch {
      absl::Mutex mu;
      GetManyResults results;
      absl::Status failure;
      size_t pending;
      Callback<GetManyResults> done;
    };
    std::vector<std::vector<size_t>> groups = GroupByHome(items);
    auto batch = std::make_shared<Batch>();
    batch->results.assign(items.size(), absl::UnknownError("not fetched"));
    batch->pending = groups.size();
    batch->done = std::move(done);
    for (std::vector<size_t>& indexes : groups) {
      std::vector<GetManyItem> group;
      for (size_t i : indexes) group.push_back(items[i]);
      std::string first = group.front().key;
      RouteAsync<GetManyResults>(
          first, true,
          [group = std::move(group), options](Client& c, Callback<GetManyResults> cb) {
            c.GetManyAsync(group, options, std::move(cb));
          },
          [batch, indexes = std::move(indexes)](absl::StatusOr<GetManyResults> got) {
            bool last;
            {
              absl::MutexLock lock(&batch->mu);
              if (!got.ok()) {
                if (batch->failure.ok()) batch->failure = got.status();
              } else {
                for (size_t j = 0; j < indexes.size(); ++j) {
                  batch->results[indexes[j]] = std::move((*got)[j]);
                }
              }
              last = --batch->pending == 0;
            }
            if (!last) return;
            if (!batch->failure.ok()) return batch->done(batch->failure);
            batch->done(std::move(batch->results));
          });
    }
  }

  // The items are handed over together when every group's call has ended.
  void GetManyEachAsync(std::vector<GetManyItem> items, const GetOptions& options,
                        ItemsCallback each, StatusCallback done) override {
    GetManyAsync(std::move(items), options,
                 [each = std::move(each), done = std::move(done)](absl::StatusOr<GetManyResults> r) {
                   if (!r.ok()) return done(r.status());
                   if (!r->empty()) each(0, *std::move(r));
                   done(absl::OkStatus());
                 });
  }

  // The indexes of `items` grouped by their home server (groups in the order of their first item).
  std::vector<std::vector<size_t>> GroupByHome(const std::vector<GetManyItem>& items) {
    std::vector<std::vector<size_t>> groups;
    absl::flat_hash_map<std::string, size_t> group_of;
    std::vector<std::string> live = servers();
    for (size_t i = 0; i < items.size(); ++i) {
      std::vector<std::string> ranked = RendezvousOrder(live, items[i].key);
      std::string server = ranked.empty() ? "" : ranked.front();
      auto [it, inserted] = group_of.try_emplace(server, groups.size());
      if (inserted) groups.emplace_back();
      groups[it->second].push_back(i);
    }
    return groups;
  }

  absl::StatusOr<PutResult> Put(absl::string_view key, buffer::cpu::Buffer value,
                                const Conditions& conditions) override {
    bool conditional = conditions.if_generation_match || conditions.if_generation_not_match;
    return Route<PutResult>(key, !conditional,
                            [&](Client& c) { return c.Put(key, value, conditions); });
  }
  void PutAsync(absl::string_view key, buffer::cpu::Buffer value, const Conditions& conditions,
                Callback<PutResult> done) override {
    bool conditional = conditions.if_generation_match || conditions.if_generation_not_match;
    RouteAsync<PutResult>(
        key, !conditional,
        [key = std::string(key), value, conditions](Client& c, Callback<PutResult> cb) {
          c.PutAsync(key, value, conditions, std::move(cb));
        },
        std::move(done));
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    auto r = Route<bool>(key, true, [&](Client& c) -> absl::StatusOr<bool> {
      absl::Status s = c.Delete(key, conditions);
      if (!s.ok()) return s;
      return true;
    });
    return r.status();
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
        [done = std::move(done)](absl::StatusOr<bool> r) { done(r.status()); });
  }

  absl::StatusOr<StatResult> Stat(absl::string_view key) override {
    return Route<StatResult>(key, true, [&](Client& c) { return c.Stat(key); });
  }
  void StatAsync(absl::string_view key, Callback<StatResult> done) override {
    RouteAsync<StatResult>(key, true,
                           [key = std::string(key)](Client& c, Callback<StatResult> cb) {
                             c.StatAsync(key, std::move(cb));
                           },
                           std::move(done));
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
      absl::Status first_error;      // other than UNAVAILABLE
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
                            } else if (FailsOver(r.status())) {
                              if (merge->first_unavailable.ok()) merge->first_unavailable = r.status();
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
                            for (auto& [key, size] : merge->entries) out.entries.push_back({key, size});
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
      if (r.ok() || !FailsOver(r.status())) return r;
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
    absl::Time down_until = absl::InfinitePast();
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

  // The key's servers in rendezvous order, those not down first (each group in rank order).
  std::vector<std::pair<std::string, Client*>> Candidates(absl::string_view key) {
    (void)Refresh(false);
    absl::MutexLock lock(&mu_);
    std::vector<std::string> order = RendezvousOrder(current_, key);
    absl::Time now = absl::Now();
    std::vector<std::pair<std::string, Client*>> up, down;
    for (std::string& s : order) {
      Client* c = clients_.at(s).get();
      if (states_[s].down_until > now) {
        down.emplace_back(std::move(s), c);
      } else {
        up.emplace_back(std::move(s), c);
      }
    }
    up.insert(up.end(), down.begin(), down.end());
    return up;
  }

  std::vector<std::pair<std::string, Client*>> UpServers() {
    (void)Refresh(false);
    absl::MutexLock lock(&mu_);
    absl::Time now = absl::Now();
    std::vector<std::pair<std::string, Client*>> up, all;
    for (const std::string& s : current_) {
      all.emplace_back(s, clients_.at(s).get());
      if (states_[s].down_until <= now) up.emplace_back(s, clients_.at(s).get());
    }
    return up.empty() ? all : up;
  }

  // Notes the outcome of a call to `server`.
  void Record(const std::string& server, const absl::Status& s) {
    absl::MutexLock lock(&mu_);
    State& state = states_[server];
    if (!FailsOver(s)) {
      state.consecutive_failures = 0;
      state.down_until = absl::InfinitePast();
      return;
    }
    if (++state.consecutive_failures >= options_.failures_to_mark_down) {
      state.down_until = absl::Now() + options_.down_backoff;
    }
  }

  template <typename T, typename Call>
  absl::StatusOr<T> Route(absl::string_view key, bool fail_over, Call call) {
    auto candidates = Candidates(key);
    absl::StatusOr<T> result = absl::UnavailableError("no chunkd server");
    for (size_t i = 0; i < candidates.size(); ++i) {
      result = call(*candidates[i].second);
      Record(candidates[i].first, result.status());
      if (!fail_over || !FailsOver(result.status())) return result;
    }
    return result;
  }

  template <typename T, typename Start>
  void RouteAsync(absl::string_view key, bool fail_over, Start start, Callback<T> done) {
    struct Attempt {
      std::vector<std::pair<std::string, Client*>> candidates;
      size_t next = 0;
      bool fail_over;
      Start start;
      Callback<T> done;
    };
    auto attempt = std::make_shared<Attempt>(
        Attempt{Candidates(key), 0, fail_over, std::move(start), std::move(done)});
    Next<T>(std::move(attempt));
  }

  template <typename T, typename A>
  void Next(std::shared_ptr<A> a) {
    auto [name, client] = a->candidates[a->next++];
    a->start(*client, [this, a, name = name](absl::StatusOr<T> r) {
      Record(name, r.status());
      if (a->fail_over && FailsOver(r.status()) && a->next < a->candidates.size()) {
        Next<T>(a);
        return;
      }
      a->done(std::move(r));
    });
  }

  const ShardedClientOptions options_;
  const std::string host_, port_;  // set when the pool is one host name
  mutable absl::Mutex mu_;
  std::vector<std::string> current_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<Client>> clients_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, State> states_ ABSL_GUARDED_BY(mu_);
  absl::Time next_resolve_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
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

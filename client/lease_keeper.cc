#include "client/lease_keeper.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "buffer/shm_import.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/cuda_import.h"

namespace chunkd::client {
namespace {

std::atomic<int> fail_next_shm_imports{0};

// The keeper (client/lease_keeper.h): releases on one thread, renewals on another.
class LeaseKeeperImpl final : public LeaseKeeper,
                              public std::enable_shared_from_this<LeaseKeeperImpl> {
 public:
  LeaseKeeperImpl(std::shared_ptr<grpc::Channel> channel, const std::string& shm_dir)
      : stub_(v1::Chunkd::NewStub(channel)), importer_(shm_dir), pid_(getpid()) {
    thread_ = std::thread([this] { ReleaseLoop(); });
    renew_thread_ = std::thread([this] { RenewLoop(); });
  }
  ~LeaseKeeperImpl() override {
    if (getpid() != pid_) {
      thread_.detach();  // the parent's threads: nothing to join here
      renew_thread_.detach();
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    thread_.join();
    renew_thread_.join();
    // Whatever is left goes out now, with a short deadline: the process may be exiting.
    std::vector<uint64_t> rest;
    {
      absl::MutexLock lock(&mu_);
      rest.swap(to_release_);
    }
    if (!rest.empty()) SendRelease(std::move(rest), absl::Seconds(2));
  }

  // HandleImporter: maps the segment (shared memory) or opens the IPC handle (CUDA) of a
  // handle reply; the buffer holds the keeper, so one that outlives its client still returns
  // its lease.
  absl::StatusOr<GetResult> Import(const v1::GetHeader& header) override {
    if (absl::Status alive = CheckAlive(header.lease().id()); !alive.ok()) {
      Drop(header.lease().id());
      return alive;
    }
    return header.delivery() == v1::DELIVERY_CUDA_IPC ? ImportCuda(header) : ImportShm(header);
  }

  // A reply's header announced lease `lease`, granted after `call_start`: kept alive from now
  // on, until dropped.
  void Announce(const v1::Lease& lease, absl::Time call_start) override {
    if (lease.id() == 0) return;
    absl::Duration ttl = absl::Milliseconds(lease.ttl_ms());
    absl::MutexLock lock(&mu_);
    Held& held = live_[lease.id()];
    // A process-bound lease may come again (the server hands a process one lease per block it
    // holds); each grant is dropped, and released, once.
    if (++held.refs > 1) return;
    held.process_bound = lease.process_bound();
    held.ttl = ttl;
    held.alive_until = call_start + ttl;
    if (!held.process_bound) {
      renew_wake_ = true;  // the renewal thread computes its next deadline again
      if (ttl < ttl_) ttl_ = ttl;
    }
  }
  // Its last copy is gone: release the lease with the next batch (in the process that took
  // it: a forked child's copies of the parent's buffers release nothing).
  void Drop(uint64_t id) override {
    if (getpid() != pid_) return;
    absl::MutexLock lock(&mu_);
    auto it = live_.find(id);
    if (it == live_.end()) {
      if (exited_) return;  // released at exit already
    } else if (--it->second.refs == 0) {
      live_.erase(it);
    }
    to_release_.push_back(id);
  }
  size_t held() const override {
    absl::MutexLock lock(&mu_);
    return live_.size();
  }
  bool Flush() override {
    std::vector<uint64_t> ids;
    {
      absl::MutexLock lock(&mu_);
      ids.swap(to_release_);
    }
    bool ok = ids.empty() || SendRelease(std::move(ids), kCallTimeout);
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](LeaseKeeperImpl* k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k->mu_) { return !k->sending_; },
        this));
    return ok && last_send_ok_;
  }
  void ReleaseAllAtExit() override {
    if (getpid() != pid_) return;
    std::vector<uint64_t> ids;
    {
      absl::MutexLock lock(&mu_);
      ids.swap(to_release_);
      for (const auto& [id, held] : live_) ids.insert(ids.end(), held.refs, id);
      live_.clear();
      exited_ = true;
    }
    if (!ids.empty()) SendRelease(std::move(ids), absl::Seconds(1));
  }

 private:
  static constexpr size_t kBatch = 256;
  static constexpr absl::Duration kGather = absl::Milliseconds(20);
  static constexpr absl::Duration kCallTimeout = absl::Seconds(10);

  struct Held {
    bool process_bound = false;
    absl::Duration ttl;
    // The server keeps the lease at least until then (grant or renewal + TTL, counted from a
    // moment before the server's).
    absl::Time alive_until;
    bool lost = false;  // the server no longer knew it
    int refs = 0;       // grants of it not dropped yet (process-bound leases come again)
  };

  // Calls are blocking ones, made from this thread (or Flush's caller): gRPC's synchronous API
  // starts no threads of its own, so a client that only reads starts none (see BlockingUnary).
  void ReleaseLoop() {
    absl::MutexLock lock(&mu_);
    while (!stopping_) {
      // Asleep until there is something to release; releases then wait up to kGather for
      // company, unless a batch is full: a busy reader returns its leases in a few dozen calls
      // a second, not hundreds (each costs both sides a whole call).
      mu_.Await(absl::Condition(
          +[](LeaseKeeperImpl* k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k->mu_) {
            return k->stopping_ || !k->to_release_.empty();
          },
          this));
      if (stopping_) break;
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](LeaseKeeperImpl* k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k->mu_) {
                                 return k->stopping_ || k->to_release_.size() >= kBatch;
                               },
                               this),
                           kGather);
      std::vector<uint64_t> release;
      release.swap(to_release_);
      sending_ = !release.empty();
      mu_.Unlock();
      bool sent = release.empty() || SendRelease(std::move(release), kCallTimeout);
      mu_.Lock();
      if (sending_) last_send_ok_ = sent;
      sending_ = false;
    }
  }

  // Renews each TTL lease once a third of its TTL has passed (less than two thirds of a TTL
  // remain of what the server surely keeps), so two renewals can fail before it lapses. A renewal
  // that fails is tried again soon (a tenth of the TTL), not a whole period later.
  void RenewLoop() {
    absl::MutexLock lock(&mu_);
    absl::Time retry_at = absl::InfinitePast();
    while (!stopping_) {
      absl::Time next = absl::InfiniteFuture();
      for (const auto& [id, held] : live_) {
        if (!held.process_bound) next = std::min(next, held.alive_until - held.ttl * 2 / 3);
      }
      next = std::max(next, retry_at);
      renew_wake_ = false;
      mu_.AwaitWithDeadline(absl::Condition(
                                +[](LeaseKeeperImpl* k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k->mu_) {
                                  return k->stopping_ || k->renew_wake_;
                                },
                                this),
                            next);
      if (stopping_) break;
      absl::Time now = absl::Now();
      if (now < next) continue;  // woken by a new lease: compute the deadline again
      // Everything due within the next third of a TTL goes in this call.
      std::vector<uint64_t> renew;
      for (const auto& [id, held] : live_) {
        if (!held.process_bound && held.alive_until - held.ttl * 2 / 3 <= now + held.ttl / 3) {
          renew.push_back(id);
        }
      }
      if (renew.empty()) continue;
      mu_.Unlock();
      bool ok = RenewNow(renew);
      mu_.Lock();
      retry_at = ok ? absl::InfinitePast() : absl::Now() + ttl_ / 10;
    }
  }

  // Renews `ids` and records the server's answer: the leases it knows live one TTL from the
  // request's sending; those it does not know are lost. False when the call failed.
  bool RenewNow(const std::vector<uint64_t>& ids) {
    absl::Time sent = absl::Now();
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(sent + kCallTimeout));
    v1::RenewRequest request;
    for (uint64_t id : ids) request.add_lease_ids(id);
    v1::RenewResponse response;
    if (!stub_->Renew(&context, request, &response).ok()) return false;
    absl::flat_hash_set<uint64_t> unknown(response.unknown_lease_ids().begin(),
                                          response.unknown_lease_ids().end());
    absl::MutexLock lock(&mu_);
    for (uint64_t id : ids) {
      auto it = live_.find(id);
      if (it == live_.end()) continue;  // dropped meanwhile
      if (unknown.contains(id)) {
        // Expired: its memory may hold other bytes by now. Nothing can bring it back; a buffer
        // not handed out yet fails its import check, one handed out gets this line logged.
        if (lost_++ == 0) {
          std::fprintf(stderr,
                       "chunkd client: the server no longer knows a lease this process holds "
                       "(expired, its TTL being %s, or released elsewhere); a buffer of it may "
                       "no longer hold its bytes\n",
                       absl::FormatDuration(it->second.ttl).c_str());
        }
        it->second.alive_until = absl::InfinitePast();
        it->second.process_bound = true;  // nothing more to renew
        it->second.lost = true;
        continue;
      }
      it->second.alive_until = sent + it->second.ttl;
    }
    return true;
  }

  // OK when lease `id` is surely alive now with time to spare (or follows this process);
  // otherwise it is renewed now, and UNAVAILABLE when the server no longer knows it.
  absl::Status CheckAlive(uint64_t id) {
    {
      absl::MutexLock lock(&mu_);
      auto it = live_.find(id);
      if (it == live_.end()) return absl::OkStatus();  // not announced (a test's reply)
      const Held& held = it->second;
      if (held.lost) return LostLease(held.ttl);
      if (held.process_bound || held.alive_until - absl::Now() > held.ttl / 4) {
        return absl::OkStatus();
      }
    }
    bool renewed = RenewNow({id});
    absl::MutexLock lock(&mu_);
    auto it = live_.find(id);
    if (it == live_.end()) return absl::OkStatus();
    if (!renewed || it->second.lost) return LostLease(it->second.ttl);
    return absl::OkStatus();
  }

  static absl::Status LostLease(absl::Duration ttl) {
    return absl::UnavailableError(absl::StrCat(
        "the lease of a handle expired before its buffer was handed out (the reply took longer "
        "than the lease's TTL of ",
        absl::FormatDuration(ttl), ", and it could not be renewed); read it again"));
  }

  // Maps the handle's segment (once per process) and returns a buffer that views the chunk
  // and releases its lease when the last copy goes.
  absl::StatusOr<GetResult> ImportShm(const v1::GetHeader& header) {
    const v1::ShmHandle& shm = header.shm();
    uint64_t lease = header.lease().id();
    absl::StatusOr<buffer::cpu::Buffer> data;
    if (fail_next_shm_imports.load(std::memory_order_relaxed) > 0 &&
        fail_next_shm_imports.fetch_sub(1) > 0) {
      data = absl::PermissionDeniedError(
          absl::StrCat("cannot map ", shm.segment(), ": permission denied (injected by a test)"));
    } else {
      data = importer_.Import(shm.segment(), shm.segment_size(), shm.offset(), shm.length(),
                              [keeper = shared_from_this(), lease] { keeper->Drop(lease); });
    }
    if (!data.ok()) return Failed(header, data.status());
    GetResult r = Imported(header);
    r.data = *std::move(data);
    return r;
  }

  // Opens the segment's IPC handle (once per process, client/cuda_import.h) and returns a device
  // buffer that views the chunk and releases its lease when the last copy goes.
  absl::StatusOr<GetResult> ImportCuda(const v1::GetHeader& header) {
    uint64_t lease = header.lease().id();
    absl::StatusOr<CudaImporter*> importer = CudaImporter::ForProcess();
    absl::StatusOr<buffer::gpu::Buffer> data =
        importer.ok() ? (*importer)->Import(header.cuda(), [keeper = shared_from_this(),
                                                            lease] { keeper->Drop(lease); })
                      : importer.status();
    if (!data.ok()) return Failed(header, data.status());
    GetResult r = Imported(header);
    r.device_data = *std::move(data);
    return r;
  }

  // A handle imported: its lease is kept alive from now on, and given back with the buffer.
  GetResult Imported(const v1::GetHeader& header) {
    bool announced;
    {
      absl::MutexLock lock(&mu_);
      announced = live_.contains(header.lease().id());
    }
    if (!announced) Announce(header.lease(), absl::Now());
    GetResult r;
    r.total_size = header.total_size();
    r.generation = header.generation();
    r.range_start = header.range_start();
    r.delivery = header.delivery();
    r.lease_id = header.lease().id();
    return r;
  }

  // A handle that could not be imported: its lease goes back now.
  absl::Status Failed(const v1::GetHeader& header, const absl::Status& cause) {
    Drop(header.lease().id());
    return ImportFailed(cause, header.delivery());
  }

  // A lost release is not lost memory: the lease expires.
  bool SendRelease(std::vector<uint64_t> ids, absl::Duration timeout) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    v1::ReleaseRequest request;
    for (uint64_t id : ids) request.add_lease_ids(id);
    v1::ReleaseResponse response;
    return stub_->Release(&context, request, &response).ok();
  }

  std::unique_ptr<v1::Chunkd::Stub> stub_;
  buffer::ShmImporter importer_;
  const pid_t pid_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Held> live_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> to_release_ ABSL_GUARDED_BY(mu_);
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  bool renew_wake_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration ttl_ ABSL_GUARDED_BY(mu_) = absl::Seconds(30);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool exited_ ABSL_GUARDED_BY(mu_) = false;
  // The thread is sending a batch of releases (Flush waits for it), and how the last went.
  bool sending_ ABSL_GUARDED_BY(mu_) = false;
  bool last_send_ok_ ABSL_GUARDED_BY(mu_) = true;
  std::thread thread_;        // releases
  std::thread renew_thread_;  // renewals
};

// Every keeper of the process, for ReleaseLeasesAtExit.
absl::Mutex keepers_mu(absl::kConstInit);
std::vector<std::weak_ptr<LeaseKeeper>>& Keepers() {
  static auto* keepers = new std::vector<std::weak_ptr<LeaseKeeper>>();
  return *keepers;
}

}  // namespace

std::shared_ptr<LeaseKeeper> NewLeaseKeeper(std::shared_ptr<grpc::Channel> channel,
                                            const std::string& shm_dir) {
  auto keeper = std::make_shared<LeaseKeeperImpl>(std::move(channel), shm_dir);
  absl::MutexLock lock(&keepers_mu);
  auto& keepers = Keepers();
  std::erase_if(keepers, [](const std::weak_ptr<LeaseKeeper>& k) { return k.expired(); });
  keepers.push_back(keeper);
  return keeper;
}

void ReleaseLeasesAtExit() {
  std::vector<std::shared_ptr<LeaseKeeper>> keepers;
  {
    absl::MutexLock lock(&keepers_mu);
    for (const auto& weak : Keepers()) {
      if (auto keeper = weak.lock()) keepers.push_back(std::move(keeper));
    }
  }
  for (const auto& keeper : keepers) keeper->ReleaseAllAtExit();
}

void FailNextShmImportsForTesting(int n) { fail_next_shm_imports.store(n); }

}  // namespace chunkd::client

// The chunkd C++ client: blocking and asynchronous calls for every RPC.
//
// Values arrive as chunkd::buffer::cpu::Buffer: Get copies each received part once, from the
// gRPC slices that left the socket straight into the result's memory (no protobuf object in
// between); Put sends the caller's buffer as slices that refer to it.
//
// Every call has a deadline (ClientOptions::timeout unless the call's options say otherwise).
// Calls that fail with UNAVAILABLE (server restarting, connection lost) are retried with
// exponential backoff within that deadline; conditional Puts are not retried, because the first
// attempt may have landed. An inline Get whose reply is cut off after part of the value arrived
// (a server shutting down can close its connections with a large reply half sent) is resumed:
// the next attempt asks for the rest of the value by range, at the same generation
// (if_generation_match), and the result is the whole value; if the value changed meanwhile,
// the next attempt reads it whole. Resumed attempts count against max_attempts like others.
//
// Thread-safe: one Client serves any number of threads. Async callbacks run on gRPC's threads
// and must not block.
#ifndef CHUNKD_CLIENT_CLIENT_H_
#define CHUNKD_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "buffer/gpu/buffer.h"
#include "buffer/host_identity.h"
#include "chunkd/v1/chunkd.pb.h"
#include "proto/wire/byte_range.h"
#include "proto/wire/conditions.h"

namespace grpc {
class ClientContext;
}

namespace chunkd::client {

class InterruptedGet;  // client/replies.h

struct ClientOptions {
  // "host:port", "[::1]:port" or "unix:/path/to/socket".
  std::string address = "127.0.0.1:7878";
  // Deadline of each call, retries included.
  absl::Duration timeout = absl::Seconds(60);
  // Attempts of a call that fails with UNAVAILABLE (1: no retry).
  int max_attempts = 5;
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
  // Size of the data parts a Put sends (at most 1 MiB).
  size_t put_part_bytes = 1u << 20;
  // Largest value a Get or GetMany reply may announce; a larger one fails with
  // RESOURCE_EXHAUSTED before any memory is set aside for it (inline values are received into
  // memory sized from the reply's header).
  uint64_t max_value_bytes = uint64_t{1} << 40;
  // Deliveries a Get asks for, in order of preference. Inline (the bytes over the connection)
  // is the default and always possible. With DELIVERY_SHM, a server on this host that shares
  // `shm_dir` answers with a handle: the result then views the server's memory (mapped
  // read-only, no copy) and holds a lease until the last copy of the buffer is dropped. Other
  // servers fall back to inline.
  std::vector<v1::Delivery> accept = {v1::DELIVERY_INLINE};
  // Freshness of every Get and GetMany (GetOptions::max_staleness overrides): a cached value is
  // served only if the server's store confirmed it at most this long before the request.
  // Unset: the server's policy (--revalidate_after; the file store checks every read).
  std::optional<absl::Duration> max_staleness;
  std::string shm_dir = "/dev/shm";
  // The identity the client presents; its own when unset (tests set another to see fallback).
  std::optional<buffer::HostIdentity> identity;
  // With DELIVERY_CUDA_IPC in `accept`: the GPU (this process's ordinal) the chunks should be
  // on. The server matches it by UUID; when it has that GPU in its device tier and runs on this
  // host, the result's device_data views the server's GPU memory (opened through CUDA IPC, no
  // copy) and holds a lease; otherwise the next accepted delivery is used. Connect fails with
  // FAILED_PRECONDITION "no CUDA device: ..." when this process has no such device.
  int cuda_device = 0;
  // Security (client/credentials.h). TLS on TCP addresses: tls_ca is the PEM file of the CA that
  // signs the server's certificate (tls alone: the system's roots); "unix:" stays plaintext.
  // tls_ca, tls_cert and tls_key may also hold the PEM text itself instead of a file's path.
  std::string tls_ca;
  bool tls = false;
  // The client's certificate and key (PEM files), for servers that require one (mutual TLS).
  std::string tls_cert;
  std::string tls_key;
  // The name the server's certificate must hold, when it is not the host of `address`.
  std::string tls_server_name;
  // Sent with every call as "authorization: Bearer TOKEN" (servers started with --auth_tokens).
  std::string token;
  // Finding a server that went silent (its host cut off, no reset): the connection is pinged
  // after keepalive_time without a ping (idle or not), and closed when the answer takes longer
  // than keepalive_timeout (also the longest time sent bytes may go unacknowledged, Linux's
  // TCP_USER_TIMEOUT); the calls on it then fail with UNAVAILABLE, which is retried or, in a
  // pool, fails over. A connection attempt gives up after connect_timeout. chunkd servers
  // accept pings every second or more; zero keepalive_time: no pings.
  absl::Duration keepalive_time = absl::Seconds(5);
  absl::Duration keepalive_timeout = absl::Seconds(5);
  absl::Duration connect_timeout = absl::Seconds(5);
};

// The byte ranges and generation conditions of requests: the wire's (proto/wire/), one
// definition shared with the server.
using wire::ByteRange;
using wire::Conditions;

// Cancels an asynchronous call (GetOptions::cancellation): the attempt in flight is cancelled
// and no further attempt starts, so the call ends with CANCELLED (unless it finished first).
// Thread-safe; cancelling twice, or after the call ended, does nothing.
class Cancellation {
 public:
  void Cancel();
  bool cancelled() const;
  // The client's side: the context of the attempt that starts now. False when the call was
  // cancelled already (the attempt then must not start).
  bool Arm(std::shared_ptr<grpc::ClientContext> context);

 private:
  mutable absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<grpc::ClientContext> context_ ABSL_GUARDED_BY(mu_);
};

// A read of a derived entry (chunkd.v1's DerivedRead): the value derived from the key's current
// value by `derivation` (for Zarr, a decoded chunk), held by the server for every process of
// the node. A miss with `produce` is answered with a production id (GetResult::production_id):
// the caller derives the value and publishes it with PutDerived; readers that miss meanwhile
// wait for it (up to `wait_ms`, 0: the server's default). docs/protocol.md, "Derived entries".
struct DerivedRead {
  std::string derivation;  // 1 to 4096 bytes, opaque to the server
  bool produce = false;
  uint64_t wait_ms = 0;
};

// A derived entry's publication (chunkd.v1's DerivedPut).
struct DerivedPut {
  std::string derivation;
  uint64_t source_generation = 0;  // what the value was derived from
  uint64_t production_id = 0;      // the production it publishes (0: none)
  bool abandon = false;            // gives the production up (no value)
};

struct GetOptions {
  ByteRange range;
  Conditions conditions;
  // Overrides ClientOptions::timeout / accept / cuda_device when set.
  std::optional<absl::Duration> timeout;
  std::optional<std::vector<v1::Delivery>> accept;
  std::optional<int> cuda_device;
  // Freshness: serve a cached value only if the server's store confirmed it at most this long
  // before the request (zero: validate now). Unset: ClientOptions::max_staleness.
  std::optional<absl::Duration> max_staleness;
  // GetAsync and GetManyAsync: cancels the call when cancelled (see Cancellation).
  std::shared_ptr<Cancellation> cancellation;
  // Get and GetAsync: where an inline value cut off mid-reply keeps the bytes that arrived, so
  // that the call's next attempt asks only for the rest (client/replies.h). Made per call when
  // unset; a ShardedClient sets one per call, so that the key's next server continues it.
  std::shared_ptr<InterruptedGet> resume;
  // Get and GetAsync: read the derived entry instead of the value (DerivedRead).
  std::optional<DerivedRead> derived;
};

struct GetResult {
  // The requested bytes. With DELIVERY_SHM, a read-only view of the server's shared memory
  // whose lease is released (in the background, batched) once every copy of it is dropped.
  buffer::cpu::Buffer data;
  uint64_t total_size = 0;  // size of the whole stored value
  uint64_t generation = 0;
  uint64_t range_start = 0;  // where `data` starts within the value
  v1::Delivery delivery = v1::DELIVERY_INLINE;
  uint64_t lease_id = 0;  // DELIVERY_SHM, DELIVERY_CUDA_IPC: the lease the buffer holds
  // DELIVERY_CUDA_IPC: the bytes in GPU memory (`data` is then empty). Holds the lease until
  // the last copy of it is dropped; to_cpu() copies the bytes to the host.
  std::optional<buffer::gpu::Buffer> device_data;
  // A derived read that missed: nonzero, the caller is to produce the entry from generation
  // `generation` of the source and publish it (Client::PutDerived); `data` is empty.
  uint64_t production_id = 0;
};

// One item of GetMany.
struct GetManyItem {
  std::string key;
  ByteRange range;
  Conditions conditions;
  std::optional<DerivedRead> derived;  // read the derived entry instead (DerivedRead)
};

// GetMany's results, one per item and in the items' order; an item's failure (NOT_FOUND, say)
// is its own.
using GetManyResults = std::vector<absl::StatusOr<GetResult>>;

struct PutResult {
  uint64_t generation = 0;
  uint64_t size = 0;
};

struct StatResult {
  bool exists = false;
  uint64_t size = 0;
  uint64_t generation = 0;
};

struct ListEntry {
  std::string key;
  uint64_t size = 0;
};

struct ListResult {
  std::vector<ListEntry> entries;
  std::vector<std::string> prefixes;  // with `directory`: child "directories", ending in '/'
};

template <typename T>
using Callback = std::function<void(absl::StatusOr<T>)>;
using StatusCallback = std::function<void(absl::Status)>;
// The results of GetMany items [first, first + results.size()), in order.
using ItemsCallback =
    std::function<void(size_t first, std::vector<absl::StatusOr<GetResult>> results)>;

// Sets up what the client needs of the process, once: call it at the start of main (or of a
// module's import), before the program starts gRPC (a channel, a server, grpc_init) and before
// it starts threads that use setenv/getenv. Idempotent and thread-safe; Client::Connect calls
// it too, so a program that does not call it still works, only with the state set later.
// Process-wide, and why:
// - GRPC_POLL_STRATEGY=poll, unless the environment names one already: gRPC's default engine
//   (epoll1) has one thread poll every connection and hand events to the others, which costs
//   blocking calls from several threads a thread switch each (4 threads of 4 KiB Gets: 12-13.5
//   thousand per second on epoll1, 19-20 thousand on poll). gRPC reads the variable once, when
//   it starts: set after that (Connect after the program's own first channel), it has no
//   effect, and the program keeps gRPC's default. setenv is not safe beside threads that read
//   the environment, hence "before the program starts threads".
// - Abseil's mutex deadlock detection off (Debian builds it on; gRPC's locks are absl::Mutex
//   too, and its bookkeeping costs every call). Programs that want it set it again after.
// - One callback channel kept for the life of the process, so that gRPC 1.51's process-wide
//   callback queue is never torn down from one of its own threads (client.cc,
//   KeepCallbackQueueForTheProcess). Not in ThreadSanitizer builds.
// It cannot be done per Client: each item is state of the whole process, read by gRPC once.
void InitProcess();

class Client {
 public:
  // Creates a client for `options.address`. Connecting happens lazily; a server that is
  // down shows as UNAVAILABLE on the first call. INVALID_ARGUMENT for a malformed address.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  virtual ~Client() = default;

  // NOT_FOUND: no such key. FAILED_PRECONDITION: a condition failed. INVALID_ARGUMENT: bad key
  // or range (the message says which).
  virtual absl::StatusOr<GetResult> Get(absl::string_view key, const GetOptions& options = {}) = 0;
  virtual void GetAsync(absl::string_view key, const GetOptions& options,
                        Callback<GetResult> done) = 0;

  // Many values in one call (at most 4096 items): the call's overhead is paid once for the
  // batch, which is what small chunks and shared-memory handles need. Deliveries are inline or
  // shared memory (options.accept; CUDA IPC is for Get); options.range and .conditions are
  // unused, each item has its own. The error is the call's (UNAVAILABLE after the retries, too
  // many items); items fail one by one inside the results.
  virtual absl::StatusOr<GetManyResults> GetMany(const std::vector<GetManyItem>& items,
                                                 const GetOptions& options = {}) = 0;
  virtual void GetManyAsync(std::vector<GetManyItem> items, const GetOptions& options,
                            Callback<GetManyResults> done) = 0;
  // GetMany handing items' results to `each` as soon as they have arrived whole (items are
  // answered in order; `each` runs on gRPC's threads, once per reply message that completed
  // items, with those items), so a caller can use the first values while the later ones are on
  // their way; then `done` with the call's status: OK once every item was handed over, else
  // the error that ended the call (the items not handed over failed with it). An attempt that
  // fails with UNAVAILABLE is retried for the items not handed over yet; an item whose handle
  // cannot be imported is read again, with the rest, inline.
  virtual void GetManyEachAsync(std::vector<GetManyItem> items, const GetOptions& options,
                                ItemsCallback each, StatusCallback done) = 0;

  // RESOURCE_EXHAUSTED: larger than the server's maximum, or the store is full.
  virtual absl::StatusOr<PutResult> Put(absl::string_view key, buffer::cpu::Buffer value,
                                        const Conditions& conditions = {}) = 0;
  virtual void PutAsync(absl::string_view key, buffer::cpu::Buffer value,
                        const Conditions& conditions, Callback<PutResult> done) = 0;
  // Publishes `value` as the derived entry of `key` (or, with `derived.abandon`, gives the
  // production up; `value` empty). The store is not written. FAILED_PRECONDITION when the key
  // is no longer at derived.source_generation (nothing stored), or when the server keeps no
  // derived entries.
  virtual absl::StatusOr<PutResult> PutDerived(absl::string_view key, buffer::cpu::Buffer value,
                                               const DerivedPut& derived) = 0;
  virtual void PutDerivedAsync(absl::string_view key, buffer::cpu::Buffer value,
                               const DerivedPut& derived, Callback<PutResult> done) = 0;

  // NOT_FOUND when the key holds no value.
  virtual absl::Status Delete(absl::string_view key, const Conditions& conditions = {}) = 0;
  virtual void DeleteAsync(absl::string_view key, const Conditions& conditions,
                           StatusCallback done) = 0;

  // A missing key is not an error: exists is false.
  virtual absl::StatusOr<StatResult> Stat(absl::string_view key) = 0;
  virtual void StatAsync(absl::string_view key, Callback<StatResult> done) = 0;

  // Drops the server's cached copy of `key`, if it holds one (the store is not touched): the
  // next read of the key comes from the store. A pool drops every server's copy.
  virtual absl::Status Invalidate(absl::string_view key) = 0;
  virtual void InvalidateAsync(absl::string_view key, StatusCallback done) = 0;

  virtual absl::StatusOr<ListResult> List(absl::string_view prefix, bool directory = false) = 0;
  virtual void ListAsync(absl::string_view prefix, bool directory, Callback<ListResult> done) = 0;
  // The listing as the server sent it, page by page (a pool's: one merged page).
  virtual absl::StatusOr<std::vector<ListResult>> ListPages(absl::string_view prefix,
                                                            bool directory = false) = 0;
  virtual void ListPagesAsync(absl::string_view prefix, bool directory,
                              Callback<std::vector<ListResult>> done) = 0;

  virtual absl::StatusOr<v1::ServerInfoResponse> ServerInfo() = 0;
  virtual void ServerInfoAsync(Callback<v1::ServerInfoResponse> done) = 0;

  const ClientOptions& options() const { return options_; }

  // Leases this client holds on handle deliveries (buffers alive), and mapped segments.
  virtual size_t leases_held() const = 0;
  // Sends the releases of dropped buffers now instead of at the next batch, and waits for the
  // server's answer. False when a release call failed (the leases then expire).
  virtual bool FlushReleases() = 0;
  // Why shared-memory delivery is off for this client (a handle it could not map: the call was
  // then made again inline, and every later one is inline), or "" while it is on.
  virtual std::string shm_disabled() const = 0;

 protected:
  explicit Client(const ClientOptions& options) : options_(options) {}
  const ClientOptions options_;
};

// Returns every lease the process's clients hold (buffers still alive included) to their
// servers now, in one call per client with a short deadline; buffers dropped afterwards release
// nothing. For a process that is exiting (the Python package calls it from atexit): its leases
// then do not pin the servers' memory for a TTL.
void ReleaseLeasesAtExit();

// Tests only: the next `n` shared-memory imports of this process fail as a segment that cannot
// be mapped does (a permission error), to exercise the inline retry.
void FailNextShmImportsForTesting(int n);

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_CLIENT_H_

// TensorStore's key-value service, tensorstore_grpc.kvstore.KvStoreService (the server side of
// TensorStore's `tsgrpc_kvstore` driver; proto/tensorstore_grpc/), on the same engine, store,
// cache, limits and tokens as chunkd.v1 (ServiceCore). How it maps TensorStore's semantics:
//
// - Generations. A TensorStore StorageGeneration is bytes: "" is "unknown", "\x02" is "no value"
//   and "\x00" followed by bytes a stored version (TensorStore 0.1.74 and later). chunkd's
//   64-bit generation G travels as "\x00" + G in little-endian order (StorageGeneration::
//   FromUint64), so generations survive restarts as chunkd's do. A condition on generation
//   bytes chunkd never hands out can never equal a stored value's.
// - Conditions. Read takes generation_if_equal and generation_if_not_equal, Write and Delete
//   generation_if_equal ("\x02": only if the key holds no value). A condition that does not
//   hold is not an error for TensorStore: Read answers state UNSPECIFIED with the stored
//   generation, Write and Delete an OK reply with the empty ("unknown") generation. A Read of a
//   missing key answers MISSING whatever its conditions, as TensorStore's own stores do.
// - Byte ranges must lie within the value (OUT_OF_RANGE otherwise), as TensorStore's stores
//   require; chunkd.v1 clips them as Zarr's stores do. The rule is applied by SliceForRead.
// - Timestamps and staleness_bound. A Read's timestamp is the time the store last confirmed
//   the value (CachedValue::validated: the read that fetched it, or the last validation that
//   found it unchanged), not the call's arrival. A staleness_bound is honoured against that
//   time: a cached copy confirmed before the bound is validated first (a stat for the file
//   store, a conditional request for s3/http; InfiniteFuture: now). Without a bound the
//   server's freshness policy applies (see server/store/chunk_store.h). A malformed bound is
//   INVALID_ARGUMENT.
// - Delete of a range lists the range and deletes key by key (not atomically); List of a range
//   lists the bounds' common prefix and keeps the keys within the range, stripping
//   strip_prefix_length bytes from each.
// - Keys are checked as chunkd.v1 checks them (ValidateKey): a bad key is INVALID_ARGUMENT.
//   Errors are gRPC statuses, which the driver reports as the same absl codes.
//
// Read is served raw, as chunkd.v1's Get: each reply's value bytes are a slice that refers to
// the cached buffer (wire::PartSequence), never copied on their way to the socket.
#ifndef CHUNKD_SERVER_SERVICES_TENSORSTORE_KVSTORE_SERVICE_H_
#define CHUNKD_SERVER_SERVICES_TENSORSTORE_KVSTORE_SERVICE_H_

#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "server/backend/backend.h"
#include "server/rpc/rpc_engine.h"
#include "server/services/method_calls.h"
#include "server/services/service_core.h"
#include "tensorstore_grpc/kvstore/kvstore.grpc.pb.h"

namespace chunkd::server {

namespace tsgrpc {

// TensorStore's "no value" storage generation.
inline constexpr absl::string_view kNoValue("\x02", 1);

// The StorageGeneration bytes of chunkd's generation `g` (never 0).
std::string EncodeGeneration(Generation g);
// The chunkd generation that `bytes` encodes, or nullopt for bytes chunkd never hands out.
std::optional<Generation> DecodeGeneration(absl::string_view bytes);

// A request's generation conditions, as chunkd Conditions; `never` when generation_if_equal
// names a generation no stored value can have (the condition cannot hold for a value, nor
// for a missing key).
struct TsConditions {
  Conditions conditions;
  bool never = false;
};
TsConditions ConditionsFrom(absl::string_view if_equal, absl::string_view if_not_equal = "");

}  // namespace tsgrpc

// Read is raw (replies assembled by hand around slices of the cache); the rest are typed.
using TensorStoreServiceBase = tensorstore_grpc::kvstore::KvStoreService::WithRawMethod_Read<
    tensorstore_grpc::kvstore::KvStoreService::AsyncService>;

// Counted in ServerInfo and /metrics under "tensorstore_": a Read is a get, a Write a put, each
// key a Delete removes a delete (a range counts its keys).
class TensorStoreKvStoreService final : public TensorStoreServiceBase {
 public:
  // `core` (shared with the server's other services) outlives the service.
  explicit TensorStoreKvStoreService(ServiceCore* core);

  // Registers every method with `engine` (before engine->Start()). Register the service with
  // the grpc::ServerBuilder that `engine` was made with, too.
  void Serve(rpc::Engine* engine);

  ServiceCore& core() { return *core_; }
  CallCounters& counters() { return counters_; }

  // Full method names, as authorization and logs name them.
  static constexpr char kRead[] = "/tensorstore_grpc.kvstore.KvStoreService/Read";
  static constexpr char kWrite[] = "/tensorstore_grpc.kvstore.KvStoreService/Write";
  static constexpr char kDelete[] = "/tensorstore_grpc.kvstore.KvStoreService/Delete";
  static constexpr char kList[] = "/tensorstore_grpc.kvstore.KvStoreService/List";

 private:
  ServiceCore* const core_;
  CallCounters counters_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_TENSORSTORE_KVSTORE_SERVICE_H_

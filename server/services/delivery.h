// How chunkd.v1 delivers the bytes of a read (Get, GetMany items): which deliveries a request
// accepts, parsed once; which one it gets (a CUDA IPC handle, a shared-memory handle, or the
// bytes inline); the leases a handle takes; and the filling of the handle in the reply's header.
// The calls (get_call.cc, get_many_call.cc) decide the order and send the replies.
//
// The rule, in the order a Get applies it: CUDA IPC when accepted and the server and client
// can do it (ChooseCudaDelivery), else shared memory when accepted and the client can map this
// server's segments (buffer::CanShareMemory), else inline when accepted (or nothing was listed);
// a client that accepts only handles gets an error naming why none could be offered.
#ifndef CHUNKD_SERVER_SERVICES_DELIVERY_H_
#define CHUNKD_SERVER_SERVICES_DELIVERY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "buffer/host_identity.h"
#include "chunkd/v1/chunkd.pb.h"
#include "grpcpp/server_context.h"
#include "server/services/chunkd_service.h"
#include "server/store/derived_cache.h"
#include "server/store/device_tier.h"
#include "server/store/lease_table.h"

namespace chunkd::server {

// The deliveries a request's `accept` lists, and who asks (for handles).
struct Recipient {
  bool shm = false;       // DELIVERY_SHM listed
  bool cuda = false;      // DELIVERY_CUDA_IPC listed
  bool other = false;     // a delivery other than CUDA IPC listed
  bool inline_ok = true;  // inline listed, or nothing listed
  bool cuda_only() const { return cuda && !other; }
  buffer::HostIdentity client;  // the client's host, when it accepts shared memory
  LeaseHolder holder;           // of the leases, when it accepts a handle
};

// A Get's or GetMany's `accept` and `client`, parsed once per call.
Recipient RecipientOf(ChunkdService* service, const grpc::ServerContextBase& context,
                      const google::protobuf::RepeatedField<int>& accept,
                      const v1::ClientIdentity& client);

// Whether the reply can be one handle to memory of any size (CUDA IPC, or shared memory this
// client maps): then a range over several blocks is joined into one piece, else it streams
// inline block by block.
bool TakesHandles(ChunkdService* service, const Recipient& recipient);

// The header of one read's reply to `value` (conditions checked, range resolved: SliceForRead),
// and in `bytes` the part of the value it describes: all of the header's `length`, or its first
// part when the read was capped (ReadOptions::max_extent_bytes). Delivery and handle are the
// caller's to fill.
absl::StatusOr<v1::GetHeader> HeaderFor(const CachedValue& value, const std::string& key,
                                        const ByteRange& range, const Conditions& conditions,
                                        buffer::cpu::Buffer* bytes);

// The leases a call granted, whose TTL starts when the call is over (LeaseTable::Grant's
// until_renewed): renewed then, however the call ended. Thread-safe: GetMany grants on I/O
// threads.
class GrantedLeases {
 public:
  void Add(uint64_t id);
  // The call is over: the TTLs start now.
  void StartTtls(LeaseTable* leases);

 private:
  absl::Mutex mu_;
  std::vector<uint64_t> ids_ ABSL_GUARDED_BY(mu_);
};

// Fills in a shared-memory handle and lease when the recipient can map this server's segments
// and `data` lives in one: true. False means inline delivery. An error (RESOURCE_EXHAUSTED,
// naming the cap) when a cap on pinned memory refused the lease and the client accepts no
// inline bytes.
absl::StatusOr<bool> OfferShm(ChunkdService* service, const Recipient& recipient,
                              const buffer::cpu::Buffer& data, v1::GetHeader* header,
                              GrantedLeases* granted);

// What a Get asks of CUDA IPC (ChooseCudaDelivery decides).
CudaRequest CudaRequestOf(const Recipient& recipient, const v1::GetRequest& request);

// The key of what the store answered (`value`, for `key`) in the device tier: a value read whole
// is its key; a block or range of a value read by the block is its own entry.
std::string DeviceKeyOf(const std::string& key, const CachedValue& value);

// Fills in the CUDA IPC handle of `chunk` (the device copy of the store's answer, which starts at
// `chunk_offset` in the value) and a lease on its device block: true. False when the lease was
// refused and the client accepts another delivery (counted as a fallback); the refusal when it
// accepts only CUDA IPC.
absl::StatusOr<bool> OfferCuda(ChunkdService* service, const Recipient& recipient,
                               const DeviceChunk& chunk, uint64_t chunk_offset,
                               v1::GetHeader* header, GrantedLeases* granted);

// A read's `derived` (GetRequest.derived) as the derived cache's request: INVALID_ARGUMENT for a
// derivation outside 1..4096 bytes, FAILED_PRECONDITION when the server keeps no derived
// entries (--derived_cache_fraction=0) or the client accepts only CUDA IPC (derived entries
// are host memory). `source`: the read options of the source (its freshness bound).
absl::StatusOr<DerivedRequest> DerivedRequestOf(ChunkdService* service,
                                                const grpc::ServerContextBase& context,
                                                const Recipient& recipient,
                                                const v1::GetRequest& request,
                                                const ReadOptions& source);

// The header of a derived read told to produce the entry (`answer.production_id`): no bytes,
// the source's generation; `conditions` checked against it as for any read.
absl::StatusOr<v1::GetHeader> ProductionHeaderFor(const DerivedAnswer& answer,
                                                  const std::string& key,
                                                  const Conditions& conditions);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_DELIVERY_H_

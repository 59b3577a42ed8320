// The replies of Get and GetMany, assembled from their raw messages (proto/wire): each message
// is walked field by field and its data copied once, from the received slices into the result.
// A handle reply (shared memory, CUDA IPC) is handed to a HandleImporter. Part of the client
// library; separate so that it can be fuzzed with arbitrary replies (tests/fuzz/replies_fuzz.cc)
// and tested without a server (tests/unit/replies_test.cc).
#ifndef CHUNKD_CLIENT_REPLIES_H_
#define CHUNKD_CLIENT_REPLIES_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "chunkd/v1/chunkd.pb.h"
#include "client/client.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/status.h"
#include "proto/wire/raw_message.h"

namespace chunkd::client {

// grpc::Status -> absl::Status, code and message kept.
absl::Status FromGrpc(const grpc::Status& s);

// A handle this process could not import (map a segment, open a CUDA IPC handle) fails its call
// with ImportFailed(cause, delivery): ABORTED, not UNAVAILABLE, so that the retry loops do not
// repeat the call as it was (it would ask for the same delivery again); the client turns that
// delivery off and makes the call again, inline. ImportFailure(status) says which delivery
// failed (DELIVERY_UNSPECIFIED for any other status).
absl::Status ImportFailed(const absl::Status& cause, v1::Delivery delivery);
v1::Delivery ImportFailure(const absl::Status& s);

// Turns the header of a handle reply into a result: maps the segment or opens the IPC handle,
// and takes its lease over (the result's buffer gives it back when its last copy goes). On
// failure the lease is given back at once and the status is ImportFailed's. Thread-safe.
class HandleImporter {
 public:
  virtual ~HandleImporter() = default;
  virtual absl::StatusOr<GetResult> Import(const v1::GetHeader& header) = 0;
  // A reply's header has announced `lease`, which the server granted after `call_start`: it is
  // kept alive from now on (renewed, when it needs renewals) until imported and dropped, or
  // dropped. Called as the header arrives, long before Import for a GetMany's early items.
  virtual void Announce(const v1::Lease& lease, absl::Time call_start) {}
  // Gives back a lease that no buffer has taken over.
  virtual void Drop(uint64_t lease) = 0;
};

// A lease a reply announced that no buffer has taken over yet: given back when the reply goes
// unfinished (a failed or cancelled call, a GetMany item after one that could not be
// imported), rather than left to expire.
class UnclaimedLease {
 public:
  UnclaimedLease() = default;
  UnclaimedLease(std::shared_ptr<HandleImporter> importer, uint64_t id)
      : importer_(std::move(importer)), id_(id) {}
  UnclaimedLease(UnclaimedLease&& other) noexcept;
  UnclaimedLease& operator=(UnclaimedLease&& other) noexcept;
  ~UnclaimedLease() { Drop(); }
  // The lease is someone else's to give back now.
  void Claim() { id_ = 0; }

 private:
  void Drop();
  std::shared_ptr<HandleImporter> importer_;
  uint64_t id_ = 0;
};

// The bytes an inline Get has received when its reply was cut off, kept across the call's
// attempts so that the next one asks only for the rest: the bytes after the last one received,
// at the same generation (if_generation_match), inline. One per Get call, shared by its
// attempts (a ShardedClient passes it on to the key's next server: GetOptions::resume).
//
// Why: gRPC 1.51's server can close a connection at shutdown with the last megabytes of a
// large reply unsent (the client sees UNAVAILABLE, INTERNAL "RST_STREAM" or CANCELLED after
// part of the value arrived). An attempt ended so (GetReply::Finish) keeps what it has here and
// fails with UNAVAILABLE, which the retry loops repeat within the call's attempts and deadline;
// Get is idempotent, and the generation condition makes the pieces one value. When the value
// changed meanwhile (the condition fails), the next attempt reads it whole.
//
// Thread-safe (the attempts of an asynchronous Get complete on gRPC's threads).
class InterruptedGet {
 public:
  // Whether bytes of a value are kept for the next attempt.
  bool active() const;

 private:
  friend class GetReply;
  struct Kept {
    v1::GetHeader header;  // of the first attempt's reply: the whole range the call asked for
    buffer::cpu::MutableBuffer value;
    uint64_t received = 0;
  };
  // Takes the kept bytes over (the attempt that continues them); nullopt when none are kept.
  std::optional<Kept> Take();
  void Keep(Kept kept);

  mutable absl::Mutex mu_;
  std::optional<Kept> kept_ ABSL_GUARDED_BY(mu_);
};

// One Get's reply. `max_bytes`: the largest value it may announce (ClientOptions). With
// `resume`, the attempt continues the value kept there, if any (its request then must go
// through RewriteRequest), and keeps its bytes there when its reply is cut off (see
// InterruptedGet).
class GetReply {
 public:
  GetReply(std::shared_ptr<HandleImporter> importer, uint64_t max_bytes,
           std::shared_ptr<InterruptedGet> resume = nullptr)
      : importer_(std::move(importer)),
        max_bytes_(max_bytes),
        started_(absl::Now()),
        resume_(std::move(resume)) {
    if (resume_) kept_ = resume_->Take();
  }

  // This attempt continues a value an earlier one was cut off in.
  bool continues() const { return kept_.has_value(); }
  // With continues(): makes `request` (the call's) ask for the rest of the kept value: its
  // bytes from the first one missing, at the kept generation, inline.
  void RewriteRequest(v1::GetRequest* request) const;

  // One received GetResponse message.
  absl::Status Absorb(const grpc::ByteBuffer& message);
  // The encoded GetHeader: sizes the value, or announces a handle.
  absl::Status TakeHeader(const std::string& bytes);
  // `length` bytes of data, next in `reader`: copied once, into the value.
  absl::Status TakeData(wire::FieldReader& reader, uint64_t length);

  bool has_header() const { return have_header_; }
  uint64_t length() const { return have_header_ ? header_.length() : 0; }
  // Every byte of the value (or its handle) has arrived.
  bool complete() const;
  // The result, once the call ended with `status`.
  absl::StatusOr<GetResult> Finish(const grpc::Status& status);

 private:
  static absl::Status Malformed() { return absl::DataLossError("malformed Get reply"); }
  bool is_handle() const {
    return header_.delivery() == v1::DELIVERY_SHM || header_.delivery() == v1::DELIVERY_CUDA_IPC;
  }

  // The header of a reply that continues the value kept in resume_: it must announce the rest
  // of that value at its generation, inline.
  absl::Status TakeRest(const v1::GetHeader& rest);
  // The attempt ended with `status` (an error): keeps the bytes received for the next attempt
  // when they can be continued, and says how the attempt failed.
  absl::Status Interrupted(const grpc::Status& status);

  std::shared_ptr<HandleImporter> importer_;
  uint64_t max_bytes_;
  absl::Time started_;  // before the call went out: before any lease of its reply was granted
  std::shared_ptr<InterruptedGet> resume_;
  // The value this attempt continues (taken from resume_), until its header arrives.
  // (An attempt that ends without Finish, on a malformed reply, drops it: the next attempt,
  // if any, reads the value whole.)
  std::optional<InterruptedGet::Kept> kept_;
  bool have_header_ = false;
  v1::GetHeader header_;
  UnclaimedLease unclaimed_;
  buffer::cpu::MutableBuffer value_;
  uint64_t received_ = 0;
};

// One GetMany's reply: each GetManyPart goes to its item's GetReply.
//
// With `each` set, every item is handed to it as soon as it is complete (items are answered in
// order), its index offset by `base`; Finish then hands over what is left and returns no
// results. A handle that cannot be imported stops the handing over there: the reply is still
// read to its end (so that every later item's lease is known, and given back as the reply
// goes), and Finish fails with the import's status (the rest is read again inline).
class GetManyReply {
 public:
  GetManyReply(std::shared_ptr<HandleImporter> importer, size_t items, uint64_t max_bytes,
               ItemsCallback each = nullptr, size_t base = 0);

  // One received GetManyResponse message.
  absl::Status Absorb(const grpc::ByteBuffer& message);
  // The items' results, once the call ended well (none with `each`: they were handed over).
  absl::StatusOr<GetManyResults> Finish();
  // Items handed over to `each` so far.
  size_t handed_over() const { return handed_over_; }

 private:
  static constexpr uint64_t kHandOverBytes = 256 << 10;

  absl::Status AbsorbParts(const grpc::ByteBuffer& message);
  // One GetManyPart, which ends where the reader has consumed `end` bytes.
  absl::Status AbsorbPart(wire::FieldReader& reader, uint64_t end);
  // Hands the complete items from the next one on to `each`, together (all of them once
  // `finished`). Before the end, only once they hold kHandOverBytes: small items go together
  // (their caller's next requests then go together too), large ones one by one.
  absl::Status HandOver(bool finished);
  // Bytes of the complete items not handed over yet.
  uint64_t ReadyBytes() const;
  absl::Status CompleteItems(bool finished, std::vector<absl::StatusOr<GetResult>>* results);
  static absl::Status Malformed() { return absl::DataLossError("malformed GetMany reply"); }

  std::vector<GetReply> replies_;
  std::vector<std::optional<absl::Status>> errors_;
  ItemsCallback each_;
  size_t base_ = 0;
  size_t handed_over_ = 0;
  absl::Status import_failed_;
};

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_REPLIES_H_

// The replies of Get and GetMany, assembled from their raw messages (proto/wire): each message
// is walked field by field and its data copied once, from the received slices into the result.
// A handle reply (shared memory, CUDA IPC) is handed to a HandleImporter. Part of the client
// library; separate so that it can be fuzzed with arbitrary replies (tests/fuzz/replies_fuzz.cc).
#ifndef CHUNKD_CLIENT_REPLIES_H_
#define CHUNKD_CLIENT_REPLIES_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "chunkd/v1/chunkd.pb.h"
#include "client/client.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/status.h"
#include "proto/wire/raw_message.h"

namespace chunkd::client {

// grpc::Status -> absl::Status, code and message kept.
absl::Status FromGrpc(const grpc::Status& s);

// Turns the header of a handle reply into a result: maps the segment or opens the IPC handle,
// and keeps the lease. Thread-compatible per call.
class HandleImporter {
 public:
  virtual ~HandleImporter() = default;
  virtual absl::StatusOr<GetResult> Import(const v1::GetHeader& header) = 0;
};

// One Get's reply. `max_bytes`: the largest value it may announce (ClientOptions).
class GetReply {
 public:
  GetReply(std::shared_ptr<HandleImporter> importer, uint64_t max_bytes)
      : importer_(std::move(importer)), max_bytes_(max_bytes) {}

  // One received GetResponse message.
  absl::Status Absorb(const grpc::ByteBuffer& message);
  // The encoded GetHeader: sizes the value, or announces a handle.
  absl::Status TakeHeader(const std::string& bytes);
  // `length` bytes of data, next in `reader`: copied once, into the value.
  absl::Status TakeData(wire::FieldReader& reader, uint64_t length);
  bool has_header() const { return have_header_; }
  // The result, once the call ended with `status`.
  absl::StatusOr<GetResult> Finish(const grpc::Status& status);

 private:
  static absl::Status Malformed() { return absl::DataLossError("malformed Get reply"); }

  std::shared_ptr<HandleImporter> importer_;
  uint64_t max_bytes_;
  bool have_header_ = false;
  v1::GetHeader header_;
  buffer::cpu::MutableBuffer value_;
  uint64_t received_ = 0;
};

// One GetMany's reply: each GetManyPart goes to its item's GetReply.
class GetManyReply {
 public:
  GetManyReply(std::shared_ptr<HandleImporter> importer, size_t items, uint64_t max_bytes);

  // One received GetManyResponse message.
  absl::Status Absorb(const grpc::ByteBuffer& message);
  // The items' results, once the call ended well.
  absl::StatusOr<GetManyResults> Finish();

 private:
  // One GetManyPart, which ends where the reader has consumed `end` bytes.
  absl::Status AbsorbPart(wire::FieldReader& reader, uint64_t end);
  static absl::Status Malformed() { return absl::DataLossError("malformed GetMany reply"); }

  std::vector<GetReply> replies_;
  std::vector<std::optional<absl::Status>> errors_;
};

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_REPLIES_H_

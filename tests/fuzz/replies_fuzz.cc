// The client's assembly of Get and GetMany replies from raw messages (client/replies.h over
// proto/wire's FieldReader): what a server, or anything that answers in its place, sends. The
// first bytes say how many messages and where each is cut into slices, as gRPC may hand them
// over; the reply must then be assembled or refused, never read out of bounds.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "client/replies.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

// Values announced past this are refused (ClientOptions::max_value_bytes), as a client with that
// limit would: the fuzzer's 2 GB malloc limit would otherwise report any large announcement.
constexpr uint64_t kMaxBytes = 1 << 20;

// Handle replies are refused: there is no server whose memory could be mapped.
class NoHandles final : public chunkd::client::HandleImporter {
 public:
  absl::StatusOr<chunkd::client::GetResult> Import(const chunkd::v1::GetHeader&) override {
    return absl::UnavailableError("no handles here");
  }
  void Drop(uint64_t) override {}
};

// Splits `data` into messages of slices: each control byte gives a slice's length (0: the
// message ends there).
std::vector<grpc::ByteBuffer> Messages(const uint8_t* data, size_t size, const uint8_t* control,
                                       size_t controls) {
  std::vector<grpc::ByteBuffer> messages;
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  for (size_t i = 0; i < controls && at < size; ++i) {
    size_t n = control[i];
    if (n == 0) {
      messages.emplace_back(slices.data(), slices.size());
      slices.clear();
      continue;
    }
    n = n < size - at ? n : size - at;
    slices.emplace_back(data + at, n);
    at += n;
  }
  if (at < size) slices.emplace_back(data + at, size - at);
  messages.emplace_back(slices.data(), slices.size());
  return messages;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  chunkd::fuzz::SilenceProtobufLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  bool many = data[0] & 1;
  size_t items = 1 + (data[0] >> 1) % 8;
  size_t controls = data[1] % 16;
  if (size < 2 + controls) return 0;
  std::vector<grpc::ByteBuffer> messages =
      Messages(data + 2 + controls, size - 2 - controls, data + 2, controls);
  auto importer = std::make_shared<NoHandles>();
  if (many) {
    chunkd::client::GetManyReply reply(importer, items, kMaxBytes);
    for (const grpc::ByteBuffer& m : messages) {
      if (!reply.Absorb(m).ok()) return 0;
    }
    auto results = reply.Finish();
    if (results.ok() && results->size() != items) std::abort();
  } else {
    chunkd::client::GetReply reply(importer, kMaxBytes);
    for (const grpc::ByteBuffer& m : messages) {
      if (!reply.Absorb(m).ok()) return 0;
    }
    (void)reply.Finish(grpc::Status::OK);
  }
  return 0;
}

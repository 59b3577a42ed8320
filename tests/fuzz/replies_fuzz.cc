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

// Handle replies: an even lease "imports" (a result viewing nothing, as no server's memory is
// here to map), an odd one fails as a segment this process cannot map does (the GetMany then
// fails as a whole, to be read again inline).
class FakeHandles final : public chunkd::client::HandleImporter {
 public:
  absl::StatusOr<chunkd::client::GetResult> Import(const chunkd::v1::GetHeader& header) override {
    uint64_t lease = header.lease().id();
    if (lease % 2 == 1) {
      Drop(lease);
      return chunkd::client::ImportFailed(absl::PermissionDeniedError("cannot map"),
                                          header.delivery());
    }
    chunkd::client::GetResult r;
    r.delivery = header.delivery();
    r.lease_id = lease;
    return r;
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
  auto importer = std::make_shared<FakeHandles>();
  if (many) {
    // Half of the inputs hand the items over as they complete (GetManyEachAsync).
    bool each = data[1] & 0x80;
    size_t next = 0;
    chunkd::client::ItemsCallback handed;
    if (each) {
      handed = [&next](size_t first, std::vector<absl::StatusOr<chunkd::client::GetResult>> r) {
        if (first != next || r.empty()) std::abort();  // in order, none twice
        next += r.size();
      };
    }
    {
      chunkd::client::GetManyReply reply(importer, items, kMaxBytes, handed);
      bool absorbed = true;
      for (const grpc::ByteBuffer& m : messages) {
        if (!reply.Absorb(m).ok()) {
          absorbed = false;
          break;
        }
      }
      if (absorbed) {
        auto results = reply.Finish();
        if (results.ok() && !each && results->size() != items) std::abort();
        if (results.ok() && each && (!results->empty() || next != items)) std::abort();
      }
      if (next > items) std::abort();
    }
  } else {
    chunkd::client::GetReply reply(importer, kMaxBytes);
    bool absorbed = true;
    for (const grpc::ByteBuffer& m : messages) {
      if (!reply.Absorb(m).ok()) {
        absorbed = false;
        break;
      }
    }
    if (absorbed) (void)reply.Finish(grpc::Status::OK);
  }
  return 0;
}

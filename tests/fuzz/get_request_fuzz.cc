// Requests as the server receives them: a GetRequest or GetManyRequest parsed by protobuf, then
// the checks the service makes before anything else (key, byte range, conditions).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "chunkd/v1/chunkd.pb.h"
#include "server/common/key.h"
#include "server/services/requests.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

void Check(const chunkd::v1::GetRequest& request) {
  (void)chunkd::server::ValidateKey(request.key());
  auto range = chunkd::server::RangeFromProto(request);
  if (range.ok()) {
    if (!range->Validate().ok()) std::abort();
    for (uint64_t size : {0ull, 7ull, 1ull << 20, ~0ull}) {
      chunkd::server::ResolvedRange r = chunkd::server::Resolve(*range, size);
      if (r.start > size || r.length > size - r.start) std::abort();
    }
  }
  chunkd::server::Conditions conditions = chunkd::server::ConditionsFromProto(request.conditions());
  (void)conditions.Check(request.key(), 1);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  chunkd::fuzz::SilenceProtobufLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  chunkd::v1::GetRequest get;
  if (get.ParseFromArray(data, static_cast<int>(size))) Check(get);
  chunkd::v1::GetManyRequest many;
  if (many.ParseFromArray(data, static_cast<int>(size))) {
    for (const auto& item : many.items()) Check(item);
  }
  return 0;
}

// Byte ranges: the server's ranges from the protocol (Validate, Resolve) and chunkctl's --range
// (ByteRange::Parse, proto/wire/byte_range.h), checked against each other. The first byte picks the
// form; then either three 64-bit numbers (a range as a GetRequest carries it) and a value size, or
// text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "client/client.h"
#include "server/common/byte_range.h"

namespace {

using chunkd::server::ByteRange;

// Checks that a valid range resolves within a value of `size` bytes.
void CheckResolve(const ByteRange& range, uint64_t size) {
  if (!range.Validate().ok()) return;
  chunkd::server::ResolvedRange r = chunkd::server::Resolve(range, size);
  if (r.start > size || r.length > size - r.start) std::abort();
  (void)range.ToString();
}

int64_t Take64(const uint8_t*& data, size_t& size) {
  int64_t v = 0;
  size_t n = size < sizeof(v) ? size : sizeof(v);
  std::memcpy(&v, data, n);
  data += n;
  size -= n;
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  uint8_t form = data[0];
  ++data;
  --size;
  if (form & 1) {
    // chunkctl --range=TEXT, as the client parses it and the server then checks it.
    std::string text(reinterpret_cast<const char*>(data), size);
    // One type on both sides (proto/wire/byte_range.h): what the client parses is what the
    // server checks.
    auto parsed = ByteRange::Parse(text);
    if (!parsed.ok()) return 0;
    ByteRange range = *parsed;
    // Parse refuses negative numbers: what it accepts the server accepts, unless inverted.
    if (!range.Validate().ok() &&
        !(range.kind == ByteRange::Kind::kBounded && range.end < range.start)) {
      std::abort();
    }
    for (uint64_t value_size : {0ull, 1ull, 4096ull, 1ull << 40, ~0ull})
      CheckResolve(range, value_size);
    return 0;
  }
  ByteRange range;
  switch ((form >> 1) % 4) {
    case 0:
      range = ByteRange::All();
      break;
    case 1: {
      int64_t start = Take64(data, size);
      range = ByteRange::Bounded(start, Take64(data, size));
      break;
    }
    case 2:
      range = ByteRange::FromOffset(Take64(data, size));
      break;
    case 3:
      range = ByteRange::Suffix(Take64(data, size));
      break;
  }
  CheckResolve(range, static_cast<uint64_t>(Take64(data, size)));
  return 0;
}

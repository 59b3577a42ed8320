#include "server/common/key.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace chunkd::server {
namespace {

// Length of the UTF-8 sequence at s[i], or 0 when it is not valid UTF-8 (overlong forms,
// surrogates and code points past U+10FFFF included).
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLength[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// Checks the characters of a key or prefix: valid UTF-8, no control characters.
absl::Status ValidateCharacters(absl::string_view what, absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", QuoteKey(s), " contains a NUL byte at offset ", i));
    }
    if (c < 0x20 || c == 0x7F) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s %s contains control character 0x%02x at offset %d", what, QuoteKey(s), c, i));
    }
    size_t n = Utf8SequenceLength(s, i);
    if (n == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", QuoteKey(s), " is not valid UTF-8 (at offset ", i, ")"));
    }
    // C1 control characters U+0080..U+009F are encoded as C2 80..C2 9F.
    if (n == 2 && c == 0xC2 && static_cast<unsigned char>(s[i + 1]) < 0xA0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", QuoteKey(s), " contains a control character at offset ", i));
    }
    i += n;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateKey(absl::string_view key) {
  if (key.empty()) return absl::InvalidArgumentError("key is empty");
  if (key.size() > kMaxKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", QuoteKey(key), " is longer than ", kMaxKeyBytes, " bytes"));
  }
  if (absl::Status s = ValidateCharacters("key", key); !s.ok()) return s;
  if (key.front() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", QuoteKey(key), " starts with '/'; keys are relative"));
  }
  size_t start = 0;
  while (start <= key.size()) {
    size_t end = key.find('/', start);
    if (end == absl::string_view::npos) end = key.size();
    absl::string_view segment = key.substr(start, end - start);
    if (segment.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("key ", QuoteKey(key), " has an empty segment at offset ", start));
    }
    if (segment == "." || segment == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat("key ", QuoteKey(key), " has a '", segment, "' segment"));
    }
    start = end + 1;
  }
  return absl::OkStatus();
}

absl::Status ValidatePrefix(absl::string_view prefix) {
  if (prefix.empty()) return absl::OkStatus();
  if (prefix.size() > kMaxKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix is longer than ", kMaxKeyBytes, " bytes"));
  }
  if (absl::Status s = ValidateCharacters("prefix", prefix); !s.ok()) return s;
  if (prefix.front() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix ", QuoteKey(prefix), " starts with '/'; keys are relative"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> PrefixOfKeyRange(absl::string_view inclusive_min,
                                             absl::string_view exclusive_max) {
  size_t n = 0;
  if (exclusive_max.empty()) {
    // No upper bound: keys from inclusive_min to the end share no prefix.
  } else {
    while (n < inclusive_min.size() && n < exclusive_max.size() &&
           inclusive_min[n] == exclusive_max[n]) {
      ++n;
    }
  }
  absl::string_view prefix = inclusive_min.substr(0, n);
  // Do not end inside a UTF-8 sequence: back off to the start of the last character when it
  // is incomplete (continuation bytes are 10xxxxxx).
  size_t last = prefix.size();
  while (last > 0 && (static_cast<unsigned char>(prefix[last - 1]) & 0xC0) == 0x80) --last;
  if (last > 0 && static_cast<unsigned char>(prefix[last - 1]) >= 0xC0 &&
      Utf8SequenceLength(prefix, last - 1) == 0) {
    prefix = prefix.substr(0, last - 1);
  }
  if (absl::Status s = ValidatePrefix(prefix); !s.ok()) return s;
  return std::string(prefix);
}

}  // namespace chunkd::server

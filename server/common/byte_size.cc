#include "server/common/byte_size.h"

#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace chunkd::server {

bool AbslParseFlag(absl::string_view text, ByteSize* out, std::string* error) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  size_t unit_at = s.size();
  while (unit_at > 0 && absl::ascii_isalpha(static_cast<unsigned char>(s[unit_at - 1]))) --unit_at;
  absl::string_view number = absl::StripAsciiWhitespace(s.substr(0, unit_at));
  std::string unit = absl::AsciiStrToLower(s.substr(unit_at));
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1},
      {"b", 1},
      {"k", 1024.0},
      {"kib", 1024.0},
      {"kb", 1e3},
      {"m", 1048576.0},
      {"mib", 1048576.0},
      {"mb", 1e6},
      {"g", 1073741824.0},
      {"gib", 1073741824.0},
      {"gb", 1e9},
      {"t", 1099511627776.0},
      {"tib", 1099511627776.0},
      {"tb", 1e12},
  };
  double scale = 0;
  for (const auto& [name, factor] : kUnits) {
    if (unit == name) scale = factor;
  }
  double value;
  if (scale == 0 || number.empty() || !absl::SimpleAtod(number, &value) || value < 0 ||
      !std::isfinite(value) || value * scale > 1.8e19) {
    *error = absl::StrCat("'", text, "' is not a byte size (examples: 4096, 64KiB, 512MiB, 1GiB)");
    return false;
  }
  out->bytes = static_cast<uint64_t>(std::llround(value * scale));
  return true;
}

std::string AbslUnparseFlag(ByteSize size) {
  static const std::pair<const char*, uint64_t> kUnits[] = {
      {"TiB", 1ull << 40}, {"GiB", 1ull << 30}, {"MiB", 1ull << 20}, {"KiB", 1ull << 10}};
  for (const auto& [name, factor] : kUnits) {
    if (size.bytes >= factor && size.bytes % factor == 0) {
      return absl::StrCat(size.bytes / factor, name);
    }
  }
  return absl::StrCat(size.bytes);
}

std::string FormatBytes(uint64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  static const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int i = -1;
  while (v >= 1024 && i < 3) v /= 1024, ++i;
  return absl::StrFormat("%.1f %s", v, kUnits[i]);
}

}  // namespace chunkd::server

#include "proto/wire/conditions.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace chunkd::wire {

absl::Status Conditions::Check(absl::string_view key, std::optional<Generation> current) const {
  Generation have = current.value_or(0);
  if (if_generation_match && *if_generation_match != have) {
    return absl::FailedPreconditionError(
        absl::StrCat("key ", QuoteKey(key), ": generation is ", have, ", condition wants ",
                     *if_generation_match, have == 0 ? " (the key holds no value)" : ""));
  }
  if (if_generation_not_match && *if_generation_not_match == have) {
    return absl::FailedPreconditionError(absl::StrCat("key ", QuoteKey(key), ": generation is ",
                                                      have, ", condition wants any other"));
  }
  return absl::OkStatus();
}

std::string QuoteKey(absl::string_view key) {
  constexpr size_t kShown = 80;
  std::string out = "\"";
  for (size_t i = 0; i < key.size() && i < kShown; ++i) {
    unsigned char c = static_cast<unsigned char>(key[i]);
    if (c == '"' || c == '\\') {
      absl::StrAppend(&out, "\\", std::string(1, static_cast<char>(c)));
    } else if (c >= 0x20 && c < 0x7F) {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", c);
    }
  }
  out += "\"";
  if (key.size() > kShown) absl::StrAppend(&out, "... (", key.size(), " bytes)");
  return out;
}

}  // namespace chunkd::wire

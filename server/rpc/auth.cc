#include "server/rpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace chunkd::server {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr char kServicePrefix[] = "/chunkd.v1.Chunkd/";

std::optional<Right> ParseRight(absl::string_view name) {
  if (name == "read") return Right::kRead;
  if (name == "write") return Right::kWrite;
  if (name == "admin") return Right::kAdmin;
  return std::nullopt;
}

// Why `token` cannot be a token (empty when it can): tokens are at least 16 printable ASCII
// characters.
std::string TokenProblem(absl::string_view token) {
  if (token.size() < kMinTokenLength) {
    return absl::StrCat("the token is ", token.size(), " characters long; tokens need at least ",
                        kMinTokenLength, " (make one with: openssl rand -hex 32)");
  }
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) return "the token holds a character that is not printable ASCII";
  }
  return "";
}

absl::Status LineError(absl::string_view origin, int line, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(origin, " line ", line, ": ", message));
}

}  // namespace

absl::string_view RightName(Right right) {
  switch (right) {
    case Right::kRead:
      return "read";
    case Right::kWrite:
      return "write";
    case Right::kAdmin:
      return "admin";
  }
  return "?";
}

std::string RightsString(Rights rights) {
  std::string out;
  for (Right r : {Right::kRead, Right::kWrite, Right::kAdmin}) {
    if (rights & static_cast<Rights>(r))
      absl::StrAppend(&out, out.empty() ? "" : ",", RightName(r));
  }
  return out.empty() ? "none" : out;
}

std::optional<Right> RequiredRight(absl::string_view method) {
  // Full method names; chunkd.v1's calls name their method alone ("Get").
  static const auto* const kRights = new absl::flat_hash_map<std::string, Right>{
      {"/chunkd.v1.Chunkd/Get", Right::kRead},
      {"/chunkd.v1.Chunkd/GetMany", Right::kRead},
      {"/chunkd.v1.Chunkd/Stat", Right::kRead},
      {"/chunkd.v1.Chunkd/List", Right::kRead},
      {"/chunkd.v1.Chunkd/ServerInfo", Right::kRead},
      {"/chunkd.v1.Chunkd/Release", Right::kRead},
      {"/chunkd.v1.Chunkd/Renew", Right::kRead},
      {"/chunkd.v1.Chunkd/Put", Right::kWrite},
      {"/chunkd.v1.Chunkd/Delete", Right::kWrite},
      {"/chunkd.v1.Chunkd/Prefetch", Right::kAdmin},
      {"/tensorstore_grpc.kvstore.KvStoreService/Read", Right::kRead},
      {"/tensorstore_grpc.kvstore.KvStoreService/List", Right::kRead},
      {"/tensorstore_grpc.kvstore.KvStoreService/Write", Right::kWrite},
      {"/tensorstore_grpc.kvstore.KvStoreService/Delete", Right::kWrite},
  };
  auto it = absl::StartsWith(method, "/") ? kRights->find(method)
                                          : kRights->find(absl::StrCat(kServicePrefix, method));
  if (it == kRights->end()) return std::nullopt;
  return it->second;
}

TokenTable::Digest TokenTable::Hash(absl::string_view token) {
  Digest digest;
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), digest.data());
  return digest;
}

std::string TokenTable::Fingerprint(absl::string_view token) {
  Digest digest = Hash(token);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(digest.data()), 8));
}

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text, absl::string_view origin) {
  TokenTable table;
  absl::flat_hash_map<std::string, int> seen;  // digest -> line
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    std::vector<absl::string_view> fields;
    for (absl::string_view field :
         absl::StrSplit(line, absl::ByAnyChar(" \t\r\v\f"), absl::SkipEmpty())) {
      if (absl::StartsWith(field, "#")) break;
      fields.push_back(field);
    }
    if (fields.empty()) continue;
    absl::string_view token = fields[0];
    if (fields.size() < 2) {
      return LineError(origin, line_number,
                       "expected TOKEN RIGHTS (RIGHTS: a comma list of read, write, admin), "
                       "found only a token");
    }
    if (std::string problem = TokenProblem(token); !problem.empty()) {
      return LineError(origin, line_number, problem);
    }
    Rights rights = 0;
    for (size_t i = 1; i < fields.size(); ++i) {
      for (absl::string_view name : absl::StrSplit(fields[i], ',', absl::SkipEmpty())) {
        std::optional<Right> right = ParseRight(name);
        if (!right) {
          return LineError(
              origin, line_number,
              absl::StrCat("unknown right \"", name, "\" (rights are read, write and admin)"));
        }
        rights |= static_cast<Rights>(*right);
      }
    }
    if (rights == 0) {
      return LineError(origin, line_number, "no rights given (read, write or admin)");
    }
    Digest digest = Hash(token);
    std::string key(reinterpret_cast<const char*>(digest.data()), digest.size());
    if (auto [it, inserted] = seen.emplace(key, line_number); !inserted) {
      return LineError(origin, line_number, absl::StrCat("the same token as on line ", it->second));
    }
    table.entries_.push_back(Entry{digest, rights});
  }
  if (table.entries_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, " holds no tokens: every call would be refused"));
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path, "token file ");
  if (!text.ok()) return text.status();
  return Parse(*text, absl::StrCat("token file ", path));
}

absl::StatusOr<TokenTable> TokenTable::ParseSingle(absl::string_view text,
                                                   absl::string_view origin) {
  absl::string_view token = absl::StripAsciiWhitespace(text);
  if (std::string problem = TokenProblem(token); !problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", problem));
  }
  TokenTable table;
  table.entries_.push_back(Entry{Hash(token), static_cast<Rights>(Right::kRead)});
  return table;
}

absl::StatusOr<TokenTable> TokenTable::LoadSingle(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path, "token file ");
  if (!text.ok()) return text.status();
  return ParseSingle(*text, absl::StrCat("token file ", path));
}

std::optional<Rights> TokenTable::Find(absl::string_view token) const {
  Digest digest = Hash(token);
  // Every entry is compared, whatever matched, and the match is folded in without branching.
  Rights found = 0;
  unsigned matched = 0;
  for (const Entry& entry : entries_) {
    unsigned equal = CRYPTO_memcmp(digest.data(), entry.digest.data(), digest.size()) == 0;
    unsigned mask = 0u - equal;  // all ones when equal
    found |= static_cast<Rights>(entry.rights & mask);
    matched |= equal;
  }
  if (!matched) return std::nullopt;
  return found;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read ", what, path, ": ", std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::UnavailableError(absl::StrCat("cannot read ", what, path));
  return text.str();
}

absl::StatusOr<std::string> BearerToken(const grpc::ServerContextBase& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing bearer token (send it as 'authorization: Bearer TOKEN' metadata)");
  }
  return BearerTokenOf(absl::string_view(it->second.data(), it->second.size()));
}

absl::StatusOr<std::string> BearerTokenOf(absl::string_view value) {
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(
        "missing bearer token (the authorization is not 'Bearer TOKEN')");
  }
  return std::string(absl::StripAsciiWhitespace(value.substr(kScheme.size())));
}

grpc::Status Authorize(const TokenTable& tokens, const grpc::ServerContextBase& context,
                       absl::string_view method, Right needed) {
  absl::StatusOr<std::string> token = BearerToken(context);
  if (!token.ok()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(token.status().message()));
  }
  std::optional<Rights> rights = tokens.Find(*token);
  if (!rights) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown token");
  if ((*rights & static_cast<Rights>(needed)) == 0) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat(method, " needs the ", RightName(needed),
                                     " right; this token has ", RightsString(*rights)));
  }
  return grpc::Status::OK;
}

std::string CallerOf(const grpc::ServerContextBase& context, bool by_token,
                     std::optional<int64_t> kernel_pid, uint64_t stated_process_id,
                     uint64_t stated_mount_namespace) {
  if (by_token) {
    // The authorizer let the call through, so it carries a token; digested, never kept.
    absl::StatusOr<std::string> token = BearerToken(context);
    return absl::StrCat("token:", TokenTable::Fingerprint(token.ok() ? *token : ""));
  }
  if (kernel_pid) return absl::StrCat("unix:pid=", *kernel_pid);
  std::string peer = context.peer();
  if (absl::StartsWith(peer, "unix:")) {
    return absl::StrCat(peer, peer == "unix:" ? "" : " ", "pid=", stated_process_id, "@",
                        stated_mount_namespace);
  }
  return peer;
}

rpc::Authorizer MakeTokenAuthorizer(std::shared_ptr<const TokenTable> tokens) {
  return [tokens = std::move(tokens)](const grpc::ServerContextBase& context,
                                      absl::string_view method) {
    std::optional<Right> needed = RequiredRight(method);
    if (!needed) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          absl::StrCat(method, " has no access rule"));
    }
    return Authorize(*tokens, context, method, *needed);
  };
}

}  // namespace chunkd::server

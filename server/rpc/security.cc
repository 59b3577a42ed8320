#include "server/rpc/security.h"

#include <arpa/inet.h>
#include <grp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "grpc/grpc.h"
#include "grpc/grpc_security_constants.h"
#include "server/common/log.h"
#include "server/rpc/auth.h"
#include <openssl/x509.h>

namespace chunkd::server {

namespace {

std::string UnixPath(absl::string_view address) {
  if (absl::StartsWith(address, "unix://")) return std::string(address.substr(7));
  if (absl::StartsWith(address, "unix:")) return std::string(address.substr(5));
  return "";
}

// The last OpenSSL error, for messages.
std::string OpenSslError() {
  unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "not valid PEM";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view flag) {
  absl::StatusOr<std::string> pem = ReadWholeFile(path, absl::StrCat("--", flag, "="));
  if (!pem.ok()) return pem.status();
  if (!absl::StrContains(*pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, " holds no PEM block (-----BEGIN ...)"));
  }
  return pem;
}

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};

std::unique_ptr<BIO, BioDeleter> PemBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioDeleter>(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Checks that the certificate chain parses, its first certificate matches the key, and
// it has not expired (an expired one is only reported: clients decide).
absl::Status CheckCertificateAndKey(const std::string& cert_pem, const std::string& key_pem,
                                    const SecurityOptions& options) {
  ERR_clear_error();
  std::unique_ptr<X509, X509Deleter> cert(
      PEM_read_bio_X509(PemBio(cert_pem).get(), nullptr, nullptr, nullptr));
  if (!cert) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert=", options.tls_cert,
                                                   " is not a PEM certificate: ", OpenSslError()));
  }
  std::unique_ptr<EVP_PKEY, KeyDeleter> key(
      PEM_read_bio_PrivateKey(PemBio(key_pem).get(), nullptr, nullptr, nullptr));
  if (!key) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_key=", options.tls_key, " is not an unencrypted PEM private key: ", OpenSslError()));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_key=", options.tls_key, " is not the key of --tls_cert=", options.tls_cert));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) < 0) {
    Log("warning: the certificate in --tls_cert=%s has expired; clients will refuse it",
        options.tls_cert);
  }
  return absl::OkStatus();
}

absl::Status CheckCaBundle(const std::string& pem, const std::string& path) {
  ERR_clear_error();
  std::unique_ptr<X509, X509Deleter> cert(
      PEM_read_bio_X509(PemBio(pem).get(), nullptr, nullptr, nullptr));
  if (!cert) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_client_ca=", path, " holds no PEM certificate: ", OpenSslError()));
  }
  return absl::OkStatus();
}

absl::StatusOr<gid_t> ResolveGroup(const std::string& group) {
  uint32_t number;
  if (absl::SimpleAtoi(group, &number)) return static_cast<gid_t>(number);
  std::vector<char> buffer(16384);
  struct group entry;
  struct group* result = nullptr;
  int error = getgrnam_r(group.c_str(), &entry, buffer.data(), buffer.size(), &result);
  if (error != 0 || result == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("--unix_socket_group=", group, ": no such group on this host"));
  }
  return result->gr_gid;
}

int ClampMillis(absl::Duration d) {
  int64_t ms = absl::ToInt64Milliseconds(d);
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

}  // namespace

absl::StatusOr<mode_t> ParseSocketMode(absl::string_view text) {
  std::string mode(absl::StripAsciiWhitespace(text));
  char* end = nullptr;
  long parsed = mode.empty() ? -1 : std::strtol(mode.c_str(), &end, 8);
  if (mode.empty() || *end != '\0' || parsed < 0 || (parsed & ~0777L) != 0 ||
      (parsed & 0600) != 0600) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--unix_socket_mode=", text,
        " must be an octal mode within 0777 that lets the owner read and write (0600: the "
        "server's user only; 0660: and its group; 0666: every local user)"));
  }
  return static_cast<mode_t>(parsed);
}

bool IsLoopbackAddress(absl::string_view address) {
  if (!UnixPath(address).empty()) return true;
  std::string host(address);
  if (size_t colon = host.rfind(':'); colon != std::string::npos) host.resize(colon);
  if (absl::StartsWith(host, "[") && absl::EndsWith(host, "]")) {
    host = host.substr(1, host.size() - 2);
  }
  if (absl::EqualsIgnoreCase(host, "localhost")) return true;
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;  // a host name or a wildcard: other hosts may reach it
}

absl::StatusOr<std::unique_ptr<ServerSecurity>> ServerSecurity::Create(
    const SecurityOptions& options, std::vector<std::string> listen) {
  std::unique_ptr<ServerSecurity> security(new ServerSecurity());
  security->options_ = options;
  security->listen_ = std::move(listen);
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together: give both or neither");
  }
  if (!options.tls_client_ca.empty() && options.tls_cert.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca needs --tls_cert and --tls_key (client certificates are checked "
        "during the TLS handshake)");
  }
  if (!options.tls_cert.empty()) {
    auto cert = ReadPemFile(options.tls_cert, "tls_cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPemFile(options.tls_key, "tls_key");
    if (!key.ok()) return key.status();
    if (absl::Status s = CheckCertificateAndKey(*cert, *key, options); !s.ok()) return s;
    security->tls_cert_pem_ = *std::move(cert);
    security->tls_key_pem_ = *std::move(key);
    if (!options.tls_client_ca.empty()) {
      auto ca = ReadPemFile(options.tls_client_ca, "tls_client_ca");
      if (!ca.ok()) return ca.status();
      if (absl::Status s = CheckCaBundle(*ca, options.tls_client_ca); !s.ok()) return s;
      security->tls_client_ca_pem_ = *std::move(ca);
    }
  }
  if (!options.auth_tokens.empty()) {
    auto tokens = TokenTable::Load(options.auth_tokens);
    if (!tokens.ok()) return tokens.status();
    security->tokens_ = std::make_shared<const TokenTable>(*std::move(tokens));
    struct stat st;
    if (::stat(options.auth_tokens.c_str(), &st) == 0 && (st.st_mode & 0004) != 0) {
      Log("warning: every user of this host can read the token file %s (chmod 0600 it)",
          options.auth_tokens);
    }
  }
  if (!options.unix_socket_group.empty()) {
    auto gid = ResolveGroup(options.unix_socket_group);
    if (!gid.ok()) return gid.status();
    security->socket_group_ = *gid;
  }
  if (options.max_concurrent_streams < 0) {
    return absl::InvalidArgumentError("--max_concurrent_streams must be 0 (no limit) or more");
  }
  if (options.keepalive_time < absl::ZeroDuration() ||
      options.keepalive_timeout <= absl::ZeroDuration() ||
      options.max_connection_idle < absl::ZeroDuration() ||
      options.max_call_duration < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "--keepalive_time, --max_connection_idle and --max_call_duration must not be negative, "
        "--keepalive_timeout must be positive");
  }
  return security;
}

ServerSecurity::~ServerSecurity() = default;

void ServerSecurity::Configure(grpc::ServerBuilder& builder, rpc::Engine* engine) {
  if (tokens_) engine->set_authorizer(MakeTokenAuthorizer(tokens_));
  if (options_.max_concurrent_streams > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options_.max_concurrent_streams);
  }
  if (options_.keepalive_time > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ClampMillis(options_.keepalive_time));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                               ClampMillis(options_.keepalive_timeout));
    // Ping idle connections too (a dead client holds no call but still a connection), without
    // the default cap of two pings between data frames.
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  } else {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, INT_MAX);
  }
  // Also what lets clients ping a connection that has no call (without it, each such ping is a
  // strike), with or without pings of the server's own.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Clients may ping every second or more (pings half a second apart still pass, for timers'
  // jitter): chunkd's client pings every 5 s by default (also while a call waits for a slow
  // store, when no data flows) to find a server cut off silently within seconds
  // (ClientOptions::keepalive_time). More frequent pings count as strikes, and after gRPC's
  // default two the connection is closed (GOAWAY "too_many_pings").
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 500);
  if (options_.max_connection_idle > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                               ClampMillis(options_.max_connection_idle));
  }
  if (options_.max_call_duration > absl::ZeroDuration()) {
    engine->set_call_limit(options_.max_call_duration);
  }
}

std::shared_ptr<grpc::ServerCredentials> ServerSecurity::CredentialsFor(
    absl::string_view address) const {
  if (!tls() || !UnixPath(address).empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      tls_client_ca_pem_.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = tls_client_ca_pem_;
  ssl.pem_key_cert_pairs.push_back({tls_key_pem_, tls_cert_pem_});
  return grpc::SslServerCredentials(ssl);
}

std::unique_ptr<grpc::Server> ServerSecurity::BuildAndStart(grpc::ServerBuilder& builder) {
  bool unix_listener = false;
  for (const std::string& address : listen_) unix_listener |= !UnixPath(address).empty();
  if (!unix_listener) return builder.BuildAndStart();
  // The socket file is created by bind() with the process's umask: owner-only until Started()
  // gives it its group and mode, so it is never wider than asked. (The umask is the process's;
  // nothing else creates files while the server starts.)
  mode_t old = ::umask(0177);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ::umask(old);
  return server;
}

absl::Status ServerSecurity::Started() {
  bool authenticated = tokens_ != nullptr || !tls_client_ca_pem_.empty();
  for (const std::string& address : listen_) {
    if (std::string path = UnixPath(address); !path.empty()) {
      if (socket_group_ && ::chown(path.c_str(), static_cast<uid_t>(-1), *socket_group_) != 0) {
        return absl::PermissionDeniedError(
            absl::StrCat("cannot give socket ", path,
                         " the group --unix_socket_group=", options_.unix_socket_group, ": ",
                         std::strerror(errno), " (the server's user must belong to that group)"));
      }
      if (::chmod(path.c_str(), options_.unix_socket_mode) != 0) {
        return absl::PermissionDeniedError(
            absl::StrCat("cannot chmod socket ", path, ": ", std::strerror(errno)));
      }
      struct stat st;
      gid_t gid = ::stat(path.c_str(), &st) == 0 ? st.st_gid : static_cast<gid_t>(-1);
      Log("socket %s: mode %04o, group %d%s", path, options_.unix_socket_mode,
          static_cast<int>(gid), tokens_ ? ", bearer tokens required" : "");
      continue;
    }
    if (IsLoopbackAddress(address)) continue;
    if (!authenticated) {
      Log("WARNING: %s accepts connections from other hosts without authentication%s: anyone "
          "who reaches it can read and write the cache. Use --auth_tokens and/or "
          "--tls_client_ca, or listen on loopback or a UNIX socket.",
          address, tls() ? "" : " or TLS");
    } else if (!tls() && tokens_) {
      Log("WARNING: %s takes bearer tokens over plaintext: anyone on the network path can "
          "read them. Use --tls_cert and --tls_key.",
          address);
    }
  }
  std::string tls_text = !tls()                       ? "off"
                         : tls_client_ca_pem_.empty() ? "on (TCP)"
                                                      : "on (TCP), client certificates required";
  Log("security: TLS %s; bearer tokens %s; max %d streams per connection, calls cancelled after "
      "%s",
      tls_text, tokens_ ? absl::StrCat("on (", tokens_->size(), ")") : "off",
      options_.max_concurrent_streams,
      options_.max_call_duration > absl::ZeroDuration()
          ? absl::FormatDuration(options_.max_call_duration)
          : "never");
  return absl::OkStatus();
}

}  // namespace chunkd::server

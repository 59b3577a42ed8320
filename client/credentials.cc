#include "client/credentials.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/client_interceptor.h"

namespace chunkd::client {
namespace {

// Adds the authorization metadata to every call before its headers leave.
class TokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(std::shared_ptr<const std::string> header)
      : header_(std::move(header)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", *header_});
    }
    methods->Proceed();
  }

 private:
  std::shared_ptr<const std::string> header_;
};

class TokenInterceptorFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(const std::string& token)
      : header_(std::make_shared<const std::string>("Bearer " + token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new TokenInterceptor(header_);
  }

 private:
  std::shared_ptr<const std::string> header_;
};

// The PEM text of `path`, or `path` itself when it is PEM text already (the Python package
// passes the certificates it read, or was given as bytes, this way).
absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  if (absl::StrContains(path, "-----BEGIN ")) return path;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read ", what, " ", path, ": ", std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string pem = text.str();
  if (!absl::StrContains(pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " is not a PEM file"));
  }
  return pem;
}

bool IsUnixAddress(absl::string_view address) { return absl::StartsWith(address, "unix:"); }

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const ClientOptions& options,
                                                             grpc::ChannelArguments args) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key: give both tls_cert "
        "and tls_key, or neither");
  }
  bool tls = options.tls || !options.tls_ca.empty();
  if (!tls && (!options.tls_cert.empty() || !options.tls_server_name.empty())) {
    return absl::InvalidArgumentError(
        "tls_cert, tls_key and tls_server_name need TLS: set tls_ca (or tls)");
  }
  if (tls && !IsUnixAddress(options.address)) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca.empty()) {
      auto ca = ReadFile(options.tls_ca, "CA file");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *std::move(ca);
    }
    if (!options.tls_cert.empty()) {
      auto cert = ReadFile(options.tls_cert, "client certificate");
      if (!cert.ok()) return cert.status();
      auto key = ReadFile(options.tls_key, "client key");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(ssl);
    if (!credentials) return absl::InvalidArgumentError("cannot create TLS credentials");
    if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  }
  if (options.token.empty()) {
    return grpc::CreateCustomChannel(options.address, credentials, args);
  }
  for (char c : options.token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "the token holds a blank or a character that is not printable ASCII");
    }
  }
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<TokenInterceptorFactory>(options.token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(options.address, credentials, args,
                                                                 std::move(factories));
}

absl::Status ApplySecurityFlags(const SecurityFlags& flags, ClientOptions* options) {
  options->tls_ca = flags.tls_ca;
  options->tls = flags.tls;
  options->tls_cert = flags.tls_cert;
  options->tls_key = flags.tls_key;
  options->tls_server_name = flags.tls_server_name;
  if (!flags.token.empty() && !flags.token_file.empty()) {
    return absl::InvalidArgumentError("give --token or --token_file, not both");
  }
  if (!flags.token.empty()) {
    options->token = flags.token;
  } else if (!flags.token_file.empty()) {
    std::ifstream in(flags.token_file);
    std::string line;
    if (!in || !std::getline(in, line)) {
      return absl::NotFoundError(absl::StrCat(
          "cannot read a token from --token_file=", flags.token_file, ": ", std::strerror(errno)));
    }
    options->token = std::string(absl::StripAsciiWhitespace(line));
    if (options->token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--token_file=", flags.token_file, " starts with an empty line"));
    }
  } else if (const char* env = std::getenv("CHUNKD_TOKEN"); env != nullptr) {
    options->token = std::string(absl::StripAsciiWhitespace(env));
  }
  return absl::OkStatus();
}

}  // namespace chunkd::client

// Security of the real chunkd: TLS and mutual TLS with certificates made here by the openssl
// tool, bearer tokens and their rights, the health service without a token, the UNIX socket's
// mode and group, the warnings, refused configurations, and the longest call.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/client.h"
#include "client/credentials.h"
#include "client/health.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "tensorstore_grpc/kvstore/kvstore.grpc.pb.h"
#include "tests/support/tensorstore_client.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::Client;
using client::ClientOptions;
using testing::CommandResult;
using testing::RunCommand;
using testing::ServerProcess;
using testing::TempDir;

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }

constexpr char kReadToken[] = "read-token-0123456789abcdef";
constexpr char kWriteToken[] = "write-token-0123456789abcdef";
constexpr char kAdminToken[] = "admin-token-0123456789abcdef";
constexpr char kAllToken[] = "all-token-0123456789abcdef";

// The openssl tool, found on $PATH (RunCommand takes a path); empty when it is not installed.
const std::string& Openssl() {
  static const std::string* const path = [] {
    const char* env = std::getenv("PATH");
    for (absl::string_view dir : absl::StrSplit(env ? env : "/usr/bin:/bin", ':')) {
      std::string candidate = absl::StrCat(dir.empty() ? "." : dir, "/openssl");
      if (::access(candidate.c_str(), X_OK) == 0) return new std::string(candidate);
    }
    return new std::string();
  }();
  return *path;
}

// A CA, a server certificate it signs (for localhost and 127.0.0.1), a client certificate it
// signs, and a second CA with a client certificate of its own, all made by the openssl tool.
class Certificates {
 public:
  Certificates() {
    ok_ = MakeCa("ca") && MakeLeaf("server", "ca", "localhost", true) &&
          MakeLeaf("client", "ca", "chunkd-client", false) && MakeCa("other-ca") &&
          MakeLeaf("other-client", "other-ca", "intruder", false) &&
          MakeLeaf("other-server", "other-ca", "localhost", true);
  }
  bool ok() const { return ok_; }
  std::string Path(const std::string& name) const { return dir_.Join(name); }
  const std::string& error() const { return error_; }

 private:
  bool Run(std::vector<std::string> argv) {
    CommandResult r = RunCommand(argv);
    if (r.exit_code != 0) error_ = absl::StrCat(argv[0], " ", argv[1], ": ", r.err);
    return r.exit_code == 0;
  }
  bool MakeCa(const std::string& name) {
    return Run({Openssl(), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                "/CN=" + name + "-test", "-keyout", Path(name + ".key"), "-out",
                Path(name + ".pem")});
  }
  bool MakeLeaf(const std::string& name, const std::string& ca, const std::string& cn,
                bool server) {
    std::string ext = Path(name + ".ext");
    testing::WriteFile(ext, server ? "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                     "extendedKeyUsage=serverAuth\n"
                                   : "extendedKeyUsage=clientAuth\n");
    return Run({Openssl(), "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-subj", "/CN=" + cn, "-keyout", Path(name + ".key"), "-out",
                Path(name + ".csr")}) &&
           Run({Openssl(), "x509", "-req", "-in", Path(name + ".csr"), "-CA", Path(ca + ".pem"),
                "-CAkey", Path(ca + ".key"), "-CAcreateserial", "-days", "2", "-extfile", ext,
                "-out", Path(name + ".pem")});
  }

  TempDir dir_;
  bool ok_ = false;
  std::string error_;
};

ClientOptions Options(const std::string& address) {
  ClientOptions options;
  options.address = address;
  options.timeout = absl::Seconds(20);
  options.max_attempts = 1;
  return options;
}

std::unique_ptr<Client> MustConnect(const ClientOptions& options) {
  auto client = Client::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? *std::move(client) : nullptr;
}

// A round trip through `options`: OK, or the first error.
absl::Status RoundTrip(const ClientOptions& options, const std::string& key) {
  auto client = Client::Connect(options);
  if (!client.ok()) return client.status();
  auto put = (*client)->Put(key, Bytes("value of " + key));
  if (!put.ok()) return put.status();
  auto got = (*client)->Get(key);
  if (!got.ok()) return got.status();
  if (std::string(got->data.view()) != "value of " + key) {
    return absl::DataLossError("read back other bytes");
  }
  return absl::OkStatus();
}

uint64_t Counter(const v1::ServerInfoResponse& info, const std::string& name) {
  auto it = info.counters().find(name);
  return it == info.counters().end() ? 0 : it->second;
}

// Calls `method` with one empty request message (any kind of method accepts that on the wire)
// and returns the status it ends with.
grpc::StatusCode CallWithEmptyRequest(const std::shared_ptr<grpc::Channel>& channel,
                                      const std::string& method) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto call = stub.PrepareCall(&context, method, &cq);
  void* tag;
  bool ok;
  auto step = [&](auto start) {
    start();
    cq.Next(&tag, &ok);
    return ok;
  };
  grpc::Status status;
  if (step([&] { call->StartCall(reinterpret_cast<void*>(1)); })) {
    grpc::ByteBuffer empty(nullptr, 0);
    if (step([&] { call->Write(empty, reinterpret_cast<void*>(2)); })) {
      step([&] { call->WritesDone(reinterpret_cast<void*>(3)); });
    }
    grpc::ByteBuffer reply;
    while (step([&] { call->Read(&reply, reinterpret_cast<void*>(4)); })) {
    }
  }
  step([&] { call->Finish(&status, reinterpret_cast<void*>(5)); });
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status.error_code();
}

// ---------------------------------------------------------------------------------------------
// TLS

class SecurityTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Openssl().empty()) GTEST_SKIP() << "no openssl command on $PATH";
    ASSERT_TRUE(certs_.ok()) << certs_.error();
  }
  void Start(std::vector<std::string> extra) {
    std::vector<std::string> flags = {
        "--listen=127.0.0.1:0,unix:" + dir_.Join("sock"), "--store=memory://", "--shm=false",
        "--tls_cert=" + certs_.Path("server.pem"), "--tls_key=" + certs_.Path("server.key")};
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  ClientOptions Tls(const std::string& ca) {
    ClientOptions options = Options(server_->address());
    options.tls_ca = certs_.Path(ca);
    return options;
  }

  Certificates certs_;
  TempDir dir_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(SecurityTlsTest, ClientThatTrustsTheCaReadsAndWrites) {
  Start({});
  EXPECT_TRUE(RoundTrip(Tls("ca.pem"), "tls/a").ok());
  // The name in the certificate, by override (the address says 127.0.0.1).
  ClientOptions named = Tls("ca.pem");
  named.tls_server_name = "localhost";
  EXPECT_TRUE(RoundTrip(named, "tls/b").ok());
  EXPECT_TRUE(absl::StrContains(server_->log(), "TLS on")) << server_->log();
}

TEST_F(SecurityTlsTest, ClientThatTrustsAnotherCaOrSpeaksPlaintextFails) {
  Start({});
  absl::Status wrong_ca = RoundTrip(Tls("other-ca.pem"), "tls/wrong-ca");
  EXPECT_TRUE(absl::IsUnavailable(wrong_ca)) << wrong_ca;
  absl::Status plaintext = RoundTrip(Options(server_->address()), "tls/plaintext");
  EXPECT_TRUE(absl::IsUnavailable(plaintext)) << plaintext;
  // A certificate for another name.
  ClientOptions misnamed = Tls("ca.pem");
  misnamed.tls_server_name = "elsewhere.example";
  absl::Status wrong_name = RoundTrip(misnamed, "tls/wrong-name");
  EXPECT_TRUE(absl::IsUnavailable(wrong_name)) << wrong_name;
}

TEST_F(SecurityTlsTest, UnixSocketStaysPlaintext) {
  Start({});
  EXPECT_TRUE(RoundTrip(Options(server_->addresses()[1]), "tls/unix").ok());
  // Client options with TLS work there too: unix: addresses are plaintext on both sides.
  ClientOptions tls = Tls("ca.pem");
  tls.address = server_->addresses()[1];
  EXPECT_TRUE(RoundTrip(tls, "tls/unix-with-tls-options").ok());
}

TEST_F(SecurityTlsTest, MutualTlsAdmitsOnlyClientsWithACertificateFromTheClientCa) {
  Start({"--tls_client_ca=" + certs_.Path("ca.pem")});
  ClientOptions with_cert = Tls("ca.pem");
  with_cert.tls_cert = certs_.Path("client.pem");
  with_cert.tls_key = certs_.Path("client.key");
  EXPECT_TRUE(RoundTrip(with_cert, "mtls/good").ok());

  absl::Status no_cert = RoundTrip(Tls("ca.pem"), "mtls/no-cert");
  EXPECT_FALSE(no_cert.ok());
  EXPECT_TRUE(absl::IsUnavailable(no_cert)) << no_cert;

  ClientOptions foreign = Tls("ca.pem");
  foreign.tls_cert = certs_.Path("other-client.pem");
  foreign.tls_key = certs_.Path("other-client.key");
  absl::Status foreign_cert = RoundTrip(foreign, "mtls/foreign");
  EXPECT_TRUE(absl::IsUnavailable(foreign_cert)) << foreign_cert;
  EXPECT_TRUE(absl::StrContains(server_->log(), "client certificates required")) << server_->log();
}

TEST_F(SecurityTlsTest, ChunkctlSpeaksTls) {
  Start({});
  CommandResult put = RunCommand({testing::kChunkctlBinary, "--server=" + server_->address(),
                                  "--tls_ca=" + certs_.Path("ca.pem"), "put", "ctl/k", "-"},
                                 "hello");
  ASSERT_EQ(put.exit_code, 0) << put.err;
  CommandResult get = RunCommand({testing::kChunkctlBinary, "--server=" + server_->address(),
                                  "--tls_ca=" + certs_.Path("ca.pem"), "get", "ctl/k"});
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "hello");
  CommandResult plain = RunCommand(
      {testing::kChunkctlBinary, "--server=" + server_->address(), "--timeout=5s", "get", "ctl/k"});
  EXPECT_EQ(plain.exit_code, 1);
}

TEST_F(SecurityTlsTest, RefusesToStartWithAKeyThatIsNotTheCertificates) {
  CommandResult r = RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=memory://",
                                "--tls_cert=" + certs_.Path("server.pem"),
                                "--tls_key=" + certs_.Path("client.key")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "is not the key of --tls_cert")) << r.err;
  r = RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=memory://",
                  "--tls_cert=" + certs_.Path("server.pem")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "--tls_cert and --tls_key go together")) << r.err;
  r = RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=memory://",
                  "--tls_cert=" + certs_.Path("missing.pem"),
                  "--tls_key=" + certs_.Path("server.key")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "cannot read --tls_cert=")) << r.err;
}

// ---------------------------------------------------------------------------------------------
// Bearer tokens

class SecurityTokenTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    shm_ = new TempDir("/dev/shm");
    testing::WriteFile(dir_->Join("tokens"),
                       absl::StrCat("# chunkd tokens\n", kReadToken, " read\n", kWriteToken,
                                    " read,write   # a loader that also writes\n\n", kAdminToken,
                                    " admin\n", kAllToken, " read, write, admin\n"));
    ::chmod(dir_->Join("tokens").c_str(), 0600);
    auto server = ServerProcess::Start(
        {"--listen=127.0.0.1:0,unix:" + dir_->Join("sock"), "--store=memory://",
         "--auth_tokens=" + dir_->Join("tokens"), "--shm_dir=" + shm_->path()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    if (server_) EXPECT_EQ(server_->Stop(), 0) << server_->log();
    delete server_;
    delete shm_;
    delete dir_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(server_, nullptr); }

  std::string Address() const {
    return GetParam() == "tcp" ? server_->addresses()[0] : server_->addresses()[1];
  }
  ClientOptions With(const std::string& token) {
    ClientOptions options = Options(Address());
    options.token = token;
    return options;
  }
  std::string Key(const std::string& name) { return GetParam() + "/" + name; }

  static TempDir* dir_;
  static TempDir* shm_;
  static ServerProcess* server_;
};
TempDir* SecurityTokenTest::dir_ = nullptr;
TempDir* SecurityTokenTest::shm_ = nullptr;
ServerProcess* SecurityTokenTest::server_ = nullptr;

TEST_P(SecurityTokenTest, CallsWithoutATokenAreUnauthenticated) {
  auto client = MustConnect(With(""));
  auto get = client->Get(Key("missing"));
  EXPECT_TRUE(absl::IsUnauthenticated(get.status())) << get.status();
  EXPECT_TRUE(absl::StrContains(get.status().message(), "missing bearer token"));
  auto put = client->Put(Key("k"), Bytes("v"));
  EXPECT_TRUE(absl::IsUnauthenticated(put.status())) << put.status();
  EXPECT_TRUE(absl::IsUnauthenticated(client->ServerInfo().status()));
  EXPECT_TRUE(absl::IsUnauthenticated(client->Stat(Key("k")).status()));
  EXPECT_TRUE(absl::IsUnauthenticated(client->List("").status()));
  EXPECT_TRUE(absl::IsUnauthenticated(client->Delete(Key("k"))));
}

TEST_P(SecurityTokenTest, UnknownTokensAreUnauthenticated) {
  auto client = MustConnect(With("not-a-token-0123456789abcdef"));
  auto get = client->Get(Key("k"));
  EXPECT_TRUE(absl::IsUnauthenticated(get.status())) << get.status();
  EXPECT_EQ(get.status().message(), "unknown token");
  // A prefix or an extension of a real token is no token either.
  auto prefix = MustConnect(With(std::string(kReadToken).substr(0, 20)))->Stat(Key("k"));
  EXPECT_TRUE(absl::IsUnauthenticated(prefix.status())) << prefix.status();
  auto longer = MustConnect(With(std::string(kReadToken) + "x"))->Stat(Key("k"));
  EXPECT_TRUE(absl::IsUnauthenticated(longer.status())) << longer.status();
}

TEST_P(SecurityTokenTest, ReadTokenReadsButCannotWrite) {
  auto writer = MustConnect(With(kWriteToken));
  ASSERT_TRUE(writer->Put(Key("r"), Bytes("readable")).ok());
  auto reader = MustConnect(With(kReadToken));
  auto got = reader->Get(Key("r"));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::string(got->data.view()), "readable");
  EXPECT_TRUE(reader->Stat(Key("r")).ok());
  EXPECT_TRUE(reader->List(GetParam() + "/").ok());
  EXPECT_TRUE(reader->ServerInfo().ok());

  auto put = reader->Put(Key("r"), Bytes("overwritten"));
  EXPECT_TRUE(absl::IsPermissionDenied(put.status())) << put.status();
  EXPECT_TRUE(absl::StrContains(put.status().message(), "write right")) << put.status();
  absl::Status del = reader->Delete(Key("r"));
  EXPECT_TRUE(absl::IsPermissionDenied(del)) << del;
  EXPECT_EQ(std::string(reader->Get(Key("r"))->data.view()), "readable");
}

TEST_P(SecurityTokenTest, WriteTokenWritesAndDeletes) {
  auto writer = MustConnect(With(kWriteToken));
  ASSERT_TRUE(writer->Put(Key("w"), Bytes("x")).ok());
  EXPECT_TRUE(writer->Delete(Key("w")).ok());
  EXPECT_FALSE(writer->Stat(Key("w"))->exists);
}

TEST_P(SecurityTokenTest, AdminRightIsNeededForPrefetchAndGivesNothingElse) {
  auto channel_for = [&](const std::string& token) {
    return *client::CreateChannel(With(token), grpc::ChannelArguments());
  };
  auto prefetch = [&](const std::string& token) {
    auto stub = v1::Chunkd::NewStub(channel_for(token));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::PrefetchRequest request;
    auto reader = stub->Prefetch(&context, request);
    v1::PrefetchResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish();
  };
  grpc::Status denied = prefetch(kReadToken);
  EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED) << denied.error_message();
  EXPECT_TRUE(absl::StrContains(denied.error_message(), "admin right")) << denied.error_message();
  EXPECT_EQ(prefetch("").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // With the admin right the call reaches the service (whatever it then answers).
  for (const char* token : {kAdminToken, kAllToken}) {
    grpc::Status admitted = prefetch(token);
    EXPECT_NE(admitted.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << admitted.error_message();
    EXPECT_NE(admitted.error_code(), grpc::StatusCode::UNAUTHENTICATED) << admitted.error_message();
  }
  // Admin alone does not read or write.
  auto admin = MustConnect(With(kAdminToken));
  auto get = admin->Get(Key("any"));
  EXPECT_TRUE(absl::IsPermissionDenied(get.status())) << get.status();
  EXPECT_TRUE(absl::StrContains(get.status().message(), "read right"));
  EXPECT_TRUE(RoundTrip(With(kAllToken), Key("all")).ok());
}

TEST_P(SecurityTokenTest, EveryMethodReachesTheServiceWithTheRightToken) {
  // Each method of chunkd.v1.Chunkd answers the same with a token holding every right as on a
  // server without tokens: the token check forwards all of them (none is left UNIMPLEMENTED).
  auto plain = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=memory://"});
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto open = *client::CreateChannel(Options((*plain)->address()), grpc::ChannelArguments());
  auto guarded = *client::CreateChannel(With(kAllToken), grpc::ChannelArguments());
  auto anonymous = *client::CreateChannel(With(""), grpc::ChannelArguments());
  for (const char* name : {v1::Chunkd::service_full_name(),
                           tensorstore_grpc::kvstore::KvStoreService::service_full_name()}) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    ASSERT_NE(service, nullptr) << name;
    for (int i = 0; i < service->method_count(); ++i) {
      std::string method = absl::StrCat("/", name, "/", service->method(i)->name());
      SCOPED_TRACE(method);
      EXPECT_EQ(CallWithEmptyRequest(guarded, method), CallWithEmptyRequest(open, method));
      EXPECT_EQ(CallWithEmptyRequest(anonymous, method), grpc::StatusCode::UNAUTHENTICATED);
    }
  }
}

TEST_P(SecurityTokenTest, TensorStoreServiceTakesTheSameTokensAndRights) {
  using testing::TsClient;
  std::string key = Key("ts");
  auto channel = [&](const std::string& token) {
    return *client::CreateChannel(With(token), grpc::ChannelArguments());
  };
  TsClient writer(channel(kWriteToken), kWriteToken);
  ASSERT_TRUE(writer.Write(key, "readable", nullptr).ok());
  // A read token reads and lists, and can neither write nor delete.
  TsClient reader(channel(kReadToken), kReadToken);
  EXPECT_EQ(reader.Read(key).value, "readable");
  std::vector<std::string> keys;
  EXPECT_TRUE(reader.List(key, "", &keys).ok());
  grpc::Status write = reader.Write(key, "overwritten", nullptr);
  EXPECT_EQ(write.error_code(), grpc::StatusCode::PERMISSION_DENIED) << write.error_message();
  EXPECT_TRUE(absl::StrContains(write.error_message(), "write right")) << write.error_message();
  EXPECT_EQ(reader.Delete(key).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(reader.DeleteRange(key, "").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(reader.Read(key).value, "readable");
  // Admin alone does not read; no token, or an unknown one, is unauthenticated.
  TsClient admin(channel(kAdminToken), kAdminToken);
  EXPECT_EQ(admin.Read(key).status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  TsClient anonymous(channel(""));
  testing::TsRead r = anonymous.Read(key);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(r.status.error_message(), "missing bearer token"));
  TsClient unknown(channel(""), "not-a-token-0123456789abcdef");
  EXPECT_EQ(unknown.Write(key, "x", nullptr).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(writer.Delete(key).ok());
}

TEST_P(SecurityTokenTest, HealthServiceAnswersWithoutAToken) {
  auto health = client::CheckHealth(With(""), absl::Seconds(10));
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");
  auto chunkd_service = client::CheckHealth(With(""), absl::Seconds(10), "chunkd.v1.Chunkd");
  ASSERT_TRUE(chunkd_service.ok()) << chunkd_service.status();
  EXPECT_EQ(*chunkd_service, "SERVING");
  CommandResult ctl = RunCommand({testing::kChunkctlBinary, "--server=" + Address(), "health"});
  EXPECT_EQ(ctl.exit_code, 0) << ctl.err;
  EXPECT_EQ(ctl.out, "SERVING\n");
}

TEST_P(SecurityTokenTest, LeaseCallsInTheBackgroundCarryTheToken) {
  ClientOptions options = With(kReadToken);
  options.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
  options.shm_dir = shm_->path();
  ASSERT_TRUE(
      MustConnect(With(kWriteToken))->Put(Key("leased"), Bytes(std::string(1 << 16, 'l'))).ok());
  auto client = MustConnect(options);
  auto before = client->ServerInfo();
  ASSERT_TRUE(before.ok());
  {
    auto got = client->Get(Key("leased"));
    ASSERT_TRUE(got.ok()) << got.status();
    if (got->delivery != v1::DELIVERY_SHM) GTEST_SKIP() << "no shared-memory delivery here";
    EXPECT_EQ(client->leases_held(), 1u);
  }
  client->FlushReleases();
  auto after = client->ServerInfo();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(Counter(*after, "leases_released"), Counter(*before, "leases_released") + 1);
  EXPECT_EQ(Counter(*after, "leases_unknown"), Counter(*before, "leases_unknown"));
}

TEST_P(SecurityTokenTest, ChunkctlTakesTheTokenFromAFlagAFileOrTheEnvironment) {
  std::string server = "--server=" + Address();
  CommandResult denied =
      RunCommand({testing::kChunkctlBinary, server, "put", Key("ctl"), "-"}, "v");
  EXPECT_EQ(denied.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(denied.err, "missing bearer token")) << denied.err;
  CommandResult put = RunCommand({testing::kChunkctlBinary, server,
                                  std::string("--token=") + kWriteToken, "put", Key("ctl"), "-"},
                                 "v");
  EXPECT_EQ(put.exit_code, 0) << put.err;
  testing::WriteFile(dir_->Join("client-token"), std::string(kReadToken) + "\n");
  CommandResult get = RunCommand({testing::kChunkctlBinary, server,
                                  "--token_file=" + dir_->Join("client-token"), "get", Key("ctl")});
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "v");
  ::setenv("CHUNKD_TOKEN", kReadToken, 1);
  CommandResult env = RunCommand({testing::kChunkctlBinary, server, "put", Key("ctl"), "-"}, "w");
  ::unsetenv("CHUNKD_TOKEN");
  EXPECT_EQ(env.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(env.err, "write right")) << env.err;
}

INSTANTIATE_TEST_SUITE_P(Transports, SecurityTokenTest, ::testing::Values("tcp", "unix"),
                         [](const auto& info) { return info.param; });

TEST(SecurityTokenFileTest, MalformedTokenFileStopsTheServerNamingTheLine) {
  TempDir dir;
  testing::WriteFile(dir.Join("tokens"),
                     absl::StrCat("# ok\n", kReadToken, " read\n", kWriteToken, " read,wirte\n"));
  CommandResult r = RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=memory://",
                                "--auth_tokens=" + dir.Join("tokens")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "line 3")) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "unknown right \"wirte\"")) << r.err;
  r = RunCommand({testing::kChunkdBinary, "--listen=127.0.0.1:0", "--store=memory://",
                  "--auth_tokens=" + dir.Join("absent")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "cannot read token file")) << r.err;
}

TEST(SecurityReadOnlyTest, ReadOnlyServerRefusesWritesEvenWithAWriteToken) {
  TempDir dir;
  testing::WriteFile(dir.Join("tokens"), absl::StrCat(kWriteToken, " read,write\n"));
  auto server = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=memory://", "--read_only",
                                      "--auth_tokens=" + dir.Join("tokens")});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options = Options((*server)->address());
  options.token = kWriteToken;
  auto client = MustConnect(options);
  auto put = client->Put("ro/k", Bytes("v"));
  EXPECT_TRUE(absl::IsPermissionDenied(put.status())) << put.status();
  EXPECT_TRUE(absl::StrContains(put.status().message(), "read-only")) << put.status();
  EXPECT_TRUE(absl::IsPermissionDenied(client->Delete("ro/k")));
  EXPECT_TRUE(client->ServerInfo().ok());
}

// ---------------------------------------------------------------------------------------------
// UNIX socket permissions, warnings

mode_t SocketMode(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

TEST(SecurityUnixSocketTest, SocketGetsTheConfiguredModeAndGroup) {
  TempDir dir;
  {
    auto server =
        ServerProcess::Start({"--listen=unix:" + dir.Join("default.sock"), "--store=memory://"});
    ASSERT_TRUE(server.ok()) << server.status();
    EXPECT_EQ(SocketMode(dir.Join("default.sock")), 0660u);
    EXPECT_TRUE(absl::StrContains((*server)->log(), "mode 0660")) << (*server)->log();
  }
  {
    // The process's own primary group is one it may always give.
    std::string group = std::to_string(::getegid());
    auto server =
        ServerProcess::Start({"--listen=unix:" + dir.Join("private.sock"), "--store=memory://",
                              "--unix_socket_mode=0600", "--unix_socket_group=" + group});
    ASSERT_TRUE(server.ok()) << server.status();
    EXPECT_EQ(SocketMode(dir.Join("private.sock")), 0600u);
    struct stat st;
    ASSERT_EQ(::stat(dir.Join("private.sock").c_str(), &st), 0);
    EXPECT_EQ(st.st_gid, ::getegid());
    EXPECT_TRUE(RoundTrip(Options((*server)->address()), "sock/k").ok());
  }
  CommandResult bad = RunCommand({testing::kChunkdBinary, "--listen=unix:" + dir.Join("bad.sock"),
                                  "--store=memory://", "--unix_socket_mode=0400"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(bad.err, "--unix_socket_mode=0400")) << bad.err;
  bad = RunCommand({testing::kChunkdBinary, "--listen=unix:" + dir.Join("bad.sock"),
                    "--store=memory://", "--unix_socket_group=no-such-group-chunkd"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(bad.err, "no such group")) << bad.err;
}

TEST(SecurityWarningTest, NetworkAddressWithoutAuthenticationIsWarnedAbout) {
  auto open = ServerProcess::Start({"--listen=0.0.0.0:0", "--store=memory://"});
  ASSERT_TRUE(open.ok()) << open.status();
  EXPECT_TRUE(absl::StrContains((*open)->log(),
                                "WARNING: 0.0.0.0:0 accepts connections from "
                                "other hosts without authentication"))
      << (*open)->log();
  auto loopback = ServerProcess::Start({"--listen=127.0.0.1:0,[::1]:0", "--store=memory://"});
  if (!loopback.ok())
    loopback = ServerProcess::Start({"--listen=127.0.0.1:0", "--store=memory://"});
  ASSERT_TRUE(loopback.ok()) << loopback.status();
  EXPECT_FALSE(absl::StrContains((*loopback)->log(), "WARNING")) << (*loopback)->log();

  TempDir dir;
  testing::WriteFile(dir.Join("tokens"), absl::StrCat(kReadToken, " read\n"));
  auto tokens_only = ServerProcess::Start(
      {"--listen=0.0.0.0:0", "--store=memory://", "--auth_tokens=" + dir.Join("tokens")});
  ASSERT_TRUE(tokens_only.ok()) << tokens_only.status();
  EXPECT_TRUE(absl::StrContains((*tokens_only)->log(), "bearer tokens over plaintext"))
      << (*tokens_only)->log();
}

// ---------------------------------------------------------------------------------------------
// Limits

// A client starts a 64 MiB Get over TCP, reads one part and stops reading. The server cancels
// the call at --max_call_duration, which lets go of the value it held for the call.
TEST(SecurityCallLimitTest, StalledReaderIsCancelledAtTheLongestCallDuration) {
  TempDir dir;
  std::filesystem::create_directories(dir.Join("store"));
  // 64 MiB is more than a quarter of the cache: the value is not cached, so the stalled call
  // holds the only copy.
  auto server =
      ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.Join("store"), "--fsync=false",
                            "--shm=false", "--host_cache_bytes=128MiB", "--max_call_duration=3s"});
  ASSERT_TRUE(server.ok()) << server.status();
  const size_t size = 64 << 20;
  auto client = MustConnect(Options((*server)->address()));
  ASSERT_TRUE(client->Put("big/value", Bytes(testing::RandomBytes(size, 7))).ok());

  auto channel = *client::CreateChannel(Options((*server)->address()), [] {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(16 << 20);
    return args;
  }());
  auto stub = v1::Chunkd::NewStub(channel);
  grpc::ClientContext context;  // no deadline of its own: only the server's limit ends it
  v1::GetRequest request;
  request.set_key("big/value");
  absl::Time start = absl::Now();
  auto reader = stub->Get(&context, request);
  v1::GetResponse first;
  ASSERT_TRUE(reader->Read(&first));
  ASSERT_TRUE(first.has_header());
  EXPECT_EQ(first.header().total_size(), size);

  // The reader stops here. The server must give up on it once the limit has passed.
  uint64_t errors_before = 0;
  absl::Time cancelled_at = absl::InfinitePast();
  uint64_t served_when_cancelled = 0;
  while (absl::Now() - start < absl::Seconds(20)) {
    auto info = client->ServerInfo();
    ASSERT_TRUE(info.ok()) << info.status();
    if (Counter(*info, "get_errors") > errors_before) {
      cancelled_at = absl::Now();
      served_when_cancelled = Counter(*info, "bytes_served_inline");
      break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_NE(cancelled_at, absl::InfinitePast()) << "the stalled Get was never cancelled\n"
                                                << (*server)->log();
  EXPECT_GE(cancelled_at - start, absl::Seconds(2.5));
  EXPECT_LT(cancelled_at - start, absl::Seconds(8));
  // It really stalled: flow control stopped the server well before the end of the value.
  EXPECT_LT(served_when_cancelled, size) << "the test's reader did not stall the server";
  EXPECT_TRUE(absl::StrContains((*server)->log(), "cancelling a Get call")) << (*server)->log();

  // The client sees the end of the call once it reads again.
  v1::GetResponse part;
  while (reader->Read(&part)) {
  }
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();

  // Calls that finish in time are not affected, and the server still serves.
  auto again = client->Get("big/value", {.range = client::ByteRange::Bounded(0, 4096)});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->data.size(), 4096u);
}

// The same for TensorStore's Read: a reader that stops reading a 64 MiB value is cancelled at
// --max_call_duration.
TEST(SecurityCallLimitTest, StalledTensorStoreReaderIsCancelledAtTheLongestCallDuration) {
  TempDir dir;
  std::filesystem::create_directories(dir.Join("store"));
  auto server =
      ServerProcess::Start({"--listen=127.0.0.1:0", "--store=" + dir.Join("store"), "--fsync=false",
                            "--shm=false", "--host_cache_bytes=128MiB", "--max_call_duration=3s"});
  ASSERT_TRUE(server.ok()) << server.status();
  const size_t size = 64 << 20;
  testing::TsClient ts((*server)->address());
  ASSERT_TRUE(ts.Write("big/value", testing::RandomBytes(size, 7), nullptr).ok());
  auto client = MustConnect(Options((*server)->address()));

  grpc::ClientContext context;  // no deadline of its own: only the server's limit ends it
  tensorstore_grpc::kvstore::ReadRequest request;
  request.set_key("big/value");
  absl::Time start = absl::Now();
  auto reader = ts.stub().Read(&context, request);
  tensorstore_grpc::kvstore::ReadResponse first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_EQ(first.state(), tensorstore_grpc::kvstore::ReadResponse::VALUE);

  // The reader stops here. The server must give up on it once the limit has passed.
  absl::Time cancelled_at = absl::InfinitePast();
  uint64_t served_when_cancelled = 0;
  while (absl::Now() - start < absl::Seconds(20)) {
    auto info = client->ServerInfo();
    ASSERT_TRUE(info.ok()) << info.status();
    if (Counter(*info, "tensorstore_get_errors") > 0) {
      cancelled_at = absl::Now();
      served_when_cancelled = Counter(*info, "tensorstore_bytes_served_inline");
      break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_NE(cancelled_at, absl::InfinitePast()) << "the stalled Read was never cancelled\n"
                                                << (*server)->log();
  EXPECT_GE(cancelled_at - start, absl::Seconds(2.5));
  EXPECT_LT(cancelled_at - start, absl::Seconds(8));
  EXPECT_LT(served_when_cancelled, size) << "the test's reader did not stall the server";
  EXPECT_TRUE(absl::StrContains((*server)->log(),
                                "cancelling a /tensorstore_grpc.kvstore.KvStoreService/Read call"))
      << (*server)->log();
  tensorstore_grpc::kvstore::ReadResponse part;
  while (reader->Read(&part)) {
  }
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  // The server still serves.
  testing::TsRead again = ts.Read("big/value", testing::TsReadOptions::Range(0, 4096));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.value.size(), 4096u);
}

}  // namespace
}  // namespace chunkd

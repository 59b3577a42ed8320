// Token files, rights per method, and the socket-mode and loopback helpers of the server's
// security options.
#include "server/rpc/auth.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "google/protobuf/descriptor.h"
#include "gtest/gtest.h"
#include "server/rpc/security.h"
#include "tensorstore_grpc/kvstore/kvstore.grpc.pb.h"

namespace chunkd::server {
namespace {

constexpr char kA[] = "aaaaaaaaaaaaaaaa-token";
constexpr char kB[] = "bbbbbbbbbbbbbbbb-token";
constexpr char kC[] = "cccccccccccccccc-token";

Rights R(std::initializer_list<Right> rights) {
  Rights out = 0;
  for (Right r : rights) out |= static_cast<Rights>(r);
  return out;
}

TEST(SecurityTokenTableTest, ParsesTokensRightsCommentsAndBlankLines) {
  auto table =
      TokenTable::Parse(absl::StrCat("# tokens of the loaders\n"
                                     "\n",
                                     kA, " read\n",  //
                                     "   ", kB, "\tread,write  # trailing comment\n", kC,
                                     " read, write,admin\r\n",  // CRLF, blanks
                                     "   # indented comment\n"));
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 3u);
  EXPECT_EQ(table->Find(kA), R({Right::kRead}));
  EXPECT_EQ(table->Find(kB), R({Right::kRead, Right::kWrite}));
  EXPECT_EQ(table->Find(kC), R({Right::kRead, Right::kWrite, Right::kAdmin}));
}

TEST(SecurityTokenTableTest, UnknownPrefixesAndExtensionsOfTokensAreNotFound) {
  auto table = TokenTable::Parse(absl::StrCat(kA, " read\n"));
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->Find(""), std::nullopt);
  EXPECT_EQ(table->Find("aaaaaaaaaaaaaaaa"), std::nullopt);
  EXPECT_EQ(table->Find(absl::StrCat(kA, "x")), std::nullopt);
  EXPECT_EQ(table->Find("AAAAAAAAAAAAAAAA-token"), std::nullopt);  // case matters
  EXPECT_EQ(table->Find(kB), std::nullopt);
}

TEST(SecurityTokenTableTest, RepeatedRightsAreOneRight) {
  auto table = TokenTable::Parse(absl::StrCat(kA, " read,read,,read\n"));
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->Find(kA), R({Right::kRead}));
}

// The error names the origin and the line, and says what is wrong.
void ExpectError(const std::string& text, int line, const std::string& what) {
  auto table = TokenTable::Parse(text, "tokens.txt");
  ASSERT_FALSE(table.ok()) << text;
  EXPECT_TRUE(absl::IsInvalidArgument(table.status())) << table.status();
  std::string message(table.status().message());
  if (line > 0) {
    EXPECT_TRUE(absl::StrContains(message, absl::StrCat("tokens.txt line ", line, ":"))) << message;
  }
  EXPECT_TRUE(absl::StrContains(message, what)) << message;
}

TEST(SecurityTokenTableTest, RejectsMalformedFilesNamingTheLine) {
  ExpectError(absl::StrCat("# header\n", kA, "\n"), 2, "expected TOKEN RIGHTS");
  ExpectError(absl::StrCat(kA, " read\n", kB, " read,wirte\n"), 2, "unknown right \"wirte\"");
  ExpectError(absl::StrCat(kA, " READ\n"), 1, "unknown right \"READ\"");
  ExpectError(absl::StrCat(kA, " ,\n"), 1, "no rights");
  ExpectError("short read\n", 1, "at least 16");
  ExpectError(absl::StrCat(kA, " read\n\n", kA, " write\n"), 3, "same token as on line 1");
  ExpectError("t\xc3\xa9ll\xc3\xa9-0123456789abcdef read\n", 1, "printable ASCII");
  ExpectError("", 0, "holds no tokens");
  ExpectError("# only comments\n\n", 0, "holds no tokens");
}

TEST(SecurityTokenTableTest, LoadNamesAMissingFile) {
  auto table = TokenTable::Load("/nonexistent/chunkd-tokens");
  ASSERT_FALSE(table.ok());
  EXPECT_TRUE(absl::StrContains(table.status().message(), "/nonexistent/chunkd-tokens"));
}

TEST(SecurityTokenTableTest, ASingleTokenFileHoldsTheTokenAlone) {
  auto table = TokenTable::ParseSingle(absl::StrCat("  ", kA, "\n"), "metrics.token");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_TRUE(table->Find(kA).has_value());
  EXPECT_FALSE(table->Find(kB).has_value());
  for (std::string bad : {std::string(""), std::string("short\n"), absl::StrCat(kA, " read\n"),
                          absl::StrCat(kA, "\x01")}) {
    auto refused = TokenTable::ParseSingle(bad, "metrics.token");
    ASSERT_FALSE(refused.ok()) << bad;
    EXPECT_TRUE(absl::StartsWith(refused.status().message(), "metrics.token: "))
        << refused.status();
  }
  EXPECT_FALSE(TokenTable::LoadSingle("/nonexistent/metrics.token").ok());
}

TEST(SecurityTokenTableTest, BearerTokenOfAnAuthorizationHeader) {
  EXPECT_EQ(*BearerTokenOf("Bearer abc"), "abc");
  EXPECT_EQ(*BearerTokenOf("bearer   abc  "), "abc");
  EXPECT_FALSE(BearerTokenOf("").ok());
  EXPECT_FALSE(BearerTokenOf("Basic abc").ok());
  EXPECT_FALSE(BearerTokenOf("Bearer ").ok());
}

TEST(SecurityRightsTest, EveryMethodOfEveryServiceHasARight) {
  // A new RPC must be given a right here (server/rpc/auth.cc) before tokens admit it.
  for (const char* name : {v1::Chunkd::service_full_name(),
                           tensorstore_grpc::kvstore::KvStoreService::service_full_name()}) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    ASSERT_NE(service, nullptr) << name;
    for (int i = 0; i < service->method_count(); ++i) {
      std::string method = absl::StrCat("/", name, "/", service->method(i)->name());
      EXPECT_TRUE(RequiredRight(method).has_value())
          << method << " has no required right in server/rpc/auth.cc";
    }
  }
  // chunkd.v1's calls name their method alone.
  EXPECT_EQ(RequiredRight("Get"), Right::kRead);
}

TEST(SecurityRightsTest, TensorStoreMethodsNeedTheRightsOfTheirChunkdCounterparts) {
  constexpr char kService[] = "/tensorstore_grpc.kvstore.KvStoreService/";
  EXPECT_EQ(RequiredRight(absl::StrCat(kService, "Read")), Right::kRead);
  EXPECT_EQ(RequiredRight(absl::StrCat(kService, "List")), Right::kRead);
  EXPECT_EQ(RequiredRight(absl::StrCat(kService, "Write")), Right::kWrite);
  EXPECT_EQ(RequiredRight(absl::StrCat(kService, "Delete")), Right::kWrite);
  EXPECT_EQ(RequiredRight(absl::StrCat(kService, "Unknown")), std::nullopt);
  // A bare name is chunkd.v1's: "Read" is no chunkd.v1 method.
  EXPECT_EQ(RequiredRight("Read"), std::nullopt);
}

TEST(SecurityRightsTest, RightsPerMethod) {
  for (const char* m : {"Get", "Stat", "List", "ServerInfo", "Release", "Renew"}) {
    EXPECT_EQ(RequiredRight(m), Right::kRead) << m;
  }
  EXPECT_EQ(RequiredRight("Put"), Right::kWrite);
  EXPECT_EQ(RequiredRight("Delete"), Right::kWrite);
  EXPECT_EQ(RequiredRight("Prefetch"), Right::kAdmin);
  EXPECT_EQ(RequiredRight("/chunkd.v1.Chunkd/Put"), Right::kWrite);
  EXPECT_EQ(RequiredRight("Unknown"), std::nullopt);
  EXPECT_EQ(RightsString(R({Right::kRead, Right::kAdmin})), "read,admin");
  EXPECT_EQ(RightsString(0), "none");
}

TEST(SecurityOptionsTest, SocketModes) {
  EXPECT_EQ(*ParseSocketMode("0660"), 0660u);
  EXPECT_EQ(*ParseSocketMode("600"), 0600u);
  EXPECT_EQ(*ParseSocketMode("0666"), 0666u);
  for (const char* bad : {"", "0400", "0060", "0680", "01660", "rw", "0660x", "-1"}) {
    EXPECT_FALSE(ParseSocketMode(bad).ok()) << bad;
  }
}

TEST(SecurityOptionsTest, LoopbackAddresses) {
  for (const char* a : {"127.0.0.1:7878", "127.1.2.3:0", "[::1]:7878", "localhost:7878",
                        "unix:/run/chunkd.sock", "[::ffff:127.0.0.1]:1"}) {
    EXPECT_TRUE(IsLoopbackAddress(a)) << a;
  }
  for (const char* a : {"0.0.0.0:7878", "[::]:7878", "10.0.0.5:7878", "chunkd.example:7878",
                        "[2001:db8::1]:7878"}) {
    EXPECT_FALSE(IsLoopbackAddress(a)) << a;
  }
}

}  // namespace
}  // namespace chunkd::server

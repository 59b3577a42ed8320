// client.h's InitProcess: the process-wide settings of the client, made once.
#include <cstdlib>
#include <string>

#include "client/client.h"
#include "gtest/gtest.h"

namespace chunkd::client {
namespace {

// gRPC's poll engine unless the environment named one (ctest runs each test in a process of
// its own, so nothing before this one chose for it); calling it again changes nothing.
TEST(InitProcessTest, SelectsThePollEngineUnlessTheEnvironmentChoseOne) {
  const char* chosen = std::getenv("GRPC_POLL_STRATEGY");
  const std::string before = chosen != nullptr ? chosen : "";
  InitProcess();
  const char* now = std::getenv("GRPC_POLL_STRATEGY");
  ASSERT_NE(now, nullptr);
  EXPECT_EQ(std::string(now), before.empty() ? "poll" : before);
  InitProcess();
  EXPECT_EQ(std::string(std::getenv("GRPC_POLL_STRATEGY")), std::string(now));
}

}  // namespace
}  // namespace chunkd::client

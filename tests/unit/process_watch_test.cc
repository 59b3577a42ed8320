// The client processes the server watches (server/store/process_watch.h).
#include "server/store/process_watch.h"

#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace chunkd::server {
namespace {

pid_t SpawnSleeper() {
  pid_t pid = 0;
  char arg0[] = "sleep", arg1[] = "60";
  char* argv[] = {arg0, arg1, nullptr};
  if (::posix_spawnp(&pid, "sleep", nullptr, nullptr, argv, environ) != 0) return -1;
  return pid;
}

// A connection's process is found by gRPC's name of its peer, and is seen to exit.
TEST(ProcessWatchTest, KnowsEachConnectionsProcessAndSeesItExit) {
  ProcessWatch watch;
  pid_t child = SpawnSleeper();
  ASSERT_GT(child, 0);
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, child, 0));
  ASSERT_GE(pidfd, 0);
  watch.AddConnection(1000, child, pidfd);
  // A second connection of the same process shares its life (and its pidfd is not kept).
  watch.AddConnection(1001, child, static_cast<int>(::syscall(SYS_pidfd_open, child, 0)));
  // A process the server cannot watch (another PID namespace: pid 0) is known by nothing.
  watch.AddConnection(1002, 0, -1);
  std::optional<PeerProcess> peer = watch.OfPeer("fd:1000");
  ASSERT_TRUE(peer.has_value());
  EXPECT_EQ(peer->pid, child);
  ASSERT_NE(peer->life, nullptr);
  EXPECT_TRUE(peer->life->alive());
  EXPECT_EQ(watch.OfPeer("fd:1001")->life, peer->life);
  EXPECT_EQ(watch.OfPeer("fd:1002")->life, nullptr);
  EXPECT_FALSE(watch.OfPeer("unix:").has_value());
  EXPECT_FALSE(watch.OfPeer("ipv4:127.0.0.1:5").has_value());
  EXPECT_EQ(watch.watched(), 1u);

  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (peer->life->alive() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_FALSE(peer->life->alive());
  deadline = absl::Now() + absl::Seconds(20);
  while (watch.watched() != 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(watch.watched(), 0u);
}

}  // namespace
}  // namespace chunkd::server

// chunkctl against the real chunkd, as a user runs it.
#include <signal.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::ServerProcess;
using testing::TempDir;

class ChunkctlTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    std::filesystem::create_directories(dir_->Join("store"));
    auto server = ServerProcess::Start({"--listen=127.0.0.1:0,unix:" + dir_->Join("sock"),
                                        "--store=" + dir_->Join("store"), "--fsync=false"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    if (server_) {
      EXPECT_EQ(server_->Stop(SIGTERM), 0);
    }
    delete server_;
    delete dir_;
  }
  CommandResult Ctl(std::vector<std::string> args, const std::string& input = "", int address = 0) {
    std::vector<std::string> argv = {testing::kChunkctlBinary,
                                     "--server=" + server_->addresses()[address]};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, input);
  }
  static TempDir* dir_;
  static ServerProcess* server_;
};
TempDir* ChunkctlTest::dir_ = nullptr;
ServerProcess* ChunkctlTest::server_ = nullptr;

TEST_F(ChunkctlTest, PutGetRoundTrips64MiBOverTcpAndUnixSocket) {
  std::string value = testing::RandomBytes(64 << 20, 42);
  std::string in = dir_->Join("in.bin");
  testing::WriteFile(in, value);
  for (int address : {0, 1}) {
    SCOPED_TRACE(server_->addresses()[address]);
    std::string key = absl::StrCat("big/c/", address);
    CommandResult put = Ctl({"put", key, in}, "", address);
    ASSERT_EQ(put.exit_code, 0) << put.err;
    std::string out = dir_->Join(absl::StrCat("out", address, ".bin"));
    CommandResult get = Ctl({"get", key, "-o", out, "-v"}, "", address);
    ASSERT_EQ(get.exit_code, 0) << get.err;
    EXPECT_NE(get.err.find("DELIVERY_INLINE"), std::string::npos) << get.err;
    EXPECT_TRUE(testing::ReadFile(out) == value);
  }
}

TEST_F(ChunkctlTest, StdinStdoutAndRanges) {
  ASSERT_EQ(Ctl({"put", "arr/c/0", "-"}, "0123456789").exit_code, 0);
  EXPECT_EQ(Ctl({"get", "arr/c/0"}).out, "0123456789");
  EXPECT_EQ(Ctl({"get", "arr/c/0", "--range=2-5"}).out, "234");
  EXPECT_EQ(Ctl({"get", "arr/c/0", "--range=7-"}).out, "789");
  EXPECT_EQ(Ctl({"get", "arr/c/0", "--range=-4"}).out, "6789");
  EXPECT_EQ(Ctl({"get", "arr/c/0", "--range", "3-4"}).out, "3");
  CommandResult bad = Ctl({"get", "arr/c/0", "--range=5-2"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("ends before it starts"), std::string::npos) << bad.err;
  bad = Ctl({"get", "arr/c/0", "--range=x"});
  EXPECT_EQ(bad.exit_code, 1);
}

TEST_F(ChunkctlTest, GetOfSeveralKeysWritesOneFilePerKey) {
  ASSERT_EQ(Ctl({"put", "many/a", "-"}, "alpha").exit_code, 0);
  ASSERT_EQ(Ctl({"put", "many/c/0/1", "-"}, "chunk").exit_code, 0);
  std::string out = dir_->Join("many-out");
  CommandResult got = Ctl({"get", "many/a", "many/c/0/1", "-o", out, "-v"});
  ASSERT_EQ(got.exit_code, 0) << got.err;
  EXPECT_EQ(testing::ReadFile(out + "/many/a"), "alpha");
  EXPECT_EQ(testing::ReadFile(out + "/many/c/0/1"), "chunk");
  EXPECT_NE(got.err.find("2 keys in one GetMany"), std::string::npos) << got.err;

  // Every key is tried; a missing one makes the status 2, a refused one 1, and neither is
  // written anywhere.
  std::string out2 = dir_->Join("many-out2");
  CommandResult partial = Ctl({"get", "many/a", "many/missing", "-o", out2});
  EXPECT_EQ(partial.exit_code, 2) << partial.err;
  EXPECT_EQ(testing::ReadFile(out2 + "/many/a"), "alpha");
  EXPECT_FALSE(testing::PathExists(out2 + "/many/missing"));
  EXPECT_NE(partial.err.find("many/missing"), std::string::npos) << partial.err;
  CommandResult refused = Ctl({"get", "many/missing", "../escape", "many/a", "-o", out2});
  EXPECT_EQ(refused.exit_code, 1) << refused.err;
  EXPECT_FALSE(testing::PathExists(dir_->Join("escape")));

  // Several keys need a directory.
  CommandResult no_dir = Ctl({"get", "many/a", "many/c/0/1"});
  EXPECT_EQ(no_dir.exit_code, 1);
  EXPECT_NE(no_dir.err.find("-o DIR"), std::string::npos) << no_dir.err;
}

TEST_F(ChunkctlTest, ExitCodes) {
  CommandResult missing = Ctl({"get", "no/such/key"});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("not found"), std::string::npos);
  EXPECT_EQ(std::count(missing.err.begin(), missing.err.end(), '\n'), 1) << missing.err;
  EXPECT_EQ(Ctl({"stat", "no/such/key"}).exit_code, 2);
  EXPECT_EQ(Ctl({"rm", "no/such/key"}).exit_code, 2);
  CommandResult traversal = Ctl({"get", "../../etc/passwd"});
  EXPECT_EQ(traversal.exit_code, 1);
  EXPECT_NE(traversal.err.find("'..' segment"), std::string::npos);
  EXPECT_EQ(Ctl({"put", "a/../../b", "-"}, "evil").exit_code, 1);
  EXPECT_FALSE(testing::PathExists(dir_->Join("b")));
  EXPECT_EQ(Ctl({"frobnicate"}).exit_code, 1);
  EXPECT_EQ(Ctl({"get"}).exit_code, 1);
  // A local file that cannot be read is an error of its own (1), not a missing key (2).
  CommandResult no_file = Ctl({"put", "k", dir_->Join("no-such-file")});
  EXPECT_EQ(no_file.exit_code, 1);
  EXPECT_EQ(no_file.err, "chunkctl: cannot open " + dir_->Join("no-such-file") +
                             ": No such file or directory\n");
  CommandResult no_dir = Ctl({"put", "k", "-"}, "v");
  ASSERT_EQ(no_dir.exit_code, 0) << no_dir.err;
  CommandResult unwritable = Ctl({"get", "k", "-o", dir_->Join("no/such/dir/out")});
  EXPECT_EQ(unwritable.exit_code, 1);
  EXPECT_EQ(unwritable.err.rfind("chunkctl: cannot write ", 0), 0u) << unwritable.err;
  CommandResult down =
      RunCommand({testing::kChunkctlBinary, "--server=127.0.0.1:1", "--timeout=1s", "info"});
  EXPECT_EQ(down.exit_code, 1);
}

TEST_F(ChunkctlTest, AMissingKeyIsNotABackendReadError) {
  EXPECT_EQ(Ctl({"get", "never/stored"}).exit_code, 2);
  CommandResult info = Ctl({"info"});
  EXPECT_EQ(info.exit_code, 0);
  EXPECT_NE(info.out.find("counter backend_read_errors: 0\n"), std::string::npos) << info.out;
  EXPECT_EQ(info.out.find("counter backend_not_found: 0\n"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("counter backend_not_found: "), std::string::npos) << info.out;
}

TEST_F(ChunkctlTest, ListStatRemoveInfo) {
  for (const char* key : {"ls/zarr.json", "ls/c/0/0", "ls/c/0/1"}) {
    ASSERT_EQ(Ctl({"put", key, "-"}, "v").exit_code, 0);
  }
  EXPECT_EQ(Ctl({"ls", "ls/"}).out, "ls/c/0/0\nls/c/0/1\nls/zarr.json\n");
  EXPECT_EQ(Ctl({"ls", "ls/", "--dir"}).out, "ls/c/\nls/zarr.json\n");
  CommandResult stat = Ctl({"stat", "ls/zarr.json"});
  EXPECT_EQ(stat.exit_code, 0);
  EXPECT_NE(stat.out.find("size: 1"), std::string::npos) << stat.out;
  EXPECT_EQ(Ctl({"rm", "ls/zarr.json"}).exit_code, 0);
  EXPECT_EQ(Ctl({"get", "ls/zarr.json"}).exit_code, 2);
  CommandResult info = Ctl({"info"});
  EXPECT_EQ(info.exit_code, 0);
  EXPECT_NE(info.out.find("backend: file"), std::string::npos) << info.out;
  CommandResult help = RunCommand({testing::kChunkctlBinary, "--help"});
  EXPECT_NE(help.out.find("chunkctl [--server=ADDR] get KEY"), std::string::npos) << help.out;
}

// --max_staleness: a long bound takes the cached copy without asking the (file) store, 0 looks.
TEST_F(ChunkctlTest, MaxStalenessIsPassedToTheServer) {
  std::filesystem::create_directories(dir_->Join("store/fresh"));
  testing::WriteFile(dir_->Join("store/fresh/k"), "one");
  CommandResult first = Ctl({"get", "fresh/k"});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_EQ(first.out, "one");
  absl::SleepFor(absl::Milliseconds(20));  // past the file system clock's tick
  testing::WriteFile(dir_->Join("store/fresh/k"), "two");
  CommandResult lax = Ctl({"get", "fresh/k", "--max_staleness=1h"});
  ASSERT_EQ(lax.exit_code, 0) << lax.err;
  EXPECT_EQ(lax.out, "one");
  CommandResult strict = Ctl({"get", "fresh/k", "--max_staleness=0"});
  ASSERT_EQ(strict.exit_code, 0) << strict.err;
  EXPECT_EQ(strict.out, "two");
  CommandResult bad = Ctl({"get", "fresh/k", "--max_staleness=soon"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--max_staleness"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace chunkd

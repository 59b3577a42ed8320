// What both programs answer before they do any work: --help, --version and bad flags.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/version.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using testing::CommandResult;
using testing::RunCommand;

struct Program {
  std::string name;
  std::string binary;
  std::string usage_line;  // a line of its --help
  std::string own_flag;    // a flag --help must list
};

std::vector<Program> Programs() {
  return {
      {"chunkd", testing::kChunkdBinary, "chunkd [--listen=127.0.0.1:7878]", "--shutdown_grace"},
      {"chunkctl", testing::kChunkctlBinary, "chunkctl [--server=ADDR] get KEY", "--delivery"}};
}

// The build facts --version must state, as this test (compiled with the same flags) sees them.
std::string ExpectedBuildLine() {
  std::string line = absl::StrCat("build: ", CHUNKD_BUILD_TYPE, " (");
#ifdef __OPTIMIZE__
  absl::StrAppend(&line, "optimized, ");
#else
  absl::StrAppend(&line, "not optimized, ");
#endif
#ifdef NDEBUG
  absl::StrAppend(&line, "assertions off");
#else
  absl::StrAppend(&line, "assertions on");
#endif
  return line;
}

TEST(CliTest, HelpExitsZeroWithUsageOnStdout) {
  for (const Program& p : Programs()) {
    for (const char* help : {"--help", "--helpfull", "-help", "-h", "--helpshort"}) {
      CommandResult r = RunCommand({p.binary, help});
      EXPECT_EQ(r.exit_code, 0) << p.name << " " << help << ": " << r.err;
      EXPECT_TRUE(absl::StrContains(r.out, p.usage_line)) << p.name << " " << help << r.out;
      EXPECT_TRUE(absl::StrContains(r.out, p.own_flag)) << p.name << " " << help;
      EXPECT_EQ(r.err, "") << p.name << " " << help;
    }
  }
}

TEST(CliTest, ShortHelpShowsFlagsAsTheReadmeWritesThem) {
  for (const Program& p : Programs()) {
    CommandResult h = RunCommand({p.binary, "-h"});
    EXPECT_EQ(h.exit_code, 0) << p.name << ": " << h.err;
    EXPECT_EQ(h.out, RunCommand({p.binary, "--help"}).out) << p.name;
    // No source paths (Abseil's "Flags from ../client/chunkctl.cc:"), no other files' flags.
    EXPECT_FALSE(absl::StrContains(h.out, "Flags from")) << h.out;
    EXPECT_FALSE(absl::StrContains(h.out, ".cc")) << h.out;
    EXPECT_FALSE(absl::StrContains(h.out, "--flagfile")) << h.out;
    EXPECT_TRUE(absl::StrContains(h.out, absl::StrCat("\n  ", p.own_flag, " ("))) << h.out;
  }
  CommandResult ctl = RunCommand({testing::kChunkctlBinary, "-h"});
  for (const char* flag : {"-o", "-l", "-v"}) {
    EXPECT_TRUE(absl::StrContains(ctl.out, absl::StrCat("\n  ", flag, " ("))) << flag << ctl.out;
    EXPECT_FALSE(absl::StrContains(ctl.out, absl::StrCat("-", flag, " ("))) << flag << ctl.out;
  }
  // --helpfull still lists every flag by file, relative to the repository.
  CommandResult full = RunCommand({testing::kChunkctlBinary, "--helpfull"});
  EXPECT_TRUE(absl::StrContains(full.out, "Flags from client/chunkctl.cc:")) << full.out;
  EXPECT_FALSE(absl::StrContains(full.out, "../")) << full.out;
}

TEST(CliTest, VersionStatesVersionAndBuild) {
  for (const Program& p : Programs()) {
    CommandResult r = RunCommand({p.binary, "--version"});
    EXPECT_EQ(r.exit_code, 0) << p.name << ": " << r.err;
    EXPECT_EQ(r.out.rfind(absl::StrCat(p.name, " ", CHUNKD_VERSION, "\n"), 0), 0u) << r.out;
    EXPECT_TRUE(absl::StrContains(r.out, ExpectedBuildLine())) << r.out;
    EXPECT_FALSE(absl::StrContains(r.out, "NDEBUG")) << r.out;  // Abseil's own, untrue, line
  }
}

TEST(CliTest, BadFlagsAreOneLineWithTheProgramsName) {
  for (const Program& p : Programs()) {
    CommandResult unknown = RunCommand({p.binary, "--frobnicate=1"});
    EXPECT_EQ(unknown.exit_code, 1) << p.name;
    EXPECT_EQ(unknown.err,
              absl::StrCat(p.name, ": unknown flag --frobnicate (see ", p.name, " --help)\n"));
    EXPECT_EQ(unknown.out, "");
    CommandResult bad_value = RunCommand({p.binary, "--timeout=soon"});
    if (p.name == "chunkd") bad_value = RunCommand({p.binary, "--shutdown_grace=soon"});
    EXPECT_EQ(bad_value.exit_code, 1) << p.name;
    EXPECT_EQ(bad_value.err.rfind(p.name + ": ", 0), 0u) << bad_value.err;
    EXPECT_TRUE(absl::StrContains(bad_value.err, "soon")) << bad_value.err;
    EXPECT_EQ(std::count(bad_value.err.begin(), bad_value.err.end(), '\n'), 1) << bad_value.err;
    CommandResult no_value = RunCommand({p.binary, p.name == "chunkd" ? "--listen" : "--server"});
    EXPECT_EQ(no_value.exit_code, 1) << p.name;
    EXPECT_EQ(no_value.err.rfind(p.name + ": flag --", 0), 0u) << no_value.err;
    CommandResult negated = RunCommand({p.binary, "--nofrobnicate"});
    EXPECT_EQ(negated.exit_code, 1);
    EXPECT_TRUE(absl::StrContains(negated.err, "unknown flag --nofrobnicate")) << negated.err;
  }
}

TEST(CliTest, FlagsParseAsAbseilReadsThem) {
  // A value in the next argument, "-" as an operand, --noBOOL, and "--" ending the flags: none
  // is a bad flag (chunkctl then fails to reach a server that is not there, with exit 1, or
  // complains about its operands).
  CommandResult r = RunCommand({testing::kChunkctlBinary, "--server", "127.0.0.1:1", "--timeout",
                                "1s", "--nov", "--range", "-4", "get", "k"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "cannot reach chunkd at 127.0.0.1:1")) << r.err;
  CommandResult operands =
      RunCommand({testing::kChunkctlBinary, "--server=127.0.0.1:1", "--", "put", "--weird", "-"});
  EXPECT_EQ(operands.exit_code, 1);
  EXPECT_FALSE(absl::StrContains(operands.err, "unknown flag")) << operands.err;
}

}  // namespace
}  // namespace chunkd

// Helpers shared by chunkd's test suites.
#ifndef CHUNKD_TESTS_SUPPORT_TEST_SUPPORT_H_
#define CHUNKD_TESTS_SUPPORT_TEST_SUPPORT_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace chunkd::testing {

// Paths of the binaries under test, from the build.
inline constexpr char kChunkdBinary[] = CHUNKD_BIN;
inline constexpr char kChunkctlBinary[] = CHUNKCTL_BIN;
inline constexpr char kShmReaderBinary[] = SHM_READER_BIN;

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  // Under `base` instead (e.g. /dev/shm, for a shared-memory directory of the test's own).
  explicit TempDir(const std::string& base);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Join(const std::string& relative) const { return path_ + "/" + relative; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& contents);
// The file's contents, or "<missing>" when it cannot be read.
std::string ReadFile(const std::string& path);
bool PathExists(const std::string& path);

// `n` pseudo-random bytes, the same for the same seed.
std::string RandomBytes(size_t n, uint64_t seed);

// A real chunkd process. Start() passes `flags` plus --ready_file and waits until it serves.
class ServerProcess {
 public:
  // `launcher`: a command that runs chunkd (with its arguments) in some other setting, e.g.
  // {"ip", "netns", "exec", "NAME"}; it must exec chunkd in its own process.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      std::vector<std::string> flags, absl::Duration wait = absl::Seconds(20),
      const std::vector<std::string>& launcher = {});
  // Stops the server (SIGTERM, then SIGKILL after a while) if it still runs.
  ~ServerProcess();

  // The first bound address ("127.0.0.1:PORT" or "unix:/path") and all of them.
  const std::string& address() const { return addresses_.front(); }
  const std::vector<std::string>& addresses() const { return addresses_; }
  pid_t pid() const { return pid_; }
  // Everything the server wrote on stderr so far.
  std::string log() const;
  // The port of the metrics endpoint a server started with --metrics_listen=127.0.0.1:0 names
  // in its log; 0 when it names none.
  int metrics_port() const;

  // Sends `signal` and waits for the exit; returns the exit status (128+N when killed by N).
  int Stop(int signal = 15, absl::Duration wait = absl::Seconds(30));

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  std::unique_ptr<TempDir> dir_;
  std::vector<std::string> addresses_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs `argv` to completion with `input` on standard input, capturing its outputs.
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input = "");

// Starts `argv` in the background with standard output going to `out_path`; returns its pid.
pid_t StartProcess(const std::vector<std::string>& argv, const std::string& out_path);

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_SUPPORT_TEST_SUPPORT_H_

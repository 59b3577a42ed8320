// Command-line parsing shared by chunkd and chunkctl.
#ifndef CHUNKD_CLI_FLAGS_H_
#define CHUNKD_CLI_FLAGS_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace chunkd::cli {

// Parses argv's flags as absl::ParseCommandLine does and returns the positional arguments
// (argv[0] first), but answers as the program does everywhere else:
// - an unknown flag, a missing value or a value the flag cannot take is one line
//   "PROGRAM: ..." on stderr, and exit status 1;
// - -h, --help and --helpshort print the usage message and the flags defined in files whose
//   path contains one of `help_files` (one-letter flags shown as -o, no source paths) on stdout
//   and exit 0 (Abseil exits 1); --helpfull, --helpmatch=S and --helpon=FILE print Abseil's
//   listing (by file, paths relative to the repository), also with exit 0;
// - --version prints VersionText(program) and exits 0.
// Call it once, at the start of main, after absl::SetProgramUsageMessage.
std::vector<char*> ParseCommandLine(int argc, char** argv, absl::string_view program,
                                    std::vector<std::string> help_files);

// "PROGRAM VERSION" and a line on the build as compiled: CMake's build type, whether the code is
// optimized, has assertions or sanitizers, and whether the CUDA parts are built in.
std::string VersionText(absl::string_view program);

}  // namespace chunkd::cli

#endif  // CHUNKD_CLI_FLAGS_H_

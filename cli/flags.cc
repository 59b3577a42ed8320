#include "cli/flags.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/internal/parse.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/version.h"

namespace chunkd::cli {
namespace {

// Abseil's usage flags are not registered flags (FindCommandLineFlag does not know them).
bool IsUsageFlag(absl::string_view name) {
  for (absl::string_view usage : {"help", "helpfull", "helpshort", "helppackage", "helpon",
                                  "helpmatch", "version", "only_check_args"}) {
    if (name == usage) return true;
  }
  return false;
}

[[noreturn]] void Fail(absl::string_view program, const std::string& problem) {
  std::fprintf(stderr, "%.*s: %s (see %.*s --help)\n", static_cast<int>(program.size()),
               program.data(), problem.c_str(), static_cast<int>(program.size()), program.data());
  std::exit(1);
}

// Checks every flag on the command line the way Abseil's parser will read it (--name=value,
// --name value for non-booleans, --noname for booleans, one or two dashes, "--" ends the
// flags), so that Abseil's own parse finds nothing to complain about: its complaints are
// "ERROR: ..." lines that do not name the program. Values are parsed into their flags here;
// Abseil's parse then sets the same values again.
void CheckFlags(int argc, char** argv, absl::string_view program) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;  // a positional argument, or "-" (stdin)
    absl::string_view spec = arg.substr(arg[1] == '-' ? 2 : 1);
    size_t eq = spec.find('=');
    absl::string_view name = spec.substr(0, eq);
    bool has_value = eq != absl::string_view::npos;
    absl::string_view value = has_value ? spec.substr(eq + 1) : absl::string_view();
    if (IsUsageFlag(name) || name.empty()) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::StartsWith(name, "no")) {
      absl::CommandLineFlag* negated = absl::FindCommandLineFlag(name.substr(2));
      if (negated != nullptr && negated->IsOfType<bool>()) {
        if (has_value) Fail(program, absl::StrCat("--", name, " takes no value"));
        continue;
      }
    }
    if (flag == nullptr) Fail(program, absl::StrCat("unknown flag --", name));
    if (flag->IsOfType<bool>()) {
      if (!has_value) continue;
      if (value.empty()) Fail(program, absl::StrCat("flag --", name, "= needs true or false"));
    } else if (!has_value) {
      if (i + 1 >= argc) Fail(program, absl::StrCat("flag --", name, " needs a value"));
      value = argv[++i];
    }
    // Abseil expands these itself (their flags are read there, and complained about there).
    if (name == "flagfile" || name == "fromenv" || name == "tryfromenv") continue;
    std::string error;
    if (!flag->ParseFrom(value, &error)) Fail(program, error);
  }
}

// The requests for the short help: -h (which Abseil does not know), --help, --helpshort, with
// one dash or two, before any "--".
bool WantsHelp(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") return false;
    if (arg == "-h" || arg == "--h" || arg == "-help" || arg == "--help" || arg == "-helpshort" ||
        arg == "--helpshort") {
      return true;
    }
  }
  return false;
}

bool InHelpFiles(absl::string_view path, const std::vector<std::string>& help_files) {
  for (const std::string& file : help_files) {
    if (absl::StrContains(path, file)) return true;
  }
  return false;
}

// Appends `text` to `out` in lines of at most kWidth columns, each continuation line indented.
void Wrap(absl::string_view text, std::string* out) {
  constexpr size_t kWidth = 80;
  constexpr absl::string_view kIndent = "      ";
  size_t column = out->size() - std::min(out->size(), out->rfind('\n') + 1);
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (column > kIndent.size() && column + 1 + word.size() > kWidth) {
      absl::StrAppend(out, "\n", kIndent);
      column = kIndent.size();
    } else if (column > 0 && out->back() != ' ') {
      out->push_back(' ');
      ++column;
    }
    absl::StrAppend(out, word);
    column += word.size();
  }
}

// --help and -h: the usage message, then the program's own flags (those defined in
// `help_files`) by name, each as the README writes it (one dash for a one-letter flag: -o),
// with its help and default. No source paths: --helpfull lists every flag, by file.
void PrintHelp(std::ostream& out, absl::string_view program,
               const std::vector<std::string>& help_files) {
  std::vector<absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!flag->IsRetired() && InHelpFiles(flag->Filename(), help_files)) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(), [](absl::CommandLineFlag* a, absl::CommandLineFlag* b) {
    return a->Name() < b->Name();
  });
  // As Abseil prints it ("PROGRAM: MESSAGE"); the messages end in their own "Flags:" header.
  absl::string_view message = absl::StripTrailingAsciiWhitespace(absl::ProgramUsageMessage());
  std::string text = absl::StrCat(program, ": ", message);
  absl::StrAppend(&text, absl::EndsWith(message, "Flags:") ? "\n" : "\n\nFlags:\n");
  for (absl::CommandLineFlag* flag : flags) {
    std::string line = absl::StrCat("  ", flag->Name().size() == 1 ? "-" : "--", flag->Name());
    std::string value = flag->DefaultValue();
    if (flag->IsOfType<std::string>()) value = absl::StrCat("\"", value, "\"");
    Wrap(absl::StrCat("(", flag->Help(), "); default: ", value, ";"), &line);
    absl::StrAppend(&text, line, "\n");
  }
  absl::StrAppend(&text,
                  "\nOne-letter flags take one dash or two (-o FILE, --o=FILE). --helpfull lists\n"
                  "every flag, --version the build.\n");
  out << text;
}

}  // namespace

std::vector<char*> ParseCommandLine(int argc, char** argv, absl::string_view program,
                                    std::vector<std::string> help_files) {
  absl::FlagsUsageConfig config;
  const std::vector<std::string> help_files_copy = help_files;
  config.contains_help_flags = [help_files = std::move(help_files)](absl::string_view path) {
    return InHelpFiles(path, help_files);
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  config.version_string = [program = std::string(program)] { return VersionText(program); };
  // --helpfull names each flag's file: relative to the repository, whatever the build's paths.
  config.normalize_filename = [](absl::string_view path) {
    while (absl::ConsumePrefix(&path, "../") || absl::ConsumePrefix(&path, "./")) {
    }
    return std::string(path);
  };
  absl::SetFlagsUsageConfig(config);

  if (WantsHelp(argc, argv)) {
    PrintHelp(std::cout, program, help_files_copy);
    std::cout.flush();
    std::exit(0);
  }
  CheckFlags(argc, argv, program);
  // Abseil's public ParseCommandLine exits 1 after --help; its implementation with the usage
  // flags left to the caller lets help exit 0, as a request that succeeded.
  std::vector<char*> positional = absl::flags_internal::ParseCommandLineImpl(
      argc, argv, absl::flags_internal::ArgvListAction::kRemoveParsedArgs,
      absl::flags_internal::UsageFlagsAction::kIgnoreUsage,
      absl::flags_internal::OnUndefinedFlag::kAbortIfUndefined);
  if (absl::flags_internal::HandleUsageFlags(std::cout, absl::ProgramUsageMessage()) != -1) {
    std::cout.flush();
    std::exit(0);
  }
  return positional;
}

std::string VersionText(absl::string_view program) {
  std::vector<std::string> traits;
#ifdef __OPTIMIZE__
  traits.push_back("optimized");
#else
  traits.push_back("not optimized");
#endif
#ifdef NDEBUG
  traits.push_back("assertions off");
#else
  traits.push_back("assertions on");
#endif
#ifdef __SANITIZE_ADDRESS__
  traits.push_back("AddressSanitizer");
#endif
#ifdef __SANITIZE_THREAD__
  traits.push_back("ThreadSanitizer");
#endif
  return absl::StrCat(program, " ", CHUNKD_VERSION, "\nbuild: ", CHUNKD_BUILD_TYPE, " (",
                      absl::StrJoin(traits, ", "), "), CUDA ",
                      CHUNKD_VERSION_HAVE_CUDA ? "built in" : "not built in", "\n");
}

}  // namespace chunkd::cli

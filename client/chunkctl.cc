// chunkctl: the command-line client of chunkd.
//
// Exit status: 0 on success, 2 when the key is not found, 1 on any other error (with a
// one-line message on stderr).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "cli/flags.h"
#include "client/client.h"
#include "client/credentials.h"
#include "client/health.h"
#include "client/sharded_client.h"

ABSL_FLAG(std::string, server, "127.0.0.1:7878",
          "Address of the chunkd server: HOST:PORT or unix:/path/to/socket; a comma-separated "
          "list of them for a pool, each key going to one server (rendezvous hashing). The "
          "CHUNKD_SERVER "
          "environment variable sets it too; this flag wins.");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(60), "Deadline of the command's call.");
ABSL_FLAG(std::string, o, "",
          "get: write the value to this file instead of standard output; with several keys, "
          "the directory to write DIR/KEY files to.");
ABSL_FLAG(std::string, range, "",
          "get: only these bytes. START-END (END exclusive, as Zarr's RangeByteRequest), START- "
          "(from START to the end) or -N (the last N bytes; write it --range=-N).");
ABSL_FLAG(bool, dir, false,
          "ls: only the immediate children of PREFIX ('/' separates levels); deeper levels are "
          "shown once, as PREFIX/NAME/.");
ABSL_FLAG(bool, l, false, "ls: show sizes.");
ABSL_FLAG(std::string, delivery, "inline",
          "get: how the bytes should arrive: inline (over the connection), shm (a shared-memory "
          "handle, when the server runs on this host and shares --shm_dir; otherwise inline) or "
          "cuda (a CUDA IPC handle to GPU memory of the server's device tier, when the server "
          "runs on this host with --device_cache_bytes and has this process's --cuda_device; "
          "otherwise inline; the bytes are copied to the host to be written out). -v shows which "
          "one was used.");
ABSL_FLAG(int32_t, cuda_device, 0,
          "get --delivery=cuda: the GPU (ordinal in this process) to receive the chunk on.");
ABSL_FLAG(std::string, shm_dir, "/dev/shm",
          "get --delivery=shm: where this host's shared-memory segments are (the server's "
          "--shm_dir as seen from here).");
ABSL_FLAG(std::string, max_staleness, "",
          "get/cat: serve a cached value only if the server's store confirmed it at most this "
          "long ago (0: validate now; a duration such as 5s). Empty: the server's policy.");
ABSL_FLAG(bool, v, false, "Say more: the delivery used, generation and timing of a get/put.");
ABSL_FLAG(std::string, if_generation_match, "",
          "put, rm, get: only if the stored generation is this (0: put only if the key is new).");
ABSL_FLAG(std::string, tls_ca, "",
          "Use TLS (HOST:PORT servers; unix: sockets stay plaintext), trusting the server "
          "certificates this PEM file's CA signed.");
ABSL_FLAG(bool, tls, false, "Use TLS, trusting the system's CAs (with no --tls_ca).");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM file with this client's certificate, for servers that require one "
          "(chunkd --tls_client_ca). Needs --tls_key.");
ABSL_FLAG(std::string, tls_key, "", "PEM file with the private key of --tls_cert.");
ABSL_FLAG(std::string, tls_server_name, "",
          "The name the server's certificate must hold, when not the host in --server.");
ABSL_FLAG(std::string, token, "",
          "Bearer token for servers started with --auth_tokens. The CHUNKD_TOKEN environment "
          "variable sets it too, and keeps it out of the process list; this flag wins.");
ABSL_FLAG(std::string, token_file, "",
          "Read the bearer token from this file (its first line) instead.");

namespace {

using chunkd::client::Client;

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitNotFound = 2;

// The server address, for messages.
std::string g_server;

int Report(const absl::Status& status) {
  std::string message(status.message());
  if (absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status)) {
    message = absl::StrCat("cannot reach chunkd at ", g_server, ": ", message);
  }
  std::fprintf(stderr, "chunkctl: %s\n",
               message.empty() ? status.ToString().c_str() : message.c_str());
  return absl::IsNotFound(status) ? kExitNotFound : kExitError;
}

// A local file that cannot be read or written: exit 1, like any error but a missing key, and
// no "cannot reach chunkd" (which Report adds to UNAVAILABLE).
absl::Status LocalFileError(absl::string_view what, const std::string& path) {
  return absl::FailedPreconditionError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

int Usage(const std::string& problem) {
  std::fprintf(stderr, "chunkctl: %s (see chunkctl --help)\n", problem.c_str());
  return kExitError;
}

absl::Status WriteAll(int fd, const std::byte* data, size_t size, const std::string& path) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return LocalFileError("cannot write", path);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Reads a whole file ("-": standard input) into a buffer.
absl::StatusOr<chunkd::buffer::cpu::Buffer> ReadInput(const std::string& path) {
  int fd = path == "-" ? STDIN_FILENO : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return LocalFileError("cannot open", path);
  struct stat st;
  std::string bytes;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) bytes.reserve(st.st_size);
  char chunk[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      absl::Status error = LocalFileError("cannot read", path);
      if (fd != STDIN_FILENO) ::close(fd);
      return error;
    }
    if (n == 0) break;
    bytes.append(chunk, static_cast<size_t>(n));
  }
  if (fd != STDIN_FILENO) ::close(fd);
  return chunkd::buffer::cpu::Buffer::CopyOf(bytes);
}

absl::StatusOr<chunkd::client::Conditions> ConditionsFromFlags() {
  chunkd::client::Conditions conditions;
  std::string match = absl::GetFlag(FLAGS_if_generation_match);
  if (!match.empty()) {
    uint64_t generation;
    if (!absl::SimpleAtoi(match, &generation)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--if_generation_match=", match, " is not a generation number"));
    }
    conditions.if_generation_match = generation;
  }
  return conditions;
}

// Writes `data` to the file at `path`, or to standard output for "" or "-".
absl::Status WriteOut(const std::string& path, const chunkd::buffer::cpu::Buffer& data) {
  int fd = STDOUT_FILENO;
  if (!path.empty() && path != "-") {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return LocalFileError("cannot write", path);
  }
  absl::Status written =
      WriteAll(fd, data.data(), data.size(), fd == STDOUT_FILENO ? "standard output" : path);
  if (fd != STDOUT_FILENO && ::close(fd) != 0 && written.ok()) {
    written = LocalFileError("cannot write", path);
  }
  return written;
}

// Several keys: one GetMany call per 4096 of them, each value written to DIR/KEY. Every key is
// tried; the exit status is the worst outcome (not found: 2, another error: 1).
int GetMany(Client& client, const std::vector<std::string>& keys) {
  const std::string dir = absl::GetFlag(FLAGS_o);
  if (dir.empty() || dir == "-") {
    return Usage("get of several keys writes one file per key: give -o DIR");
  }
  if (!absl::GetFlag(FLAGS_range).empty() || !absl::GetFlag(FLAGS_if_generation_match).empty()) {
    return Usage("--range and --if_generation_match are for a get of one key");
  }
  int exit_code = kExitOk;
  const auto failed = [&](const std::string& key, const absl::Status& status) {
    std::fprintf(stderr, "chunkctl: %s: %s\n", key.c_str(), std::string(status.message()).c_str());
    if (absl::IsNotFound(status) && exit_code == kExitOk) {
      exit_code = kExitNotFound;
    } else if (!absl::IsNotFound(status)) {
      exit_code = kExitError;
    }
  };
  constexpr size_t kPerCall = 4096;
  for (size_t first = 0; first < keys.size(); first += kPerCall) {
    std::vector<chunkd::client::GetManyItem> items;
    for (size_t i = first; i < std::min(keys.size(), first + kPerCall); ++i) {
      items.push_back({keys[i], {}, {}});
    }
    absl::Time start = absl::Now();
    auto results = client.GetMany(items);
    if (!results.ok()) return Report(results.status());
    absl::Duration took = absl::Now() - start;
    for (size_t j = 0; j < items.size(); ++j) {
      const std::string& key = items[j].key;
      const auto& r = (*results)[j];
      if (!r.ok()) {
        failed(key, r.status());
        continue;
      }
      // The server refused keys with "..", empty segments or a leading "/": the path stays in
      // DIR.
      std::string path = absl::StrCat(dir, "/", key);
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
      if (absl::Status s = WriteOut(path, r->data); !s.ok()) {
        failed(key, s);
        continue;
      }
      if (absl::GetFlag(FLAGS_v)) {
        std::fprintf(stderr, "chunkctl: %s: %zu bytes to %s, generation %llu, delivery %s\n",
                     key.c_str(), r->data.size(), path.c_str(),
                     static_cast<unsigned long long>(r->generation),
                     chunkd::v1::Delivery_Name(r->delivery).c_str());
      }
    }
    if (absl::GetFlag(FLAGS_v)) {
      std::fprintf(stderr, "chunkctl: %zu keys in one GetMany, %s\n", items.size(),
                   absl::FormatDuration(took).c_str());
    }
  }
  return exit_code;
}

int Get(Client& client, const std::string& key) {
  chunkd::client::GetOptions options;
  if (std::string range = absl::GetFlag(FLAGS_range); !range.empty()) {
    auto parsed = chunkd::client::ByteRange::Parse(range);
    if (!parsed.ok()) return Report(parsed.status());
    options.range = *parsed;
  }
  auto conditions = ConditionsFromFlags();
  if (!conditions.ok()) return Report(conditions.status());
  options.conditions = *conditions;
  absl::Time start = absl::Now();
  auto result = client.Get(key, options);
  if (!result.ok()) return Report(result.status());
  absl::Duration took = absl::Now() - start;
  if (result->device_data) {
    // CUDA IPC: the bytes are in GPU memory; copy them to the host to write them out.
    auto host = result->device_data->to_cpu();
    if (!host.ok()) return Report(host.status());
    result->data = *std::move(host);
  }
  if (absl::Status written = WriteOut(absl::GetFlag(FLAGS_o), result->data); !written.ok()) {
    return Report(written);
  }
  if (absl::GetFlag(FLAGS_v)) {
    std::fprintf(
        stderr,
        "chunkctl: %s: %zu bytes at offset %llu of %llu, generation %llu, delivery %s, "
        "%s\n",
        key.c_str(), result->data.size(), static_cast<unsigned long long>(result->range_start),
        static_cast<unsigned long long>(result->total_size),
        static_cast<unsigned long long>(result->generation),
        chunkd::v1::Delivery_Name(result->delivery).c_str(), absl::FormatDuration(took).c_str());
  }
  return kExitOk;
}

int Put(Client& client, const std::string& key, const std::string& path) {
  auto value = ReadInput(path);
  if (!value.ok()) return Report(value.status());
  auto conditions = ConditionsFromFlags();
  if (!conditions.ok()) return Report(conditions.status());
  absl::Time start = absl::Now();
  auto result = client.Put(key, *value, *conditions);
  if (!result.ok()) return Report(result.status());
  if (absl::GetFlag(FLAGS_v)) {
    std::fprintf(stderr, "chunkctl: %s: stored %llu bytes, generation %llu, %s\n", key.c_str(),
                 static_cast<unsigned long long>(result->size),
                 static_cast<unsigned long long>(result->generation),
                 absl::FormatDuration(absl::Now() - start).c_str());
  }
  return kExitOk;
}

int Remove(Client& client, const std::string& key) {
  auto conditions = ConditionsFromFlags();
  if (!conditions.ok()) return Report(conditions.status());
  absl::Status s = client.Delete(key, *conditions);
  return s.ok() ? kExitOk : Report(s);
}

int List(Client& client, const std::string& prefix) {
  auto result = client.List(prefix, absl::GetFlag(FLAGS_dir));
  if (!result.ok()) return Report(result.status());
  bool sizes = absl::GetFlag(FLAGS_l);
  // Entries and prefixes merged in order, as a directory listing reads.
  size_t e = 0, p = 0;
  while (e < result->entries.size() || p < result->prefixes.size()) {
    bool take_prefix =
        e == result->entries.size() ||
        (p < result->prefixes.size() && result->prefixes[p] < result->entries[e].key);
    if (take_prefix) {
      std::printf(sizes ? "%12s  %s\n" : "%s%s\n", sizes ? "-" : "", result->prefixes[p++].c_str());
    } else if (sizes) {
      std::printf("%12llu  %s\n", static_cast<unsigned long long>(result->entries[e].size),
                  result->entries[e].key.c_str());
      ++e;
    } else {
      std::printf("%s\n", result->entries[e++].key.c_str());
    }
  }
  return kExitOk;
}

int Stat(Client& client, const std::string& key) {
  auto result = client.Stat(key);
  if (!result.ok()) return Report(result.status());
  if (!result->exists) {
    return Report(absl::NotFoundError(absl::StrCat("key \"", key, "\" not found")));
  }
  std::printf("key: %s\nsize: %llu\ngeneration: %llu\n", key.c_str(),
              static_cast<unsigned long long>(result->size),
              static_cast<unsigned long long>(result->generation));
  return kExitOk;
}

int Info(Client& client) {
  auto info = client.ServerInfo();
  if (!info.ok()) return Report(info.status());
  std::printf("version: %s\nbackend: %s\nstore: %s\nread_only: %s\nmax_value_bytes: %llu\n",
              info->version().c_str(), info->backend().c_str(), info->store().c_str(),
              info->read_only() ? "true" : "false",
              static_cast<unsigned long long>(info->max_value_bytes()));
  for (const auto& tier : info->tiers()) {
    std::printf("tier %s: %llu of %llu bytes used, %llu entries\n", tier.tier().c_str(),
                static_cast<unsigned long long>(tier.used_bytes()),
                static_cast<unsigned long long>(tier.capacity_bytes()),
                static_cast<unsigned long long>(tier.entries()));
    // What leases on handles pin, and its caps (0: none). Nothing is leased out of the disk;
    // derived entries' leases count in the host tier's line (one cap over host memory).
    if (tier.tier() == "disk" || tier.tier() == "derived") continue;
    std::printf(
        "tier %s pinned: %llu bytes by %llu clients, cap %llu, per client %llu, "
        "refused at the cap %llu, at the per-client cap %llu\n",
        tier.tier().c_str(), static_cast<unsigned long long>(tier.pinned_bytes()),
        static_cast<unsigned long long>(tier.pinning_clients()),
        static_cast<unsigned long long>(tier.max_pinned_bytes()),
        static_cast<unsigned long long>(tier.max_client_pinned_bytes()),
        static_cast<unsigned long long>(tier.pin_refusals_total_cap()),
        static_cast<unsigned long long>(tier.pin_refusals_client_cap()));
  }
  std::string deliveries;
  for (int d : info->deliveries()) {
    absl::StrAppend(&deliveries, deliveries.empty() ? "" : " ",
                    chunkd::v1::Delivery_Name(static_cast<chunkd::v1::Delivery>(d)));
  }
  std::printf("deliveries: %s\n", deliveries.c_str());
  std::string features;
  for (const auto& f : info->features()) absl::StrAppend(&features, features.empty() ? "" : " ", f);
  std::printf("features: %s\n", features.c_str());
  std::vector<std::pair<std::string, uint64_t>> counters(info->counters().begin(),
                                                         info->counters().end());
  std::sort(counters.begin(), counters.end());
  for (const auto& [name, value] : counters) {
    std::printf("counter %s: %llu\n", name.c_str(), static_cast<unsigned long long>(value));
  }
  return kExitOk;
}

// The standard health check: what probes should call, since it needs no token.
int Health(const chunkd::client::ClientOptions& options) {
  auto status = chunkd::client::CheckHealth(options, absl::GetFlag(FLAGS_timeout));
  if (!status.ok()) return Report(status.status());
  std::printf("%s\n", status->c_str());
  return *status == "SERVING" ? kExitOk : kExitError;
}

}  // namespace

int main(int argc, char** argv) {
  chunkd::client::InitProcess();  // first, before gRPC starts (client.h)
  absl::SetProgramUsageMessage(
      "the command-line client of chunkd.\n\n"
      "  chunkctl [--server=ADDR] get KEY [-o FILE] [--range=START-END|START-|-N] [-v]\n"
      "  chunkctl [--server=ADDR] get KEY KEY... -o DIR   (one GetMany; writes DIR/KEY each)\n"
      "  chunkctl [--server=ADDR] put KEY FILE|-      (- reads standard input)\n"
      "  chunkctl [--server=ADDR] rm KEY\n"
      "  chunkctl [--server=ADDR] ls [PREFIX] [--dir] [-l]\n"
      "  chunkctl [--server=ADDR] stat KEY\n"
      "  chunkctl [--server=ADDR] info\n"
      "  chunkctl [--server=ADDR] health      (gRPC health check; needs no token)\n\n"
      "ADDR is HOST:PORT (default 127.0.0.1:7878) or unix:/path/to/socket.\n"
      "Exit status: 0 success, 2 key not found, 1 any other error.\n\nFlags:");
  std::vector<char*> args =
      chunkd::cli::ParseCommandLine(argc, argv, "chunkctl", {"client/chunkctl.cc"});
  if (args.size() < 2) return Usage("no command given");
  std::string command = args[1];
  std::vector<std::string> operands(args.begin() + 2, args.end());

  chunkd::client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_server);
  if (const char* env = std::getenv("CHUNKD_SERVER");
      env != nullptr && *env != '\0' && options.address == "127.0.0.1:7878") {
    options.address = env;
  }
  options.timeout = absl::GetFlag(FLAGS_timeout);
  g_server = options.address;
  options.shm_dir = absl::GetFlag(FLAGS_shm_dir);
  if (absl::Status s = chunkd::client::ApplySecurityFlags(
          {.tls_ca = absl::GetFlag(FLAGS_tls_ca),
           .tls = absl::GetFlag(FLAGS_tls),
           .tls_cert = absl::GetFlag(FLAGS_tls_cert),
           .tls_key = absl::GetFlag(FLAGS_tls_key),
           .tls_server_name = absl::GetFlag(FLAGS_tls_server_name),
           .token = absl::GetFlag(FLAGS_token),
           .token_file = absl::GetFlag(FLAGS_token_file)},
          &options);
      !s.ok()) {
    return Report(s);
  }
  if (std::string delivery = absl::GetFlag(FLAGS_delivery); delivery == "shm") {
    options.accept = {chunkd::v1::DELIVERY_SHM, chunkd::v1::DELIVERY_INLINE};
  } else if (delivery == "cuda") {
    // Connect fails with "no CUDA device: ..." when this process has no such GPU.
    options.accept = {chunkd::v1::DELIVERY_CUDA_IPC, chunkd::v1::DELIVERY_INLINE};
    options.cuda_device = absl::GetFlag(FLAGS_cuda_device);
  } else if (delivery != "inline") {
    return Usage(absl::StrCat("--delivery=", delivery, " is not inline, shm or cuda"));
  }
  if (std::string staleness = absl::GetFlag(FLAGS_max_staleness); !staleness.empty()) {
    absl::Duration d;
    if (!absl::ParseDuration(staleness, &d) || d < absl::ZeroDuration()) {
      return Usage(absl::StrCat("--max_staleness=", staleness, " is not a duration of 0 or more"));
    }
    options.max_staleness = d;
  }
  absl::StatusOr<std::unique_ptr<Client>> client;
  if (absl::StrContains(options.address, ',')) {
    // A pool of servers: each key goes to one of them (client/sharded_client.h).
    chunkd::client::ShardedClientOptions pool;
    pool.servers = chunkd::client::SplitServerList(options.address);
    pool.client = options;
    auto sharded = chunkd::client::ShardedClient::Connect(pool);
    if (!sharded.ok()) return Report(sharded.status());
    client = std::unique_ptr<Client>(*std::move(sharded));
  } else {
    client = Client::Connect(options);
  }
  if (!client.ok()) return Report(client.status());

  const auto need = [&](size_t n, const char* form) -> bool {
    if (operands.size() == n) return true;
    Usage(absl::StrCat("usage: chunkctl ", command, " ", form));
    return false;
  };
  if (command == "get") {
    if (operands.empty()) return Usage("usage: chunkctl get KEY [-o FILE] | get KEY KEY... -o DIR");
    return operands.size() == 1 ? Get(**client, operands[0]) : GetMany(**client, operands);
  }
  if (command == "put")
    return need(2, "KEY FILE|-") ? Put(**client, operands[0], operands[1]) : kExitError;
  if (command == "rm") return need(1, "KEY") ? Remove(**client, operands[0]) : kExitError;
  if (command == "stat") return need(1, "KEY") ? Stat(**client, operands[0]) : kExitError;
  if (command == "info") return need(0, "") ? Info(**client) : kExitError;
  if (command == "health") return need(0, "") ? Health(options) : kExitError;
  if (command == "ls") {
    if (operands.size() > 1) return Usage("usage: chunkctl ls [PREFIX] [--dir] [-l]");
    return List(**client, operands.empty() ? "" : operands[0]);
  }
  return Usage(absl::StrCat("unknown command '", command, "'"));
}

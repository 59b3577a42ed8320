// chunkd: serves chunk buffers from a cache in front of a store, over gRPC.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/marshalling.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cli/flags.h"
#include "server/common/byte_size.h"
#include "server/common/log.h"
#include "server/daemon/metrics.h"
#include "server/daemon/security_flags.h"
#include "server/daemon/server.h"
#include "server/rpc/auth.h"
#include "server/rpc/security.h"
#include "server/store/prefetch.h"

using chunkd::server::ByteSize;

ABSL_FLAG(std::string, listen, "127.0.0.1:7878",
          "Comma-separated addresses to serve on: HOST:PORT (port 0 picks a free port), "
          "[::1]:PORT, or unix:/path/to/socket. Loopback by default; before serving other hosts, "
          "see --tls_cert and --auth_tokens (docs/security.md).");
ABSL_FLAG(std::string, store, "chunkd-data",
          "Where values are stored: a directory (or file:///path) in Zarr's layout, or memory:// "
          "for a store that lives only in memory (bounded by --host_cache_bytes), or "
          "s3://BUCKET/PREFIX (see --s3_*), or http(s)://HOST/PATH (read-only; see --http_*). The "
          "default directory is created in the working directory if missing.");
ABSL_FLAG(ByteSize, host_cache_bytes, ByteSize{1ull << 30},
          "Budget of the host cache (for memory://, of the store itself). Units: KiB, MiB, GiB "
          "(powers of 1024) or kB, MB, GB.");
ABSL_FLAG(std::string, disk_cache_dir, "",
          "A directory on a local disk (NVMe) for a disk tier below the host cache: values and "
          "blocks read from the store are written there behind the read (crc32c-checked, "
          "bounded by --disk_cache_bytes) and served from there after they leave memory and "
          "after a restart (revalidated with conditional requests, not read again). For remote "
          "stores only (s3://, http(s)://): the file store is already on a local disk, whose "
          "page cache does this job. Empty: off. See docs/disk-tier.md.");
ABSL_FLAG(ByteSize, disk_cache_bytes, ByteSize{0},
          "Budget of the disk tier (required with --disk_cache_dir): its files never hold more. "
          "Units as --host_cache_bytes.");
ABSL_FLAG(double, derived_cache_fraction, 0.25,
          "Share of --host_cache_bytes kept for derived entries (values clients derive from "
          "stored ones and publish for the node, such as decoded Zarr chunks), carved out of "
          "the host cache: the two together stay within --host_cache_bytes. 0: no derived "
          "entries (derived reads fail with FAILED_PRECONDITION).");
ABSL_FLAG(absl::Duration, derived_produce_timeout, absl::Seconds(30),
          "How long a reader told to produce a derived entry has to publish it before a "
          "waiting reader takes the production over.");
ABSL_FLAG(int64_t, derived_wait_ms, 10000,
          "How long a derived read waits for another reader's production when it names no "
          "wait of its own (DerivedRead.wait_ms), in milliseconds.");
ABSL_FLAG(int32_t, derived_max_waiters, 4096,
          "Derived reads waiting for productions at once; past it a miss that would wait is "
          "answered at once with RESOURCE_EXHAUSTED.");
ABSL_FLAG(ByteSize, max_value_bytes, ByteSize{256ull << 20},
          "Largest value a Put may store; larger ones are refused with RESOURCE_EXHAUSTED before "
          "any byte is buffered.");
ABSL_FLAG(bool, read_only, false, "Refuse every write and delete (PERMISSION_DENIED).");
ABSL_FLAG(std::string, eviction, "s3fifo",
          "Eviction policy of the host cache: s3fifo (scan-resistant, lock-free hits) or lru.");
ABSL_FLAG(double, cache_max_entry_fraction, 0.25,
          "No cache entry is larger than this fraction of the cache budget: larger values are "
          "read and cached by the block (--block_bytes), so one huge value cannot flush the "
          "cache.");
ABSL_FLAG(ByteSize, block_bytes, ByteSize{256ull << 10},
          "Unit of caching for byte ranges and large values: a range read of a value not cached "
          "whole reads from the store only the aligned blocks it covers (a 256 KiB Zarr inner "
          "chunk costs one or two blocks, not its 16 MiB shard). Values read whole up to "
          "--read_ahead_blocks x --block_bytes are one entry.");
ABSL_FLAG(int32_t, read_ahead_blocks, 128,
          "Blocks fetched ahead of a reader walking a value sequentially, in parallel; times "
          "--block_bytes, also the largest value read whole in one request (32 MiB by default: a "
          "16 MiB Zarr shard with its index is one entry).");
ABSL_FLAG(ByteSize, read_budget_bytes, ByteSize{256ull << 20},
          "Memory that reads in flight may hold outside the cache (a range joined from several "
          "blocks, waiting for a slow client); past it a read fails with RESOURCE_EXHAUSTED "
          "instead of growing memory.");
ABSL_FLAG(int32_t, io_threads, 0,
          "Threads that do backend I/O (file reads, writes, listings, requests to S3/HTTP). 0: "
          "8 for a local store, 64 for a remote one (its threads mostly wait a round trip, and "
          "more of them in flight is what hides it).");
ABSL_FLAG(int32_t, rpc_threads, 0,
          "Threads that run gRPC calls, each polling its own completion queue and handling the "
          "calls it receives without handing them to another thread (0: half the cores, 1 to "
          "8). One is fastest for small values; more spread large transfers over cores.");
ABSL_FLAG(bool, reflection, false,
          "Serve gRPC server reflection (for grpcurl without the .proto). Off by default: it "
          "runs on gRPC's synchronous threads, which slow every other call.");
ABSL_FLAG(int32_t, max_queued_io, 4096,
          "Backend operations that may wait for an I/O thread; past this, requests fail fast with "
          "UNAVAILABLE instead of queueing without bound.");
ABSL_FLAG(ByteSize, part_bytes, ByteSize{1ull << 20},
          "Size of the data parts of a Get reply (at most 1 MiB).");
ABSL_FLAG(ByteSize, max_inflight_put_bytes, ByteSize{1ull << 30},
          "Bytes of Put values being received at once, all clients together; past it new Puts "
          "fail with RESOURCE_EXHAUSTED.");
ABSL_FLAG(bool, fsync, true,
          "fsync files and directories on every write (file store). Turn off only for scratch "
          "data: a crash can then lose acknowledged writes.");
ABSL_FLAG(std::string, revalidate_after, "",
          "How long a cached value is served before it is validated against the store again "
          "(a duration: 0, 500ms, 60s, inf). Empty: the store's default: 0 for the file store "
          "(every read checks the file with one stat), 60s for s3:// and http:// (one "
          "conditional request, If-None-Match, per key per interval). Keys named by "
          "--always_revalidate_names and under --immutable_prefixes have their own rules; a "
          "request's max_staleness overrides this.");
ABSL_FLAG(std::vector<std::string>, always_revalidate_names,
          std::vector<std::string>({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}),
          "Keys whose last segment is one of these (Zarr metadata by default) are validated on "
          "every read, whatever --revalidate_after says.");
ABSL_FLAG(std::vector<std::string>, immutable_prefixes, {},
          "Key prefixes whose values are never replaced (snapshot stores, content-addressed "
          "chunks: e.g. icechunk's chunks/): their cached values are never validated, even when "
          "a request asks for a maximum staleness.");
ABSL_FLAG(std::string, s3_endpoint, "",
          "S3 store (--store=s3://BUCKET/PREFIX): base URL of the S3 API of an S3-compatible "
          "store (http://127.0.0.1:9000 for MinIO or moto). Empty: AWS, "
          "https://s3.REGION.amazonaws.com. Credentials come from AWS_ACCESS_KEY_ID / "
          "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or ~/.aws/credentials.");
ABSL_FLAG(std::string, s3_region, "us-east-1", "S3 store: the region requests are signed for.");
ABSL_FLAG(std::string, s3_addressing, "auto",
          "S3 store: path (ENDPOINT/BUCKET/KEY), virtual (BUCKET.HOST/KEY) or auto (path for "
          "--s3_endpoint, virtual-hosted for AWS).");
ABSL_FLAG(std::string, s3_profile, "",
          "S3 store: profile of the credentials file (empty: $AWS_PROFILE, else default).");
ABSL_FLAG(ByteSize, s3_multipart_threshold, ByteSize{64ull << 20},
          "S3 store: values larger than this are uploaded in parts (multipart upload).");
ABSL_FLAG(ByteSize, s3_multipart_part_size, ByteSize{16ull << 20},
          "S3 store: size of the parts of a multipart upload (at least 5MiB).");
ABSL_FLAG(absl::Duration, http_connect_timeout, absl::Seconds(10),
          "http(s):// and s3:// stores: limit of establishing a connection.");
ABSL_FLAG(absl::Duration, http_timeout, absl::Seconds(120),
          "http(s):// and s3:// stores: limit of one request attempt, transfer included.");
ABSL_FLAG(absl::Duration, http_stall_timeout, absl::Seconds(20),
          "http(s):// and s3:// stores: an attempt that moves no byte for this long is given up.");
ABSL_FLAG(int32_t, http_max_attempts, 4,
          "http(s):// and s3:// stores: attempts of a request that fails with a connection error, "
          "a timeout, a truncated body or a 5xx answer (with exponential backoff); then the "
          "request fails with UNAVAILABLE.");
ABSL_FLAG(bool, shm, true,
          "Shared-memory delivery: keep chunks in segments under --shm_dir and give colocated "
          "clients that ask for it (chunkctl --delivery=shm) a handle and a lease instead of the "
          "bytes. Off, or when the directory is unusable, chunks are served inline only.");
ABSL_FLAG(std::string, shm_dir, "/dev/shm",
          "Directory for shared-memory segments (a tmpfs: /dev/shm, or a memory-backed volume "
          "shared with client containers).");
ABSL_FLAG(ByteSize, shm_segment_bytes, ByteSize{1ull << 30},
          "Address space of each shared-memory segment; memory is used only as chunks are.");
ABSL_FLAG(std::string, shm_mode, "0600",
          "File mode of shared-memory segments: 0600 (this user's clients only) or 0640 with "
          "--shm_group.");
ABSL_FLAG(int32_t, shm_group, -1, "Group id given to shared-memory segments (-1: unchanged).");
ABSL_FLAG(absl::Duration, lease_ttl, absl::Seconds(30),
          "How long a handle's lease pins its chunk without renewal; memory of a client that "
          "dies holding leases comes back within about this long.");
ABSL_FLAG(double, max_pinned_fraction, 0.5,
          "Leases (shared-memory and CUDA IPC handles) may pin at most this share of the tier's "
          "budget (--host_cache_bytes; --device_cache_bytes per GPU), all clients together, "
          "in the cache or already evicted. Past it, values are served inline (a client that "
          "accepts only handles gets RESOURCE_EXHAUSTED naming the cap). 0 to 1.");
ABSL_FLAG(double, max_client_pinned_fraction, 0.25,
          "One client's leases may pin at most this share of the tier's budget; a client is a "
          "bearer token when --auth_tokens is set, else a connection (on a UNIX socket, the "
          "process the kernel names: SO_PEERCRED). Past it, that client gets values inline. "
          "0 to 1.");
ABSL_FLAG(uint32_t, max_client_leases, 1 << 16,
          "One client (as for --max_client_pinned_fraction) may hold at most this many leases "
          "at once (the same small value asked for many times takes one per item, not more "
          "memory); past it, that client gets values inline and others keep theirs.");
ABSL_FLAG(ByteSize, device_cache_bytes, ByteSize{0},
          "CUDA IPC delivery: budget of the device tier on each GPU (0: off). Colocated GPU "
          "clients that ask for it (chunkctl --delivery=cuda) get chunks copied into GPU memory "
          "and handed out as CUDA IPC handles with leases. Without a CUDA driver or device the "
          "server says so once and serves host-only.");
ABSL_FLAG(std::string, cuda_device, "all",
          "Device tier: the GPUs to use, \"all\" or comma-separated ordinals as this process "
          "sees them (after CUDA_VISIBLE_DEVICES). Clients name GPUs by UUID.");
ABSL_FLAG(ByteSize, device_segment_bytes, ByteSize{256ull << 20},
          "Device tier: size of each GPU memory segment. Each segment is exported once as a CUDA "
          "IPC handle that clients open once; larger values get a segment of their own.");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "On SIGTERM or SIGINT, how long calls in flight may run before they are cancelled.");
ABSL_FLAG(std::vector<std::string>, warm, {},
          "Prefixes to warm the cache with at start (comma-separated; \"\" for everything): "
          "their keys are read in the background while the server already serves.");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus metrics over HTTP (GET /metrics; /healthz). Off when empty. "
          "Metrics carry no chunk data, but they tell what is stored and how it is used: on an "
          "address other hosts can reach, protect them with --metrics_token_file (the server "
          "warns at start when it is missing) and keep the port on a trusted network.");
ABSL_FLAG(std::string, metrics_token_file, "",
          "A file holding one bearer token (at least 16 printable characters; the format of "
          "Prometheus' credentials_file, so one file serves both): GET /metrics then needs "
          "'Authorization: Bearer TOKEN' (401 otherwise). /healthz stays open for probes. The "
          "token crosses plain HTTP.");
ABSL_FLAG(std::string, ready_file, "",
          "When set, the bound addresses (one per line) are written to this file once the server "
          "accepts calls: useful with port 0.");

namespace chunkd::server {
namespace {

constexpr char kDefaultStore[] = "chunkd-data";

int Fail(const std::string& message) {
  std::fprintf(stderr, "chunkd: %s\n", message.c_str());
  return 1;
}

// The handle deliveries' part of `config` from the flags, checked: shared memory, leases and
// their caps on pinned memory, the device tier.
absl::Status HandleDeliveryFromFlags(ServerConfig* config) {
  config->shm = absl::GetFlag(FLAGS_shm);
  config->shm_arena.directory = absl::GetFlag(FLAGS_shm_dir);
  config->shm_arena.segment_bytes = absl::GetFlag(FLAGS_shm_segment_bytes).bytes;
  {
    std::string mode = absl::GetFlag(FLAGS_shm_mode);
    char* end = nullptr;
    long parsed = std::strtol(mode.c_str(), &end, 8);
    if (mode.empty() || *end != '\0' || (parsed & ~0660) != 0 || (parsed & 0600) != 0600) {
      return absl::InvalidArgumentError(
          absl::StrCat("--shm_mode=", mode,
                       " must be an octal mode no wider than 0660 that the owner can "
                       "read and write (0600, 0640 or 0660)"));
    }
    config->shm_arena.mode = static_cast<mode_t>(parsed);
  }
  config->shm_arena.group = static_cast<gid_t>(absl::GetFlag(FLAGS_shm_group));
  config->leases.ttl = absl::GetFlag(FLAGS_lease_ttl);
  if (config->leases.ttl < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("--lease_ttl must be at least 100ms");
  }
  config->leases.max_holder_leases = absl::GetFlag(FLAGS_max_client_leases);
  if (config->leases.max_holder_leases == 0) {
    return absl::InvalidArgumentError("--max_client_leases must be at least 1");
  }
  config->device_tier.capacity_bytes = absl::GetFlag(FLAGS_device_cache_bytes).bytes;
  {
    double all = absl::GetFlag(FLAGS_max_pinned_fraction);
    double one = absl::GetFlag(FLAGS_max_client_pinned_fraction);
    if (!(all >= 0 && all <= 1) || !(one >= 0 && one <= 1)) {
      return absl::InvalidArgumentError(
          "--max_pinned_fraction and --max_client_pinned_fraction must be between 0 and 1");
    }
    auto limits = [&](uint64_t budget, const char* budget_flag) {
      PinLimits l;
      l.max_bytes = static_cast<uint64_t>(all * static_cast<double>(budget));
      l.max_holder_bytes = static_cast<uint64_t>(one * static_cast<double>(budget));
      l.origin = absl::StrCat("--max_pinned_fraction=", all, " of ", budget_flag);
      l.holder_origin = absl::StrCat("--max_client_pinned_fraction=", one, " of ", budget_flag);
      return l;
    };
    // Host memory: the host cache and the derived entries together.
    config->leases.host =
        limits(config->store_options.cache.capacity_bytes + config->derived.cache.capacity_bytes,
               "--host_cache_bytes");
    config->leases.device = limits(config->device_tier.capacity_bytes, "--device_cache_bytes");
  }
  config->device_tier.segment_bytes = absl::GetFlag(FLAGS_device_segment_bytes).bytes;
  if (config->device_tier.segment_bytes < (1u << 20)) {
    return absl::InvalidArgumentError("--device_segment_bytes must be at least 1MiB");
  }
  if (auto devices = ParseCudaDevices(absl::GetFlag(FLAGS_cuda_device)); devices.ok()) {
    config->device_tier.devices = *std::move(devices);
  } else {
    return devices.status();
  }
  return absl::OkStatus();
}

// The server's configuration from the flags, each checked (INVALID_ARGUMENT naming the flag).
// Creates the default store directory when it is the store and missing.
absl::StatusOr<ServerConfig> ConfigFromFlags() {
  ServerConfig config;
  config.listen = absl::StrSplit(absl::GetFlag(FLAGS_listen), ',', absl::SkipWhitespace());
  config.store = absl::GetFlag(FLAGS_store);
  if (config.store == kDefaultStore && ::mkdir(kDefaultStore, 0755) == 0) {
    Log("created the default store directory ./%s", kDefaultStore);
  }
  uint64_t cache_bytes = absl::GetFlag(FLAGS_host_cache_bytes).bytes;
  config.backend.memory_capacity_bytes = cache_bytes;
  config.backend.fsync = absl::GetFlag(FLAGS_fsync);
  config.backend.s3.endpoint = absl::GetFlag(FLAGS_s3_endpoint);
  config.backend.s3.region = absl::GetFlag(FLAGS_s3_region);
  config.backend.s3.addressing = absl::GetFlag(FLAGS_s3_addressing);
  config.backend.s3.profile = absl::GetFlag(FLAGS_s3_profile);
  config.backend.s3.multipart_threshold_bytes = absl::GetFlag(FLAGS_s3_multipart_threshold).bytes;
  config.backend.s3.multipart_part_bytes = absl::GetFlag(FLAGS_s3_multipart_part_size).bytes;
  config.backend.http.connect_timeout = absl::GetFlag(FLAGS_http_connect_timeout);
  config.backend.http.timeout = absl::GetFlag(FLAGS_http_timeout);
  config.backend.http.stall_timeout = absl::GetFlag(FLAGS_http_stall_timeout);
  config.backend.http.max_attempts = absl::GetFlag(FLAGS_http_max_attempts);
  if (config.backend.http.max_attempts < 1) {
    return absl::InvalidArgumentError("--http_max_attempts must be at least 1");
  }
  config.store_options.cache.capacity_bytes = cache_bytes;
  config.disk_tier.dir = absl::GetFlag(FLAGS_disk_cache_dir);
  config.disk_tier.capacity_bytes = absl::GetFlag(FLAGS_disk_cache_bytes).bytes;
  if (!config.disk_tier.dir.empty() && config.disk_tier.capacity_bytes == 0) {
    return absl::InvalidArgumentError(
        "--disk_cache_dir needs --disk_cache_bytes, the most the tier may hold (e.g. 500GiB)");
  }
  if (config.disk_tier.dir.empty() && config.disk_tier.capacity_bytes != 0) {
    return absl::InvalidArgumentError(
        "--disk_cache_bytes is the budget of the disk tier: set --disk_cache_dir too");
  }
  config.store_options.cache.max_entry_fraction = absl::GetFlag(FLAGS_cache_max_entry_fraction);
  {
    double fraction = absl::GetFlag(FLAGS_derived_cache_fraction);
    if (!(fraction >= 0 && fraction < 1)) {
      return absl::InvalidArgumentError(absl::StrCat("--derived_cache_fraction=", fraction,
                                                     " must be at least 0 and less than 1"));
    }
    uint64_t derived = static_cast<uint64_t>(fraction * static_cast<double>(cache_bytes));
    config.derived.cache = config.store_options.cache;
    config.derived.cache.capacity_bytes = derived;
    // Carved out of the host cache (for memory://, out of the store, which is the cache).
    config.store_options.cache.capacity_bytes -= derived;
    config.backend.memory_capacity_bytes -= derived;
    config.derived.produce_timeout = absl::GetFlag(FLAGS_derived_produce_timeout);
    if (config.derived.produce_timeout <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError("--derived_produce_timeout must be positive");
    }
    if (absl::GetFlag(FLAGS_derived_wait_ms) < 1 || absl::GetFlag(FLAGS_derived_max_waiters) < 1) {
      return absl::InvalidArgumentError(
          "--derived_wait_ms and --derived_max_waiters must be at least 1");
    }
    config.derived.default_wait = absl::Milliseconds(absl::GetFlag(FLAGS_derived_wait_ms));
    config.derived.max_waiters = absl::GetFlag(FLAGS_derived_max_waiters);
  }
  auto policy = ParseEvictionPolicy(absl::GetFlag(FLAGS_eviction));
  if (!policy) {
    return absl::InvalidArgumentError(absl::StrCat("--eviction=", absl::GetFlag(FLAGS_eviction),
                                                   " is not a policy (s3fifo or lru)"));
  }
  config.store_options.cache.policy = *policy;
  if (absl::GetFlag(FLAGS_io_threads) < 0 || absl::GetFlag(FLAGS_max_queued_io) < 1) {
    return absl::InvalidArgumentError(
        "--io_threads must be 0 (auto) or more, --max_queued_io at least 1");
  }
  config.store_options.io_threads = absl::GetFlag(FLAGS_io_threads);
  config.store_options.block_bytes = absl::GetFlag(FLAGS_block_bytes).bytes;
  if (config.store_options.block_bytes < 4096 || config.store_options.block_bytes > (64u << 20)) {
    return absl::InvalidArgumentError("--block_bytes must be between 4 KiB and 64 MiB");
  }
  if (absl::GetFlag(FLAGS_read_ahead_blocks) < 0 || absl::GetFlag(FLAGS_read_ahead_blocks) > 4096) {
    return absl::InvalidArgumentError("--read_ahead_blocks must be between 0 and 4096");
  }
  config.store_options.read_ahead_blocks = absl::GetFlag(FLAGS_read_ahead_blocks);
  config.store_options.read_budget_bytes = absl::GetFlag(FLAGS_read_budget_bytes).bytes;
  if (std::string after = absl::GetFlag(FLAGS_revalidate_after); !after.empty()) {
    absl::Duration d;
    if (!absl::ParseDuration(after, &d) || d < absl::ZeroDuration()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--revalidate_after=", after, " is not a duration of 0 or more (0, 500ms, 60s, inf)"));
    }
    config.store_options.freshness.revalidate_after = d;
  }
  config.store_options.freshness.always_revalidate_names =
      absl::GetFlag(FLAGS_always_revalidate_names);
  config.store_options.freshness.immutable_prefixes = absl::GetFlag(FLAGS_immutable_prefixes);
  if (absl::GetFlag(FLAGS_rpc_threads) < 0) {
    return absl::InvalidArgumentError("--rpc_threads must be 0 (auto) or more");
  }
  config.rpc_threads = absl::GetFlag(FLAGS_rpc_threads);
  config.reflection = absl::GetFlag(FLAGS_reflection);
  config.store_options.max_queued_io = absl::GetFlag(FLAGS_max_queued_io);
  config.service.max_value_bytes = absl::GetFlag(FLAGS_max_value_bytes).bytes;
  config.service.read_only = absl::GetFlag(FLAGS_read_only);
  config.service.part_bytes = absl::GetFlag(FLAGS_part_bytes).bytes;
  if (config.service.part_bytes < 1024 || config.service.part_bytes > (1u << 20)) {
    return absl::InvalidArgumentError("--part_bytes must be between 1KiB and 1MiB");
  }
  config.service.max_inflight_put_bytes = absl::GetFlag(FLAGS_max_inflight_put_bytes).bytes;

  if (absl::Status s = HandleDeliveryFromFlags(&config); !s.ok()) return s;

  auto security = SecurityOptionsFromFlags();
  if (!security.ok()) return security.status();
  config.security = *std::move(security);
  return config;
}

// The line that says what the server serves, once it does.
void LogServing(ChunkdServer& server, const ServerConfig& config) {
  // Freshness: how long a cached value is served before the store is asked again.
  std::string fresh;
  if (server.store().backend().validation() != Validation::kNone) {
    fresh = absl::StrCat(", revalidate after ",
                         absl::FormatDuration(server.store().revalidate_after()));
    if (!config.store_options.freshness.immutable_prefixes.empty()) {
      absl::StrAppend(&fresh, " (immutable: ",
                      absl::StrJoin(config.store_options.freshness.immutable_prefixes, ","), ")");
    }
  }
  std::string derived =
      config.derived.cache.capacity_bytes > 0
          ? absl::StrCat(", derived entries ", FormatBytes(config.derived.cache.capacity_bytes))
          : ", no derived entries";
  Log("serving %s store %s on %s (host cache %s%s, %s, max value %s%s%s%s)",
      std::string(server.store().backend().kind()), server.store().backend().location(),
      absl::StrJoin(server.addresses(), ", "),
      FormatBytes(config.store_options.cache.capacity_bytes), derived,
      absl::GetFlag(FLAGS_eviction), FormatBytes(config.service.max_value_bytes), fresh,
      config.service.read_only ? ", read-only" : "",
      server.arena() ? ", shared memory in " + config.shm_arena.directory : ", inline only");
}

// The metrics endpoint of --metrics_listen (null without it), scraping `server`'s ServerInfo.
absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetrics(ChunkdServer* server) {
  std::string address = absl::GetFlag(FLAGS_metrics_listen);
  if (address.empty()) {
    if (!absl::GetFlag(FLAGS_metrics_token_file).empty()) {
      return absl::InvalidArgumentError("--metrics_token_file needs --metrics_listen");
    }
    return nullptr;
  }
  std::shared_ptr<const TokenTable> token;
  if (std::string path = absl::GetFlag(FLAGS_metrics_token_file); !path.empty()) {
    auto loaded = TokenTable::LoadSingle(path);
    if (!loaded.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--metrics_token_file: ", loaded.status().message()));
    }
    token = std::make_shared<const TokenTable>(*std::move(loaded));
  }
  auto metrics = MetricsServer::Start(
      address,
      [server] {
        chunkd::v1::ServerInfoResponse info;
        server->service().FillServerInfo(&info);
        return info;
      },
      token);
  if (!metrics.ok()) return metrics.status();
  Log("metrics on http://%s/metrics%s", (*metrics)->address(),
      token ? " (bearer token required)" : "");
  if (!token && !IsLoopbackAddress(address)) {
    Log("WARNING: metrics on %s are open to other hosts without authentication: anyone who "
        "reaches the port can see what is stored and how it is used. Use "
        "--metrics_token_file, or listen on loopback.",
        address);
  }
  return metrics;
}

// Writes the bound addresses to --ready_file, when set, at once (through a rename).
absl::Status WriteReadyFile(const std::vector<std::string>& addresses) {
  std::string ready = absl::GetFlag(FLAGS_ready_file);
  if (ready.empty()) return absl::OkStatus();
  std::string temp = ready + ".tmp";
  {
    std::ofstream out(temp);
    for (const std::string& address : addresses) out << address << "\n";
  }
  if (std::rename(temp.c_str(), ready.c_str()) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot write --ready_file ", ready, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// Warms the prefixes of --warm into `store`'s cache on a thread of its own, logging each, until
// done or `stop` is set (checked between keys). No thread without --warm.
std::thread StartWarming(ChunkStore* store, const std::atomic<bool>* stop) {
  std::vector<std::string> prefixes = absl::GetFlag(FLAGS_warm);
  if (prefixes.empty()) return std::thread();
  return std::thread([store, stop, prefixes] {
    for (const std::string& prefix : prefixes) {
      absl::Time start = absl::Now();
      PrefetchProgress last;
      absl::Status s = Prefetch(*store, {}, prefix, 256, [&](const PrefetchProgress& p) {
        last = p;
        return !stop->load();
      });
      Log("warmed prefix \"%s\": %d keys, %s, %d failed, in %s%s", prefix, last.keys_done,
          FormatBytes(last.bytes_loaded), last.keys_failed,
          absl::FormatDuration(absl::Now() - start),
          s.ok() ? "" : absl::StrCat(" (", s.message(), ")"));
      if (stop->load()) break;
    }
  });
}

}  // namespace
}  // namespace chunkd::server

int main(int argc, char** argv) {
  // Debian builds Abseil with its mutex deadlock detector on; gRPC's locks go through
  // absl::Mutex too, and the detector's graph bookkeeping shows in profiles of every call.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::SetProgramUsageMessage(
      "serves chunk buffers (Zarr chunks) from a host cache in front of a store, over gRPC.\n\n"
      "  chunkd [--listen=127.0.0.1:7878] [--store=DIR|file:///DIR|memory://|s3://BUCKET/PREFIX|"
      "https://HOST/PATH] [flags]\n\n"
      "Examples:\n"
      "  chunkd --store=/data/era5.zarr --host_cache_bytes=8GiB\n"
      "  chunkd --listen=unix:/run/chunkd.sock --store=memory://\n\n"
      "Talk to it with chunkctl (chunkctl --help), chunkd's Python and C++ clients, or\n"
      "TensorStore's tsgrpc_kvstore driver (TensorStore's key-value protocol is served on the\n"
      "same listeners). Flags:");
  std::vector<char*> positional = chunkd::cli::ParseCommandLine(
      argc, argv, "chunkd", {"server/daemon/main.cc", "server/daemon/security_flags.cc"});
  if (positional.size() > 1) {
    return chunkd::server::Fail(absl::StrCat("unexpected argument '", positional[1],
                                             "' (flags take the form --name=value; see --help)"));
  }

  // SIGTERM and SIGINT are taken by sigwait below, on this thread; block them before any other
  // thread starts so that every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client that vanishes mid-write must not kill the server.
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<chunkd::server::ServerConfig> config = chunkd::server::ConfigFromFlags();
  if (!config.ok()) return chunkd::server::Fail(std::string(config.status().message()));

  auto server = chunkd::server::ChunkdServer::Start(*config);
  if (!server.ok()) return chunkd::server::Fail(std::string(server.status().message()));
  chunkd::server::LogServing(**server, *config);
  auto metrics = chunkd::server::StartMetrics(server->get());
  if (!metrics.ok()) return chunkd::server::Fail(std::string(metrics.status().message()));
  if (absl::Status s = chunkd::server::WriteReadyFile((*server)->addresses()); !s.ok()) {
    return chunkd::server::Fail(std::string(s.message()));
  }

  // Warm-up in the background; stopped (between keys) at shutdown.
  std::atomic<bool> stop_warming{false};
  std::thread warmer = chunkd::server::StartWarming(&(*server)->store(), &stop_warming);

  int signal_number = 0;
  while (sigwait(&signals, &signal_number) != 0) {
  }
  absl::Duration grace = absl::GetFlag(FLAGS_shutdown_grace);
  chunkd::server::Log("received %s: finishing calls in flight (up to %s)", strsignal(signal_number),
                      absl::FormatDuration(grace));
  stop_warming = true;
  (*server)->Shutdown(grace);
  if (warmer.joinable()) warmer.join();
  metrics->reset();
  server->reset();
  chunkd::server::Log("stopped");
  return 0;
}

// chunkd_gpu_bench: what CUDA IPC delivery costs, against a running chunkd with a device tier
// (deploy/scripts/gpu-check.sh starts one and runs this).
//
//   chunkd_gpu_bench --server=127.0.0.1:7878 [--value_bytes=16MiB] [--keys=16] [--quick]
//                    [--json=FILE]
//
// Measures, on this process's GPU --cuda_device:
//   promotion   the first CUDA IPC Get of a value the host cache holds: the server copies it to
//               its device tier (pinned staging, cudaMemcpyAsync) and hands out the handle;
//   ipc_first   a Get of a device-resident value whose segment this process has not opened:
//               the client opens the IPC handle (cudaIpcOpenMemHandle) for it;
//   ipc_repeat  the same with the segment already open (another buffer of it held): the handle
//               is reused, no open;
//   hits        device-tier hits from --threads threads for --seconds: Gets per second and
//               bytes made readable on the GPU per second (no byte crosses the socket).
// Each value read back through to_cpu() is compared with what was put, once, so a wrong
// handle or offset fails the run. Prints one line per measurement and, with --json, writes
// them as JSON lines. Exits 2 with "no CUDA device: ..." where this process has no GPU.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/cuda_import.h"

ABSL_FLAG(std::string, server, "127.0.0.1:7878", "chunkd's address (HOST:PORT or unix:/path).");
ABSL_FLAG(int32_t, cuda_device, 0, "This process's GPU (ordinal) to receive chunks on.");
ABSL_FLAG(int64_t, value_bytes, 16 << 20, "Size of each value.");
ABSL_FLAG(int32_t, keys, 16, "Values put and promoted (their total must fit the device tier).");
ABSL_FLAG(int32_t, threads, 4, "Threads of the device-hit measurement.");
ABSL_FLAG(double, seconds, 5, "Length of the device-hit measurement.");
ABSL_FLAG(bool, quick, false, "4 keys, 1 second of hits: a smoke run.");
ABSL_FLAG(std::string, json, "", "Also write the measurements here, one JSON object a line.");

namespace {

using chunkd::client::Client;
using chunkd::client::GetResult;

struct Stats {
  std::vector<double> micros;
  double Median() {
    std::sort(micros.begin(), micros.end());
    return micros.empty() ? 0 : micros[micros.size() / 2];
  }
  double Min() { return micros.empty() ? 0 : *std::min_element(micros.begin(), micros.end()); }
};

std::vector<std::string> g_json;

void Report(const std::string& name, const std::string& human, const std::string& json_fields) {
  std::printf("%-11s %s\n", name.c_str(), human.c_str());
  g_json.push_back(absl::StrCat("{\"measurement\": \"", name, "\", ", json_fields, "}"));
}

[[noreturn]] void Die(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "chunkd_gpu_bench: %s: %s\n", what.c_str(),
               std::string(status.message()).c_str());
  std::exit(absl::IsFailedPrecondition(status) ? 2 : 1);
}

// One CUDA IPC Get, checked to have come by CUDA IPC; its wall time in microseconds.
GetResult CudaGet(Client& client, const std::string& key, double* micros) {
  absl::Time start = absl::Now();
  auto got = client.Get(key);
  *micros = absl::ToDoubleMicroseconds(absl::Now() - start);
  if (!got.ok()) Die(absl::StrCat("get ", key), got.status());
  if (got->delivery != chunkd::v1::DELIVERY_CUDA_IPC || !got->device_data) {
    Die(absl::StrCat("get ", key),
        absl::FailedPreconditionError(absl::StrCat(
            "came by ", chunkd::v1::Delivery_Name(got->delivery),
            ", not CUDA IPC: is the server local, with --device_cache_bytes, on this GPU?")));
  }
  return *std::move(got);
}

uint64_t Counter(Client& client, const std::string& name) {
  auto info = client.ServerInfo();
  if (!info.ok()) Die("ServerInfo", info.status());
  auto it = info->counters().find(name);
  return it == info->counters().end() ? 0 : it->second;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("measures CUDA IPC delivery against a running chunkd.");
  absl::ParseCommandLine(argc, argv);
  const bool quick = absl::GetFlag(FLAGS_quick);
  const size_t size = static_cast<size_t>(absl::GetFlag(FLAGS_value_bytes));
  const int keys = quick ? std::min(4, absl::GetFlag(FLAGS_keys)) : absl::GetFlag(FLAGS_keys);
  const double seconds = quick ? 1.0 : absl::GetFlag(FLAGS_seconds);

  chunkd::client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_server);
  options.accept = {chunkd::v1::DELIVERY_CUDA_IPC, chunkd::v1::DELIVERY_INLINE};
  options.cuda_device = absl::GetFlag(FLAGS_cuda_device);
  auto connected = Client::Connect(options);
  if (!connected.ok()) Die("connect", connected.status());
  Client& client = **connected;
  auto importer = chunkd::client::CudaImporter::ForProcess();
  if (!importer.ok()) Die("CUDA", importer.status());

  // Values with distinct contents, put inline and read once inline so the host cache has them.
  std::vector<std::string> names, values;
  std::mt19937_64 random(42);
  for (int i = 0; i < keys; ++i) {
    names.push_back(absl::StrCat("gpu-bench/c/", i));
    std::string value(size, '\0');
    for (size_t j = 0; j < size; j += 8) {
      uint64_t word = random();
      std::memcpy(value.data() + j, &word, std::min<size_t>(8, size - j));
    }
    auto put = client.Put(names.back(), chunkd::buffer::cpu::Buffer::CopyOf(value));
    if (!put.ok()) Die("put", put.status());
    chunkd::client::GetOptions inline_only;
    inline_only.accept = std::vector<chunkd::v1::Delivery>{chunkd::v1::DELIVERY_INLINE};
    auto warm = client.Get(names.back(), inline_only);
    if (!warm.ok()) Die("get inline", warm.status());
    values.push_back(std::move(value));
  }

  // Promotion: the first CUDA IPC Get of each value. Buffers are dropped at once, so each Get
  // also opens its segment's handle unless an earlier one of the same segment is still open
  // (it is not: the importer closes a handle with its segment's last buffer).
  uint64_t promotions_before = Counter(client, "device_promotions");
  Stats promotion;
  for (int i = 0; i < keys; ++i) {
    double micros;
    GetResult got = CudaGet(client, names[i], &micros);
    promotion.micros.push_back(micros);
    if (i == 0) {
      auto host = got.device_data->to_cpu();
      if (!host.ok()) Die("to_cpu", host.status());
      if (host->size() != size || std::memcmp(host->data(), values[0].data(), size) != 0) {
        Die("check", absl::DataLossError("the bytes read through CUDA IPC differ from the put"));
      }
    }
  }
  uint64_t promotions = Counter(client, "device_promotions") - promotions_before;
  double median = promotion.Median();
  Report("promotion",
         absl::StrFormat("%d values of %d bytes: median %.0f us, %.2f GB/s host to device "
                         "(%d promotions counted)",
                         keys, size, median, size / median / 1e3, promotions),
         absl::StrFormat("\"values\": %d, \"value_bytes\": %d, \"median_us\": %.1f, "
                         "\"min_us\": %.1f, \"gb_per_s\": %.3f, \"promotions\": %d",
                         keys, size, median, promotion.Min(), size / median / 1e3, promotions));
  if (promotions < static_cast<uint64_t>(keys)) {
    Die("promotion", absl::FailedPreconditionError(absl::StrCat(
                         "only ", promotions, " of ", keys,
                         " values were promoted: is --device_cache_bytes large enough?")));
  }

  // IPC handle handoff, on one device-resident value: each Get's buffer dropped at once (the
  // importer closes the segment's handle with it, so the next Get opens it again), against
  // Gets while another buffer of the segment is held (the handle stays open).
  const int rounds = quick ? 20 : 200;
  Stats first, repeat;
  for (int r = 0; r < rounds; ++r) {
    double micros;
    CudaGet(client, names[0], &micros);  // the result is dropped here
    first.micros.push_back(micros);
  }
  {
    double micros;
    GetResult anchor = CudaGet(client, names[0], &micros);
    size_t open = (*importer)->open_handles();
    for (int r = 0; r < rounds; ++r) {
      CudaGet(client, names[0], &micros);
      repeat.micros.push_back(micros);
    }
    if ((*importer)->open_handles() != open) {
      Die("ipc_repeat", absl::InternalError("the held segment's handle was reopened"));
    }
  }
  Report("ipc_first",
         absl::StrFormat("get with the IPC handle opened: median %.0f us, min %.0f us",
                         first.Median(), first.Min()),
         absl::StrFormat("\"gets\": %d, \"median_us\": %.1f, \"min_us\": %.1f", rounds,
                         first.Median(), first.Min()));
  Report("ipc_repeat",
         absl::StrFormat("get with the handle already open: median %.0f us, min %.0f us",
                         repeat.Median(), repeat.Min()),
         absl::StrFormat("\"gets\": %d, \"median_us\": %.1f, \"min_us\": %.1f", rounds,
                         repeat.Median(), repeat.Min()));

  // Device-tier hits from several threads, each segment held open by an anchor buffer.
  std::vector<GetResult> anchors;
  for (int i = 0; i < keys; ++i) {
    double micros;
    anchors.push_back(CudaGet(client, names[i], &micros));
  }
  uint64_t hits_before = Counter(client, "device_hits");
  std::atomic<uint64_t> gets{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  absl::Time start = absl::Now();
  for (int t = 0; t < absl::GetFlag(FLAGS_threads); ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; !stop.load(std::memory_order_relaxed); ++i) {
        double micros;
        CudaGet(client, names[i % keys], &micros);
        gets.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  absl::SleepFor(absl::Seconds(seconds));
  stop = true;
  for (auto& thread : threads) thread.join();
  double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
  uint64_t hits = Counter(client, "device_hits") - hits_before;
  Report("hits",
         absl::StrFormat("%d threads: %.0f gets/s, %.2f GB/s made readable on the GPU "
                         "(%d device hits counted)",
                         absl::GetFlag(FLAGS_threads), gets / elapsed, gets * size / elapsed / 1e9,
                         hits),
         absl::StrFormat("\"threads\": %d, \"value_bytes\": %d, \"gets_per_s\": %.1f, "
                         "\"gb_per_s\": %.3f, \"device_hits\": %d",
                         absl::GetFlag(FLAGS_threads), size, gets / elapsed,
                         gets * size / elapsed / 1e9, hits));

  if (std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream out(path);
    for (const std::string& line : g_json) out << line << "\n";
  }
  return 0;
}

// chunkd_disk_tier_bench: the disk tier's I/O against plain reads of the same files, the
// choices it made (O_DIRECT or the page cache, a pread pool or io_uring) and its start-up with
// a million entries. docs/disk-tier.md ("Design and measurements") has a run's figures.
//
//   chunkd_disk_tier_bench --dir=/var/tmp/chunkd-disk-bench [--bytes=1073741824] [--threads=4]
//       [--what=reads,uring,startup] [--startup_entries=1000000] [--startup_block=1024]
//
// Reads are measured with the page cache dropped first (echo 3 > /proc/sys/vm/drop_caches,
// which needs root; the run says when it could not). Everything under --dir is removed at the
// end.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "buffer/cpu/buffer.h"
#include "server/store/disk_tier.h"
#include "server/store/disk_tier_internal.h"
#ifdef CHUNKD_HAVE_LIBURING
#include <liburing.h>
#endif

ABSL_FLAG(std::string, dir, "/var/tmp/chunkd-disk-bench", "scratch directory (removed after)");
ABSL_FLAG(uint64_t, bytes, 1ull << 30, "bytes of each read data set");
ABSL_FLAG(int, threads, 4, "reading threads (and io_uring queue depth)");
ABSL_FLAG(std::string, what, "reads,uring,startup", "what to measure");
ABSL_FLAG(uint64_t, startup_entries, 1000000, "entries of the start-up measurement");
ABSL_FLAG(uint64_t, startup_block, 1024, "bytes per entry of the start-up measurement");

namespace chunkd::server {
namespace {

namespace fs = std::filesystem;

bool DropCaches() {
  sync();
  std::ofstream f("/proc/sys/vm/drop_caches");
  f << "3\n";
  f.close();
  return !f.fail();
}

// /proc/meminfo's Cached, in MiB.
int64_t CachedMiB() {
  std::ifstream f("/proc/meminfo");
  std::string name;
  int64_t kb;
  std::string unit;
  while (f >> name >> kb) {
    std::getline(f, unit);
    if (name == "Cached:") return kb / 1024;
  }
  return -1;
}

int64_t RssMiB() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) / 1024;
  }
  return -1;
}

std::vector<std::string> SegmentFiles(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".dat") out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Runs `work(thread)` on `threads` threads; seconds taken.
double Parallel(int threads, const std::function<void(int)>& work) {
  const absl::Time start = absl::Now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work, t);
  for (auto& th : pool) th.join();
  return absl::ToDoubleSeconds(absl::Now() - start);
}

struct Row {
  std::string what;
  double gbps = 0;
  int64_t cached_growth_mib = 0;
  std::string note;
};
std::vector<Row> rows;

void Print(const Row& r) {
  std::printf("| %-58s | %7.2f | %8lld | %s |\n", r.what.c_str(), r.gbps,
              static_cast<long long>(r.cached_growth_mib), r.note.c_str());
  std::fflush(stdout);
  rows.push_back(r);
}

// A data set: `count` entries of `entry_bytes`, as blocks of values of 64 blocks or as whole
// values.
struct DataSet {
  std::string dir;
  uint64_t entry_bytes;
  uint64_t count;
  bool blocks;
  std::string Key(uint64_t i) const {
    return blocks ? absl::StrCat("blocks/", i / 64) : absl::StrCat("whole/", i);
  }
  uint64_t Part(uint64_t i) const { return blocks ? i % 64 : kWholeValue; }
};

std::unique_ptr<DiskTier> Open(const std::string& dir, uint64_t capacity, const DiskTierIo& io) {
  DiskTierOptions o;
  o.dir = dir;
  o.capacity_bytes = capacity;
  o.max_queued_write_bytes = 256ull << 20;
  auto tier = OpenDiskTier(o, nullptr, io);
  if (!tier.ok()) {
    std::fprintf(stderr, "open %s: %s\n", dir.c_str(), tier.status().ToString().c_str());
    std::exit(1);
  }
  while (!(*tier)->stats().index_loaded) absl::SleepFor(absl::Milliseconds(1));
  return *std::move(tier);
}

void Populate(DiskTier& tier, const DataSet& set, const std::string& label) {
  const std::string bytes(set.entry_bytes, 'x');
  std::string value = bytes;
  for (size_t i = 0; i < value.size(); i += 8) value[i] = static_cast<char>(i * 131);
  const buffer::cpu::Buffer data = buffer::cpu::Buffer::CopyOf(value);
  const int64_t cached_before = CachedMiB();
  const absl::Time start = absl::Now();
  for (uint64_t i = 0; i < set.count; ++i) {
    CachedValue v(data, 1, absl::Now(), "\"etag\"");
    if (set.blocks) {
      v.offset = set.Part(i) * set.entry_bytes;
      v.total_size = 64 * set.entry_bytes;
    }
    tier.Write(set.Key(i), set.Part(i), v);
    if (i % 64 == 63) tier.Flush();
  }
  tier.Flush();
  const double s = absl::ToDoubleSeconds(absl::Now() - start);
  const DiskTierStats st = tier.stats();
  Print({absl::StrFormat("write %s (tier, %d x %d KiB)", label, set.count, set.entry_bytes >> 10),
         set.count * set.entry_bytes / s / 1e9, CachedMiB() - cached_before,
         absl::StrFormat("dropped %d", st.writes_dropped)});
}

// mode: "O_DIRECT", "page cache" or "page cache, pages dropped after".
void TierReads(const DataSet& set, const std::string& mode, int threads, bool drop_ok) {
  DiskTierIo io;
  io.direct_reads = mode == "O_DIRECT";
  io.drop_read_pages = mode != "page cache";
  auto tier = Open(set.dir, 64ull << 30, io);
  DropCaches();
  const int64_t cached_before = CachedMiB();
  std::atomic<uint64_t> next{0}, bytes{0}, failures{0};
  const double s = Parallel(threads, [&](int) {
    for (uint64_t i; (i = next.fetch_add(1)) < set.count;) {
      auto v = tier->Read(set.Key(i), set.Part(i), 0);
      if (!v.has_value()) {
        ++failures;
        continue;
      }
      bytes += v->value.size();
    }
  });
  Print({absl::StrFormat("read %d KiB entries: tier, %s, %d threads", set.entry_bytes >> 10, mode,
                         threads),
         bytes / s / 1e9, CachedMiB() - cached_before,
         absl::StrFormat("%s%s", failures ? absl::StrCat(failures.load(), " misses ") : "",
                         drop_ok ? "" : "(cache not dropped)")});
}

// The same files read whole, chunk by chunk, spread over the threads.
void PlainPreads(const DataSet& set, bool direct, int threads, bool drop_ok) {
  const std::vector<std::string> files = SegmentFiles(set.dir);
  struct Chunk {
    int fd;
    uint64_t offset;
  };
  std::vector<int> fds;
  std::vector<Chunk> chunks;
  const uint64_t chunk = set.entry_bytes;
  for (const std::string& f : files) {
    int fd = open(f.c_str(), O_RDONLY | (direct ? O_DIRECT : 0));
    fds.push_back(fd);
    struct stat st;
    fstat(fd, &st);
    for (uint64_t off = 0; off < static_cast<uint64_t>(st.st_size); off += chunk) {
      chunks.push_back({fd, off});
    }
  }
  DropCaches();
  const int64_t cached_before = CachedMiB();
  std::atomic<uint64_t> next{0}, bytes{0};
  const double s = Parallel(threads, [&](int) {
    void* buf = nullptr;
    if (posix_memalign(&buf, 4096, chunk) != 0) return;
    for (uint64_t i; (i = next.fetch_add(1)) < chunks.size();) {
      ssize_t n = pread(chunks[i].fd, buf, chunk, static_cast<off_t>(chunks[i].offset));
      if (n > 0) bytes += static_cast<uint64_t>(n);
    }
    free(buf);
  });
  for (int fd : fds) close(fd);
  Print({absl::StrFormat("read %d KiB chunks: plain pread, %s, %d threads", chunk >> 10,
                         direct ? "O_DIRECT" : "page cache", threads),
         bytes / s / 1e9, CachedMiB() - cached_before, drop_ok ? "" : "(cache not dropped)"});
}

#ifdef CHUNKD_HAVE_LIBURING
// The same files, chunk by chunk, from one thread keeping `depth` reads in flight.
void UringReads(const DataSet& set, bool direct, int depth, bool drop_ok) {
  const std::vector<std::string> files = SegmentFiles(set.dir);
  const uint64_t chunk = set.entry_bytes;
  struct Chunk {
    int fd;
    uint64_t offset;
  };
  std::vector<int> fds;
  std::vector<Chunk> chunks;
  for (const std::string& f : files) {
    int fd = open(f.c_str(), O_RDONLY | (direct ? O_DIRECT : 0));
    fds.push_back(fd);
    struct stat st;
    fstat(fd, &st);
    for (uint64_t off = 0; off < static_cast<uint64_t>(st.st_size); off += chunk) {
      chunks.push_back({fd, off});
    }
  }
  io_uring ring;
  if (int err = io_uring_queue_init(static_cast<unsigned>(depth), &ring, 0); err < 0) {
    Print({"io_uring", 0, 0, absl::StrCat("io_uring_queue_init: ", strerror(-err))});
    return;
  }
  std::vector<void*> bufs(static_cast<size_t>(depth));
  for (void*& b : bufs) {
    if (posix_memalign(&b, 4096, chunk) != 0) return;
  }
  DropCaches();
  const int64_t cached_before = CachedMiB();
  const absl::Time start = absl::Now();
  uint64_t submitted = 0, done = 0, bytes = 0;
  std::vector<int> free_slots;
  for (int i = 0; i < depth; ++i) free_slots.push_back(i);
  while (done < chunks.size()) {
    while (!free_slots.empty() && submitted < chunks.size()) {
      const int slot = free_slots.back();
      free_slots.pop_back();
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      io_uring_prep_read(sqe, chunks[submitted].fd, bufs[static_cast<size_t>(slot)],
                         static_cast<unsigned>(chunk), chunks[submitted].offset);
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(slot));
      ++submitted;
    }
    io_uring_submit(&ring);
    io_uring_cqe* cqe;
    if (io_uring_wait_cqe(&ring, &cqe) != 0) break;
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      if (cqe->res > 0) bytes += static_cast<uint64_t>(cqe->res);
      free_slots.push_back(static_cast<int>(io_uring_cqe_get_data64(cqe)));
      ++done;
      ++seen;
    }
    io_uring_cq_advance(&ring, seen);
  }
  const double s = absl::ToDoubleSeconds(absl::Now() - start);
  io_uring_queue_exit(&ring);
  for (void* b : bufs) free(b);
  for (int fd : fds) close(fd);
  Print({absl::StrFormat("read %d KiB chunks: io_uring, %s, depth %d, 1 thread", chunk >> 10,
                         direct ? "O_DIRECT" : "page cache", depth),
         bytes / s / 1e9, CachedMiB() - cached_before, drop_ok ? "" : "(cache not dropped)"});
}
#endif

void Startup(const std::string& dir, uint64_t entries, uint64_t block) {
  const uint64_t per_value = 256;
  DataSet set{dir, block, entries, true};
  {
    DiskTierIo io;
    auto tier = Open(dir, 64ull << 30, io);
    const std::string value(block, 's');
    const buffer::cpu::Buffer data = buffer::cpu::Buffer::CopyOf(value);
    const absl::Time start = absl::Now();
    for (uint64_t i = 0; i < entries; ++i) {
      CachedValue v(data, 1, absl::Now(), "\"etag\"");
      v.offset = (i % per_value) * block;
      v.total_size = per_value * block;
      tier->Write(absl::StrCat("startup/value-", i / per_value), i % per_value, v);
      if (i % 4096 == 4095) tier->Flush();
    }
    tier->Flush();
    const DiskTierStats s = tier->stats();
    std::printf("start-up set: %llu entries of %llu B written in %.1f s, %.2f GiB on disk\n",
                static_cast<unsigned long long>(s.entries), static_cast<unsigned long long>(block),
                absl::ToDoubleSeconds(absl::Now() - start), s.used_bytes / double(1ull << 30));
  }
  for (bool scan : {false, true}) {
    if (scan) {
      for (const auto& e : fs::directory_iterator(dir)) {
        if (e.path().extension() == ".idx") fs::remove(e.path());
      }
    }
    const bool dropped = DropCaches();
    const int64_t rss_before = RssMiB();
    const absl::Time start = absl::Now();
    DiskTierIo io;
    auto tier = Open(dir, 64ull << 30, io);
    const double wall = absl::ToDoubleSeconds(absl::Now() - start);
    const DiskTierStats s = tier->stats();
    std::printf(
        "| start-up, %s | %llu entries | %.2f s (index_load_micros %.2f s) | index %.1f B/entry "
        "| RSS +%lld MiB |%s\n",
        scan ? "scan of segments (no index files: kill -9)" : "index files",
        static_cast<unsigned long long>(s.entries), wall, s.index_load_micros / 1e6,
        s.entries ? double(s.index_bytes) / double(s.entries) : 0.0,
        static_cast<long long>(RssMiB() - rss_before), dropped ? "" : " (cache not dropped)");
    std::fflush(stdout);
    (void)set;
  }
}

int Main() {
  const std::string root = absl::GetFlag(FLAGS_dir);
  const uint64_t bytes = absl::GetFlag(FLAGS_bytes);
  const int threads = absl::GetFlag(FLAGS_threads);
  std::vector<std::string> what = absl::StrSplit(absl::GetFlag(FLAGS_what), ',');
  auto wants = [&](const char* w) { return std::find(what.begin(), what.end(), w) != what.end(); };
  fs::remove_all(root);
  fs::create_directories(root);
  const bool drop_ok = DropCaches();
  if (!drop_ok) std::printf("note: cannot drop the page cache (not root?): reads may hit it\n");
  std::printf("| what | GB/s | Cached +MiB | note |\n| --- | ---: | ---: | --- |\n");
  const DataSet blocks{root + "/blocks", 256 << 10, bytes / (256 << 10), true};
  const DataSet whole{root + "/whole", 1 << 20, bytes / (1 << 20), false};
  if (wants("reads") || wants("uring")) {
    {
      DiskTierIo keep;
      keep.drop_written_pages = false;
      auto tier = Open(blocks.dir, 64ull << 30, keep);
      Populate(*tier, blocks, "page cache kept");
    }
    {
      auto tier = Open(whole.dir, 64ull << 30, DiskTierIo());
      Populate(*tier, whole, "sealed segments synced and dropped");
    }
  }
  if (wants("reads")) {
    for (const DataSet* set : {&blocks, &whole}) {
      for (const char* mode : {"O_DIRECT", "page cache", "page cache, pages dropped after"}) {
        TierReads(*set, mode, threads, drop_ok);
      }
      PlainPreads(*set, true, threads, drop_ok);
      PlainPreads(*set, false, threads, drop_ok);
    }
    // Queue depth: 1, and 32 (as io_uring's depth 32 below).
    for (int n : {1, 32}) {
      TierReads(blocks, "O_DIRECT", n, drop_ok);
      PlainPreads(blocks, true, n, drop_ok);
    }
  }
#ifdef CHUNKD_HAVE_LIBURING
  if (wants("uring")) {
    for (int depth : {threads, 32}) UringReads(blocks, true, depth, drop_ok);
    UringReads(blocks, false, threads, drop_ok);
  }
#else
  if (wants("uring")) std::printf("io_uring: not built (liburing-dev missing)\n");
#endif
  fs::remove_all(blocks.dir);
  fs::remove_all(whole.dir);
  if (wants("startup")) {
    Startup(root + "/startup", absl::GetFlag(FLAGS_startup_entries),
            absl::GetFlag(FLAGS_startup_block));
  }
  fs::remove_all(root);
  return 0;
}

}  // namespace
}  // namespace chunkd::server

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return chunkd::server::Main();
}

// Tests of server/store/disk_tier.h on real files: round trips with their metadata, restarts
// (from index files and by scanning), corruption and torn tails, drops, generations, the
// bound in bytes, a filesystem that fills (a tiny tmpfs), the directory lock and reads while
// the index loads.
#include "server/store/disk_tier.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "buffer/cpu/buffer.h"
#include "gtest/gtest.h"
#include "server/store/disk_tier_internal.h"
#include "tests/support/test_support.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;
using chunkd::testing::RandomBytes;
using chunkd::testing::TempDir;

DiskTierOptions Options(const std::string& dir, uint64_t capacity = 64ull << 20) {
  DiskTierOptions o;
  o.dir = dir;
  o.capacity_bytes = capacity;
  return o;
}

std::unique_ptr<DiskTier> OpenTier(const DiskTierOptions& options) {
  absl::StatusOr<std::unique_ptr<DiskTier>> tier = DiskTier::Open(options, nullptr);
  EXPECT_TRUE(tier.ok()) << tier.status();
  return tier.ok() ? *std::move(tier) : nullptr;
}

bool WaitLoaded(DiskTier& tier) {
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!tier.stats().index_loaded) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// A whole value (offset 0, no total size).
CachedValue Whole(const std::string& bytes, Generation generation, absl::Time validated,
                  std::string etag = {}) {
  return CachedValue(Buffer::CopyOf(bytes), generation, validated, std::move(etag));
}

// Block `index` of `block_bytes` of a value of `total` bytes.
CachedValue Block(const std::string& value, uint64_t index, uint64_t block_bytes,
                  Generation generation, absl::Time validated, std::string etag = {}) {
  const uint64_t offset = index * block_bytes;
  const uint64_t n = std::min<uint64_t>(block_bytes, value.size() - offset);
  CachedValue v(Buffer::CopyOf(std::string_view(value).substr(offset, n)), generation, validated,
                std::move(etag));
  v.offset = offset;
  v.total_size = value.size();
  return v;
}

std::vector<std::string> Files(const std::string& dir, const std::string& suffix) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(suffix)) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// What the tier's files take: their sizes (index files rounded up to 4 KiB, as the tier
// accounts them) and the filesystem's blocks.
struct DiskUse {
  uint64_t bytes = 0;
  uint64_t blocks_bytes = 0;
};
DiskUse Use(const std::string& dir) {
  DiskUse use;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    struct stat st;
    if (stat(e.path().c_str(), &st) != 0) continue;
    uint64_t size = static_cast<uint64_t>(st.st_size);
    if (e.path().extension() == ".idx") size = (size + 4095) / 4096 * 4096;
    use.bytes += size;
    use.blocks_bytes += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return use;
}

const absl::Time kValidated = absl::FromUnixMicros(1'700'000'000'123'456);

// The bytes of the whole-value entry under `key`, or "<miss>".
std::string Bytes(DiskTier& tier, const std::string& key) {
  std::optional<CachedValue> got = tier.Read(key, kWholeValue, 0);
  return got.has_value() ? std::string(got->value.view()) : "<miss>";
}

void ExpectEntry(DiskTier& tier, const std::string& key, uint64_t part, const CachedValue& want) {
  std::optional<CachedValue> got = tier.Read(key, part, 0);
  ASSERT_TRUE(got.has_value()) << key << " part " << part;
  EXPECT_TRUE(got->value.view() == want.value.view());
  EXPECT_EQ(got->generation, want.generation);
  EXPECT_EQ(got->validated, want.validated);
  EXPECT_EQ(got->etag, want.etag);
  EXPECT_EQ(got->offset, want.offset);
  EXPECT_EQ(got->total_size, want.total_size);
}

TEST(DiskTierTest, RoundTripOfWholeValuesAndBlocks) {
  TempDir dir;
  auto tier = OpenTier(Options(dir.path()));
  ASSERT_NE(tier, nullptr);
  ASSERT_TRUE(WaitLoaded(*tier));
  const std::string whole = RandomBytes(100'000, 1);
  const std::string big = RandomBytes(300'000, 2);
  const CachedValue w = Whole(whole, 7, kValidated, "\"etag-1\"");
  const CachedValue b0 = Block(big, 0, 131072, 9, kValidated, "\"etag-2\"");
  const CachedValue b2 = Block(big, 2, 131072, 9, kValidated, "\"etag-2\"");
  tier->Write("a/whole", kWholeValue, w);
  tier->Write("a/big", 0, b0);
  tier->Write("a/big", 2, b2);
  tier->Write("a/empty", kWholeValue, Whole("", 3, kValidated));
  tier->Flush();
  ExpectEntry(*tier, "a/whole", kWholeValue, w);
  ExpectEntry(*tier, "a/big", 0, b0);
  ExpectEntry(*tier, "a/big", 2, b2);
  EXPECT_EQ(tier->Read("a/empty", kWholeValue, 3)->value.size(), 0u);
  EXPECT_FALSE(tier->Read("a/big", 1, 0).has_value());    // never written
  EXPECT_FALSE(tier->Read("a/big", 0, 8).has_value());    // another generation
  EXPECT_FALSE(tier->Read("a/whole", 0, 0).has_value());  // a block of a whole value
  EXPECT_TRUE(tier->Read("a/big", 2, 9).has_value());     // the generation asked for
  auto record = tier->Record("a/big");
  ASSERT_TRUE(record.has_value());
  EXPECT_EQ(record->first.size, big.size());
  EXPECT_EQ(record->first.generation, 9u);
  EXPECT_EQ(record->first.etag, "\"etag-2\"");
  EXPECT_EQ(record->second, kValidated);
  EXPECT_FALSE(tier->Record("a/none").has_value());
  const DiskTierStats s = tier->stats();
  EXPECT_EQ(s.entries, 4u);
  EXPECT_EQ(s.writes, 4u);
  EXPECT_EQ(s.write_bytes, whole.size() + b0.value.size() + b2.value.size());
  EXPECT_EQ(s.hits, 5u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_GT(s.index_bytes, 0u);
  EXPECT_GT(s.used_bytes, s.write_bytes);
  EXPECT_LE(s.used_bytes, s.capacity_bytes);
  EXPECT_EQ(s.checksum_failures, 0u);
}

// A later Write of a version the tier holds writes nothing and moves its validation time on.
TEST(DiskTierTest, SameVersionAgainOnlyRevalidates) {
  TempDir dir;
  auto tier = OpenTier(Options(dir.path()));
  ASSERT_TRUE(WaitLoaded(*tier));
  tier->Write("k", kWholeValue, Whole("abc", 1, kValidated));
  tier->Flush();
  tier->Write("k", kWholeValue, Whole("abc", 1, kValidated + absl::Seconds(5)));
  tier->Flush();
  EXPECT_EQ(tier->stats().writes, 1u);
  EXPECT_EQ(tier->Read("k", kWholeValue, 1)->validated, kValidated + absl::Seconds(5));
  EXPECT_EQ(tier->Record("k")->second, kValidated + absl::Seconds(5));
}

// Restarts load from the index files a closed tier writes, or (kill -9: none) by a scan.
class DiskTierReopenTest : public ::testing::TestWithParam<bool> {
 protected:
  // Drops the index files when the case is "scan", as a killed server leaves none for the
  // segment it was writing.
  void Crash(const std::string& dir) {
    if (!GetParam()) return;
    for (const std::string& f : Files(dir, ".idx")) ASSERT_EQ(unlink(f.c_str()), 0);
  }
};
INSTANTIATE_TEST_SUITE_P(IndexFilesOrScan, DiskTierReopenTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Scan" : "IndexFiles"; });

TEST_P(DiskTierReopenTest, ReopenKeepsEntries) {
  TempDir dir;
  // Small capacity: 64 KiB segments, so entries span several sealed segments and the active.
  const auto options = Options(dir.path(), 1 << 20);
  std::vector<std::pair<std::string, CachedValue>> written;
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    for (int i = 0; i < 40; ++i) {
      const std::string key = absl::StrCat("v/", i);
      CachedValue v = Whole(RandomBytes(5000 + i * 100, i), 100 + i, kValidated + absl::Seconds(i),
                            absl::StrCat("\"e", i, "\""));
      tier->Write(key, kWholeValue, v);
      written.emplace_back(key, v);
    }
    const std::string value = RandomBytes(50'000, 99);
    for (uint64_t b = 0; b < 4; ++b) {
      CachedValue v = Block(value, b, 16384, 5, kValidated, "\"blocks\"");
      tier->Write("v/blocks", b, v);
      written.emplace_back("v/blocks", v);
    }
    tier->Flush();
    EXPECT_GT(Files(dir.path(), ".dat").size(), 2u);
  }
  Crash(dir.path());
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_EQ(tier->stats().entries, written.size());
  for (const auto& [key, v] : written) {
    ExpectEntry(*tier, key, v.total_size.has_value() ? v.offset / 16384 : kWholeValue, v);
  }
  auto record = tier->Record("v/blocks");
  ASSERT_TRUE(record.has_value());
  EXPECT_EQ(record->first.size, 50'000u);
  EXPECT_EQ(record->first.etag, "\"blocks\"");
  // A scanned segment gets its index file, so the next start reads that.
  EXPECT_EQ(Files(dir.path(), ".idx").size(), Files(dir.path(), ".dat").size());
  EXPECT_EQ(tier->stats().checksum_failures, 0u);
}

TEST_P(DiskTierReopenTest, DropSurvivesReopen) {
  TempDir dir;
  const auto options = Options(dir.path(), 4 << 20);
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    tier->Write("gone", kWholeValue, Whole("old bytes", 1, kValidated));
    tier->Write("kept", kWholeValue, Whole("kept bytes", 1, kValidated));
    tier->Write("gone/blocks", 0, Whole("block", 2, kValidated));
    tier->Flush();
    tier->Drop("gone");
    tier->Drop("gone/blocks");
    EXPECT_FALSE(tier->Read("gone", kWholeValue, 0).has_value());
    EXPECT_FALSE(tier->Record("gone").has_value());
    // Queued, then dropped before it is written: it must not land after the tombstone.
    tier->Write("late", kWholeValue, Whole("late bytes", 1, kValidated));
    tier->Drop("late");
    tier->Flush();
    EXPECT_FALSE(tier->Read("late", kWholeValue, 0).has_value());
    EXPECT_EQ(tier->stats().entries, 1u);
  }
  Crash(dir.path());
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_FALSE(tier->Read("gone", kWholeValue, 0).has_value());
  EXPECT_FALSE(tier->Read("gone/blocks", 0, 0).has_value());
  EXPECT_FALSE(tier->Read("late", kWholeValue, 0).has_value());
  EXPECT_TRUE(Bytes(*tier, "kept") == "kept bytes");
  EXPECT_EQ(tier->stats().entries, 1u);
}

TEST_P(DiskTierReopenTest, NewerGenerationReplaces) {
  TempDir dir;
  const auto options = Options(dir.path(), 4 << 20);
  const std::string v1 = RandomBytes(40'000, 1);
  const std::string v2 = RandomBytes(40'000, 2);
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    tier->Write("k", 0, Block(v1, 0, 16384, 1, kValidated, "\"one\""));
    tier->Write("k", 1, Block(v1, 1, 16384, 1, kValidated, "\"one\""));
    tier->Flush();
    tier->Write("k", 0, Block(v2, 0, 16384, 2, kValidated, "\"two\""));
    tier->Flush();
    EXPECT_FALSE(tier->Read("k", 1, 0).has_value());  // block 1 of version 1 is forgotten
    EXPECT_EQ(tier->Read("k", 0, 0)->generation, 2u);
    EXPECT_EQ(tier->Record("k")->first.etag, "\"two\"");
    EXPECT_EQ(tier->stats().entries, 1u);
  }
  Crash(dir.path());
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_FALSE(tier->Read("k", 1, 0).has_value());
  ExpectEntry(*tier, "k", 0, Block(v2, 0, 16384, 2, kValidated, "\"two\""));
  EXPECT_EQ(tier->stats().entries, 1u);
}

TEST(DiskTierTest, CorruptedEntryIsNotServedCountedAndDropped) {
  TempDir dir;
  auto tier = OpenTier(Options(dir.path()));
  ASSERT_TRUE(WaitLoaded(*tier));
  const std::string value = RandomBytes(20'000, 5);
  tier->Write("first", kWholeValue, Whole(value, 1, kValidated));
  tier->Flush();  // so that it is the first record
  tier->Write("second", kWholeValue, Whole(value, 1, kValidated));
  tier->Flush();
  // Flip one byte in the middle of the first record's data (records start at offset 0 of the
  // first segment, in write order).
  const std::vector<std::string> segments = Files(dir.path(), ".dat");
  ASSERT_EQ(segments.size(), 1u);
  int fd = open(segments[0].c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char byte;
  ASSERT_EQ(pread(fd, &byte, 1, 10'000), 1);
  byte ^= 0x40;
  ASSERT_EQ(pwrite(fd, &byte, 1, 10'000), 1);
  close(fd);
  EXPECT_FALSE(tier->Read("first", kWholeValue, 0).has_value());
  DiskTierStats s = tier->stats();
  EXPECT_EQ(s.checksum_failures, 1u);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_FALSE(tier->Record("first").has_value());
  EXPECT_FALSE(tier->Read("first", kWholeValue, 0).has_value());  // a miss now, not a failure
  EXPECT_EQ(tier->stats().checksum_failures, 1u);
  EXPECT_TRUE(Bytes(*tier, "second") == value);
}

// kill -9 during a write: the segment ends inside a record and has no index file.
TEST(DiskTierTest, TornTailKeepsEarlierEntries) {
  TempDir dir;
  const auto options = Options(dir.path());
  const std::string value = RandomBytes(10'000, 6);
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    // One at a time, so that they are appended in this order (two writer threads).
    for (const char* key : {"a", "b", "torn"}) {
      tier->Write(key, kWholeValue, Whole(value, 1, kValidated));
      tier->Flush();
    }
  }
  for (const std::string& f : Files(dir.path(), ".idx")) ASSERT_EQ(unlink(f.c_str()), 0);
  const std::vector<std::string> segments = Files(dir.path(), ".dat");
  ASSERT_EQ(segments.size(), 1u);
  // Each record is 72 + 1 + 10000 bytes rounded to 12 KiB: cut the third in its data.
  ASSERT_EQ(truncate(segments[0].c_str(), 2 * 12288 + 5000), 0);
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_TRUE(Bytes(*tier, "a") == value);
  EXPECT_TRUE(Bytes(*tier, "b") == value);
  EXPECT_FALSE(tier->Read("torn", kWholeValue, 0).has_value());
  EXPECT_EQ(tier->stats().entries, 2u);
  struct stat st;
  ASSERT_EQ(stat(segments[0].c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2 * 12288);  // cut at the last good record
  // New writes go on after it, and all of it survives another restart.
  tier->Write("c", kWholeValue, Whole(value, 1, kValidated));
  tier->Flush();
  tier.reset();
  tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_EQ(tier->stats().entries, 3u);
  EXPECT_TRUE(Bytes(*tier, "c") == value);
}

// The bound: the files under the directory (segment files, and index files rounded up to
// 4 KiB) never hold more than capacity_bytes; filesystem blocks likewise.
TEST(DiskTierTest, EvictionKeepsFilesWithinCapacity) {
  TempDir dir;
  const uint64_t capacity = 1 << 20;  // 64 KiB segments
  auto options = Options(dir.path(), capacity);
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  const std::string value = RandomBytes(10'000, 7);
  for (int i = 0; i < 300; ++i) {
    tier->Write(absl::StrCat("k", i), kWholeValue, Whole(value, 1, kValidated));
    if (i % 10 == 9) {
      tier->Flush();
      const DiskTierStats s = tier->stats();
      ASSERT_LE(s.used_bytes, capacity);
      const DiskUse use = Use(dir.path());
      ASSERT_LE(use.bytes, capacity) << "after " << i;
      ASSERT_LE(use.blocks_bytes, capacity) << "after " << i;
    }
  }
  const DiskTierStats s = tier->stats();
  EXPECT_GT(s.evictions, 0u);
  EXPECT_EQ(s.evicted_bytes, s.evictions * value.size());
  EXPECT_EQ(s.entries + s.evictions, 300u);
  EXPECT_GT(s.used_bytes, capacity / 2);
  EXPECT_FALSE(tier->Read("k0", kWholeValue, 0).has_value());  // FIFO: the oldest went
  EXPECT_TRUE(Bytes(*tier, "k299") == value);
  // A value that cannot fit is not written.
  tier->Write("huge", kWholeValue, Whole(RandomBytes(capacity, 8), 1, kValidated));
  tier->Flush();
  EXPECT_FALSE(tier->Read("huge", kWholeValue, 0).has_value());
  EXPECT_GE(tier->stats().writes_dropped, 1u);
  // Reopened with less room, it evicts down to it first.
  tier.reset();
  options.capacity_bytes = capacity / 4;
  tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_LE(Use(dir.path()).bytes, capacity / 4);
  EXPECT_TRUE(Bytes(*tier, "k299") == value);
}

TEST(DiskTierTest, QueueBoundDropsWrites) {
  TempDir dir;
  auto options = Options(dir.path());
  options.max_queued_write_bytes = 1;
  auto tier = OpenTier(options);
  tier->Write("k", kWholeValue, Whole("bytes", 1, kValidated));
  tier->Flush();
  EXPECT_EQ(tier->stats().writes_dropped, 1u);
  EXPECT_EQ(tier->stats().writes, 0u);
}

// A tmpfs of 4 MiB under a tier of 16 MiB: the filesystem fills long before the capacity.
TEST(DiskTierTest, FilesystemFullShrinksTheTier) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to mount a tmpfs";
  TempDir dir;
  if (mount("tmpfs", dir.path().c_str(), "tmpfs", 0, "size=4m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs: " << strerror(errno);
  }
  struct Unmount {
    std::string path;
    ~Unmount() { umount2(path.c_str(), MNT_DETACH); }
  } unmount{dir.path()};
  const uint64_t capacity = 16 << 20;  // 1 MiB segments
  auto tier = OpenTier(Options(dir.path() + "/tier", capacity));
  ASSERT_TRUE(WaitLoaded(*tier));
  std::vector<std::string> values;
  for (int i = 0; i < 120; ++i) {
    values.push_back(RandomBytes(100'000, 100 + i));
    tier->Write(absl::StrCat("k", i), kWholeValue, Whole(values.back(), 1, kValidated));
    if (i % 4 == 3) tier->Flush();
  }
  tier->Flush();
  int hits = 0;
  for (int i = 0; i < 120; ++i) {
    std::optional<CachedValue> got = tier->Read(absl::StrCat("k", i), kWholeValue, 0);
    if (got.has_value()) {
      ++hits;
      ASSERT_TRUE(got->value.view() == values[i]) << i;
    }
  }
  const DiskTierStats s = tier->stats();
  EXPECT_GE(s.enospc_events, 1u);
  EXPECT_LT(s.capacity_bytes, 4u << 20);
  EXPECT_LE(s.used_bytes, s.capacity_bytes);
  EXPECT_GT(hits, 5);
  EXPECT_TRUE(tier->Read("k119", kWholeValue, 0).has_value());  // the tier still works
  EXPECT_EQ(s.checksum_failures, 0u);
  // A drop on the full filesystem is still recorded: it does not come back at the next start.
  tier->Drop("k119");
  tier.reset();
  tier = OpenTier(Options(dir.path() + "/tier", capacity));
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_FALSE(tier->Read("k119", kWholeValue, 0).has_value());
  for (int i = 0; i < 119; ++i) {
    std::optional<CachedValue> got = tier->Read(absl::StrCat("k", i), kWholeValue, 0);
    if (got.has_value()) ASSERT_TRUE(got->value.view() == values[i]) << i;
  }
  tier.reset();
}

TEST(DiskTierTest, SecondOpenOfTheSameDirectoryFails) {
  TempDir dir;
  auto first = OpenTier(Options(dir.path()));
  ASSERT_NE(first, nullptr);
  absl::StatusOr<std::unique_ptr<DiskTier>> second = DiskTier::Open(Options(dir.path()), nullptr);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find(dir.path()), std::string::npos) << second.status();
  first.reset();
  EXPECT_NE(OpenTier(Options(dir.path())), nullptr);
  EXPECT_FALSE(DiskTier::Open(Options(dir.path(), 0), nullptr).ok());
}

// The loader is held on an index file that is a FIFO (its open blocks until a writer comes):
// meanwhile the tier answers, with misses; then it loads (by a scan) and hits.
TEST(DiskTierTest, ReadsMissWhileTheIndexLoadsThenHit) {
  TempDir dir;
  const auto options = Options(dir.path());
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    tier->Write("k", kWholeValue, Whole("bytes", 1, kValidated));
    tier->Flush();
  }
  const std::vector<std::string> indexes = Files(dir.path(), ".idx");
  ASSERT_EQ(indexes.size(), 1u);
  ASSERT_EQ(unlink(indexes[0].c_str()), 0);
  ASSERT_EQ(mkfifo(indexes[0].c_str(), 0600), 0);
  auto tier = OpenTier(options);
  ASSERT_NE(tier, nullptr);
  struct Release {
    std::string fifo;
    ~Release() {
      int fd = open(fifo.c_str(), O_WRONLY);  // blocks until the loader opens its end
      if (fd >= 0) close(fd);
    }
  };
  {
    Release release{indexes[0]};
    EXPECT_FALSE(tier->stats().index_loaded);
    EXPECT_FALSE(tier->Read("k", kWholeValue, 0).has_value());
    EXPECT_FALSE(tier->Record("k").has_value());
    // Writes meanwhile go to a new segment and win over what loads.
    tier->Write("new", kWholeValue, Whole("new bytes", 1, kValidated));
    tier->Flush();
    EXPECT_FALSE(tier->stats().index_loaded);
  }
  ASSERT_TRUE(WaitLoaded(*tier));
  EXPECT_TRUE(Bytes(*tier, "k") == "bytes");
  EXPECT_TRUE(Bytes(*tier, "new") == "new bytes");
  EXPECT_EQ(tier->stats().entries, 2u);
}

// Writers, readers and drops at once over a small tier (evicting all along): every read is
// the bytes written for that key and version, or a miss.
TEST(DiskTierTest, ConcurrentUseServesOnlyWhatWasWritten) {
  TempDir dir;
  auto options = Options(dir.path(), 1 << 20);
  options.write_threads = 2;
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  auto bytes_of = [](int key, Generation generation) {
    return RandomBytes(3000 + key * 10, key * 1000 + generation);
  };
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 400; ++i) {
        const int key = (i * 7 + t) % 50;
        const Generation generation = 1 + (i / 50) % 3;
        tier->Write(absl::StrCat("k", key), kWholeValue,
                    Whole(bytes_of(key, generation), generation, kValidated));
        if (i % 37 == 0) tier->Drop(absl::StrCat("k", (key + 3) % 50));
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop.load()) {
      for (int key = 0; key < 50; ++key) {
        std::optional<CachedValue> got = tier->Read(absl::StrCat("k", key), kWholeValue, 0);
        if (!got.has_value()) continue;
        ++hits;
        if (got->value.view() != bytes_of(key, got->generation)) ++bad;
      }
    }
  });
  threads[0].join();
  threads[1].join();
  tier->Flush();
  stop.store(true);
  threads[2].join();
  EXPECT_EQ(bad.load(), 0);
  const DiskTierStats s = tier->stats();
  EXPECT_LE(s.used_bytes, s.capacity_bytes);
  EXPECT_EQ(s.checksum_failures, 0u);
  uint64_t entries = 0;
  for (int key = 0; key < 50; ++key) {
    if (tier->Read(absl::StrCat("k", key), kWholeValue, 0).has_value()) ++entries;
  }
  EXPECT_EQ(entries, s.entries);
}

// The other I/O path (the tests above read with O_DIRECT where the filesystem allows it, and
// drop written pages): buffered reads, pages kept. Same bytes, same checks.
TEST(DiskTierTest, BufferedReadsServeAndCheckTheSame) {
  TempDir dir;
  DiskTierIo io;
  io.direct_reads = false;
  io.drop_written_pages = false;
  io.segment_bytes = 64 << 10;
  absl::StatusOr<std::unique_ptr<DiskTier>> opened = OpenDiskTier(Options(dir.path()), nullptr, io);
  ASSERT_TRUE(opened.ok()) << opened.status();
  DiskTier& tier = **opened;
  ASSERT_TRUE(WaitLoaded(tier));
  const std::string value = RandomBytes(30'000, 11);
  for (int i = 0; i < 5; ++i) {
    tier.Write(absl::StrCat("k", i), kWholeValue, Whole(value, 1, kValidated, "\"e\""));
    tier.Flush();  // in order: k0 is the first record
  }
  EXPECT_GT(Files(dir.path(), ".dat").size(), 1u);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(Bytes(tier, absl::StrCat("k", i)) == value) << i;
  const std::vector<std::string> segments = Files(dir.path(), ".dat");
  int fd = open(segments[0].c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, "X", 1, 20'000), 1);
  close(fd);
  EXPECT_FALSE(tier.Read("k0", kWholeValue, 0).has_value());
  EXPECT_EQ(tier.stats().checksum_failures, 1u);
  EXPECT_TRUE(Bytes(tier, "k1") == value);
}

// A sealed segment whose index file and a record went bad after start-up is evicted by a
// scan that stops at the bad record: the entries after it must leave the index too.
TEST(DiskTierTest, EvictingASegmentWithABadIndexFileForgetsAllItsEntries) {
  TempDir dir;
  const auto options = Options(dir.path(), 1 << 20);  // 64 KiB segments
  const std::string value = RandomBytes(10'000, 12);  // 12 KiB records: 5 per segment
  {
    auto tier = OpenTier(options);
    ASSERT_TRUE(WaitLoaded(*tier));
    for (int i = 0; i < 20; ++i) {
      tier->Write(absl::StrCat("k", i), kWholeValue, Whole(value, 1, kValidated));
      tier->Flush();
    }
  }
  auto tier = OpenTier(options);
  ASSERT_TRUE(WaitLoaded(*tier));
  ASSERT_EQ(tier->stats().entries, 20u);
  const std::vector<std::string> indexes = Files(dir.path(), ".idx");
  const std::vector<std::string> segments = Files(dir.path(), ".dat");
  ASSERT_GT(segments.size(), 2u);
  chunkd::testing::WriteFile(indexes[0], "garbage");
  ASSERT_EQ(truncate(segments[0].c_str(), 12288 + 100), 0);  // only k0 scans whole
  for (int i = 20; i < 120; ++i) {
    tier->Write(absl::StrCat("k", i), kWholeValue, Whole(value, 1, kValidated));
    tier->Flush();
  }
  EXPECT_FALSE(std::filesystem::exists(segments[0]));
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(tier->Record(absl::StrCat("k", i)).has_value()) << i;
  uint64_t readable = 0;
  for (int i = 0; i < 120; ++i) {
    if (tier->Read(absl::StrCat("k", i), kWholeValue, 0).has_value()) ++readable;
  }
  const DiskTierStats s = tier->stats();
  EXPECT_EQ(readable, s.entries);
  EXPECT_EQ(s.entries + s.evictions, 120u);
  EXPECT_EQ(s.checksum_failures, 0u);
}

}  // namespace
}  // namespace chunkd::server

// Tests of the file backend beyond the conformance suite: atomic replacement, temporary
// files, symbolic links that lead out of the root, and opening stores by URL.
#include "server/backend/file/file_backend.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "buffer/cpu/buffer.h"
#include "buffer/memory.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "server/common/key.h"
#include "tests/support/test_support.h"

namespace chunkd::server {
namespace {

using buffer::cpu::Buffer;
using chunkd::testing::PathExists;
using chunkd::testing::ReadFile;
using chunkd::testing::TempDir;
using chunkd::testing::WriteFile;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::Not;

std::unique_ptr<Backend> Open(const std::string& path, bool fsync = true) {
  BackendOptions options;
  options.fsync = fsync;
  auto b = OpenFileBackend(path, options);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

absl::StatusOr<std::string> Get(Backend& b, const std::string& key) {
  auto v = b.Read(key, nullptr);
  if (!v.ok()) return v.status();
  return std::string(v->view());
}

absl::Status Put(Backend& b, const std::string& key, const std::string& value,
                 const Conditions& conditions = {}) {
  return b.Write(key, Buffer::CopyOf(value), conditions).status();
}

std::vector<std::string> ListKeys(Backend& b, const std::string& prefix = "") {
  std::vector<std::string> keys;
  auto cursor = b.List(prefix, false);
  EXPECT_TRUE(cursor.ok()) << cursor.status();
  if (!cursor.ok()) return keys;
  for (int guard = 0; guard < 1000; ++guard) {
    ListPage page;
    auto more = (*cursor)->Next(100, &page);
    EXPECT_TRUE(more.ok()) << more.status();
    for (auto& e : page.entries) keys.push_back(e.key);
    if (!more.ok() || !*more) break;
  }
  return keys;
}

ListPage ListDirectory(Backend& b, const std::string& prefix) {
  ListPage all;
  auto cursor = b.List(prefix, true);
  EXPECT_TRUE(cursor.ok()) << cursor.status();
  if (!cursor.ok()) return all;
  for (int guard = 0; guard < 1000; ++guard) {
    auto more = (*cursor)->Next(100, &all);
    EXPECT_TRUE(more.ok()) << more.status();
    if (!more.ok() || !*more) break;
  }
  return all;
}

// Every path under `root` (relative), recursively, without following links.
std::vector<std::string> AllPaths(const std::string& root) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(root)) {
    out.push_back(std::filesystem::relative(e.path(), root).string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> TempNames(const std::string& root) {
  std::vector<std::string> out;
  for (const std::string& p : AllPaths(root)) {
    if (absl::StrContains(p, kFileBackendTempPrefix)) out.push_back(p);
  }
  return out;
}

void Symlink(const std::string& target, const std::string& link) {
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0) << link << " -> " << target;
}

TEST(FileBackendTest, WritesAreAtomic) {
  TempDir root;
  auto b = Open(root.path(), /*fsync=*/false);  // atomicity comes from the rename
  ASSERT_NE(b, nullptr);
  const std::string a(1 << 20, 'A'), bee(1 << 20, 'B');
  ASSERT_TRUE(Put(*b, "arr/c/0", a).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, torn{0}, errors{0};
  std::thread reader([&] {
    while (!stop.load()) {
      auto v = b->Read("arr/c/0", nullptr);
      if (!v.ok()) {
        errors.fetch_add(1);
        continue;
      }
      reads.fetch_add(1);
      std::string_view s = v->view();
      if (s.size() != a.size() || s.find_first_not_of(s[0]) != std::string_view::npos ||
          (s[0] != 'A' && s[0] != 'B')) {
        torn.fetch_add(1);
      }
    }
  });
  for (int i = 0; i < 60; ++i) ASSERT_TRUE(Put(*b, "arr/c/0", i % 2 ? a : bee).ok());
  // Let the reader overlap a few more writes if it was slow to start.
  while (reads.load() < 20) ASSERT_TRUE(Put(*b, "arr/c/0", bee).ok());
  stop = true;
  reader.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_THAT(TempNames(root.path()), IsEmpty());
}

TEST(FileBackendTest, StoresValuesAsPlainFiles) {
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->kind(), "file");
  char real[PATH_MAX];
  ASSERT_NE(::realpath(root.path().c_str(), real), nullptr);
  EXPECT_EQ(b->location(), absl::StrCat("file://", real));
  ASSERT_TRUE(Put(*b, "arr/c/0/1", "chunk bytes").ok());
  EXPECT_EQ(ReadFile(root.Join("arr/c/0/1")), "chunk bytes");
  // A file placed by another program is a value.
  WriteFile(root.Join("arr/zarr.json"), "{}");
  auto v = Get(*b, "arr/zarr.json");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "{}");
  EXPECT_THAT(ListKeys(*b), ElementsAre("arr/c/0/1", "arr/zarr.json"));
}

TEST(FileBackendTest, GenerationSurvivesReopening) {
  TempDir root;
  Generation generation;
  {
    auto b = Open(root.path());
    ASSERT_NE(b, nullptr);
    auto info = b->Write("k", Buffer::CopyOf("v"), {});
    ASSERT_TRUE(info.ok());
    generation = info->generation;
  }
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  auto stat = b->Stat("k");
  ASSERT_TRUE(stat.ok());
  EXPECT_EQ(stat->generation, generation);
  Conditions match;
  match.if_generation_match = generation;
  EXPECT_TRUE(Put(*b, "k", "w", match).ok());
}

TEST(FileBackendTest, NoTemporaryFilesLeftOrListed) {
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(Put(*b, absl::StrCat("d", i % 3, "/k", i), "x").ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(Put(*b, "d0/k0", std::string(i * 1000, 'y')).ok());
  // Failed writes leave nothing behind either.
  Conditions create_only;
  create_only.if_generation_match = 0;
  EXPECT_FALSE(Put(*b, "d0/k0", "no", create_only).ok());
  EXPECT_FALSE(Put(*b, "d0", "a directory is there").ok());
  EXPECT_FALSE(Put(*b, "d0/k0/below", "a value is there").ok());
  ASSERT_TRUE(b->Delete("d1/k1", {}).ok());
  EXPECT_THAT(TempNames(root.path()), IsEmpty());

  // Temporary files of a write in progress (or of a crashed one) are never listed.
  std::string temp = absl::StrCat(kFileBackendTempPrefix, "12345-0");
  WriteFile(root.Join(temp), "partial");
  WriteFile(root.Join("d2/" + temp), "partial");
  for (const std::string& key : ListKeys(*b)) {
    EXPECT_FALSE(absl::StrContains(key, kFileBackendTempPrefix)) << key;
  }
  EXPECT_EQ(ListKeys(*b).size(), 19u);
  ListPage top = ListDirectory(*b, "");
  EXPECT_THAT(top.entries, IsEmpty());
  EXPECT_THAT(top.prefixes, ElementsAre("d0/", "d1/", "d2/"));
  ListPage d2 = ListDirectory(*b, "d2/");
  for (const ListEntry& e : d2.entries) {
    EXPECT_FALSE(absl::StrContains(e.key, kFileBackendTempPrefix)) << e.key;
  }
  EXPECT_TRUE(ListKeys(*b, std::string(kFileBackendTempPrefix)).empty());
  // Keys naming a temporary file cannot be written.
  absl::Status s = Put(*b, "d2/" + temp, "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(ReadFile(root.Join("d2/" + temp)), "partial");
}

// Sets the modification time of `path` to `seconds` from now (a link itself, not its target).
void Touch(const std::string& path, int seconds) {
  struct timespec times[2] = {{0, UTIME_OMIT}, {std::time(nullptr) + seconds, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, AT_SYMLINK_NOFOLLOW), 0) << path;
}

TEST(FileBackendTest, TemporaryFilesOfInterruptedWritesAreSweptAtStart) {
  TempDir root, outside;
  std::string prefix(kFileBackendTempPrefix);
  ASSERT_EQ(::mkdir(root.Join("a").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(root.Join("a/b").c_str(), 0755), 0);
  // Left by writes that a crash interrupted: older than this start.
  for (const std::string& stale :
       {prefix + "4242-0", "a/b/" + prefix + "4242-7", prefix + "4242-8-0123456789abcdef"}) {
    WriteFile(root.Join(stale), "partial");
    Touch(root.Join(stale), -3600);
  }
  // Kept: a write in progress (touched after the start), names chunkd does not make, what is
  // not a regular file, and anything beyond a link.
  WriteFile(root.Join(prefix + "4242-9"), "in progress");
  Touch(root.Join(prefix + "4242-9"), 3600);
  std::vector<std::string> kept = {prefix + "4242-9", prefix + "notours",
                                   prefix + "1-2-3",  prefix + "12-",
                                   "a/b/c",           "a/link/" + prefix + "7-7"};
  for (const std::string& name :
       {prefix + "notours", prefix + "1-2-3", prefix + "12-", std::string("a/b/c")}) {
    WriteFile(root.Join(name), "x");
    Touch(root.Join(name), -3600);
  }
  ASSERT_EQ(::mkdir(root.Join(prefix + "5-5").c_str(), 0755), 0);
  kept.push_back(prefix + "5-5");
  ASSERT_EQ(::symlink("a/b/c", root.Join(prefix + "6-6").c_str()), 0);
  Touch(root.Join(prefix + "6-6"), -3600);
  kept.push_back(prefix + "6-6");
  WriteFile(outside.Join(prefix + "7-7"), "beyond a link");
  Touch(outside.Join(prefix + "7-7"), -3600);
  ASSERT_EQ(::symlink(outside.path().c_str(), root.Join("a/link").c_str()), 0);

  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  EXPECT_FALSE(PathExists(root.Join(prefix + "4242-0")));
  EXPECT_FALSE(PathExists(root.Join("a/b/" + prefix + "4242-7")));
  EXPECT_FALSE(PathExists(root.Join(prefix + "4242-8-0123456789abcdef")));
  for (const std::string& name : kept) EXPECT_TRUE(PathExists(root.Join(name))) << name;
  EXPECT_EQ(*Get(*b, "a/b/c"), "x");
  EXPECT_THAT(ListKeys(*b), ElementsAre("a/b/c"));
}

// Two containers whose writers are both pid 1 share a volume: a temporary name made of pid and
// counter alone is the same for both. Here the other writer's temporary file (a write of its in
// progress) has the name such a scheme gives this store's first write.
TEST(FileBackendTest, TemporaryNamesDoNotCollideWithAnotherWriterOfTheSamePid) {
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  ASSERT_EQ(::mkdir(root.Join("d").c_str(), 0755), 0);
  std::string theirs = root.Join(absl::StrCat("d/", kFileBackendTempPrefix, ::getpid(), "-0"));
  WriteFile(theirs, "their write in progress");
  ASSERT_TRUE(Put(*b, "d/k", "mine").ok());
  EXPECT_EQ(*Get(*b, "d/k"), "mine");
  EXPECT_EQ(ReadFile(theirs), "their write in progress");
  // Two stores of one process (one pid) writing into one directory at once.
  auto other = Open(root.path());
  ASSERT_NE(other, nullptr);
  std::atomic<int> failures{0};
  std::vector<std::thread> writers;
  for (Backend* store : {b.get(), other.get()}) {
    writers.emplace_back([store, &failures] {
      for (int i = 0; i < 50; ++i) {
        if (!Put(*store, absl::StrCat("d/", reinterpret_cast<uintptr_t>(store) % 997, "-", i), "v")
                 .ok()) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : writers) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// The path a descriptor names, for the fsync seam.
std::string PathOfFd(int fd) {
  char link[64], real[4096];
  std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(link, real, sizeof(real) - 1);
  return n < 0 ? std::string() : std::string(real, static_cast<size_t>(n));
}

bool IsDirectoryFd(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
}

// What the seam shows: which directories the store asks to sync, in which order; not what
// the disk does with it.
TEST(FileBackendTest, CreatedDirectoriesAreSyncedIntoTheirParents) {
  TempDir root;
  char real[4096];
  ASSERT_NE(::realpath(root.path().c_str(), real), nullptr);
  std::string base = real;
  absl::Mutex mu;
  std::vector<std::string> synced;
  BackendOptions options;
  options.fsync_for_testing = [&](int fd) {
    if (IsDirectoryFd(fd)) {
      absl::MutexLock lock(&mu);
      synced.push_back(PathOfFd(fd));
    }
    return ::fsync(fd);
  };
  auto b = OpenFileBackend(root.path(), options);
  ASSERT_TRUE(b.ok()) << b.status();
  auto take = [&] {
    absl::MutexLock lock(&mu);
    return std::exchange(synced, {});
  };
  ASSERT_TRUE(Put(**b, "a/b/k", "v").ok());
  // root holds the new "a", a the new "b", a/b the renamed value.
  EXPECT_THAT(take(), ElementsAre(base, base + "/a", base + "/a/b"));
  ASSERT_TRUE(Put(**b, "a/b/k", "w").ok());  // nothing created: only the value's directory
  EXPECT_THAT(take(), ElementsAre(base + "/a/b"));
}

TEST(FileBackendTest, FailedDirectorySyncFailsTheWriteAndDelete) {
  TempDir root;
  std::atomic<bool> fail{false};
  BackendOptions options;
  options.fsync_for_testing = [&](int fd) {
    if (fail.load() && IsDirectoryFd(fd)) {
      errno = EIO;
      return -1;
    }
    return ::fsync(fd);
  };
  auto b = OpenFileBackend(root.path(), options);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE(Put(**b, "k", "old").ok());
  fail = true;
  absl::Status put = Put(**b, "k", "new");
  EXPECT_FALSE(put.ok());
  EXPECT_THAT(std::string(put.message()), ::testing::HasSubstr("sync the directory"));
  absl::Status del = (*b)->Delete("k", {});
  EXPECT_FALSE(del.ok());
  fail = false;
  ASSERT_TRUE(Put(**b, "x/y", "v").ok());
  fail = true;
  EXPECT_FALSE(Put(**b, "z/y", "v").ok());  // the new directory z could not be synced
}

TEST(FileBackendTest, TemporaryFilesCannotBeReadOrDeleted) {
  // A temporary file may be half written: reading it would return a torn value, and deleting
  // it would break the write that owns it.
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  std::string temp = absl::StrCat(kFileBackendTempPrefix, "999-1");
  WriteFile(root.Join(temp), "partial");
  ASSERT_EQ(::mkdir(root.Join("d").c_str(), 0755), 0);
  WriteFile(root.Join("d/" + temp), "partial");
  for (const std::string& key : {temp, "d/" + temp}) {
    auto r = b->Read(key, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument)
        << key << ": " << (r.ok() ? "read " + std::string(r->view()) : r.status().ToString());
    EXPECT_EQ(b->Stat(key).status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_EQ(b->Delete(key, {}).code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_EQ(ReadFile(root.Join(key)), "partial") << key;
  }
  // A name that merely contains the prefix is an ordinary key.
  std::string ordinary = absl::StrCat("x", kFileBackendTempPrefix);
  ASSERT_TRUE(Put(*b, ordinary, "fine").ok());
  EXPECT_EQ(*Get(*b, ordinary), "fine");
  ASSERT_TRUE(b->Delete(ordinary, {}).ok());
}

TEST(FileBackendTest, ValueInPlaceOfDirectoryAndDirectoryInPlaceOfValue) {
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(Put(*b, "a", "leaf").ok());
  absl::Status s = Put(*b, "a/b", "below a value");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  s = Put(*b, "a/b/c", "deeper");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(*Get(*b, "a"), "leaf");

  ASSERT_TRUE(Put(*b, "d/e", "x").ok());
  s = Put(*b, "d", "over a directory");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(*Get(*b, "d/e"), "x");
  EXPECT_THAT(ListKeys(*b), ElementsAre("a", "d/e"));
  EXPECT_THAT(TempNames(root.path()), IsEmpty());
}

TEST(FileBackendTest, SymbolicLinksCannotLeaveTheRoot) {
  TempDir root, outside, outside_empty;
  WriteFile(outside.Join("secret"), "secret");
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(Put(*b, "real/v", "inside").ok());

  // Keys cannot name a path outside the root at all.
  for (const std::string key : {"../x", "/etc/passwd", "a/../../x", "./x"}) {
    EXPECT_EQ(ValidateKey(key).code(), absl::StatusCode::kInvalidArgument) << key;
  }

  Symlink(outside.Join("secret"), root.Join("out_file"));
  Symlink(outside.Join("secret"), root.Join("out_file2"));
  Symlink(outside.path(), root.Join("out_dir"));
  Symlink(outside_empty.path(), root.Join("out_empty"));
  Symlink(outside_empty.Join("created"), root.Join("dangling"));
  Symlink("real/v", root.Join("alias"));
  Symlink(root.Join("real/v"), root.Join("alias_abs"));
  Symlink("real", root.Join("aliasdir"));
  Symlink("loop", root.Join("loop"));
  ASSERT_EQ(::mkdir(root.Join("sub").c_str(), 0755), 0);
  Symlink("../../" + std::filesystem::path(outside.path()).filename().string() + "/secret",
          root.Join("sub/relative_out"));
  ASSERT_EQ(std::filesystem::canonical(root.Join("sub/relative_out")).string(),
            std::filesystem::canonical(outside.Join("secret")).string());

  // Reads and stats through links to outside are refused.
  for (const std::string key : {"out_file", "out_dir/secret", "sub/relative_out"}) {
    auto r = b->Read(key, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << key << ": " << r.status();
    auto s = b->Stat(key);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kPermissionDenied) << key << ": " << s.status();
  }
  // Links inside the root are followed for reading.
  for (const std::string key : {"alias", "alias_abs", "aliasdir/v"}) {
    auto v = Get(*b, key);
    ASSERT_TRUE(v.ok()) << key << ": " << v.status();
    EXPECT_EQ(*v, "inside") << key;
  }
  // A link loop is not a value.
  EXPECT_EQ(b->Read("loop", nullptr).status().code(), absl::StatusCode::kNotFound);

  // Listings skip links to outside and do not descend into linked directories.
  EXPECT_THAT(ListKeys(*b), ElementsAre("alias", "alias_abs", "real/v"));
  ListPage top = ListDirectory(*b, "");
  EXPECT_THAT(top.prefixes, Not(Contains("out_dir/")));
  EXPECT_THAT(top.prefixes, Not(Contains("out_empty/")));
  EXPECT_THAT(top.prefixes, Contains("real/"));
  for (const ListEntry& e : top.entries) {
    EXPECT_TRUE(e.key == "alias" || e.key == "alias_abs") << e.key;
  }
  // Listing under a link to outside lists nothing, or is refused.
  for (bool directory : {false, true}) {
    auto cursor = b->List("out_dir/", directory);
    if (!cursor.ok()) {
      EXPECT_EQ(cursor.status().code(), absl::StatusCode::kPermissionDenied) << cursor.status();
      continue;
    }
    ListPage page;
    auto more = (*cursor)->Next(100, &page);
    if (!more.ok()) {
      EXPECT_EQ(more.status().code(), absl::StatusCode::kPermissionDenied) << more.status();
    }
    EXPECT_THAT(page.entries, IsEmpty());
    EXPECT_THAT(page.prefixes, IsEmpty());
  }

  // Writes never go through a linked directory to outside.
  for (const std::string key :
       {"out_empty/new", "out_empty/sub/new", "out_dir/secret", "out_dir/new"}) {
    absl::Status s = Put(*b, key, "overwritten");
    EXPECT_FALSE(s.ok()) << key;
  }
  Conditions create_only;
  create_only.if_generation_match = 0;
  EXPECT_FALSE(Put(*b, "out_file", "overwritten", create_only).ok());
  // Writing a key that is a link replaces the link, never the file it points to.
  (void)Put(*b, "out_file2", "replaced");
  (void)Put(*b, "dangling", "replaced");
  (void)Put(*b, "sub/relative_out", "replaced");

  // Deletes never remove anything outside.
  (void)b->Delete("out_file", {});
  (void)b->Delete("out_dir/secret", {});
  (void)b->Delete("out_empty/new", {});

  EXPECT_EQ(ReadFile(outside.Join("secret")), "secret");
  EXPECT_THAT(AllPaths(outside.path()), ElementsAre("secret"));
  EXPECT_THAT(AllPaths(outside_empty.path()), IsEmpty());
  // What the replaced links hold now lives inside the root.
  for (const std::string key : {"out_file2", "dangling", "sub/relative_out"}) {
    auto v = b->Read(key, nullptr);
    if (v.ok()) {
      EXPECT_EQ(v->view(), "replaced") << key;
    }
  }
}

TEST(FileBackendTest, RootReachedThroughALink) {
  TempDir real, links;
  Symlink(real.path(), links.Join("store"));
  auto b = Open(links.Join("store"));
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(Put(*b, "a/b", "v").ok());
  EXPECT_EQ(*Get(*b, "a/b"), "v");
  EXPECT_EQ(ReadFile(real.Join("a/b")), "v");
  EXPECT_THAT(ListKeys(*b), ElementsAre("a/b"));
}

// The heap, refusing blocks larger than `limit`, and remembering the largest block asked for:
// how much of a value a read brought into memory.
class CappedAllocator final : public buffer::HostAllocator {
 public:
  explicit CappedAllocator(size_t limit) : limit_(limit) {}
  absl::StatusOr<std::shared_ptr<buffer::Block>> Allocate(size_t size) override {
    size_t seen = largest_.load();
    while (size > seen && !largest_.compare_exchange_weak(seen, size)) {
    }
    if (size > limit_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("test allocator: ", size, " bytes asked, ", limit_, " at most"));
    }
    return buffer::HeapAllocator().Allocate(size);
  }
  buffer::MemoryKind kind() const override { return buffer::HeapAllocator().kind(); }
  size_t largest() const { return largest_.load(); }

 private:
  const size_t limit_;
  std::atomic<size_t> largest_{0};
};

// A range of a huge value reads that range, not the value: an 8 GiB sparse file whose last
// 4 KiB hold data, read through an allocator that refuses more than 1 MiB.
TEST(FileBackendTest, RangeAndSuffixReadsReadOnlyTheirBytes) {
  TempDir dir;
  constexpr uint64_t kSize = uint64_t{8} << 30;
  const std::string tail = chunkd::testing::RandomBytes(4096, 5);
  const std::string middle = "in the middle";
  {
    int fd = ::open(dir.Join("big").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    if (::ftruncate(fd, static_cast<off_t>(kSize)) != 0) {
      int err = errno;
      ::close(fd);
      GTEST_SKIP() << "no 8 GiB sparse file here: " << std::strerror(err);
    }
    ASSERT_EQ(::pwrite(fd, tail.data(), tail.size(), static_cast<off_t>(kSize - tail.size())),
              static_cast<ssize_t>(tail.size()));
    ASSERT_EQ(::pwrite(fd, middle.data(), middle.size(), static_cast<off_t>(kSize / 2)),
              static_cast<ssize_t>(middle.size()));
    ::close(fd);
  }
  CappedAllocator allocator(1 << 20);
  BackendOptions options;
  options.allocator = &allocator;
  auto opened = OpenFileBackend(dir.path(), options);
  ASSERT_TRUE(opened.ok()) << opened.status();
  Backend& backend = **opened;
  auto stat = backend.Stat("big");
  ASSERT_TRUE(stat.ok()) << stat.status();
  ASSERT_EQ(stat->size, kSize);

  ValueInfo info;
  auto range = backend.ReadRange("big", kSize - 4096, 4096, &info);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_TRUE(range->view() == tail);
  EXPECT_EQ(info.size, kSize);
  EXPECT_EQ(info.generation, stat->generation);
  // Past the end: the bytes there are.
  range = backend.ReadRange("big", kSize - 10, 4096, &info);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_TRUE(range->view() == std::string_view(tail).substr(4086));

  auto suffix = backend.ReadSuffix("big", 4096, &info);
  ASSERT_TRUE(suffix.ok()) << suffix.status();
  EXPECT_TRUE(suffix->view() == tail);
  EXPECT_EQ(info.size, kSize);
  EXPECT_EQ(info.generation, stat->generation);

  auto of_version = backend.ReadRangeIfMatch("big", kSize / 2, middle.size(), *stat, &info);
  ASSERT_TRUE(of_version.ok()) << of_version.status();
  EXPECT_EQ(of_version->view(), middle);
  EXPECT_EQ(allocator.largest(), 4096u);

  // The reads above went through the allocator that would have refused the whole value.
  EXPECT_EQ(backend.Read("big", nullptr).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(FileBackendTest, FifoInTheStoreDoesNotBlock) {
  TempDir root;
  auto b = Open(root.path());
  ASSERT_NE(b, nullptr);
  ASSERT_EQ(::mkfifo(root.Join("pipe").c_str(), 0644), 0);
  // Read on another thread, so that a hang fails the test instead of stalling the suite.
  auto done = std::make_shared<std::atomic<int>>(-1);
  std::thread([b = b.get(), done] {
    *done = static_cast<int>(b->Read("pipe", nullptr).status().code());
  }).detach();
  for (int i = 0; i < 500 && done->load() < 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GE(done->load(), 0) << "Read of a FIFO blocked";
  EXPECT_EQ(static_cast<absl::StatusCode>(done->load()), absl::StatusCode::kNotFound);
  EXPECT_THAT(ListKeys(*b), IsEmpty());
}

TEST(FileBackendTest, OpenBackendByUrl) {
  TempDir root;
  BackendOptions options;
  auto missing = OpenBackend(root.Join("does/not/exist"), options);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  missing = OpenBackend("file://" + root.Join("nope"), options);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();

  auto unknown = OpenBackend("s3x://foo", options);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument) << unknown.status();
  EXPECT_THAT(std::string(unknown.status().message()), ::testing::HasSubstr("s3x"));
  EXPECT_EQ(OpenBackend("", options).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(OpenBackend("memory://somewhere", options).status().code(),
            absl::StatusCode::kInvalidArgument);

  WriteFile(root.Join("plain"), "not a directory");
  EXPECT_FALSE(OpenBackend(root.Join("plain"), options).ok());

  auto memory = OpenBackend("memory://", options);
  ASSERT_TRUE(memory.ok()) << memory.status();
  EXPECT_EQ((*memory)->kind(), "memory");
  ASSERT_TRUE((*memory)->Write("k", Buffer::CopyOf("v"), {}).ok());
  EXPECT_EQ(*Get(**memory, "k"), "v");

  auto by_path = OpenBackend(root.path(), options);
  ASSERT_TRUE(by_path.ok()) << by_path.status();
  EXPECT_EQ((*by_path)->kind(), "file");
  auto by_url = OpenBackend("file://" + root.path(), options);
  ASSERT_TRUE(by_url.ok()) << by_url.status();
  EXPECT_EQ((*by_url)->kind(), "file");
  ASSERT_TRUE((*by_path)->Write("x/y", Buffer::CopyOf("shared"), {}).ok());
  EXPECT_EQ(*Get(**by_url, "x/y"), "shared");
}

}  // namespace
}  // namespace chunkd::server

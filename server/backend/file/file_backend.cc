#include "server/backend/file/file_backend.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>
#include <optional>
#include <string>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/backend/tree_walk.h"
#include "server/common/byte_size.h"
#include "server/common/key.h"
#include "server/common/log.h"

namespace chunkd::server {
namespace {

// Owns a file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

absl::Status ErrnoError(int err, absl::string_view what, absl::string_view key) {
  std::string message = absl::StrCat(what, " ", QuoteKey(key), ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
      return absl::ResourceExhaustedError(message);
    case ENAMETOOLONG:
      return absl::InvalidArgumentError(message);
    case EROFS:
    case EISDIR:
    case ELOOP:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

// A generation that is stable across restarts and changes with every replacement of the file:
// a mix of the inode and the modification time (made unique per write by the writer).
Generation GenerationOf(const struct stat& st) {
  // SplitMix64 steps over the fields; absl::Hash is seeded per process, which would make
  // generations change across restarts.
  auto mix = [](uint64_t h, uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 27;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 31;
    return h;
  };
  uint64_t h = 0x243F6A8885A308D3ull;
  h = mix(h, st.st_dev);
  h = mix(h, st.st_ino);
  h = mix(h, static_cast<uint64_t>(st.st_mtim.tv_sec));
  h = mix(h, static_cast<uint64_t>(st.st_mtim.tv_nsec));
  h = mix(h, static_cast<uint64_t>(st.st_size));
  return h == 0 ? 1 : h;
}

// A modification time no earlier write from this process used, so that two writes of the
// same size within one clock tick (file times are coarse) still differ in generation.
struct timespec UniqueModificationTime() {
  static std::atomic<int64_t> last_ns{0};
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  int64_t want = static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec;
  int64_t prev = last_ns.load();
  int64_t next;
  do {
    next = std::max(want, prev + 1);
  } while (!last_ns.compare_exchange_weak(prev, next));
  return {static_cast<time_t>(next / 1000000000), static_cast<long>(next % 1000000000)};
}

absl::string_view LastSegment(absl::string_view key) {
  size_t slash = key.rfind('/');
  return slash == absl::string_view::npos ? key : key.substr(slash + 1);
}

std::vector<absl::string_view> Segments(absl::string_view path) {
  std::vector<absl::string_view> out;
  size_t start = 0;
  while (start < path.size()) {
    size_t end = path.find('/', start);
    if (end == absl::string_view::npos) end = path.size();
    if (end > start) out.push_back(path.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

bool IsTempName(absl::string_view name) { return absl::StartsWith(name, kFileBackendTempPrefix); }

// Whether `name` is a temporary file as WriteOnce names them: the prefix, the writer's pid, '-',
// a counter, '-' and the store's 16 random hex digits (older versions: no random part). Other
// names with the prefix are not chunkd's to remove.
bool IsWriteTempName(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, kFileBackendTempPrefix)) return false;
  auto all = [](absl::string_view s, size_t max, auto pred) {
    return !s.empty() && s.size() <= max && std::all_of(s.begin(), s.end(), pred);
  };
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  size_t dash = name.find('-');
  if (dash == absl::string_view::npos || !all(name.substr(0, dash), 20, digit)) return false;
  name.remove_prefix(dash + 1);
  dash = name.find('-');
  if (dash == absl::string_view::npos) return all(name, 20, digit);
  return all(name.substr(0, dash), 20, digit) && name.size() - dash - 1 == 16 &&
         all(name.substr(dash + 1), 16, hex);
}

// 64 random bits for this store's temporary names: two writers that share a volume can have the
// same pid (two containers whose writer is pid 1), so the pid alone does not keep their names
// apart.
uint64_t RandomTempTag() {
  uint64_t tag = 0;
  if (::getrandom(&tag, sizeof(tag), 0) != static_cast<ssize_t>(sizeof(tag))) {
    // No getrandom (very old kernels): the time in ns and the address of a stack variable.
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    tag = (static_cast<uint64_t>(now.tv_sec) * 1000000000 + now.tv_nsec) ^
          reinterpret_cast<uintptr_t>(&tag);
  }
  return tag;
}

struct SweepResult {
  uint64_t files = 0;
  uint64_t bytes = 0;
  int errors = 0;
};

// Removes, in the directory `dir` and below it (never through a link), the temporary files of
// writes that a crash interrupted: regular files named as WriteOnce names them and last
// modified before `before`. A write running now (this server's, or another's on the same
// directory) has touched its file since.
void SweepTempFiles(int dir, const struct timespec& before, SweepResult* result) {
  int dup_fd = ::fcntl(dir, F_DUPFD_CLOEXEC, 0);
  DIR* listing = dup_fd >= 0 ? ::fdopendir(dup_fd) : nullptr;
  if (listing == nullptr) {
    if (dup_fd >= 0) ::close(dup_fd);
    ++result->errors;
    return;
  }
  std::vector<std::string> subdirs;
  while (struct dirent* e = ::readdir(listing)) {
    absl::string_view name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat st;
    bool is_dir = e->d_type == DT_DIR;
    if (e->d_type == DT_UNKNOWN) {  // some file systems do not say: ask
      is_dir = ::fstatat(dir, e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
    }
    if (is_dir) {
      subdirs.emplace_back(name);
      continue;
    }
    if (!IsWriteTempName(name)) continue;
    if (::fstatat(dir, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
    bool older = st.st_mtim.tv_sec < before.tv_sec ||
                 (st.st_mtim.tv_sec == before.tv_sec && st.st_mtim.tv_nsec < before.tv_nsec);
    if (!older) continue;
    if (::unlinkat(dir, e->d_name, 0) == 0) {
      ++result->files;
      result->bytes += static_cast<uint64_t>(st.st_size);
    } else {
      ++result->errors;
    }
  }
  ::closedir(listing);
  for (const std::string& name : subdirs) {
    UniqueFd child(::openat(dir, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (child.valid()) SweepTempFiles(child.get(), before, result);
  }
}

// Keys naming a temporary file are refused: such a file may be half written (reading it would
// return a torn value) and belongs to a write in progress (deleting it would break that write).
absl::Status ReservedKeyError(absl::string_view key) {
  return absl::InvalidArgumentError(absl::StrCat("key ", QuoteKey(key), ": names starting with '",
                                                 kFileBackendTempPrefix,
                                                 "' are reserved by the file store"));
}

using Child = TreeChild;

class FileBackend;

// Frames hold the directory's open descriptor.
class FileListCursor final : public TreeWalkCursor<UniqueFd> {
 public:
  FileListCursor(const FileBackend* backend, std::string prefix, bool directory)
      : TreeWalkCursor(std::move(prefix), directory), backend_(backend) {}

 private:
  absl::StatusOr<std::optional<Frame>> ReadFirst(std::string rel,
                                                 absl::string_view name_filter) override;
  absl::StatusOr<std::optional<Frame>> ReadChild(const Frame& parent, const Child& child,
                                                 std::string rel) override;
  absl::StatusOr<Frame> ReadFrame(UniqueFd fd, std::string rel, absl::string_view name_filter);

  const FileBackend* backend_;
};

class FileBackend final : public Backend {
 public:
  FileBackend(UniqueFd root_fd, std::string root_path, const BackendOptions& options)
      : root_fd_(std::move(root_fd)),
        root_path_(std::move(root_path)),
        allocator_(options.allocator),
        fsync_(options.fsync),
        fsync_hook_(options.fsync_for_testing),
        temp_tag_(absl::StrFormat("%016x", RandomTempTag())) {}

  absl::string_view kind() const override { return "file"; }
  std::string location() const override { return absl::StrCat("file://", root_path_); }

  // Every read checks its cached copy with one stat (about a microsecond, on the caller's
  // thread): the file is replaced, rewritten or removed by other processes at any time.
  Validation validation() const override { return Validation::kLocal; }
  absl::Duration default_revalidate_after() const override { return absl::ZeroDuration(); }

  // A stat of the path, following links as the open of a read does: the file still holds the
  // cached generation (same device, inode, size and modification time in ns). A link that now
  // leads elsewhere (even outside the root) shows another generation, and the read that
  // follows checks where it leads.
  absl::StatusOr<bool> IsCurrent(absl::string_view key, const ValueInfo& cached) override {
    std::string path(key);
    struct stat st;
    if (::fstatat(root_fd_.get(), path.c_str(), &st, 0) != 0) {
      int err = errno;
      if (err == ENOENT || err == ENOTDIR || err == ELOOP) return false;
      return ErrnoError(err, "stat", key);
    }
    return S_ISREG(st.st_mode) && GenerationOf(st) == cached.generation;
  }

  absl::StatusOr<buffer::cpu::Buffer> Read(absl::string_view key, ValueInfo* info) override {
    return ReadRange(key, 0, kToEnd, info);
  }

  // Reads only the range (pread), never the whole file: a 4 KiB range of a 2 GiB value reads
  // 4 KiB.
  absl::StatusOr<buffer::cpu::Buffer> ReadRange(absl::string_view key, uint64_t offset,
                                                uint64_t length, ValueInfo* info) override {
    struct stat st;
    auto fd = OpenValue(key, &st);
    if (!fd.ok()) return fd.status();
    return ReadOpenValue(fd->get(), st, key, offset, length, info);
  }

  // One descriptor for the size and the bytes: atomic against chunkd's writes (a rename).
  absl::StatusOr<buffer::cpu::Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                                 ValueInfo* info) override {
    struct stat st;
    auto fd = OpenValue(key, &st);
    if (!fd.ok()) return fd.status();
    uint64_t size = static_cast<uint64_t>(st.st_size);
    uint64_t take = std::min(length, size);
    return ReadOpenValue(fd->get(), st, key, size - take, take, info);
  }

  // The generation is checked on the descriptor the bytes are then read from, so they are of
  // that version even if the file is replaced meanwhile.
  absl::StatusOr<buffer::cpu::Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset,
                                                       uint64_t length, const ValueInfo& expected,
                                                       ValueInfo* info) override {
    struct stat st;
    auto fd = OpenValue(key, &st);
    if (!fd.ok()) return fd.status();
    if (GenerationOf(st) != expected.generation) {
      return VersionChangedError(key, expected.generation);
    }
    return ReadOpenValue(fd->get(), st, key, offset, length, info);
  }

  absl::StatusOr<ValueInfo> Stat(absl::string_view key) override {
    struct stat st;
    auto fd = OpenValue(key, &st);
    if (!fd.ok()) return fd.status();
    return ValueInfo{static_cast<uint64_t>(st.st_size), GenerationOf(st)};
  }

  absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                  const Conditions& conditions) override {
    absl::string_view leaf = LastSegment(key);
    if (IsTempName(leaf)) return ReservedKeyError(key);
    absl::MutexLock lock(&LockFor(key));
    if (absl::Status s = CheckConditions(key, conditions); !s.ok()) return s;
    // A delete of another key may remove a directory this write just opened, once it is empty;
    // the temporary file then cannot be created and the write starts over.
    absl::StatusOr<ValueInfo> result;
    for (int attempt = 0; attempt < 3; ++attempt) {
      result = WriteOnce(key, leaf, value);
      if (!absl::IsNotFound(result.status())) break;
    }
    return result;
  }

  absl::StatusOr<ValueInfo> WriteOnce(absl::string_view key, absl::string_view leaf,
                                      const buffer::cpu::Buffer& value) {
    auto dirs = OpenDirectories(key, /*create=*/true);
    if (!dirs.ok()) return dirs.status();
    int parent = dirs->back().get();

    // pid, counter and the store's random tag: unique among this store's writes, and apart from
    // other writers' on the same volume even where they have the same pid. A name taken anyway
    // (O_EXCL: never someone else's file) moves on to the next counter.
    std::string temp_name;
    UniqueFd temp;
    for (int attempt = 0; attempt < 8 && !temp.valid(); ++attempt) {
      temp_name = absl::StrCat(kFileBackendTempPrefix, ::getpid(), "-", temp_counter_.fetch_add(1),
                               "-", temp_tag_);
      temp = UniqueFd(::openat(parent, temp_name.c_str(),
                               O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
      if (!temp.valid() && errno != EEXIST) break;
    }
    if (!temp.valid()) return ErrnoError(errno, "create a temporary file for", key);
    auto remove_temp = [&] { ::unlinkat(parent, temp_name.c_str(), 0); };

    size_t done = 0;
    while (done < value.size()) {
      ssize_t n = ::write(temp.get(), value.data() + done, value.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        absl::Status s = ErrnoError(errno, "write", key);
        remove_temp();
        return s;
      }
      done += static_cast<size_t>(n);
    }
    struct timespec times[2] = {{0, UTIME_OMIT}, UniqueModificationTime()};
    if (::futimens(temp.get(), times) != 0 || Sync(temp.get()) != 0) {
      absl::Status s = ErrnoError(errno, "flush", key);
      remove_temp();
      return s;
    }
    std::string leaf_name(leaf);
    if (::renameat(parent, temp_name.c_str(), parent, leaf_name.c_str()) != 0) {
      int err = errno;
      remove_temp();
      if (err == EISDIR || err == ENOTEMPTY || err == EEXIST) {
        return absl::FailedPreconditionError(absl::StrCat(
            "key ", QuoteKey(key), " cannot be stored: a directory of that name exists"));
      }
      return ErrnoError(err, "rename into place", key);
    }
    // The value is in place; until its directory entry is durable a crash may lose it. Say so:
    // the caller must not report a durable write (and drops its cached copy: the outcome is
    // unknown).
    if (Sync(parent) != 0) return ErrnoError(errno, "sync the directory of", key);
    struct stat st;
    if (::fstat(temp.get(), &st) != 0) return ErrnoError(errno, "stat", key);
    return ValueInfo{static_cast<uint64_t>(st.st_size), GenerationOf(st)};
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    if (IsTempName(LastSegment(key))) return ReservedKeyError(key);
    absl::MutexLock lock(&LockFor(key));
    auto dirs = OpenDirectories(key, /*create=*/false);
    if (!dirs.ok()) {
      return absl::IsNotFound(dirs.status()) ? KeyNotFoundError(key) : dirs.status();
    }
    auto info = Stat(key);
    if (!info.ok()) return info.status();
    if (absl::Status s = conditions.Check(key, info->generation); !s.ok()) return s;
    std::string leaf(LastSegment(key));
    if (::unlinkat(dirs->back().get(), leaf.c_str(), 0) != 0) {
      return errno == ENOENT ? KeyNotFoundError(key) : ErrnoError(errno, "delete", key);
    }
    if (Sync(dirs->back().get()) != 0) return ErrnoError(errno, "sync the directory of", key);
    // Remove directories the delete left empty, so that listings show no empty "groups";
    // stop at the first one that still holds something.
    std::vector<absl::string_view> segments = Segments(key);
    for (size_t i = dirs->size() - 1; i >= 1; --i) {
      std::string name(segments[i - 1]);
      if (::unlinkat((*dirs)[i - 1].get(), name.c_str(), AT_REMOVEDIR) != 0) break;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                   bool directory) override {
    return std::make_unique<FileListCursor>(this, std::string(prefix), directory);
  }

  // Opens the directory `rel` (a '/'-separated path under the root, "" for the root itself),
  // checked to lie beneath the root. NOT_FOUND when it does not exist.
  absl::StatusOr<UniqueFd> OpenDirectory(absl::string_view rel, absl::string_view key) const {
    UniqueFd fd(::openat(root_fd_.get(), rel.empty() ? "." : std::string(rel).c_str(),
                         O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) return ErrnoError(errno, "open directory for", key);
    if (absl::Status s = CheckBeneathRoot(fd.get(), key); !s.ok()) return s;
    return fd;
  }

  // Whether a directory entry that is a symbolic link resolves to a regular file beneath the
  // root; fills `size` when it does.
  bool LinkedFileBeneathRoot(int dir_fd, const std::string& name, uint64_t* size) const {
    UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd.valid() || !CheckBeneathRoot(fd.get(), name).ok()) return false;
    struct stat st;
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    *size = static_cast<uint64_t>(st.st_size);
    return true;
  }

 private:
  absl::Mutex& LockFor(absl::string_view key) {
    return write_locks_[absl::HashOf(key) % write_locks_.size()];
  }

  // fsync(2) when syncing is on (0 when off): -1 with errno on failure.
  int Sync(int fd) const {
    if (!fsync_) return 0;
    return fsync_hook_ ? fsync_hook_(fd) : ::fsync(fd);
  }

  // Refuses a descriptor whose real path is not the root or beneath it: a symbolic link
  // inside the store that points elsewhere.
  absl::Status CheckBeneathRoot(int fd, absl::string_view key) const {
    char link[64];
    std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    char real[PATH_MAX + 1];
    ssize_t n = ::readlink(link, real, PATH_MAX);
    if (n < 0) {
      return absl::PermissionDeniedError(absl::StrCat(
          "key ", QuoteKey(key), ": cannot check where it resolves (/proc unavailable)"));
    }
    absl::string_view path(real, static_cast<size_t>(n));
    if (path == root_path_ || (absl::StartsWith(path, root_path_) &&
                               (root_path_ == "/" || path.substr(root_path_.size(), 1) == "/"))) {
      return absl::OkStatus();
    }
    return absl::PermissionDeniedError(
        absl::StrCat("key ", QuoteKey(key), " resolves outside the store root (a symbolic link?)"));
  }

  // Bytes [offset, offset + length) of the open value file `fd`, whose fstat is `st`: fewer
  // where the file ends first. Into memory from the backend's allocator (a shared-memory arena
  // when configured). `info` gets the size and generation `st` gives.
  absl::StatusOr<buffer::cpu::Buffer> ReadOpenValue(int fd, const struct stat& st,
                                                    absl::string_view key, uint64_t offset,
                                                    uint64_t length, ValueInfo* info) const {
    uint64_t size = static_cast<uint64_t>(st.st_size);
    uint64_t want = offset >= size ? 0 : std::min(length, size - offset);
    auto out = buffer::cpu::MutableBuffer::Allocate(static_cast<size_t>(want), *allocator_);
    if (!out.ok()) return out.status();
    size_t done = 0;
    while (done < out->size()) {
      // Linux moves at most about 2 GiB per call: loop until the range is read.
      ssize_t n =
          ::pread(fd, out->data() + done, out->size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoError(errno, "read", key);
      }
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    if (done != out->size()) {
      // Only a writer outside chunkd truncating the file in place gets here; chunkd's own
      // writes replace files whole.
      return absl::AbortedError(
          absl::StrCat("key ", QuoteKey(key), " changed size while being read; try again"));
    }
    if (info) *info = {size, GenerationOf(st)};
    return std::move(*out).Freeze();
  }

  // Opens the value file of `key` for reading: a regular file beneath the root. `st` (when
  // set) gets its fstat.
  absl::StatusOr<UniqueFd> OpenValue(absl::string_view key, struct stat* st_out = nullptr) const {
    if (IsTempName(LastSegment(key))) return ReservedKeyError(key);
    std::string path(key);
    UniqueFd fd(::openat(root_fd_.get(), path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd.valid()) {
      int err = errno;
      if (err == ENOENT || err == ENOTDIR || err == ELOOP) return KeyNotFoundError(key);
      return ErrnoError(err, "open", key);
    }
    if (absl::Status s = CheckBeneathRoot(fd.get(), key); !s.ok()) return s;
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return ErrnoError(errno, "stat", key);
    if (!S_ISREG(st.st_mode)) return KeyNotFoundError(key);  // a directory is not a value
    // O_NONBLOCK above keeps a FIFO planted in the store from blocking the open; regular
    // files ignore it.
    if (st_out) *st_out = st;
    return fd;
  }

  // The chain of directories from the root to the parent of `key`'s last segment: element 0 is
  // the root, the last is the parent. Creates missing ones with `create`. Each is checked to
  // lie beneath the root, so no write or delete goes through a link to outside.
  absl::StatusOr<std::vector<UniqueFd>> OpenDirectories(absl::string_view key, bool create) const {
    std::vector<absl::string_view> segments = Segments(key);
    std::vector<UniqueFd> chain;
    chain.emplace_back(::fcntl(root_fd_.get(), F_DUPFD_CLOEXEC, 0));
    if (!chain.back().valid()) return ErrnoError(errno, "open the root for", key);
    for (size_t i = 0; i + 1 < segments.size(); ++i) {
      std::string name(segments[i]);
      int parent = chain.back().get();
      UniqueFd fd(::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!fd.valid() && errno == ENOENT && create) {
        if (::mkdirat(parent, name.c_str(), 0755) != 0) {
          if (errno != EEXIST) return ErrnoError(errno, "create a directory for", key);
        } else if (Sync(parent) != 0) {
          // The new directory's entry must be durable before a value in it is reported so.
          return ErrnoError(errno, "sync the directory of", key);
        }
        fd = UniqueFd(::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      }
      if (!fd.valid()) {
        if (errno == ENOTDIR) {
          return absl::FailedPreconditionError(
              absl::StrCat("key ", QuoteKey(key), ": '", name,
                           "' is a value, not a directory, so nothing can be stored under it"));
        }
        return ErrnoError(errno, "open a directory of", key);
      }
      if (absl::Status s = CheckBeneathRoot(fd.get(), key); !s.ok()) return s;
      chain.push_back(std::move(fd));
    }
    return chain;
  }

  absl::Status CheckConditions(absl::string_view key, const Conditions& conditions) {
    if (conditions.empty()) return absl::OkStatus();
    auto info = Stat(key);
    if (!info.ok() && !absl::IsNotFound(info.status())) return info.status();
    return conditions.Check(key,
                            info.ok() ? std::optional<Generation>(info->generation) : std::nullopt);
  }

  const UniqueFd root_fd_;
  const std::string root_path_;
  buffer::HostAllocator* const allocator_;
  const bool fsync_;
  const std::function<int(int)> fsync_hook_;
  // 16 hex digits from getrandom(2), part of every temporary name of this store.
  const std::string temp_tag_;
  std::atomic<uint64_t> temp_counter_{0};
  // Writers and deleters of one key are serialized (conditions are checked and acted on as
  // one step); readers never wait on these.
  std::array<absl::Mutex, 64> write_locks_;
};

absl::StatusOr<std::optional<FileListCursor::Frame>> FileListCursor::ReadFirst(
    std::string rel, absl::string_view name_filter) {
  auto fd = backend_->OpenDirectory(rel.empty() ? "" : rel.substr(0, rel.size() - 1), prefix());
  if (!fd.ok()) {
    // A prefix naming no directory lists nothing.
    if (absl::IsNotFound(fd.status())) return std::nullopt;
    return fd.status();
  }
  return ReadFrame(*std::move(fd), std::move(rel), name_filter);
}

absl::StatusOr<std::optional<FileListCursor::Frame>> FileListCursor::ReadChild(const Frame& parent,
                                                                               const Child& child,
                                                                               std::string rel) {
  UniqueFd fd(::openat(parent.dir.get(), child.name.c_str(),
                       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return std::nullopt;  // removed meanwhile
  return ReadFrame(std::move(fd), std::move(rel), "");
}

absl::StatusOr<FileListCursor::Frame> FileListCursor::ReadFrame(UniqueFd fd, std::string rel,
                                                                absl::string_view name_filter) {
  Frame frame;
  frame.rel = std::move(rel);
  int dup_fd = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0);
  DIR* dir = dup_fd >= 0 ? ::fdopendir(dup_fd) : nullptr;
  if (dir == nullptr) {
    if (dup_fd >= 0) ::close(dup_fd);
    return ErrnoError(errno, "list", frame.rel);
  }
  while (struct dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name == "." || name == ".." || IsTempName(name)) continue;
    Child child;
    child.name = name;
    struct stat st;
    if (::fstatat(fd.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      child.is_dir = true;
    } else if (S_ISREG(st.st_mode)) {
      child.size = static_cast<uint64_t>(st.st_size);
    } else if (S_ISLNK(st.st_mode)) {
      // Linked files that stay inside the store are values; linked directories are not
      // descended into (no cycles, no escapes).
      if (!backend_->LinkedFileBeneathRoot(fd.get(), name, &child.size)) continue;
    } else {
      continue;
    }
    child.sort_key = child.is_dir ? name + "/" : name;
    if (!absl::StartsWith(child.sort_key, name_filter)) continue;
    // Names that are not valid keys (control characters, bad UTF-8) cannot be asked for, so
    // they are not listed either.
    if (!ValidateKey(frame.rel + name).ok()) continue;
    frame.children.push_back(std::move(child));
  }
  ::closedir(dir);
  std::sort(frame.children.begin(), frame.children.end(),
            [](const Child& a, const Child& b) { return a.sort_key < b.sort_key; });
  frame.dir = std::move(fd);
  return frame;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> OpenFileBackend(absl::string_view path,
                                                         const BackendOptions& options) {
  if (path.empty()) return absl::InvalidArgumentError("file store: empty directory path");
  std::string p(path);
  char real[PATH_MAX + 1];
  if (::realpath(p.c_str(), real) == nullptr) {
    return absl::NotFoundError(absl::StrCat("file store ", p, ": ", std::strerror(errno),
                                            " (create the directory first)"));
  }
  struct timespec start;
  clock_gettime(CLOCK_REALTIME, &start);
  UniqueFd fd(::open(real, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) {
    return absl::FailedPreconditionError(
        absl::StrCat("file store ", p, " is not a directory: ", std::strerror(errno)));
  }
  // A crash between creating a write's temporary file and renaming it leaves the file behind;
  // nothing else would ever remove it.
  absl::Time sweep_start = absl::Now();
  SweepResult swept;
  SweepTempFiles(fd.get(), start, &swept);
  if (swept.files > 0 || swept.errors > 0) {
    Log("file store %s: removed %d temporary files (%s) of interrupted writes in %s%s", real,
        swept.files, FormatBytes(swept.bytes), absl::FormatDuration(absl::Now() - sweep_start),
        swept.errors > 0 ? absl::StrCat("; ", swept.errors, " could not be read or removed")
                         : std::string());
  }
  return std::make_unique<FileBackend>(std::move(fd), std::string(real), options);
}

}  // namespace chunkd::server

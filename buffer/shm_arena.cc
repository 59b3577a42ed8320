#include "buffer/shm_arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace chunkd::buffer {
namespace {

constexpr uint64_t kPage = 4096;

uint64_t RoundUp(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

absl::Status ErrnoStatus(const std::string& what) {
  int err = errno;
  std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == ENOSPC || err == ENOMEM) return absl::ResourceExhaustedError(message);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  if (err == ENOENT) return absl::NotFoundError(message);
  return absl::InternalError(message);
}

}  // namespace

// A block inside a segment; returns its extent to the arena when the last reference goes.
class ShmArena::ArenaBlock final : public Block {
 public:
  ArenaBlock(std::shared_ptr<ShmArena> arena, Segment* segment, uint64_t offset, uint64_t length,
             size_t size)
      : Block(segment->base + offset, size, MemoryKind::kHostShared),
        arena_(std::move(arena)),
        segment_(segment),
        offset_(offset),
        length_(length),
        name_(segment->name),
        segment_size_(segment->size) {}
  ~ArenaBlock() override { arena_->Free(segment_, offset_, length_); }

  std::optional<ShmLocation> shm_location() const override {
    return ShmLocation{name_, segment_size_, offset_};
  }

 private:
  std::shared_ptr<ShmArena> arena_;
  Segment* segment_;
  uint64_t offset_;
  uint64_t length_;
  std::string name_;
  uint64_t segment_size_;
};

absl::StatusOr<std::shared_ptr<ShmArena>> ShmArena::Create(const ShmArenaOptions& options) {
  struct stat st;
  if (::stat(options.directory.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat("shared-memory directory ", options.directory,
                                            " does not exist or is not a directory"));
  }
  // Segments are created lazily: a directory this user cannot write (a volume that belongs to
  // root, say) would otherwise fail every Put later instead of turning shared memory off now.
  if (::access(options.directory.c_str(), W_OK | X_OK) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("shared-memory directory ", options.directory,
                                                    " is not writable by uid ", ::geteuid(), ": ",
                                                    std::strerror(errno)));
  }
  if (options.segment_bytes < kPage) {
    return absl::InvalidArgumentError("shared-memory segments must be at least one page");
  }
  std::shared_ptr<ShmArena> arena(new ShmArena(options));
  if (::getrandom(&arena->instance_, sizeof(arena->instance_), 0) != sizeof(arena->instance_)) {
    arena->instance_ = static_cast<uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ull ^
                       static_cast<uint64_t>(::time(nullptr));
  }
  arena->RemoveStaleSegments();
  return arena;
}

ShmArena::~ShmArena() {
  absl::MutexLock lock(&mu_);
  while (!segments_.empty()) DestroySegmentLocked(segments_.back().get());
}

void ShmArena::RemoveStaleSegments() {
  DIR* dir = ::opendir(options_.directory.c_str());
  if (dir == nullptr) return;
  std::string prefix = options_.prefix + "-";
  while (struct dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (!absl::StartsWith(name, prefix)) continue;
    std::string path = options_.directory + "/" + name;
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) continue;
    // The owner holds a shared lock for as long as it lives; an exclusive lock we can take
    // means nobody owns the segment any more.
    struct stat st;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
        ::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      ::unlink(path.c_str());
    }
    ::close(fd);
  }
  ::closedir(dir);
}

absl::StatusOr<ShmArena::Segment*> ShmArena::NewSegmentLocked(uint64_t size) {
  auto segment = std::make_unique<Segment>(size);
  // The random part keeps names unique across restarts: a server that comes back with the same
  // pid (pid 1 in a container) must not reuse a name a client still has mapped.
  segment->name = absl::StrCat(options_.prefix, "-", ::getpid(), "-",
                               absl::Hex(instance_, absl::kZeroPad16), "-", next_segment_++);
  std::string path = options_.directory + "/" + segment->name;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, options_.mode);
  if (fd < 0) return ErrnoStatus("create shared-memory segment " + path);
  const auto fail = [&](const std::string& what) {
    absl::Status s = ErrnoStatus(what + " " + path);
    ::close(fd);
    ::unlink(path.c_str());
    return s;
  };
  if (::fchmod(fd, options_.mode) != 0) return fail("chmod");
  if (options_.group != static_cast<gid_t>(-1) && ::fchown(fd, -1, options_.group) != 0) {
    return fail("chgrp");
  }
  if (::flock(fd, LOCK_SH) != 0) return fail("lock");
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) return fail("size");
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("map");
  segment->fd = fd;
  segment->base = static_cast<std::byte*>(base);
  mapped_ += size;
  segments_.push_back(std::move(segment));
  return segments_.back().get();
}

void ShmArena::DestroySegmentLocked(Segment* segment) {
  ::munmap(segment->base, segment->size);
  ::unlink((options_.directory + "/" + segment->name).c_str());
  ::close(segment->fd);
  mapped_ -= segment->size;
  for (auto it = segments_.begin(); it != segments_.end(); ++it) {
    if (it->get() == segment) {
      segments_.erase(it);
      break;
    }
  }
}

absl::StatusOr<std::shared_ptr<Block>> ShmArena::Allocate(size_t size) {
  if (size == 0) return HeapAllocator().Allocate(0);  // nothing to share
  // No segment can be larger than off_t holds; refusing such sizes first also keeps the
  // rounding below from wrapping around to a tiny extent for a huge size (a hostile store's
  // Content-Length reaches here).
  if (size > static_cast<uint64_t>(PTRDIFF_MAX) - kPage) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", size, " bytes of shared memory"));
  }
  uint64_t length = RoundUp(size, kPage);
  absl::MutexLock lock(&mu_);
  Segment* chosen = nullptr;
  uint64_t best = 0;
  // Best fit across segments: the smallest free extent that holds the block.
  for (auto& segment : segments_) {
    std::optional<uint64_t> fit = segment->extents.BestFit(length);
    if (fit && (chosen == nullptr || *fit < best)) {
      chosen = segment.get();
      best = *fit;
    }
  }
  if (chosen == nullptr) {
    auto segment = NewSegmentLocked(std::max<uint64_t>(options_.segment_bytes, length));
    if (!segment.ok()) return segment.status();
    chosen = *segment;
  }
  std::optional<uint64_t> allocated = chosen->extents.Allocate(length);
  if (!allocated) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no free extent of ", length, " bytes in shared memory"));
  }
  uint64_t offset = *allocated;
  // Reserve the pages now: a full tmpfs (a container's small /dev/shm, say) must show as an
  // error here, not as SIGBUS when the pages are first written.
  if (::fallocate(chosen->fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
    absl::Status s = ErrnoStatus(
        absl::StrCat("reserve ", length, " bytes in shared memory ", options_.directory));
    chosen->extents.Free(offset, length);
    return s;
  }
  allocated_ += length;
  return std::make_shared<ArenaBlock>(shared_from_this(), chosen, offset, length, size);
}

void ShmArena::Free(Segment* segment, uint64_t offset, uint64_t length) {
  // Give the pages back now; the range reads as zeros until it is allocated again.
  ::fallocate(segment->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
              static_cast<off_t>(length));
  absl::MutexLock lock(&mu_);
  allocated_ -= length;
  segment->extents.Free(offset, length);  // coalesces with free neighbours
  // An empty segment goes back to the system, except the last one, kept for reuse.
  if (segment->extents.empty() && segments_.size() > 1) DestroySegmentLocked(segment);
}

uint64_t ShmArena::allocated_bytes() const {
  absl::MutexLock lock(&mu_);
  return allocated_;
}

uint64_t ShmArena::mapped_bytes() const {
  absl::MutexLock lock(&mu_);
  return mapped_;
}

size_t ShmArena::segment_count() const {
  absl::MutexLock lock(&mu_);
  return segments_.size();
}

}  // namespace chunkd::buffer

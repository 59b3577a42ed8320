// Host memory that colocated processes can map: large shared-memory segments (files in a
// directory, /dev/shm by default) carved into chunk blocks.
//
// Allocation is page-granular best fit over each segment's free extents, with neighbours
// coalesced on free. Segments are sparse: a freed extent's pages are given back to the kernel
// at once (FALLOC_FL_PUNCH_HOLE), so the memory the arena holds follows the bytes in use, not
// the high-water mark, and fragmentation costs address space rather than memory. A segment
// that becomes empty is unlinked (one is kept for reuse).
//
// Each segment file is created with mode 0600 (or 0640 and a group), and flock()ed shared by
// the server that owns it; on start, segments in the directory whose owner is gone (the lock
// can be taken exclusively) are removed. Clients open segments read-only.
#ifndef CHUNKD_BUFFER_SHM_ARENA_H_
#define CHUNKD_BUFFER_SHM_ARENA_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "buffer/extent_allocator.h"
#include "buffer/memory.h"

namespace chunkd::buffer {

struct ShmArenaOptions {
  std::string directory = "/dev/shm";
  // Size of each segment (address space; pages are used only as blocks are). Values larger
  // than this get a segment of their own.
  uint64_t segment_bytes = 1ull << 30;
  // File mode of segments: 0600 (owner only) or 0640 with `group` to let a group's clients map.
  mode_t mode = 0600;
  gid_t group = static_cast<gid_t>(-1);
  // Segment files are named "<prefix>-<pid>-<random>-<n>".
  std::string prefix = "chunkd";
};

class ShmArena final : public HostAllocator, public std::enable_shared_from_this<ShmArena> {
 public:
  // Creates an arena in `options.directory` (which must exist), removing segments that
  // earlier servers left behind.
  static absl::StatusOr<std::shared_ptr<ShmArena>> Create(const ShmArenaOptions& options);
  // Unmaps and unlinks every segment. Blocks hold a reference to the arena, so this runs
  // only once the last block is gone.
  ~ShmArena() override;

  // A block of `size` bytes (rounded up to whole pages inside the arena).
  absl::StatusOr<std::shared_ptr<Block>> Allocate(size_t size) override;
  MemoryKind kind() const override { return MemoryKind::kHostShared; }

  const std::string& directory() const { return options_.directory; }
  // Bytes in blocks handed out (page-rounded), and address space of all segments.
  uint64_t allocated_bytes() const;
  uint64_t mapped_bytes() const;
  size_t segment_count() const;

 private:
  struct Segment {
    explicit Segment(uint64_t size) : size(size), extents(size) {}
    std::string name;
    int fd = -1;
    std::byte* base = nullptr;
    const uint64_t size;
    ExtentAllocator extents;  // page-granular extents of [0, size)
  };
  class ArenaBlock;

  explicit ShmArena(const ShmArenaOptions& options) : options_(options) {}
  absl::StatusOr<Segment*> NewSegmentLocked(uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Free(Segment* segment, uint64_t offset, uint64_t length);
  void DestroySegmentLocked(Segment* segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveStaleSegments();

  const ShmArenaOptions options_;
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Segment>> segments_ ABSL_GUARDED_BY(mu_);
  uint64_t next_segment_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t instance_ = 0;  // random, part of every segment name
  uint64_t allocated_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t mapped_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_SHM_ARENA_H_

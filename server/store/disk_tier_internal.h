// The disk tier's I/O knobs, for the benchmark that chose their defaults
// (bench/disk_tier_bench.cc; docs/disk-tier.md has the figures). The server uses the defaults
// through DiskTier::Open.
#ifndef CHUNKD_SERVER_STORE_DISK_TIER_INTERNAL_H_
#define CHUNKD_SERVER_STORE_DISK_TIER_INTERNAL_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "server/store/disk_tier.h"

namespace chunkd::server {

struct DiskTierIo {
  // Read entries with O_DIRECT (into an aligned bounce buffer, then copied into the
  // allocator's block), so that the page cache does not hold a second copy of what the host
  // cache holds. Where the filesystem refuses O_DIRECT (tmpfs) reads are buffered (logged).
  bool direct_reads = true;
  // Reads through the page cache (direct_reads off, or refused) drop the pages they read
  // afterwards (POSIX_FADV_DONTNEED), keeping readahead without the second copy.
  bool drop_read_pages = true;
  // When a segment is sealed: fdatasync it and drop its pages from the page cache
  // (POSIX_FADV_DONTNEED), so written entries do not stay cached twice either.
  bool drop_written_pages = true;
  // 0: capacity / 16, clamped to [64 KiB, 64 MiB].
  uint64_t segment_bytes = 0;
};

absl::StatusOr<std::unique_ptr<DiskTier>> OpenDiskTier(const DiskTierOptions& options,
                                                       buffer::HostAllocator* allocator,
                                                       const DiskTierIo& io);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_DISK_TIER_INTERNAL_H_

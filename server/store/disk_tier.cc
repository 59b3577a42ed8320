// The disk tier's engine: a log of segment files with an in-memory index.
//
// Layout (why): a million blocks as a million files would make start-up a million opens and
// stats and every eviction an unlink; instead entries are appended as records to segment files
// (dir/seg-NNNNNNNNNN.dat, up to segment_bytes each: capacity/16 clamped to [64 KiB, 64 MiB]).
// A record is [RecordHeader][key][etag][data] padded to 4 KiB (so a record can be read with
// O_DIRECT), its crc32c covering everything after the header's crc field. When a segment is
// full it is sealed: a companion index file (seg-N.idx: every record's header and key, with
// its own crc32c) is written, so start-up reads index files sequentially instead of every
// record; the segment written at a crash (no index file) is scanned record by record, each
// record's crc checked, and cut at the first bad one (a torn tail). No embedded database: the
// index is a hash map rebuilt from these files in seconds, and a log needs no compaction
// because eviction is FIFO by segment (the oldest file is deleted whole: bounded in bytes,
// disk friendly, no fragmentation); replaced or dropped entries stay in their segment until it
// is evicted (counted in use, not in entries).
//
// Durability: kill -9 loses nothing written (the page cache holds it); a record cut short is
// caught by its crc, at start-up or at the latest on Read. A Drop appends a tombstone record
// (and fdatasyncs it) so the value's older entries do not come back at the next start.
//
// Accounting: used_bytes is the sum over segments of the data file's size plus its index
// file's size rounded up to 4 KiB (reserved when each record is appended), and the tier evicts
// before it appends, so the files under the directory never exceed capacity_bytes (the empty
// LOCK file aside).
//
// I/O (chosen by measurement: bench/disk_tier_bench.cc, figures in docs/disk-tier.md):
// - Reads are synchronous pread on the caller's thread (ChunkStore's I/O pool, off the gRPC
//   threads, with a bounded queue). io_uring measured no faster than pread at the same queue
//   depth (the depth is what counts: the caller's pool size), so no liburing dependency.
// - Reads use O_DIRECT: through the page cache every GiB read from the tier put a GiB in the
//   page cache, a second copy of what the host cache then holds. An entry of 64 KiB or more is
//   read straight into the allocator's block (no copy), a smaller one through a bounce buffer.
//   Where the filesystem refuses O_DIRECT (tmpfs) reads are buffered (logged once).
// - Writes are queued (bounded in bytes) and appended with pwritev by writer threads, one
//   append at a time (a log is sequential; crcs are computed before, in parallel), through the
//   page cache (write-behind costs no reader anything); each sealed segment is then
//   fdatasync'ed and dropped from the page cache (POSIX_FADV_DONTNEED), off the append lock.
#include "server/store/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "buffer/cpu/buffer.h"
#include "server/common/crc32c.h"
#include "server/common/log.h"
#include "server/store/disk_tier_internal.h"

namespace chunkd::server {
namespace {

constexpr uint64_t kAlign = 4096;
constexpr uint64_t AlignUp(uint64_t n) { return (n + kAlign - 1) & ~(kAlign - 1); }
constexpr uint32_t kRecordMagic = 0x54444B43;  // "CKDT"
constexpr uint32_t kIndexMagic = 0x49444B43;   // "CKDI"
constexpr uint16_t kVersion = 1;
constexpr uint8_t kEntry = 0;
constexpr uint8_t kTombstone = 1;
constexpr uint64_t kNoTotal = ~uint64_t{0};
constexpr uint32_t kMaxRecordKeyBytes = 4 << 10;  // chunkd's keys: 1 KiB at most
constexpr uint32_t kMaxEtagBytes = 4 << 10;
// O_DIRECT reads of entries this large go straight into the allocator's block; smaller ones
// through a bounce buffer that holds any record of a smaller entry.
constexpr uint64_t kDirectIntoBlockBytes = 64 << 10;
constexpr uint64_t kBounceBytes =
    AlignUp(kDirectIntoBlockBytes + 72 + kMaxRecordKeyBytes + kMaxEtagBytes);

// Native byte order (chunkd builds for little-endian hosts only).
struct RecordHeader {
  uint32_t magic = kRecordMagic;
  uint32_t crc = 0;  // crc32c of the rest of the header, the key, the etag and the data
  uint16_t version = kVersion;
  uint8_t type = kEntry;
  uint8_t reserved0 = 0;
  uint32_t key_len = 0;
  uint32_t etag_len = 0;
  uint32_t reserved1 = 0;
  uint64_t part = 0;
  uint64_t generation = 0;
  uint64_t offset = 0;      // of the data within the value
  uint64_t total_size = 0;  // kNoTotal for a whole value
  int64_t validated_micros = 0;
  uint64_t data_len = 0;
};
static_assert(sizeof(RecordHeader) == 72);
constexpr size_t kCrcFrom = offsetof(RecordHeader, version);

uint32_t HeaderCrc(const RecordHeader& h, absl::string_view key, absl::string_view etag) {
  uint32_t crc = Crc32cExtend(0, reinterpret_cast<const char*>(&h) + kCrcFrom,
                              sizeof(RecordHeader) - kCrcFrom);
  crc = Crc32cExtend(crc, key.data(), key.size());
  return Crc32cExtend(crc, etag.data(), etag.size());
}

uint64_t RecordBytes(uint64_t key_len, uint64_t etag_len, uint64_t data_len) {
  return AlignUp(sizeof(RecordHeader) + key_len + etag_len + data_len);
}

// An index file: IndexHeader, then per record IndexEntryHeader, key, etag.
struct IndexHeader {
  uint32_t magic = kIndexMagic;
  uint32_t crc = 0;  // of everything after this field
  uint32_t version = kVersion;
  uint32_t count = 0;
  uint64_t data_bytes = 0;  // the size of the segment file it describes
};
static_assert(sizeof(IndexHeader) == 24);
struct IndexEntryHeader {
  RecordHeader record;
  uint64_t record_offset = 0;
};
static_assert(sizeof(IndexEntryHeader) == 80);
uint64_t IndexEntryBytes(uint64_t key_len, uint64_t etag_len) {
  return sizeof(IndexEntryHeader) + key_len + etag_len;
}

int64_t ToMicros(absl::Time t) {
  if (t == absl::InfinitePast()) return INT64_MIN;
  if (t == absl::InfiniteFuture()) return INT64_MAX;
  return absl::ToUnixMicros(t);
}
absl::Time FromMicros(int64_t us) {
  if (us == INT64_MIN) return absl::InfinitePast();
  if (us == INT64_MAX) return absl::InfiniteFuture();
  return absl::FromUnixMicros(us);
}

// One record's metadata, as an index file or a scan gives it.
struct RecordMeta {
  RecordHeader header;
  std::string key;
  std::string etag;
  uint64_t record_offset = 0;
};

std::string SegmentName(uint32_t id) { return absl::StrFormat("seg-%010u.dat", id); }
std::string IndexName(uint32_t id) { return absl::StrFormat("seg-%010u.idx", id); }

bool IsNoSpace(int err) { return err == ENOSPC || err == EDQUOT; }

bool PreadFull(int fd, void* buf, size_t n, uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t got = pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return true;
}

// Writes all of `iov` at `offset`; the errno of a failure (ENOSPC for a short write), 0 on
// success.
int PwritevFull(int fd, std::vector<iovec> iov, uint64_t offset) {
  size_t first = 0;
  while (first < iov.size()) {
    ssize_t put = pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first),
                          static_cast<off_t>(offset));
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) return errno;
    if (put == 0) return ENOSPC;
    offset += static_cast<uint64_t>(put);
    auto left = static_cast<size_t>(put);
    while (first < iov.size() && left >= iov[first].iov_len) {
      left -= iov[first].iov_len;
      ++first;
    }
    if (first < iov.size()) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return 0;
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

struct Segment {
  Segment(uint32_t id, int fd, int direct_fd) : id(id), fd(fd), direct_fd(direct_fd) {}
  const uint32_t id;
  const Fd fd;
  const Fd direct_fd;  // O_DIRECT, for reads; -1 when not used or refused
  // Written under the tier's append mutex; read under its index mutex too (see DiskTierImpl).
  uint64_t data_bytes = 0;
  uint64_t index_bytes = 0;  // the index file's size (written or reserved), rounded to 4 KiB
  bool sealed = false;
  uint64_t accounted() const { return data_bytes + index_bytes; }
};

// Where one entry lives: 16 bytes plus its 8-byte part number in the value's map.
struct Location {
  uint32_t segment = 0;
  uint32_t page = 0;  // record offset / 4 KiB
  uint64_t data_len = 0;
};

struct ValueEntry {
  Generation generation = 0;
  uint64_t size = 0;
  int64_t validated_micros = INT64_MIN;
  std::string etag;
  absl::flat_hash_map<uint64_t, Location> parts;
};

using ValueMap = absl::flat_hash_map<std::string, ValueEntry>;

size_t HeapString(const std::string& s) {
  return s.capacity() > 15 ? s.capacity() + 1 : 0;  // beyond the small-string buffer
}
// The memory one value's entry takes beyond its slot in the map.
size_t EntryHeapBytes(const std::string& key, const ValueEntry& v) {
  return HeapString(key) + HeapString(v.etag) +
         v.parts.capacity() * (sizeof(std::pair<const uint64_t, Location>) + 1);
}

// Applies one record, in log order, to `values`.
void ApplyRecord(ValueMap& values, uint32_t segment, const RecordMeta& r) {
  if (r.header.type == kTombstone) {
    values.erase(r.key);
    return;
  }
  ValueEntry& v = values[r.key];
  if (v.parts.empty() || v.generation != r.header.generation) {
    v.parts.clear();
    v.generation = r.header.generation;
    v.etag = r.etag;
    v.validated_micros = INT64_MIN;
  }
  v.size = r.header.total_size == kNoTotal ? r.header.data_len : r.header.total_size;
  v.validated_micros = std::max(v.validated_micros, r.header.validated_micros);
  v.parts[r.header.part] =
      Location{segment, static_cast<uint32_t>(r.record_offset / kAlign), r.header.data_len};
}

struct WriteItem {
  std::string key;
  uint64_t part = 0;
  CachedValue entry;
  uint64_t drop_seq = 0;  // drop_seq_ when it was queued
  uint64_t bytes = 0;     // what it counts against max_queued_write_bytes
};

class DiskTierImpl final : public DiskTier {
 public:
  DiskTierImpl(const DiskTierOptions& options, buffer::HostAllocator* allocator, int lock_fd,
               const DiskTierIo& io)
      : options_(options),
        io_(io),
        allocator_(allocator != nullptr ? allocator : &buffer::HeapAllocator()),
        lock_fd_(lock_fd),
        segment_bytes_(
            io.segment_bytes > 0
                ? AlignUp(io.segment_bytes)
                : std::clamp<uint64_t>(AlignUp(options.capacity_bytes / 16), 64 << 10, 64 << 20)) {
    capacity_ = options.capacity_bytes;
  }

  ~DiskTierImpl() override {
    {
      absl::MutexLock lock(&queue_mu_);
      stopping_ = true;
    }
    stop_loading_.store(true);
    for (std::thread& t : writers_) t.join();
    if (loader_.joinable()) loader_.join();
    {
      absl::MutexLock lock(&append_mu_);
      if (active_ != nullptr && active_->data_bytes > 0) SealActiveLocked();
    }
    WriteBackSealed();
  }

  absl::Status Start() {
    absl::Status status = ListSegments();
    if (!status.ok()) return status;
    {
      absl::MutexLock lock(&append_mu_);
      // A smaller capacity than the last run's: evict down to it before anything else.
      while (UsedLocked() > CapacityLocked() && EvictOldestLocked()) {
      }
    }
    for (size_t i = 0; i < std::max<size_t>(1, options_.write_threads); ++i) {
      writers_.emplace_back([this] { WriterLoop(); });
    }
    loader_ = std::thread([this] { LoadIndex(); });
    return absl::OkStatus();
  }

  std::optional<CachedValue> Read(absl::string_view key, uint64_t part,
                                  Generation generation) override {
    std::shared_ptr<Segment> segment;
    Location loc;
    Generation found_generation;
    std::string etag;
    int64_t validated;
    {
      absl::ReaderMutexLock lock(&mu_);
      auto it = values_.find(key);
      if (it == values_.end() || (generation != 0 && it->second.generation != generation)) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        return std::nullopt;
      }
      auto p = it->second.parts.find(part);
      if (p == it->second.parts.end()) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        return std::nullopt;
      }
      loc = p->second;
      auto s = segments_.find(loc.segment);
      if (s == segments_.end()) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        return std::nullopt;
      }
      segment = s->second;
      found_generation = it->second.generation;
      etag = it->second.etag;
      validated = it->second.validated_micros;
    }
    std::optional<CachedValue> value = ReadRecord(*segment, loc, key, part, found_generation, etag);
    if (!value.has_value()) {
      checksum_failures_.fetch_add(1, std::memory_order_relaxed);
      Log("disk tier %s: the entry of %s (%s) in %s at offset %d failed its check; dropped",
          options_.dir, key, part == kWholeValue ? "whole value" : absl::StrCat("block ", part),
          SegmentName(loc.segment), uint64_t{loc.page} * kAlign);
      ForgetPart(key, part, loc);
      misses_.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    // The validation time may have moved on since the record was written (a later Write of
    // the same version).
    value->validated = std::max(value->validated, FromMicros(validated));
    hits_.fetch_add(1, std::memory_order_relaxed);
    return value;
  }

  std::optional<std::pair<ValueInfo, absl::Time>> Record(absl::string_view key) override {
    absl::ReaderMutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    const ValueEntry& v = it->second;
    return std::make_pair(ValueInfo(v.size, v.generation, v.etag), FromMicros(v.validated_micros));
  }

  void Write(absl::string_view key, uint64_t part, const CachedValue& entry) override {
    {
      // The same version's entry is there already: only its validation time is news.
      absl::MutexLock lock(&mu_);
      auto it = values_.find(key);
      if (it != values_.end() && it->second.generation == entry.generation &&
          it->second.parts.contains(part)) {
        it->second.validated_micros =
            std::max(it->second.validated_micros, ToMicros(entry.validated));
        return;
      }
    }
    const uint64_t bytes = entry.value.size() + key.size() + sizeof(RecordHeader);
    absl::MutexLock lock(&queue_mu_);
    if (stopping_ || queued_bytes_ + bytes > options_.max_queued_write_bytes ||
        key.size() > kMaxRecordKeyBytes || entry.etag.size() > kMaxEtagBytes) {
      writes_dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    queued_bytes_ += bytes;
    queue_.push_back(WriteItem{std::string(key), part, entry, drop_seq_, bytes});
  }

  void Drop(absl::string_view key) override {
    absl::MutexLock append_lock(&append_mu_);
    {
      // Writes of `key` queued before now must not land after the tombstone.
      absl::MutexLock lock(&queue_mu_);
      if (!queue_.empty() || in_flight_ > 0) recent_drops_[key] = ++drop_seq_;
    }
    bool on_disk;
    {
      absl::MutexLock lock(&mu_);
      auto it = values_.find(key);
      on_disk = it != values_.end() || !index_loaded_;
      if (it != values_.end()) {
        index_bytes_ -= EntryHeapBytes(it->first, it->second);
        entries_ -= it->second.parts.size();
        values_.erase(it);
      }
      if (!index_loaded_) dropped_during_load_.insert(std::string(key));
    }
    if (!on_disk) return;
    RecordMeta tombstone;
    tombstone.header.type = kTombstone;
    tombstone.key = std::string(key);
    FinishRecord(tombstone, buffer::cpu::Buffer());
    // A full filesystem fails the append after evicting a segment: the next try has its room.
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (AppendLocked(tombstone, buffer::cpu::Buffer())) {
        if (active_ != nullptr) fdatasync(active_->fd.get());
        return;
      }
    }
    Log("disk tier %s: could not record on disk that %s was dropped (the filesystem is full); "
        "its entries are gone from memory but could come back at the next start",
        options_.dir, key);
  }

  void Flush() override {
    absl::MutexLock lock(&queue_mu_);
    queue_mu_.Await(absl::Condition(
        +[](DiskTierImpl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
          return self->queue_.empty() && self->in_flight_ == 0;
        },
        this));
  }

  DiskTierStats stats() const override {
    DiskTierStats s;
    {
      absl::ReaderMutexLock lock(&mu_);
      s.capacity_bytes = capacity_;
      s.used_bytes = used_;
      s.entries = entries_;
      s.index_loaded = index_loaded_;
      s.index_load_micros = index_load_micros_;
      s.index_bytes = index_bytes_ + values_.capacity() * (sizeof(ValueMap::value_type) + 1) +
                      segments_.size() * (sizeof(Segment) + 64);
    }
    s.hits = hits_.load(std::memory_order_relaxed);
    s.misses = misses_.load(std::memory_order_relaxed);
    s.writes = writes_.load(std::memory_order_relaxed);
    s.write_bytes = write_bytes_.load(std::memory_order_relaxed);
    s.writes_dropped = writes_dropped_.load(std::memory_order_relaxed);
    s.evictions = evictions_.load(std::memory_order_relaxed);
    s.evicted_bytes = evicted_bytes_.load(std::memory_order_relaxed);
    s.checksum_failures = checksum_failures_.load(std::memory_order_relaxed);
    s.enospc_events = enospc_events_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::string PathOf(const std::string& name) const { return options_.dir + "/" + name; }

  // A descriptor of segment `id` for O_DIRECT reads; -1 when they are off or the filesystem
  // refuses them (tmpfs: EINVAL), and reads are buffered.
  int OpenDirect(uint32_t id) {
    if (!io_.direct_reads) return -1;
    int fd = open(PathOf(SegmentName(id)).c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0 && !direct_refused_.exchange(true)) {
      Log("disk tier %s: the filesystem refuses O_DIRECT (%s); reads go through the page cache",
          options_.dir, strerror(errno));
    }
    return fd;
  }

  uint64_t UsedLocked() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return used_;  // written only under both mutexes
  }
  uint64_t CapacityLocked() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return capacity_;
  }
  // segments_ is written only under both mutexes, so the append mutex alone may read it.
  const std::map<uint32_t, std::shared_ptr<Segment>>& SegmentsLocked() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return segments_;
  }

  // The segment files there are, oldest first; leftovers of an interrupted seal go.
  absl::Status ListSegments() {
    DIR* d = opendir(options_.dir.c_str());
    if (d == nullptr) {
      return absl::InternalError(
          absl::StrFormat("disk tier: cannot list %s: %s", options_.dir, strerror(errno)));
    }
    std::vector<uint32_t> ids;
    absl::flat_hash_set<uint32_t> indexed;
    std::vector<std::string> stray;
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      uint32_t id;
      char ext[8] = {};
      if (sscanf(name.c_str(), "seg-%10u.%3s", &id, ext) == 2 && name.size() == 18) {
        if (std::strcmp(ext, "dat") == 0) {
          ids.push_back(id);
        } else if (std::strcmp(ext, "idx") == 0) {
          indexed.insert(id);
        } else {
          stray.push_back(name);
        }
      } else if (name.ends_with(".tmp")) {
        stray.push_back(name);
      }
    }
    closedir(d);
    for (const std::string& name : stray) unlink(PathOf(name).c_str());
    std::sort(ids.begin(), ids.end());
    absl::flat_hash_set<uint32_t> data_ids(ids.begin(), ids.end());
    for (uint32_t id : indexed) {
      if (!data_ids.contains(id)) unlink(PathOf(IndexName(id)).c_str());
    }
    absl::MutexLock append_lock(&append_mu_);
    absl::MutexLock lock(&mu_);
    for (uint32_t id : ids) {
      int fd = open(PathOf(SegmentName(id)).c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) continue;
      auto segment = std::make_shared<Segment>(id, fd, OpenDirect(id));
      struct stat st;
      if (fstat(fd, &st) == 0) segment->data_bytes = static_cast<uint64_t>(st.st_size);
      struct stat ist;
      if (indexed.contains(id) && stat(PathOf(IndexName(id)).c_str(), &ist) == 0) {
        segment->index_bytes = AlignUp(static_cast<uint64_t>(ist.st_size));
      }
      segment->sealed = true;  // this process appends to new segments only
      used_ += segment->accounted();
      segments_.emplace(id, std::move(segment));
      next_segment_id_ = id + 1;
    }
    return absl::OkStatus();
  }

  // The records of a sealed segment: from its index file when that is whole and describes the
  // file as it is, else by scanning the file (`*scanned` then says so, and `*valid_end` is
  // where the good records end).
  std::vector<RecordMeta> SegmentRecords(const Segment& segment, bool* scanned,
                                         uint64_t* valid_end) const {
    *scanned = false;
    std::vector<RecordMeta> records;
    if (ReadIndexFile(segment, &records)) {
      *valid_end = segment.data_bytes;
      return records;
    }
    *scanned = true;
    records.clear();
    *valid_end = ScanSegment(segment, &records);
    return records;
  }

  bool ReadIndexFile(const Segment& segment, std::vector<RecordMeta>* records) const {
    Fd fd(open(PathOf(IndexName(segment.id)).c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return false;
    struct stat st;
    if (fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_size) < sizeof(IndexHeader)) {
      return false;
    }
    std::string bytes(static_cast<size_t>(st.st_size), '\0');
    if (!PreadFull(fd.get(), bytes.data(), bytes.size(), 0)) return false;
    IndexHeader header;
    std::memcpy(&header, bytes.data(), sizeof(header));
    if (header.magic != kIndexMagic || header.version != kVersion ||
        header.data_bytes != segment.data_bytes ||
        header.crc != Crc32cExtend(0, bytes.data() + 8, bytes.size() - 8)) {
      return false;
    }
    size_t pos = sizeof(IndexHeader);
    records->reserve(header.count);
    for (uint32_t i = 0; i < header.count; ++i) {
      if (bytes.size() - pos < sizeof(IndexEntryHeader)) return false;
      IndexEntryHeader e;
      std::memcpy(&e, bytes.data() + pos, sizeof(e));
      pos += sizeof(e);
      if (bytes.size() - pos < uint64_t{e.record.key_len} + e.record.etag_len) return false;
      RecordMeta r;
      r.header = e.record;
      r.record_offset = e.record_offset;
      r.key.assign(bytes.data() + pos, e.record.key_len);
      pos += e.record.key_len;
      r.etag.assign(bytes.data() + pos, e.record.etag_len);
      pos += e.record.etag_len;
      records->push_back(std::move(r));
    }
    return true;
  }

  // Reads records from the start of `segment`, checking each one's crc, until the end or the
  // first bad one; returns where the good records end.
  uint64_t ScanSegment(const Segment& segment, std::vector<RecordMeta>* records) const {
    const uint64_t end = segment.data_bytes;
    // The file is read in order through a 1 MiB window: one pread per MiB, not four per record
    // (a million small records: 9.7 s with a pread per piece).
    constexpr uint64_t kWindow = 1 << 20;
    std::vector<char> window(kWindow);
    uint64_t window_start = 0;
    uint64_t window_len = 0;
    // [at, at + n) of the file, n <= kWindow; null when it cannot be read.
    auto get = [&](uint64_t at, uint64_t n) -> const char* {
      if (at < window_start || at + n > window_start + window_len) {
        window_start = at;
        window_len = std::min(kWindow, end - at);
        if (n > window_len || !PreadFull(segment.fd.get(), window.data(), window_len, at)) {
          window_len = 0;
          return nullptr;
        }
      }
      return window.data() + (at - window_start);
    };
    uint64_t offset = 0;
    while (offset + sizeof(RecordHeader) <= end && !stop_loading_.load()) {
      const char* p = get(offset, sizeof(RecordHeader));
      if (p == nullptr) break;
      RecordHeader h;
      std::memcpy(&h, p, sizeof(h));
      if (h.magic != kRecordMagic || h.version != kVersion || h.key_len > kMaxRecordKeyBytes ||
          h.etag_len > kMaxEtagBytes || h.data_len > end) {
        break;
      }
      const uint64_t record_bytes = RecordBytes(h.key_len, h.etag_len, h.data_len);
      if (offset + record_bytes > end) break;
      RecordMeta r;
      r.header = h;
      r.record_offset = offset;
      uint64_t pos = offset + sizeof(h);
      p = get(pos, uint64_t{h.key_len} + h.etag_len);
      if (p == nullptr) break;
      r.key.assign(p, h.key_len);
      r.etag.assign(p + h.key_len, h.etag_len);
      pos += uint64_t{h.key_len} + h.etag_len;
      uint32_t crc = HeaderCrc(h, r.key, r.etag);
      bool ok = true;
      for (uint64_t left = h.data_len; left > 0;) {
        const uint64_t n = std::min(left, kWindow);
        p = get(pos, n);
        if (p == nullptr) {
          ok = false;
          break;
        }
        crc = Crc32cExtend(crc, p, n);
        pos += n;
        left -= n;
      }
      if (!ok || crc != h.crc) break;
      records->push_back(std::move(r));
      offset += record_bytes;
    }
    return offset;
  }

  // Writes the index file of `segment` from `records`; false when it could not.
  bool WriteIndexFile(const Segment& segment, const std::vector<RecordMeta>& records) {
    std::string bytes(sizeof(IndexHeader), '\0');
    for (const RecordMeta& r : records) {
      IndexEntryHeader e;
      e.record = r.header;
      e.record_offset = r.record_offset;
      bytes.append(reinterpret_cast<const char*>(&e), sizeof(e));
      bytes.append(r.key);
      bytes.append(r.etag);
    }
    IndexHeader header;
    header.count = static_cast<uint32_t>(records.size());
    header.data_bytes = segment.data_bytes;
    std::memcpy(bytes.data(), &header, sizeof(header));
    header.crc = Crc32cExtend(0, bytes.data() + 8, bytes.size() - 8);
    std::memcpy(bytes.data(), &header, sizeof(header));
    const std::string tmp = PathOf(IndexName(segment.id) + ".tmp");
    Fd fd(open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) return false;
    iovec iov{bytes.data(), bytes.size()};
    if (PwritevFull(fd.get(), {iov}, 0) != 0 ||
        rename(tmp.c_str(), PathOf(IndexName(segment.id)).c_str()) != 0) {
      unlink(tmp.c_str());
      return false;
    }
    return true;
  }

  // Seals the active segment: writes its index file (its bytes were reserved record by
  // record) and lets the next append start a new segment.
  void SealActiveLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) {
    if (active_ == nullptr) return;
    WriteIndexFile(*active_, active_records_);
    // To be written back (so a power loss keeps the sealed segment too), then dropped from the
    // page cache: what the tier wrote is in the host cache already (WriteBackSealed).
    if (io_.drop_written_pages) sealed_to_write_back_.push_back(active_);
    {
      absl::MutexLock lock(&mu_);
      active_->sealed = true;
    }
    active_.reset();
    active_records_.clear();
  }

  // Deletes the oldest segment and forgets its entries; false when there is none.
  bool EvictOldestLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) {
    if (SegmentsLocked().empty()) return false;
    std::shared_ptr<Segment> victim = SegmentsLocked().begin()->second;
    std::vector<RecordMeta> records;
    bool scanned = false;
    if (victim == active_) {
      records = std::move(active_records_);
      active_records_.clear();
      active_.reset();
    } else {
      uint64_t valid_end;
      records = SegmentRecords(*victim, &scanned, &valid_end);
    }
    uint64_t evicted = 0;
    uint64_t evicted_bytes = 0;
    {
      absl::MutexLock lock(&mu_);
      for (const RecordMeta& r : records) {
        if (r.header.type != kEntry) continue;
        auto it = values_.find(r.key);
        if (it == values_.end()) continue;
        auto p = it->second.parts.find(r.header.part);
        if (p == it->second.parts.end() || p->second.segment != victim->id ||
            uint64_t{p->second.page} * kAlign != r.record_offset) {
          continue;
        }
        ++evicted;
        evicted_bytes += r.header.data_len;
        ErasePartLocked(it, p);
      }
      // Its index file gone bad since it was written: a scan may list fewer records than the
      // index knows of (it stops at a bad one), and none may point into the deleted file.
      if (scanned) ForgetSegmentLocked(victim->id, &evicted, &evicted_bytes);
      used_ -= victim->accounted();
      segments_.erase(victim->id);
    }
    evictions_.fetch_add(evicted, std::memory_order_relaxed);
    evicted_bytes_.fetch_add(evicted_bytes, std::memory_order_relaxed);
    unlink(PathOf(SegmentName(victim->id)).c_str());
    unlink(PathOf(IndexName(victim->id)).c_str());
    return true;
  }

  // Forgets every entry in segment `id`, counting them into `*count` and `*bytes`.
  void ForgetSegmentLocked(uint32_t id, uint64_t* count, uint64_t* bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto it = values_.begin(); it != values_.end();) {
      auto next = std::next(it);
      for (auto p = it->second.parts.begin(); p != it->second.parts.end();) {
        auto p_next = std::next(p);
        if (p->second.segment == id) {
          ++*count;
          *bytes += p->second.data_len;
          if (it->second.parts.size() == 1) {
            ErasePartLocked(it, p);
            break;
          }
          ErasePartLocked(it, p);
        }
        p = p_next;
      }
      it = next;
    }
  }

  // Erases one part; the value goes with its last part.
  void ErasePartLocked(ValueMap::iterator it, absl::flat_hash_map<uint64_t, Location>::iterator p)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    index_bytes_ -= EntryHeapBytes(it->first, it->second);
    it->second.parts.erase(p);
    --entries_;
    if (it->second.parts.empty()) {
      values_.erase(it);
    } else {
      index_bytes_ += EntryHeapBytes(it->first, it->second);
    }
  }

  void ForgetPart(absl::string_view key, uint64_t part, const Location& loc) {
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return;
    auto p = it->second.parts.find(part);
    if (p == it->second.parts.end() || p->second.segment != loc.segment ||
        p->second.page != loc.page) {
      return;
    }
    ErasePartLocked(it, p);
  }

  // Fills in the record's lengths and crc (before the append lock: writer threads compute
  // crcs in parallel).
  static void FinishRecord(RecordMeta& record, const buffer::cpu::Buffer& data) {
    RecordHeader& h = record.header;
    h.key_len = static_cast<uint32_t>(record.key.size());
    h.etag_len = static_cast<uint32_t>(record.etag.size());
    h.data_len = data.size();
    const uint32_t crc = HeaderCrc(h, record.key, record.etag);
    h.crc = Crc32cExtend(crc, data.data(), data.size());
  }

  // Appends one record (an entry with `data`, or a tombstone), evicting first so that the
  // files stay within the capacity; on success `active_` holds it at active_records_.back().
  bool AppendLocked(RecordMeta record, const buffer::cpu::Buffer& data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) {
    RecordHeader& h = record.header;  // FinishRecord'ed
    const uint64_t record_bytes = RecordBytes(h.key_len, h.etag_len, h.data_len);
    const uint64_t index_entry = IndexEntryBytes(h.key_len, h.etag_len);
    // Rotate when the record would overflow a segment that already has records.
    if (active_ != nullptr && active_->data_bytes > 0 &&
        active_->data_bytes + record_bytes > segment_bytes_) {
      SealActiveLocked();
    }
    // What this record adds to the accounted bytes: itself, and its index entry (the index
    // file's size is accounted rounded up to 4 KiB, with its header, as the segment grows).
    auto added = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) {
      const uint64_t index_now = active_ != nullptr ? active_index_raw_ : sizeof(IndexHeader);
      const uint64_t index_accounted_now = active_ != nullptr ? active_->index_bytes : 0;
      return record_bytes + AlignUp(index_now + index_entry) - index_accounted_now;
    };
    // One that could not fit even in an empty tier evicts nothing.
    if (record_bytes + AlignUp(sizeof(IndexHeader) + index_entry) > CapacityLocked()) {
      return false;
    }
    while (UsedLocked() + added() > CapacityLocked()) {
      if (!EvictOldestLocked()) break;
    }
    if (UsedLocked() + added() > CapacityLocked()) return false;
    if (active_ == nullptr) {
      const uint32_t id = next_segment_id_++;
      int fd = open(PathOf(SegmentName(id)).c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd < 0) {
        if (IsNoSpace(errno)) HandleNoSpaceLocked(record_bytes);
        return false;
      }
      auto segment = std::make_shared<Segment>(id, fd, OpenDirect(id));
      absl::MutexLock lock(&mu_);
      segments_.emplace(id, segment);
      active_ = std::move(segment);
      active_index_raw_ = sizeof(IndexHeader);
      active_records_.clear();
    }
    const uint64_t offset = active_->data_bytes;
    std::vector<iovec> iov;
    iov.push_back({&h, sizeof(h)});
    iov.push_back({record.key.data(), record.key.size()});
    iov.push_back({record.etag.data(), record.etag.size()});
    iov.push_back({const_cast<std::byte*>(data.data()), data.size()});
    static const std::vector<char> zeros(kAlign, 0);
    const uint64_t padding = record_bytes - sizeof(h) - h.key_len - h.etag_len - h.data_len;
    iov.push_back({const_cast<char*>(zeros.data()), padding});
    const int err = PwritevFull(active_->fd.get(), std::move(iov), offset);
    if (err != 0) {
      // Nothing half written stays: the next record starts where this one did.
      if (ftruncate(active_->fd.get(), static_cast<off_t>(offset)) != 0) {
        // Leave the segment: a scan at start-up cuts it at the bad record.
        SealActiveLocked();
      }
      if (IsNoSpace(err)) {
        HandleNoSpaceLocked(record_bytes);
      } else {
        Log("disk tier %s: writing %s failed: %s", options_.dir, SegmentName(active_->id),
            strerror(err));
      }
      return false;
    }
    record.record_offset = offset;
    const uint64_t before = active_->accounted();
    {
      absl::MutexLock lock(&mu_);
      active_->data_bytes += record_bytes;
      active_index_raw_ += index_entry;
      active_->index_bytes = AlignUp(active_index_raw_);
      used_ += active_->accounted() - before;
    }
    active_records_.push_back(std::move(record));
    return true;
  }

  // The filesystem is full for reasons of its own: give back a segment and shrink the
  // capacity to what the tier then holds, so the next appends evict instead of failing.
  void HandleNoSpaceLocked(uint64_t record_bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(append_mu_) {
    enospc_events_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t used_before = UsedLocked();
    const uint64_t capacity_before = CapacityLocked();
    {
      absl::MutexLock lock(&mu_);
      capacity_ = std::min(capacity_, used_);
    }
    // Give the filesystem a segment back now, unless it is the one being written (the next
    // append evicts it, as it evicts whatever the smaller capacity no longer holds).
    if (!SegmentsLocked().empty() && SegmentsLocked().begin()->second != active_) {
      EvictOldestLocked();
    }
    const uint64_t capacity = CapacityLocked();
    Log("disk tier %s: the filesystem is full (ENOSPC) writing a record of %d bytes with %d of "
        "the tier's %d bytes used; capacity now %d bytes (configured %d), %d bytes used",
        options_.dir, record_bytes, used_before, capacity_before, capacity, options_.capacity_bytes,
        UsedLocked());
  }

  void WriterLoop() {
    while (true) {
      WriteItem item;
      {
        absl::MutexLock lock(&queue_mu_);
        queue_mu_.Await(absl::Condition(
            +[](DiskTierImpl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
              return !self->queue_.empty() || self->stopping_;
            },
            this));
        if (queue_.empty()) return;  // stopping, and drained
        item = std::move(queue_.front());
        queue_.pop_front();
        ++in_flight_;
      }
      WriteOne(item);
      absl::MutexLock lock(&queue_mu_);
      queued_bytes_ -= item.bytes;
      if (--in_flight_ == 0 && queue_.empty()) recent_drops_.clear();
    }
  }

  void WriteOne(WriteItem& item) {
    RecordMeta record;
    RecordHeader& h = record.header;
    h.type = kEntry;
    h.part = item.part;
    h.generation = item.entry.generation;
    h.offset = item.entry.offset;
    h.total_size = item.entry.total_size.value_or(kNoTotal);
    h.validated_micros = ToMicros(item.entry.validated);
    record.key = item.key;
    record.etag = item.entry.etag;
    FinishRecord(record, item.entry.value);
    AppendEntry(item, std::move(record));
    WriteBackSealed();
  }

  // Segments sealed since the last call: written back and dropped from the page cache, off
  // the append lock (an fdatasync of a 64 MiB segment must not stall the appends).
  void WriteBackSealed() ABSL_LOCKS_EXCLUDED(append_mu_) {
    std::vector<std::shared_ptr<Segment>> sealed;
    {
      absl::MutexLock lock(&append_mu_);
      sealed.swap(sealed_to_write_back_);
    }
    for (const std::shared_ptr<Segment>& segment : sealed) {
      fdatasync(segment->fd.get());
      posix_fadvise(segment->fd.get(), 0, 0, POSIX_FADV_DONTNEED);
    }
  }

  void AppendEntry(const WriteItem& item, RecordMeta record) {
    absl::MutexLock append_lock(&append_mu_);
    {
      absl::MutexLock lock(&queue_mu_);
      auto it = recent_drops_.find(item.key);
      if (it != recent_drops_.end() && it->second > item.drop_seq) return;  // dropped since
    }
    if (!AppendLocked(std::move(record), item.entry.value)) {
      writes_dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    const RecordMeta& written = active_records_.back();
    {
      absl::MutexLock lock(&mu_);
      auto [it, inserted] = values_.try_emplace(item.key);
      if (!inserted) index_bytes_ -= EntryHeapBytes(it->first, it->second);
      const size_t parts_before = it->second.parts.size();
      const Generation generation_before = it->second.generation;
      ApplyRecord(values_, active_->id, written);
      if (!inserted && generation_before != item.entry.generation) {
        entries_ -= parts_before;
        entries_ += it->second.parts.size();
      } else {
        entries_ += it->second.parts.size() - parts_before;
      }
      index_bytes_ += EntryHeapBytes(it->first, it->second);
    }
    writes_.fetch_add(1, std::memory_order_relaxed);
    write_bytes_.fetch_add(item.entry.value.size(), std::memory_order_relaxed);
  }

  // Reads and checks one entry's record into a block of the allocator; nullopt when it does
  // not check out.
  std::optional<CachedValue> ReadRecord(const Segment& segment, const Location& loc,
                                        absl::string_view key, uint64_t part, Generation generation,
                                        const std::string& etag) {
    const size_t head = sizeof(RecordHeader) + key.size() + etag.size();
    if (segment.direct_fd.get() >= 0) {
      return ReadRecordDirect(segment, loc, key, part, generation, etag, head);
    }
    std::vector<char> head_bytes(head);
    buffer::cpu::MutableBuffer out;
    if (loc.data_len > 0) {
      absl::StatusOr<buffer::cpu::MutableBuffer> allocated =
          buffer::cpu::MutableBuffer::Allocate(loc.data_len, *allocator_);
      if (!allocated.ok()) return std::nullopt;
      out = *std::move(allocated);
    }
    iovec iov[2] = {{head_bytes.data(), head}, {out.data(), static_cast<size_t>(loc.data_len)}};
    const uint64_t offset = uint64_t{loc.page} * kAlign;
    const size_t want = head + loc.data_len;
    size_t got = 0;
    while (got < want) {
      // Short reads are rare (a file cut under us): retry the rest once, then give up.
      ssize_t n = preadv(segment.fd.get(), iov, 2, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0 || static_cast<size_t>(n) != want) return std::nullopt;
      got = static_cast<size_t>(n);
    }
    if (io_.drop_read_pages) {
      posix_fadvise(segment.fd.get(), static_cast<off_t>(offset),
                    static_cast<off_t>(RecordBytes(key.size(), etag.size(), loc.data_len)),
                    POSIX_FADV_DONTNEED);
    }
    const std::byte* data = out.data();
    return CheckRecord(head_bytes.data(), data, std::move(out).Freeze(), loc, key, part, generation,
                       etag);
  }

  // Checks a record read at `head` (its header, key and etag) with its data at `data`
  // against what the index says it is, and its crc; the value viewing `value` (the data's
  // bytes) when it checks out.
  static std::optional<CachedValue> CheckRecord(const char* head, const std::byte* data,
                                                buffer::cpu::Buffer value, const Location& loc,
                                                absl::string_view key, uint64_t part,
                                                Generation generation, const std::string& etag) {
    RecordHeader h;
    std::memcpy(&h, head, sizeof(h));
    const absl::string_view stored_key(head + sizeof(h), key.size());
    const absl::string_view stored_etag(head + sizeof(h) + key.size(), etag.size());
    if (h.magic != kRecordMagic || h.version != kVersion || h.type != kEntry ||
        h.key_len != key.size() || h.etag_len != etag.size() || h.part != part ||
        h.generation != generation || h.data_len != loc.data_len || stored_key != key ||
        stored_etag != etag) {
      return std::nullopt;
    }
    uint32_t crc = HeaderCrc(h, stored_key, stored_etag);
    crc = Crc32cExtend(crc, data, loc.data_len);
    if (crc != h.crc) return std::nullopt;
    CachedValue out(std::move(value), h.generation, FromMicros(h.validated_micros), etag);
    out.offset = h.offset;
    if (h.total_size != kNoTotal) out.total_size = h.total_size;
    return out;
  }

  // O_DIRECT reads the whole record (4 KiB-aligned offset and length) into 4 KiB-aligned
  // memory. An entry of 64 KiB or more is read straight into a block of the allocator with
  // room for the alignment, the header and the padding (at most 8 KiB + header more than the
  // data: 3% of a 256 KiB block), and the value views its data there: no copy. A smaller one
  // goes through a per-thread bounce buffer and is copied into a block of its exact size.
  std::optional<CachedValue> ReadRecordDirect(const Segment& segment, const Location& loc,
                                              absl::string_view key, uint64_t part,
                                              Generation generation, const std::string& etag,
                                              size_t head) {
    const uint64_t record_bytes = RecordBytes(key.size(), etag.size(), loc.data_len);
    const uint64_t offset = uint64_t{loc.page} * kAlign;
    if (loc.data_len >= kDirectIntoBlockBytes) {
      absl::StatusOr<buffer::cpu::MutableBuffer> allocated =
          buffer::cpu::MutableBuffer::Allocate(record_bytes + kAlign, *allocator_);
      if (!allocated.ok()) return std::nullopt;
      auto* base = reinterpret_cast<char*>(allocated->data());
      char* aligned = reinterpret_cast<char*>(AlignUp(reinterpret_cast<uintptr_t>(base)));
      if (!PreadFull(segment.direct_fd.get(), aligned, record_bytes, offset)) return std::nullopt;
      buffer::cpu::Buffer whole = std::move(*allocated).Freeze();
      buffer::cpu::Buffer value =
          whole.Slice(static_cast<size_t>(aligned - base) + head, loc.data_len);
      const std::byte* data = value.data();
      return CheckRecord(aligned, data, std::move(value), loc, key, part, generation, etag);
    }
    struct Free {
      void operator()(char* p) const { free(p); }
    };
    thread_local std::unique_ptr<char, Free> bounce;
    if (bounce == nullptr) {
      void* p = nullptr;
      if (posix_memalign(&p, kAlign, kBounceBytes) != 0) return std::nullopt;
      bounce.reset(static_cast<char*>(p));
    }
    if (record_bytes > kBounceBytes ||
        !PreadFull(segment.direct_fd.get(), bounce.get(), record_bytes, offset)) {
      return std::nullopt;
    }
    buffer::cpu::MutableBuffer out;
    if (loc.data_len > 0) {
      absl::StatusOr<buffer::cpu::MutableBuffer> allocated =
          buffer::cpu::MutableBuffer::Allocate(loc.data_len, *allocator_);
      if (!allocated.ok()) return std::nullopt;
      out = *std::move(allocated);
      std::memcpy(out.data(), bounce.get() + head, loc.data_len);
    }
    const std::byte* data = out.data();
    return CheckRecord(bounce.get(), data, std::move(out).Freeze(), loc, key, part, generation,
                       etag);
  }

  // The background load of what the directory held at Open.
  void LoadIndex() {
    const absl::Time start = absl::Now();
    std::vector<std::shared_ptr<Segment>> segments;
    {
      absl::ReaderMutexLock lock(&mu_);
      for (const auto& [id, segment] : segments_) {
        if (segment->sealed) segments.push_back(segment);
      }
    }
    ValueMap loaded;
    for (const std::shared_ptr<Segment>& segment : segments) {
      if (stop_loading_.load()) return;
      bool scanned;
      uint64_t valid_end;
      std::vector<RecordMeta> records = SegmentRecords(*segment, &scanned, &valid_end);
      if (scanned && !stop_loading_.load()) SealScanned(segment, valid_end, records);
      for (const RecordMeta& r : records) ApplyRecord(loaded, segment->id, r);
    }
    absl::MutexLock append_lock(&append_mu_);  // no eviction meanwhile
    absl::MutexLock lock(&mu_);
    if (values_.empty() && dropped_during_load_.empty()) {
      values_.swap(loaded);
    } else {
      for (auto& [key, v] : loaded) {
        if (dropped_during_load_.contains(key)) continue;
        auto [it, inserted] = values_.try_emplace(key);
        if (inserted) {
          it->second = std::move(v);
          continue;
        }
        // Written since Open: those are newer; older parts of the same version add to them.
        index_bytes_ -= EntryHeapBytes(it->first, it->second);
        entries_ -= it->second.parts.size();
        if (it->second.generation == v.generation) {
          for (const auto& [part, loc] : v.parts) it->second.parts.try_emplace(part, loc);
        }
        entries_ += it->second.parts.size();
        index_bytes_ += EntryHeapBytes(it->first, it->second);
      }
    }
    // Entries of segments evicted while loading are not there any more.
    uint64_t entries = 0;
    size_t heap = 0;
    for (auto it = values_.begin(); it != values_.end();) {
      auto next = std::next(it);
      auto& parts = it->second.parts;
      for (auto p = parts.begin(); p != parts.end();) {
        auto p_next = std::next(p);
        if (!segments_.contains(p->second.segment)) parts.erase(p);
        p = p_next;
      }
      if (it->second.parts.empty()) {
        values_.erase(it);
      } else {
        entries += it->second.parts.size();
        heap += EntryHeapBytes(it->first, it->second);
      }
      it = next;
    }
    entries_ = entries;
    index_bytes_ = heap;
    dropped_during_load_.clear();
    index_loaded_ = true;
    index_load_micros_ = static_cast<uint64_t>(absl::ToInt64Microseconds(absl::Now() - start));
  }

  // A segment found without a (valid) index file: cut it at its last good record and write
  // its index file, so the next start-up reads that instead.
  void SealScanned(const std::shared_ptr<Segment>& segment, uint64_t valid_end,
                   const std::vector<RecordMeta>& records) {
    absl::MutexLock append_lock(&append_mu_);
    if (!SegmentsLocked().contains(segment->id)) return;  // evicted meanwhile
    const uint64_t before = segment->accounted();
    uint64_t data_bytes = segment->data_bytes;
    if (valid_end < data_bytes) {
      Log("disk tier %s: %s ends with %d bytes that are not a whole record (a write cut short); "
          "cut there",
          options_.dir, SegmentName(segment->id), data_bytes - valid_end);
      if (ftruncate(segment->fd.get(), static_cast<off_t>(valid_end)) == 0) data_bytes = valid_end;
    }
    uint64_t index_raw = sizeof(IndexHeader);
    for (const RecordMeta& r : records) index_raw += IndexEntryBytes(r.key.size(), r.etag.size());
    absl::MutexLock lock(&mu_);
    segment->data_bytes = data_bytes;
    segment->index_bytes = AlignUp(index_raw);
    if (!WriteIndexFile(*segment, records)) segment->index_bytes = 0;
    used_ = used_ - before + segment->accounted();
  }

  const DiskTierOptions options_;
  const DiskTierIo io_;
  std::atomic<bool> direct_refused_{false};
  buffer::HostAllocator* const allocator_;
  const Fd lock_fd_;
  const uint64_t segment_bytes_;

  std::vector<std::thread> writers_;
  std::thread loader_;
  std::atomic<bool> stop_loading_{false};

  // Lock order: append_mu_, then queue_mu_ or mu_.
  // Serializes appends, evictions and seals (the log's writer side).
  absl::Mutex append_mu_ ABSL_ACQUIRED_BEFORE(mu_, queue_mu_);
  std::shared_ptr<Segment> active_ ABSL_GUARDED_BY(append_mu_);
  std::vector<RecordMeta> active_records_ ABSL_GUARDED_BY(append_mu_);
  uint64_t active_index_raw_ ABSL_GUARDED_BY(append_mu_) = 0;
  uint32_t next_segment_id_ ABSL_GUARDED_BY(append_mu_) = 1;
  std::vector<std::shared_ptr<Segment>> sealed_to_write_back_ ABSL_GUARDED_BY(append_mu_);

  // The index.
  mutable absl::Mutex mu_;
  ValueMap values_ ABSL_GUARDED_BY(mu_);
  std::map<uint32_t, std::shared_ptr<Segment>> segments_ ABSL_GUARDED_BY(mu_);
  uint64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t capacity_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t entries_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t index_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // heap beyond the maps' slots
  bool index_loaded_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t index_load_micros_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<std::string> dropped_during_load_ ABSL_GUARDED_BY(mu_);

  // The write queue.
  mutable absl::Mutex queue_mu_;
  std::deque<WriteItem> queue_ ABSL_GUARDED_BY(queue_mu_);
  uint64_t queued_bytes_ ABSL_GUARDED_BY(queue_mu_) = 0;
  size_t in_flight_ ABSL_GUARDED_BY(queue_mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  uint64_t drop_seq_ ABSL_GUARDED_BY(queue_mu_) = 0;
  absl::flat_hash_map<std::string, uint64_t> recent_drops_ ABSL_GUARDED_BY(queue_mu_);

  std::atomic<uint64_t> hits_{0}, misses_{0}, writes_{0}, write_bytes_{0}, writes_dropped_{0},
      evictions_{0}, evicted_bytes_{0}, checksum_failures_{0}, enospc_events_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options,
                                                         buffer::HostAllocator* allocator) {
  return OpenDiskTier(options, allocator, DiskTierIo());
}

absl::StatusOr<std::unique_ptr<DiskTier>> OpenDiskTier(const DiskTierOptions& options,
                                                       buffer::HostAllocator* allocator,
                                                       const DiskTierIo& io) {
  if (options.dir.empty()) return absl::InvalidArgumentError("disk tier: no directory given");
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("disk tier %s: the capacity must be more than 0 bytes", options.dir));
  }
  std::error_code ec;
  std::filesystem::create_directories(options.dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrFormat("disk tier: cannot create %s: %s", options.dir, ec.message()));
  }
  const std::string lock_path = options.dir + "/LOCK";
  int lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("disk tier: cannot open %s: %s", lock_path, strerror(errno)));
  }
  if (flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    close(lock_fd);
    return absl::FailedPreconditionError(absl::StrFormat(
        "disk tier: the directory %s is in use by another chunkd (its LOCK file is locked: %s); "
        "give each server a directory of its own",
        options.dir, strerror(err)));
  }
  auto tier = std::make_unique<DiskTierImpl>(options, allocator, lock_fd, io);
  absl::Status status = tier->Start();
  if (!status.ok()) return status;
  return tier;
}

}  // namespace chunkd::server

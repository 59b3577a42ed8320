// Best-fit allocation of extents (offset, length) inside one linear range: a shared-memory
// segment, a device segment. Free extents are indexed by offset (to coalesce neighbours on
// free) and by length (to find the smallest extent that fits). Pure bookkeeping: it never
// touches the memory it describes.
//
// Not thread-safe: the owner of the range locks around every call.
#ifndef CHUNKD_BUFFER_EXTENT_ALLOCATOR_H_
#define CHUNKD_BUFFER_EXTENT_ALLOCATOR_H_

#include <cstdint>
#include <map>
#include <optional>

namespace chunkd::buffer {

class ExtentAllocator {
 public:
  // A range of `size` bytes, all of it free.
  explicit ExtentAllocator(uint64_t size);

  // The length of the free extent Allocate(length) would carve from (the smallest that holds
  // `length` bytes), or nullopt when none does. Lets a caller pick the best of several ranges.
  std::optional<uint64_t> BestFit(uint64_t length) const;

  // Takes `length` bytes from the smallest free extent that holds them; returns their offset,
  // or nullopt when no free extent is large enough. REQUIRES: length > 0.
  std::optional<uint64_t> Allocate(uint64_t length);

  // Returns [offset, offset + length), coalescing it with free neighbours.
  // REQUIRES: the extent was handed out by Allocate with this length and not freed since.
  void Free(uint64_t offset, uint64_t length);

  uint64_t size() const { return size_; }
  uint64_t used() const { return used_; }
  bool empty() const { return used_ == 0; }
  // The largest free extent (0 when full).
  uint64_t largest_free() const;
  size_t free_extents() const { return free_by_offset_.size(); }

 private:
  void AddFree(uint64_t offset, uint64_t length);
  void EraseByLength(uint64_t length, uint64_t offset);

  const uint64_t size_;
  uint64_t used_ = 0;
  std::map<uint64_t, uint64_t> free_by_offset_;       // offset -> length
  std::multimap<uint64_t, uint64_t> free_by_length_;  // length -> offset
};

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_EXTENT_ALLOCATOR_H_

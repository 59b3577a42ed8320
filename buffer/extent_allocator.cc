#include "buffer/extent_allocator.h"

#include <iterator>

namespace chunkd::buffer {

ExtentAllocator::ExtentAllocator(uint64_t size) : size_(size) {
  if (size > 0) AddFree(0, size);
}

std::optional<uint64_t> ExtentAllocator::BestFit(uint64_t length) const {
  auto it = free_by_length_.lower_bound(length);
  if (it == free_by_length_.end()) return std::nullopt;
  return it->first;
}

std::optional<uint64_t> ExtentAllocator::Allocate(uint64_t length) {
  auto it = free_by_length_.lower_bound(length);
  if (length == 0 || it == free_by_length_.end()) return std::nullopt;
  uint64_t extent_length = it->first, extent_offset = it->second;
  free_by_length_.erase(it);
  free_by_offset_.erase(extent_offset);
  if (extent_length > length) AddFree(extent_offset + length, extent_length - length);
  used_ += length;
  return extent_offset;
}

void ExtentAllocator::Free(uint64_t offset, uint64_t length) {
  used_ -= length;
  // Coalesce with the free neighbours on both sides.
  auto next = free_by_offset_.lower_bound(offset);
  if (next != free_by_offset_.end() && next->first == offset + length) {
    EraseByLength(next->second, next->first);
    length += next->second;
    next = free_by_offset_.erase(next);
  }
  if (next != free_by_offset_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      EraseByLength(prev->second, prev->first);
      offset = prev->first;
      length += prev->second;
      free_by_offset_.erase(prev);
    }
  }
  AddFree(offset, length);
}

uint64_t ExtentAllocator::largest_free() const {
  return free_by_length_.empty() ? 0 : free_by_length_.rbegin()->first;
}

void ExtentAllocator::AddFree(uint64_t offset, uint64_t length) {
  free_by_offset_[offset] = length;
  free_by_length_.emplace(length, offset);
}

void ExtentAllocator::EraseByLength(uint64_t length, uint64_t offset) {
  auto range = free_by_length_.equal_range(length);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == offset) {
      free_by_length_.erase(it);
      return;
    }
  }
}

}  // namespace chunkd::buffer

#include "server/backend/memory/memory_backend.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/backend/list_util.h"
#include "server/common/key.h"

namespace chunkd::server {
namespace {

struct StoredValue {
  buffer::cpu::Buffer value;
  Generation generation;
};

class MemoryBackend;

class MemoryListCursor final : public ListCursor {
 public:
  MemoryListCursor(const MemoryBackend* backend, std::string prefix, bool directory)
      : backend_(backend), prefix_(std::move(prefix)), directory_(directory), next_(prefix_) {}
  absl::StatusOr<bool> Next(size_t max_items, ListPage* page) override;

 private:
  const MemoryBackend* backend_;
  const std::string prefix_;
  const bool directory_;
  std::string next_;  // the listing resumes at the first key >= next_
  bool done_ = false;
};

class MemoryBackend final : public Backend {
 public:
  explicit MemoryBackend(const BackendOptions& options)
      : allocator_(options.allocator), capacity_(options.memory_capacity_bytes) {}

  absl::string_view kind() const override { return "memory"; }
  std::string location() const override { return "memory://"; }
  bool holds_values_in_memory() const override { return true; }
  // The store is this memory: no other copy to keep fresh.
  Validation validation() const override { return Validation::kNone; }
  uint64_t memory_used_bytes() const override {
    absl::MutexLock lock(&mu_);
    return used_;
  }
  uint64_t memory_capacity_bytes() const override { return capacity_; }
  uint64_t entry_count() const override {
    absl::MutexLock lock(&mu_);
    return values_.size();
  }

  absl::StatusOr<buffer::cpu::Buffer> Read(absl::string_view key, ValueInfo* info) override {
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return KeyNotFoundError(key);
    if (info) *info = {it->second.value.size(), it->second.generation};
    return it->second.value;
  }

  // One lookup for the size and the bytes (the default's Stat then ReadRange could see two
  // versions); a slice of the stored value, no copy. ReadRange and ReadRangeIfMatch keep the
  // defaults: one Read, sliced.
  absl::StatusOr<buffer::cpu::Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                                 ValueInfo* info) override {
    ValueInfo whole;
    auto value = Read(key, &whole);
    if (!value.ok()) return value.status();
    uint64_t take = std::min<uint64_t>(length, value->size());
    if (info) *info = whole;
    return value->Slice(value->size() - take, take);
  }

  absl::StatusOr<ValueInfo> Stat(absl::string_view key) override {
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return KeyNotFoundError(key);
    return ValueInfo{it->second.value.size(), it->second.generation};
  }

  absl::StatusOr<ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                  const Conditions& conditions) override {
    // Keep values in the configured allocator's memory (a shared arena, say), copying only
    // when the caller's buffer lives elsewhere.
    if (value.kind() != allocator_->kind() && !value.empty()) {
      auto copy = buffer::cpu::MutableBuffer::Allocate(value.size(), *allocator_);
      if (!copy.ok()) return copy.status();
      std::memcpy(copy->data(), value.data(), value.size());
      value = std::move(*copy).Freeze();
    }
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    std::optional<Generation> current;
    uint64_t old_size = 0;
    if (it != values_.end()) current = it->second.generation, old_size = it->second.value.size();
    if (absl::Status s = conditions.Check(key, current); !s.ok()) return s;
    uint64_t new_used = used_ - old_size + value.size();
    if (new_used > capacity_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("key ", QuoteKey(key), ": memory store is full (", used_, " of ", capacity_,
                       " bytes used, value is ", value.size(), " bytes); nothing was changed"));
    }
    used_ = new_used;
    Generation generation = ++last_generation_;
    ValueInfo info{value.size(), generation};
    if (it != values_.end()) {
      it->second = {std::move(value), generation};
    } else {
      values_.emplace(std::string(key), StoredValue{std::move(value), generation});
    }
    return info;
  }

  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return KeyNotFoundError(key);
    if (absl::Status s = conditions.Check(key, it->second.generation); !s.ok()) return s;
    used_ -= it->second.value.size();
    values_.erase(it);
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<ListCursor>> List(absl::string_view prefix,
                                                   bool directory) override {
    return std::make_unique<MemoryListCursor>(this, std::string(prefix), directory);
  }

 private:
  friend class MemoryListCursor;

  buffer::HostAllocator* const allocator_;
  const uint64_t capacity_;
  mutable absl::Mutex mu_;
  std::map<std::string, StoredValue, std::less<>> values_ ABSL_GUARDED_BY(mu_);
  uint64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  Generation last_generation_ ABSL_GUARDED_BY(mu_) = 0;
};

absl::StatusOr<bool> MemoryListCursor::Next(size_t max_items, ListPage* page) {
  if (done_) return false;
  absl::MutexLock lock(&backend_->mu_);
  size_t added = 0;
  auto it = backend_->values_.lower_bound(next_);
  while (it != backend_->values_.end() && added < max_items) {
    const std::string& key = it->first;
    if (key.compare(0, prefix_.size(), prefix_) != 0) break;
    if (directory_) {
      absl::string_view rest = absl::string_view(key).substr(prefix_.size());
      size_t slash = rest.find('/');
      if (slash != absl::string_view::npos) {
        std::string common = key.substr(0, prefix_.size() + slash + 1);
        page->prefixes.push_back(common);
        ++added;
        // Skip every key under this prefix: the next candidate sorts after "common".
        next_ = NextPrefixAfter(common);
        it = backend_->values_.lower_bound(next_);
        continue;
      }
    }
    page->entries.push_back({key, it->second.value.size()});
    ++added;
    next_ = key + '\0';  // the smallest key after this one
    ++it;
  }
  if (it == backend_->values_.end() || it->first.compare(0, prefix_.size(), prefix_) != 0) {
    done_ = true;
    return false;
  }
  return true;
}

}  // namespace

std::unique_ptr<Backend> NewMemoryBackend(const BackendOptions& options) {
  return std::make_unique<MemoryBackend>(options);
}

}  // namespace chunkd::server

#include "server/store/prefetch.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace chunkd::server {
namespace {

constexpr size_t kMaxErrors = 10;
constexpr size_t kListPage = 1000;

}  // namespace

absl::Status Prefetch(ChunkStore& store, const std::vector<std::string>& keys,
                      const std::optional<std::string>& prefix, size_t report_every,
                      const std::function<bool(const PrefetchProgress&)>& report) {
  PrefetchProgress progress;
  size_t since_report = 0;
  const auto warm = [&](const std::string& key) {
    absl::StatusOr<CachedValue> value = store.ReadAndWait(key);
    if (value.ok()) {
      ++progress.keys_done;
      progress.bytes_loaded += value->value.size();
    } else {
      ++progress.keys_failed;
      if (progress.errors.size() < kMaxErrors) {
        progress.errors.push_back(absl::StrCat(key, ": ", value.status().message()));
      }
    }
    if (++since_report >= report_every) {
      since_report = 0;
      return report(progress);
    }
    return true;
  };
  for (const std::string& key : keys) {
    if (!warm(key)) return absl::CancelledError("prefetch cancelled");
  }
  if (prefix) {
    // Listing runs on an I/O thread of the store (it is backend I/O), one page at a time.
    absl::StatusOr<std::unique_ptr<ListCursor>> cursor;
    bool more = true;
    while (more) {
      ListPage page;
      absl::Status status;
      absl::Notification listed;
      absl::Status queued = store.Submit([&] {
        if (!cursor.ok() || *cursor == nullptr) cursor = store.List(*prefix, false);
        if (cursor.ok()) {
          absl::StatusOr<bool> next = (*cursor)->Next(kListPage, &page);
          if (next.ok()) {
            more = *next;
          } else {
            status = next.status();
          }
        } else {
          status = cursor.status();
        }
        listed.Notify();
      });
      if (!queued.ok()) return queued;
      listed.WaitForNotification();
      if (!status.ok()) return status;
      for (const ListEntry& entry : page.entries) {
        if (!warm(entry.key)) return absl::CancelledError("prefetch cancelled");
      }
    }
  }
  report(progress);
  return absl::OkStatus();
}

}  // namespace chunkd::server

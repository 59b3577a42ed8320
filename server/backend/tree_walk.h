// The listing cursor shared by the backends whose stores are directory trees (file://,
// http://): a depth-first walk over each directory's children in key order.
#ifndef CHUNKD_SERVER_BACKEND_TREE_WALK_H_
#define CHUNKD_SERVER_BACKEND_TREE_WALK_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/backend/backend.h"

namespace chunkd::server {

// A directory's child: a value or a subdirectory.
struct TreeChild {
  std::string name;
  bool is_dir = false;
  uint64_t size = 0;
  std::string sort_key;  // name, plus '/' for directories: sorts like the keys under it
};

// Lists a tree depth-first: values become entries; subdirectories become prefixes in a
// directory listing and are descended into otherwise. `Dir` is what a backend keeps of a
// directory being walked (an open descriptor; std::monostate for nothing). Subclasses read the
// directories through the two hooks.
template <typename Dir>
class TreeWalkCursor : public ListCursor {
 public:
  struct Frame {
    Dir dir;
    std::string rel;                  // key prefix of this directory: "" or "a/b/"
    std::vector<TreeChild> children;  // sorted by sort_key
    size_t next = 0;
  };

  absl::StatusOr<bool> Next(size_t max_items, ListPage* page) final {
    if (!started_) {
      started_ = true;
      size_t slash = prefix_.rfind('/');
      std::string rel = slash == std::string::npos ? "" : prefix_.substr(0, slash + 1);
      std::string filter = prefix_.substr(rel.size());
      auto frame = ReadFirst(std::move(rel), filter);
      if (!frame.ok()) return frame.status();
      if (*frame) stack_.push_back(**std::move(frame));
    }
    size_t added = 0;
    while (!stack_.empty() && added < max_items) {
      Frame& top = stack_.back();
      if (top.next == top.children.size()) {
        stack_.pop_back();
        continue;
      }
      const TreeChild& child = top.children[top.next++];
      std::string key = top.rel + child.name;
      if (!child.is_dir) {
        page->entries.push_back({std::move(key), child.size});
        ++added;
      } else if (directory_) {
        page->prefixes.push_back(key + "/");
        ++added;
      } else {
        auto frame = ReadChild(top, child, key + "/");
        if (!frame.ok()) return frame.status();
        if (*frame) stack_.push_back(**std::move(frame));  // `top` is invalid from here on
      }
    }
    return !stack_.empty();
  }

 protected:
  TreeWalkCursor(std::string prefix, bool directory)
      : prefix_(std::move(prefix)), directory_(directory) {}

  const std::string& prefix() const { return prefix_; }

  // The directory `rel` ("" or "a/b/") that holds the listing's prefix, with only the children
  // whose sort_key starts with `name_filter`; nullopt when there is nothing to list.
  virtual absl::StatusOr<std::optional<Frame>> ReadFirst(std::string rel,
                                                         absl::string_view name_filter) = 0;
  // Subdirectory `child` of `parent`, whose key prefix is `rel` ("a/b/"); nullopt to skip it
  // (e.g. removed meanwhile).
  virtual absl::StatusOr<std::optional<Frame>> ReadChild(const Frame& parent,
                                                         const TreeChild& child,
                                                         std::string rel) = 0;

 private:
  const std::string prefix_;
  const bool directory_;
  bool started_ = false;
  std::vector<Frame> stack_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_TREE_WALK_H_

#include "buffer/shm_import.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace chunkd::buffer {
namespace {
constexpr size_t kMaxIdleMappings = 64;
}  // namespace

struct ShmImporter::Mapping {
  std::byte* base = nullptr;
  uint64_t size = 0;
  // The file mapped: a segment recreated under the same name (a restarted server with the same
  // pid, as in a container) is another file, and must be mapped afresh.
  dev_t dev = 0;
  ino_t ino = 0;
  ~Mapping() {
    if (base != nullptr) ::munmap(base, size);
  }
};

class ShmImporter::ImportedBlock final : public Block {
 public:
  ImportedBlock(std::shared_ptr<Mapping> mapping, uint64_t offset, uint64_t length,
                std::function<void()> on_release)
      : Block(mapping->base + offset, length, MemoryKind::kHostShared),
        mapping_(std::move(mapping)),
        on_release_(std::move(on_release)) {}
  ~ImportedBlock() override {
    if (on_release_) on_release_();
  }

 private:
  std::shared_ptr<Mapping> mapping_;
  std::function<void()> on_release_;
};

ShmImporter::ShmImporter(std::string directory) : directory_(std::move(directory)) {}
ShmImporter::~ShmImporter() = default;

absl::StatusOr<cpu::Buffer> ShmImporter::Import(const std::string& segment, uint64_t segment_size,
                                                uint64_t offset, uint64_t length,
                                                std::function<void()> on_release) {
  if (segment.empty() || segment.find('/') != std::string::npos || segment[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat("bad segment name '", segment, "'"));
  }
  if (offset > segment_size || length > segment_size - offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk [", offset, ", +", length, ") lies outside segment ", segment));
  }
  std::shared_ptr<Mapping> mapping;
  std::string path = directory_ + "/" + segment;
  struct stat now;
  if (::lstat(path.c_str(), &now) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot open shared-memory segment ", path, ": ", std::strerror(errno)));
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = mappings_.find(segment);
    if (it != mappings_.end()) mapping = it->second;
    if (mapping == nullptr || mapping->size != segment_size || mapping->dev != now.st_dev ||
        mapping->ino != now.st_ino) {
      int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
      if (fd < 0) {
        return absl::UnavailableError(
            absl::StrCat("cannot open shared-memory segment ", path, ": ", std::strerror(errno)));
      }
      struct stat st;
      if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < segment_size) {
        ::close(fd);
        return absl::UnavailableError(absl::StrCat("segment ", path, " is smaller than reported"));
      }
      void* base = ::mmap(nullptr, segment_size, PROT_READ, MAP_SHARED, fd, 0);
      ::close(fd);
      if (base == MAP_FAILED) {
        return absl::UnavailableError(
            absl::StrCat("cannot map segment ", path, ": ", std::strerror(errno)));
      }
      mapping = std::make_shared<Mapping>();
      mapping->base = static_cast<std::byte*>(base);
      mapping->size = segment_size;
      mapping->dev = st.st_dev;
      mapping->ino = st.st_ino;
      if (mappings_.size() >= kMaxIdleMappings) {
        for (auto i = mappings_.begin(); i != mappings_.end();) {
          if (i->second.use_count() == 1) {
            mappings_.erase(i++);
          } else {
            ++i;
          }
        }
      }
      mappings_[segment] = mapping;
    }
  }
  return cpu::Buffer(
      std::make_shared<ImportedBlock>(std::move(mapping), offset, length, std::move(on_release)));
}

size_t ShmImporter::mapped_segments() const {
  absl::MutexLock lock(&mu_);
  return mappings_.size();
}

}  // namespace chunkd::buffer

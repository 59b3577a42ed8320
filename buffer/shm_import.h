// The client side of shared-memory delivery: maps segments read-only, once per process, and
// hands out buffers that view a chunk inside a mapping.
#ifndef CHUNKD_BUFFER_SHM_IMPORT_H_
#define CHUNKD_BUFFER_SHM_IMPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "buffer/cpu/buffer.h"

namespace chunkd::buffer {

class ShmImporter {
 public:
  // Segments are looked up in `directory` (the client's view of the server's shm directory).
  explicit ShmImporter(std::string directory = "/dev/shm");
  ~ShmImporter();

  // A read-only buffer over [offset, offset + length) of segment `segment` (`segment_size`
  // bytes, as the server reported). `on_release` runs once the buffer and every copy and
  // slice of it are gone (the lease is returned then). Each segment is mapped once and the
  // mapping shared by every buffer of it.
  absl::StatusOr<cpu::Buffer> Import(const std::string& segment, uint64_t segment_size,
                                     uint64_t offset, uint64_t length,
                                     std::function<void()> on_release);

  size_t mapped_segments() const;

 private:
  struct Mapping;
  class ImportedBlock;

  const std::string directory_;
  mutable absl::Mutex mu_;
  // Mappings stay for reuse (mapping a segment and faulting its pages in costs more than
  // the read that follows); past kMaxIdleMappings, the ones no buffer uses are dropped.
  absl::flat_hash_map<std::string, std::shared_ptr<Mapping>> mappings_ ABSL_GUARDED_BY(mu_);
};

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_SHM_IMPORT_H_

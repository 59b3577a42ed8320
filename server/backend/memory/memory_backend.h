// memory:// — no backing store: the values live in memory and are the store of record.
// Never evicted; a write that does not fit the budget fails with RESOURCE_EXHAUSTED and
// nothing already stored is lost.
#ifndef CHUNKD_SERVER_BACKEND_MEMORY_MEMORY_BACKEND_H_
#define CHUNKD_SERVER_BACKEND_MEMORY_MEMORY_BACKEND_H_

#include <memory>

#include "server/backend/backend.h"

namespace chunkd::server {

std::unique_ptr<Backend> NewMemoryBackend(const BackendOptions& options);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_BACKEND_MEMORY_MEMORY_BACKEND_H_

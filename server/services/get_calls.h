// chunkd.v1's reads, each in its file: Get (get_call.cc: one value or range, streamed inline
// part by part and block by block, or one handle) and GetMany (get_many_call.cc: a batch of
// items, read ahead within a window and packed into messages). What each reply is delivered as
// is delivery.h's.
#ifndef CHUNKD_SERVER_SERVICES_GET_CALLS_H_
#define CHUNKD_SERVER_SERVICES_GET_CALLS_H_

#include "server/rpc/rpc_engine.h"

namespace chunkd::server {

class ChunkdService;

// The call objects of the Get and GetMany methods of `service` (for rpc::Engine::AddMethod).
rpc::Engine::Spawner GetCallSpawner(ChunkdService* service);
rpc::Engine::Spawner GetManyCallSpawner(ChunkdService* service);

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_GET_CALLS_H_

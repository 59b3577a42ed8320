// The client's side of the leases on handle deliveries (shared memory, CUDA IPC): imports
// the handles of replies into buffers that hold their leases, keeps those leases alive, and
// returns them to the server when the buffers go. Internal to the client library (client.cc
// makes one per Client); the behaviour it gives callers is documented in client.h.
#ifndef CHUNKD_CLIENT_LEASE_KEEPER_H_
#define CHUNKD_CLIENT_LEASE_KEEPER_H_

#include <cstddef>
#include <memory>
#include <string>

#include "client/replies.h"
#include "grpcpp/channel.h"

namespace chunkd::client {

// Returns the leases of dropped handle buffers to the server in batches, and keeps the leases
// of buffers still alive (and of handles announced but not imported yet) alive. The client
// and every handle buffer share it, so a buffer that outlives its client still returns its
// lease.
//
// Two kinds of lease (v1::Lease.process_bound):
// - A lease that follows this process (a UNIX-socket connection: the server watches the
//   process the kernel names) cannot lapse while the process lives: nothing to renew.
// - Any other lease lives for a TTL from its grant or last renewal. It is tracked from the
//   moment its reply's header arrives (Announce), not when the whole reply is in, and renewed
//   a few times per TTL on a thread of its own, apart from the releases (which may block for
//   their deadline); the server's answer is read, and a lease it no longer knows is lost.
//   Before a buffer is handed out, Import checks that its lease is known to be alive (renewed
//   or granted less than a TTL ago, counting from the call's start, which is before the
//   grant); one that is not is renewed there and then, and if the server no longer knows it
//   the item fails with UNAVAILABLE ("read it again"; Get retries) instead of handing out
//   memory that may hold another chunk's bytes by now.
//
// Fork: a child process inherits the keeper's memory but not its threads, and the leases stay
// its parent's. Buffers dropped in a child release nothing (Drop checks the process id), and a
// keeper destroyed in a child is left as it is (its threads and channel are the parent's).
class LeaseKeeper : public HandleImporter {
 public:
  // Leases held (buffers alive, handles announced and not dropped).
  virtual size_t held() const = 0;
  // Sends pending releases now and waits for the server's answer, and for the batch the
  // keeper's thread may be sending; false if a call failed.
  virtual bool Flush() = 0;
  // The process is exiting: every lease still held goes back now, in one call with a short
  // deadline, rather than pinning the server's memory for a TTL (ReleaseLeasesAtExit).
  virtual void ReleaseAllAtExit() = 0;
};

// A keeper whose calls (Renew, Release) go over `channel`, mapping segments of `shm_dir`; it
// starts its two threads now. Registered for ReleaseLeasesAtExit (client.h) while it lives.
std::shared_ptr<LeaseKeeper> NewLeaseKeeper(std::shared_ptr<grpc::Channel> channel,
                                            const std::string& shm_dir);

}  // namespace chunkd::client

#endif  // CHUNKD_CLIENT_LEASE_KEEPER_H_

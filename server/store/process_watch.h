// The client processes behind the server's UNIX-socket connections, and their lives.
//
// A same-host client's leases follow its process (server/store/lease_table.h): the server
// accepts UNIX-socket connections itself (server/daemon/unix_listener.h), asks the kernel which
// process connected (SO_PEERCRED, and a pidfd: SO_PEERPIDFD, or pidfd_open), and hands the
// connection to gRPC, which names the call's peer "fd:N". This class keeps, per connection,
// the process the kernel named, and watches each process's pidfd: when it exits, its
// ProcessLife says so, and its leases then expire after one TTL. Nothing here trusts what a
// client states about itself.
//
// Thread-safe.
#ifndef CHUNKD_SERVER_STORE_PROCESS_WATCH_H_
#define CHUNKD_SERVER_STORE_PROCESS_WATCH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/store/lease_table.h"

namespace chunkd::server {

// The process at the other end of a connection, as the kernel named it.
struct PeerProcess {
  int64_t pid = 0;  // in the server's PID namespace
  // Set when the server watches the process (it has a pidfd of it); null when the process is
  // in a PID namespace the server cannot see or the kernel gave no pidfd.
  std::shared_ptr<const ProcessLife> life;
};

class ProcessWatch {
 public:
  // Starts the watching thread.
  ProcessWatch();
  // Stops it; closes every pidfd.
  ~ProcessWatch();
  ProcessWatch(const ProcessWatch&) = delete;
  ProcessWatch& operator=(const ProcessWatch&) = delete;

  // The connection on file descriptor `fd` (gRPC's peer "fd:FD") comes from process `pid`
  // (SO_PEERCRED), of which `pidfd` is a pidfd (owned from now on; -1: none). A new connection
  // on a reused descriptor replaces the old one's entry: gRPC closes a connection's descriptor
  // only once every call on it has ended.
  void AddConnection(int fd, int64_t pid, int pidfd);
  // The process of a call whose peer is `peer` ("fd:N"); nullopt for any other peer.
  std::optional<PeerProcess> OfPeer(absl::string_view peer) const;
  // Processes watched now (alive).
  size_t watched() const;

 private:
  void Loop();
  void Wake();
  // Whether a watched process has exited (its pidfd is readable), noticed or not.
  bool ExitedLocked(const std::shared_ptr<ProcessLife>& life) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks it exited, closes its pidfd and forgets it.
  void MarkExitedLocked(absl::flat_hash_map<int64_t, std::shared_ptr<ProcessLife>>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, PeerProcess> by_fd_ ABSL_GUARDED_BY(mu_);
  // Living processes by pid, each watched once however many connections it has.
  absl::flat_hash_map<int64_t, std::shared_ptr<ProcessLife>> by_pid_ ABSL_GUARDED_BY(mu_);
  // pidfd -> pid, of the processes in by_pid_.
  absl::flat_hash_map<int, int64_t> pidfds_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int wake_fd_ = -1;  // an eventfd: the watcher polls it beside the pidfds
  std::thread thread_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_STORE_PROCESS_WATCH_H_

// A UNIX-socket listener that accepts connections itself, so that the server knows which
// process is at the other end of each one.
//
// gRPC 1.51 tells a call nothing about its connection's socket: a UNIX peer is "unix:" for
// every client, ServerContext::auth_context() has no peer credentials, and its server
// interceptors see no file descriptor. So the server accepts on its UNIX sockets here, asks the
// kernel who connected (SO_PEERCRED; a pidfd from SO_PEERPIDFD, Linux 6.5, else pidfd_open),
// records it in a ProcessWatch (server/store/process_watch.h) and gives the connection to
// gRPC (grpc::AddInsecureChannelFromFd), whose calls on it have the peer "fd:N". The leases of
// such a client then follow its process, and its per-client caps count the process the kernel
// named, not the one it states.
#ifndef CHUNKD_SERVER_DAEMON_UNIX_LISTENER_H_
#define CHUNKD_SERVER_DAEMON_UNIX_LISTENER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "grpcpp/server.h"
#include "server/store/process_watch.h"

namespace chunkd::server {

class UnixListener {
 public:
  // Binds and listens on `path` (a stale socket file must be gone already). The socket file is
  // created owner-only; its mode and group are set later (ServerSecurity::Started).
  static absl::StatusOr<std::unique_ptr<UnixListener>> Bind(const std::string& path);
  // Stops accepting and removes the socket file.
  ~UnixListener();

  // Accepts connections from now on, on a thread of its own, and hands them to `server`.
  // REQUIRES: `server` is started and outlives Stop(); `watch` outlives the listener.
  void Start(grpc::Server* server, ProcessWatch* watch);
  // Stops accepting (connections accepted already go on). Idempotent.
  void Stop();

 private:
  UnixListener(std::string path, int fd, int wake_fd)
      : path_(std::move(path)), fd_(fd), wake_fd_(wake_fd) {}
  void Loop(grpc::Server* server, ProcessWatch* watch);

  const std::string path_;
  const int fd_;
  const int wake_fd_;
  std::thread thread_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_DAEMON_UNIX_LISTENER_H_

#include "server/daemon/unix_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "grpcpp/server_posix.h"
#include "server/common/log.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77  // Linux 6.5
#endif

namespace chunkd::server {
namespace {

// A pidfd of the process that connected on `fd`, or -1. SO_PEERPIDFD names the very process
// that connected; on older kernels pidfd_open of SO_PEERCRED's pid, which is only that process
// if it has not exited since (its pid could then be another's): checked by the connection
// being still open, as a process that exits closes its end.
int PeerPidfd(int fd, pid_t pid) {
  int pidfd = -1;
  socklen_t len = sizeof(pidfd);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 && pidfd >= 0) return pidfd;
  if (pid <= 0) return -1;
  pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return -1;
  pollfd p{fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
    ::close(pidfd);
    return -1;
  }
  return pidfd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Bind(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot listen on unix:", path,
                                                   ": the path is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  // Owner-only until ServerSecurity::Started gives the file its group and mode.
  mode_t old = ::umask(0177);
  int bound = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  ::umask(old);
  if (bound != 0 || ::listen(fd, SOMAXCONN) != 0) {
    if (bound == 0) err = errno;
    ::close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen on unix:", path, ": ", std::strerror(err)));
  }
  int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return std::unique_ptr<UnixListener>(new UnixListener(path, fd, wake));
}

UnixListener::~UnixListener() {
  Stop();
  ::close(fd_);
  ::close(wake_fd_);
  ::unlink(path_.c_str());
}

void UnixListener::Start(grpc::Server* server, ProcessWatch* watch) {
  thread_ = std::thread([this, server, watch] { Loop(server, watch); });
}

void UnixListener::Stop() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
  thread_.join();
}

void UnixListener::Loop(grpc::Server* server, ProcessWatch* watch) {
  for (;;) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Log("unix:%s: poll: %s; no longer accepting", path_, std::strerror(errno));
      return;
    }
    if (fds[1].revents & POLLIN) return;
    for (;;) {
      int conn = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (conn < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          // Out of descriptors, say: wait a little instead of spinning.
          Log("unix:%s: accept: %s", path_, std::strerror(errno));
          ::poll(nullptr, 0, 100);
        }
        break;
      }
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) cred.pid = 0;
      // Recorded before gRPC can start a call on the connection.
      watch->AddConnection(conn, cred.pid, PeerPidfd(conn, cred.pid));
      grpc::AddInsecureChannelFromFd(server, conn);
    }
  }
}

}  // namespace chunkd::server

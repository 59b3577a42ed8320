#include "server/store/process_watch.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"

namespace chunkd::server {

ProcessWatch::ProcessWatch() {
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  thread_ = std::thread([this] { Loop(); });
}

ProcessWatch::~ProcessWatch() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  Wake();
  thread_.join();
  absl::MutexLock lock(&mu_);
  for (const auto& [pidfd, pid] : pidfds_) ::close(pidfd);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void ProcessWatch::Wake() {
  uint64_t one = 1;
  if (wake_fd_ >= 0) (void)!::write(wake_fd_, &one, sizeof(one));
}

void ProcessWatch::AddConnection(int fd, int64_t pid, int pidfd) {
  {
    absl::MutexLock lock(&mu_);
    PeerProcess peer{pid, nullptr};
    if (pid > 0) {
      auto it = by_pid_.find(pid);
      if (it != by_pid_.end() && ExitedLocked(it->second)) {
        // Gone before the watcher noticed, and its pid reused already: a new process.
        MarkExitedLocked(it);
        it = by_pid_.end();
      }
      if (it != by_pid_.end()) {
        peer.life = it->second;  // watched already, through another connection
        if (pidfd >= 0) ::close(pidfd);
      } else if (pidfd >= 0) {
        auto life = std::make_shared<ProcessLife>(pid);
        by_pid_[pid] = life;
        pidfds_[pidfd] = pid;
        peer.life = std::move(life);
      }
    } else if (pidfd >= 0) {
      ::close(pidfd);
    }
    by_fd_[fd] = std::move(peer);
  }
  Wake();
}

std::optional<PeerProcess> ProcessWatch::OfPeer(absl::string_view peer) const {
  int fd;
  if (!absl::ConsumePrefix(&peer, "fd:") || !absl::SimpleAtoi(peer, &fd)) return std::nullopt;
  absl::MutexLock lock(&mu_);
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return std::nullopt;
  return it->second;
}

size_t ProcessWatch::watched() const {
  absl::MutexLock lock(&mu_);
  return pidfds_.size();
}

void ProcessWatch::Loop() {
  std::vector<pollfd> fds;
  for (;;) {
    fds.clear();
    fds.push_back(pollfd{wake_fd_, POLLIN, 0});
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      for (const auto& [pidfd, pid] : pidfds_) fds.push_back(pollfd{pidfd, POLLIN, 0});
    }
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) return;
    if (fds[0].revents & POLLIN) {
      uint64_t n;
      (void)!::read(wake_fd_, &n, sizeof(n));
    }
    absl::MutexLock lock(&mu_);
    for (size_t i = 1; i < fds.size(); ++i) {
      // A pidfd turns readable when its process has exited.
      if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) == 0) continue;
      auto it = pidfds_.find(fds[i].fd);
      if (it == pidfds_.end()) continue;
      // Asked again: the descriptor polled may have been closed meanwhile (AddConnection found
      // its process gone) and its number reused for another process's pidfd.
      pollfd again{it->first, POLLIN, 0};
      if (::poll(&again, 1, 0) <= 0) continue;
      auto life = by_pid_.find(it->second);
      if (life != by_pid_.end()) {
        MarkExitedLocked(life);
      } else {
        ::close(it->first);
        pidfds_.erase(it);
      }
    }
  }
}

bool ProcessWatch::ExitedLocked(const std::shared_ptr<ProcessLife>& life) const {
  for (const auto& [pidfd, pid] : pidfds_) {
    if (pid != life->pid()) continue;
    pollfd p{pidfd, POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }
  return true;
}

void ProcessWatch::MarkExitedLocked(
    absl::flat_hash_map<int64_t, std::shared_ptr<ProcessLife>>::iterator it) {
  it->second->MarkExited();
  for (auto fd = pidfds_.begin(); fd != pidfds_.end(); ++fd) {
    if (fd->second == it->first) {
      ::close(fd->first);
      pidfds_.erase(fd);
      break;
    }
  }
  by_pid_.erase(it);
}

}  // namespace chunkd::server

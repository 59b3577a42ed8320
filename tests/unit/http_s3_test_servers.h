// Real servers on loopback for the tests of the remote backends (http://, s3://): nginx serving
// a directory, moto's S3 server, and a tiny scriptable HTTP server for faults (refusal,
// silence, 500s, truncated bodies). Each is started and stopped by the test that needs it;
// children die with the test process (PR_SET_PDEATHSIG).
#ifndef CHUNKD_TESTS_UNIT_HTTP_S3_TEST_SERVERS_H_
#define CHUNKD_TESTS_UNIT_HTTP_S3_TEST_SERVERS_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/support/test_support.h"

namespace chunkd::testing {

// The repository root (this header lives in tests/unit/).
// (From CMake, not __FILE__: compiler caches rewrite source paths to relative ones.)
inline std::string SourceRoot() { return CHUNKD_SOURCE_DIR; }

// A TCP port on 127.0.0.1 that was free a moment ago.
inline int FreeLoopbackPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

inline bool PortAccepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

// A child process whose standard output and error go to `log_path`; killed (SIGTERM, then
// SIGKILL) on destruction, and by the kernel if the test process dies first.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::string& log_path,
               const std::vector<std::pair<std::string, std::string>>& env = {}) {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int out = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      ::dup2(out, STDOUT_FILENO);
      ::dup2(out, STDERR_FILENO);
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      std::vector<std::string> copy = argv;
      std::vector<char*> cargv;
      for (std::string& a : copy) cargv.push_back(a.data());
      cargv.push_back(nullptr);
      ::execv(cargv[0], cargv.data());
      std::_Exit(127);
    }
  }
  ~ChildProcess() { Stop(); }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool Running() {
    if (pid_ <= 0) return false;
    int status;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }
  void Stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
    ::kill(pid_, SIGKILL);
    int status;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

// Waits until `port` accepts connections while `child` runs.
inline absl::Status WaitForPort(ChildProcess& child, int port, absl::Duration timeout,
                                const std::string& log_path) {
  absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (PortAccepts(port)) return absl::OkStatus();
    if (!child.Running()) {
      return absl::UnavailableError(absl::StrCat("the server exited early: ", ReadFile(log_path)));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("port ", port, " did not open in time: ", ReadFile(log_path)));
}

// `text` as a Python string literal (ASCII only).
inline std::string PyString(const std::string& text) {
  std::string out = "'";
  for (char c : text) {
    if (c == '\'' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out + "'";
}

inline std::string FindExecutable(const std::vector<std::string>& candidates) {
  for (const std::string& c : candidates) {
    if (!c.empty() && ::access(c.c_str(), X_OK) == 0) return c;
  }
  return "";
}

// nginx (Debian's) serving `root` on 127.0.0.1:PORT, in the foreground, as the current user,
// with its configuration, pid file, logs and temporary files in a directory of its own; JSON
// directory indexes on (autoindex_format json). `extra` is added to the server block.
class NginxServer {
 public:
  static std::string Binary() {
    if (const char* env = std::getenv("CHUNKD_NGINX")) return env;
    return FindExecutable({"/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"});
  }

  static absl::StatusOr<std::unique_ptr<NginxServer>> Start(const std::string& root,
                                                            const std::string& extra = "") {
    std::string binary = Binary();
    if (binary.empty()) return absl::NotFoundError("nginx is not installed");
    absl::Status last;
    for (int attempt = 0; attempt < 5; ++attempt) {
      auto server = std::unique_ptr<NginxServer>(new NginxServer());
      server->port_ = FreeLoopbackPort();
      const std::string& d = server->dir_.path();
      std::string conf = absl::StrCat(
          "daemon off;\nmaster_process off;\nworker_processes 1;\n", "pid ", d, "/nginx.pid;\n",
          "error_log ", d, "/error.log warn;\n", "events { worker_connections 256; }\n",
          "http {\n  access_log off;\n  default_type application/octet-stream;\n",
          "  client_body_temp_path ", d, "/body;\n  proxy_temp_path ", d, "/proxy;\n",
          "  fastcgi_temp_path ", d, "/fastcgi;\n  uwsgi_temp_path ", d, "/uwsgi;\n",
          "  scgi_temp_path ", d, "/scgi;\n", "  server {\n    listen 127.0.0.1:", server->port_,
          ";\n    root ", root, ";\n    autoindex on;\n    autoindex_format json;\n", extra,
          "  }\n}\n");
      WriteFile(d + "/nginx.conf", conf);
      std::string log = d + "/stdout.log";
      server->process_ =
          std::make_unique<ChildProcess>(std::vector<std::string>{binary, "-e", d + "/error.log",
                                                                  "-p", d, "-c", d + "/nginx.conf"},
                                         log);
      last = WaitForPort(*server->process_, server->port_, absl::Seconds(10), log);
      if (last.ok()) return server;
      last = absl::Status(last.code(), absl::StrCat(last.message(), ReadFile(d + "/error.log")));
    }
    return last;
  }

  std::string url() const { return absl::StrCat("http://127.0.0.1:", port_); }
  int port() const { return port_; }
  void Stop() { process_->Stop(); }

 private:
  NginxServer() = default;
  TempDir dir_;
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
};

// Test credentials that moto accepts; the backends read them from the environment.
inline void SetTestAwsCredentials() {
  ::setenv("AWS_ACCESS_KEY_ID", "testing", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
  ::unsetenv("AWS_SESSION_TOKEN");
  ::unsetenv("AWS_PROFILE");
}

// moto's S3 server (the repository's .venv, or $CHUNKD_MOTO_SERVER) on 127.0.0.1:PORT.
class MotoServer {
 public:
  static std::string Binary() {
    if (const char* env = std::getenv("CHUNKD_MOTO_SERVER")) return env;
    return FindExecutable({SourceRoot() + "/.venv/bin/moto_server"});
  }

  static absl::StatusOr<std::unique_ptr<MotoServer>> Start() {
    std::string binary = Binary();
    if (binary.empty()) {
      return absl::NotFoundError(
          "moto_server is not installed (deploy/scripts/setup-venv.sh installs it into .venv)");
    }
    absl::Status last;
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto server = std::unique_ptr<MotoServer>(new MotoServer());
      server->port_ = FreeLoopbackPort();
      std::string log = server->dir_.Join("moto.log");
      server->process_ = std::make_unique<ChildProcess>(
          std::vector<std::string>{binary, "-H", "127.0.0.1", "-p", std::to_string(server->port_)},
          log);
      last = WaitForPort(*server->process_, server->port_, absl::Seconds(60), log);
      if (last.ok()) return server;
    }
    return last;
  }

  // The endpoint for --s3_endpoint.
  std::string endpoint() const { return absl::StrCat("http://127.0.0.1:", port_); }
  int port() const { return port_; }

  // Creates `bucket` (no error when it exists already), with boto3 from the same environment.
  absl::Status CreateBucket(const std::string& bucket) {
    return Boto(absl::StrCat("try:\n    s3.create_bucket(Bucket='", bucket,
                             "')\nexcept s3.exceptions.BucketAlreadyOwnedByYou:\n    pass\n"));
  }

  // Puts an object directly (as another writer would), without chunkd's metadata.
  absl::Status PutObject(const std::string& bucket, const std::string& key,
                         const std::string& value) {
    return Boto(absl::StrCat("s3.put_object(Bucket='", bucket, "', Key=", PyString(key),
                             ", Body=", PyString(value), ".encode())\n"));
  }

  // Runs Python `code` with `s3`, a boto3 client of this server.
  absl::Status Boto(const std::string& code) {
    std::string python = Binary();
    python = python.substr(0, python.rfind('/') + 1) + "python";
    std::string script =
        absl::StrCat("import boto3\ns3 = boto3.client('s3', endpoint_url='", endpoint(),
                     "', region_name='us-east-1', aws_access_key_id='testing', "
                     "aws_secret_access_key='testing')\n",
                     code);
    CommandResult r = RunCommand({python, "-c", script});
    if (r.exit_code != 0) {
      return absl::InternalError(absl::StrCat("boto3 failed: ", r.err, r.out));
    }
    return absl::OkStatus();
  }

  void Stop() { process_->Stop(); }

 private:
  MotoServer() = default;
  TempDir dir_;
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
};

// A tiny HTTP/1.1 server on loopback, one thread per connection, that answers every request
// with what `handler` returns for it. Handlers may script faults: never answer, close early,
// announce a longer body than they send.
class ScriptedHttpServer {
 public:
  struct Reply {
    std::string bytes;  // written as is (status line, headers, body)
    bool hang = false;  // write nothing and keep the connection open until Stop()
    bool close = true;  // close the connection after writing
  };
  using Handler = std::function<Reply(const std::string& request, int n)>;

  // Standard replies.
  static Reply Status(int code, const std::string& body = "", const std::string& extra = "") {
    return {absl::StrCat("HTTP/1.1 ", code, " X\r\nContent-Length: ", body.size(),
                         "\r\nConnection: close\r\n", extra, "\r\n", body)};
  }

  explicit ScriptedHttpServer(Handler handler) : handler_(std::move(handler)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    socklen_t len = sizeof(addr);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    ::listen(listen_fd_, 64);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~ScriptedHttpServer() { Stop(); }

  std::string url() const { return absl::StrCat("http://127.0.0.1:", port_); }
  int requests() const { return requests_.load(); }
  int connections() const { return connections_.load(); }

  void Stop() {
    if (stopped_.exchange(true)) return;
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    ::close(listen_fd_);
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

 private:
  void AcceptLoop() {
    while (!stopped_.load()) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      connections_.fetch_add(1);
      std::lock_guard<std::mutex> lock(mu_);
      open_fds_.push_back(fd);
      threads_.emplace_back([this, fd] { Serve(fd); });
    }
  }

  void Serve(int fd) {
    std::string buffered;
    char chunk[4096];
    bool open = true;
    while (open && !stopped_.load()) {
      size_t end;
      while ((end = buffered.find("\r\n\r\n")) == std::string::npos) {
        ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
        if (n <= 0) {
          open = false;
          break;
        }
        buffered.append(chunk, static_cast<size_t>(n));
      }
      if (!open) break;
      std::string request = buffered.substr(0, end + 4);
      buffered.erase(0, end + 4);
      // Skip a request body announced by Content-Length.
      std::string lower = request;
      for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      size_t cl = lower.find("content-length:");
      if (cl != std::string::npos) {
        size_t body = std::strtoull(lower.c_str() + cl + 15, nullptr, 10);
        while (buffered.size() < body) {
          ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
          if (n <= 0) break;
          buffered.append(chunk, static_cast<size_t>(n));
        }
        buffered.erase(0, std::min(body, buffered.size()));
      }
      int n = requests_.fetch_add(1) + 1;
      Reply reply = handler_(request, n);
      if (reply.hang) {
        while (!stopped_.load()) {
          pollfd p{fd, POLLIN, 0};
          if (::poll(&p, 1, 50) > 0) {
            if (::recv(fd, chunk, sizeof(chunk), 0) <= 0) break;
          }
        }
        break;
      }
      size_t done = 0;
      while (done < reply.bytes.size()) {
        ssize_t w = ::send(fd, reply.bytes.data() + done, reply.bytes.size() - done, MSG_NOSIGNAL);
        if (w <= 0) break;
        done += static_cast<size_t>(w);
      }
      if (reply.close) break;
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = open_fds_.begin(); it != open_fds_.end(); ++it) {
      if (*it == fd) {
        open_fds_.erase(it);
        break;
      }
    }
    ::close(fd);
  }

  Handler handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopped_{false};
  std::atomic<int> requests_{0};
  std::atomic<int> connections_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<int> open_fds_;
  std::vector<std::thread> threads_;
};

// Writes `value` at `root`/`key` the way a deploy would: a temporary file (hidden: its name
// starts with '.') renamed into place, directories created as needed.
inline absl::Status WriteFileUnder(const std::string& root, const std::string& key,
                                   const std::string& value) {
  std::filesystem::path path = std::filesystem::path(root) / key;
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("mkdir ", path.parent_path().string(), ": ", ec.message()));
  static std::atomic<int> counter{0};
  std::filesystem::path temp =
      path.parent_path() / absl::StrCat(".seed-", ::getpid(), "-", counter.fetch_add(1));
  WriteFile(temp.string(), value);
  std::filesystem::rename(temp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("rename to ", path.string(), ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_UNIT_HTTP_S3_TEST_SERVERS_H_
